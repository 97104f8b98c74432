"""Figures of the vector selection (paper Figures 3-9, plus selection churn), from a recorded run directory.

Every function takes a `vblora.train.selection.Selection` (see `load_selection`) and a PNG path, draws with the
headless Agg backend, and returns the path. `plot_all(run_dir)` writes them all. Bank vectors are indexed by their
bank row; Figures 6 and 7 sort them by the norm of the final bank, as the paper does.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from vblora.errors import VBLoRAError
from vblora.train.selection import Selection, load_selection

DPI = 150
BANK_AXIS = "bank vector index"
BY_NORM = "bank vectors, sorted by final norm (largest first)"


def _subplots(*args, **kw):
    """`plt.subplots` (constrained layout) on the headless Agg backend, with the figures' font sizes."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "figure.titlesize": 12})
    return plt.subplots(*args, constrained_layout=True, **kw)


def _save(fig, path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _image(ax, data, origin="lower", **kw):
    return ax.imshow(data, aspect="auto", origin=origin, interpolation="nearest", **kw)


def _footprint(sel: Selection, max_subvectors: int | None, records=slice(None)):
    """-> (T, h, M) bool grid (bank vector selected by shown sub-vector at record t), the M shown sub-vectors (all,
    or `max_subvectors` evenly spaced ones: every layer represented) and their x-axis label."""
    n = sel.indices.shape[1]
    if not max_subvectors or n <= max_subvectors:
        cols, xlabel = np.arange(n), f"sub-vector (all {n})"
    else:
        cols = np.unique(np.linspace(0, n - 1, max_subvectors).round().astype(int))
        xlabel = f"sub-vector ({len(cols)} of {n}, evenly spaced)"
    sub = sel.indices[records][:, cols, :]  # (T, M, k)
    grid = np.zeros((len(sub), sel.num_vectors, len(cols)), bool)
    grid[np.arange(len(sub))[:, None, None], sub, np.arange(len(cols))[:, None]] = True  # broadcast to (T, M, k)
    return grid, cols, xlabel


def _xticks(ax, cols: np.ndarray, count: int = 8) -> None:
    pos = np.unique(np.linspace(0, len(cols) - 1, min(count, len(cols))).round().astype(int))
    ax.set_xticks(pos, [str(cols[p]) for p in pos])


def plot_footprint(sel: Selection, path, max_subvectors: int | None = 192) -> Path:
    """Fig. 3: every (sub-vector, bank vector) pair selected at any record, coloured by the step first selected."""
    grid, cols, xlabel = _footprint(sel, max_subvectors)  # (T, h, M)
    ever = grid.any(axis=0)
    first = np.where(ever, sel.steps[grid.argmax(axis=0)], np.nan).astype(float)
    fig, ax = _subplots(figsize=(11, 5.5))
    im = _image(ax, first, cmap="viridis", vmin=sel.steps[0], vmax=max(sel.steps[-1], sel.steps[0] + 1))
    ax.set_facecolor("white")
    _xticks(ax, cols)
    n_pairs = int(ever.sum())
    ax.set(
        xlabel=xlabel,
        ylabel=BANK_AXIS,
        title=f"Selection footprint over training: {n_pairs} distinct (sub-vector, vector) pairs "
        f"({n_pairs / len(cols):.2f} per sub-vector, k={sel.indices.shape[-1]})",
    )
    fig.colorbar(im, ax=ax, label="training step first selected")
    return _save(fig, path)


def plot_footprint_periods(sel: Selection, path, periods: int = 4, max_subvectors: int | None = 192) -> Path:
    """Fig. 5: the pairs newly selected in each period of training (not selected at the period's start)."""
    grid, cols, xlabel = _footprint(sel, max_subvectors)
    periods = max(1, min(periods, len(sel.steps) - 1))  # one record: one (empty) period
    bounds = np.linspace(0, len(sel.steps) - 1, periods + 1).round().astype(int)
    nrows, ncols = (1, periods) if periods <= 2 else (2, (periods + 1) // 2)
    fig, axes = _subplots(nrows, ncols, figsize=(5.5 * ncols, 3.8 * nrows), sharex=True, sharey=True, squeeze=False)
    for p, ax in enumerate(axes.flat):
        if p >= periods:
            ax.axis("off")
            continue
        lo, hi = bounds[p], bounds[p + 1]
        start = grid[lo]
        new = grid[lo + 1 : hi + 1].any(axis=0) & ~start  # an empty period (hi == lo): nothing new
        _image(ax, np.where(new, 1.0, np.nan), cmap="Blues", vmin=0, vmax=1.2)
        _image(ax, np.where(start, 1.0, np.nan), cmap="Greys", vmin=0, vmax=3, alpha=0.6)
        ax.set_title(f"steps {sel.steps[lo]}-{sel.steps[hi]}: {int(new.sum())} new pairs")
        _xticks(ax, cols, 5)
        if p % ncols == 0:
            ax.set_ylabel(BANK_AXIS)
        if p >= periods - ncols:
            ax.set_xlabel(xlabel)
    fig.suptitle("Selection footprint by training period (blue: newly selected; grey: selected at period start)")
    return _save(fig, path)


def plot_initial_vs_final(sel: Selection, path, max_subvectors: int | None = 192) -> Path:
    """Fig. 4: vectors selected at the first record (red), at the last (blue), and at both (green)."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    (first, last), cols, xlabel = _footprint(sel, max_subvectors, [0, -1])
    code = np.full(first.shape, np.nan)
    code[first & ~last], code[last & ~first], code[first & last] = 0, 1, 2
    colors = ["#d62728", "#1f77b4", "#2ca02c"]
    fig, ax = _subplots(figsize=(11, 5.5))
    _image(ax, code, cmap=ListedColormap(colors), vmin=-0.5, vmax=2.5)
    _xticks(ax, cols)
    kept, total = int((code == 2).sum()), int(last.sum())
    ax.set(
        xlabel=xlabel,
        ylabel=BANK_AXIS,
        title=f"Initial (step {sel.steps[0]}) vs final (step {sel.steps[-1]}) selection: "
        f"{kept} of {total} final selections kept ({kept / max(total, 1):.0%})",
    )
    ax.legend(
        handles=[
            Patch(color=c, label=text) for c, text in zip(colors, ["initial only", "final only", "both"], strict=True)
        ],
        loc="upper center",
        bbox_to_anchor=(0.5, -0.12),
        ncol=3,
        frameon=False,
    )
    return _save(fig, path)


def _norm_order(sel: Selection) -> np.ndarray:
    return np.argsort(-np.linalg.norm(sel.bank_last, axis=1), kind="stable")


def plot_weights_by_depth(sel: Selection, path) -> Path:
    """Fig. 6: sum of top-k weights per bank vector, for the first, middle and last third of the layers."""
    layers = np.unique(sel.layer[sel.layer >= 0])
    groups = [g for g in np.array_split(layers, 3) if len(g)] if len(layers) else [np.array([-1])]
    names = ["first", "middle", "last"] if len(groups) == 3 else [f"group {i + 1}" for i in range(len(groups))]
    order = _norm_order(sel)
    fig, axes = _subplots(len(groups), 1, figsize=(11, 2.4 * len(groups) + 0.8), sharex=True, squeeze=False)
    for ax, g, name, c in zip(axes[:, 0], groups, names, ["#4c72b0", "#dd8452", "#55a868"], strict=False):
        mask = np.isin(sel.layer, g)
        sums = sel.weight_sums(mask)[order]
        ax.bar(np.arange(sel.num_vectors), sums, width=1.0, color=c)
        ax.set_ylabel("sum of weights")
        span = f"layer {g.min()}" if g.min() == g.max() else f"layers {g.min()}-{g.max()}"
        ax.set_title(
            f"{name} third: {span} ({int(mask.sum())} sub-vectors); "
            f"top vectors (bank row): {', '.join('#' + str(i) for i in order[np.argsort(-sums)[:5]])}",
            loc="left",
        )
        ax.margins(x=0.005)
    axes[-1, 0].set_xlabel(BY_NORM)
    fig.suptitle(f"Sum of top-k weights per bank vector by depth (step {sel.steps[-1]})")
    return _save(fig, path)


def plot_weights_by_module(sel: Selection, path) -> Path:
    """Fig. 7: each (module type, A/B) group's share of top-k weight per bank vector, as a heatmap."""
    types = sel.module_types
    rows, labels = [], []
    for t in dict.fromkeys(types):  # model order
        for m, ab in ((0, "A"), (1, "B")):
            mask = (types == t) & (sel.matrix == m)
            if mask.any():
                sums = sel.weight_sums(mask)
                rows.append(sums / max(sums.sum(), 1e-12))
                labels.append(f"{t} {ab} ({int(mask.sum())})")
    fig, ax = _subplots(figsize=(11, 1.2 + 0.42 * len(rows)))
    im = _image(ax, np.array(rows)[:, _norm_order(sel)], origin="upper", cmap="magma_r")
    ax.set_yticks(np.arange(len(labels)), labels)
    ax.set_xlabel(BY_NORM)
    ax.set_title(
        f"Top-k weight per bank vector by module type and A vs B (step {sel.steps[-1]})\n"
        f"each row sums to 1; row label: module type, matrix (number of sub-vectors)",
        loc="left",
    )
    fig.colorbar(im, ax=ax, label="share of group weight", pad=0.01)
    return _save(fig, path)


def plot_usage_histogram(sel: Selection, path) -> Path:
    """Fig. 8: how many times each bank vector is selected (over all sub-vectors and k slots), as a histogram."""
    usage = sel.usage()
    fig, ax = _subplots(figsize=(7, 4.2))
    bins = np.arange(usage.min(), usage.max() + 2) - 0.5 if usage.max() - usage.min() < 60 else 30
    ax.hist(usage, bins=bins, color="#4c72b0", edgecolor="white")
    ax.set(
        xlabel="times selected (sub-vectors x k slots)",
        ylabel="number of bank vectors",
        title=f"Vector usage at step {sel.steps[-1]}: min {usage.min()}, median {np.median(usage):.0f}, "
        f"max {usage.max()}; {int((usage == 0).sum())} of {len(usage)} unused",
    )
    return _save(fig, path)


def plot_bank_embedding(
    sel: Selection, path, methods: tuple[str, ...] = ("pca", "tsne"), max_subvectors: int = 2000, tsne_iter: int = 1000
) -> Path:
    """Fig. 9: the final bank in 2-D with the composed sub-vectors placed on it.

    PCA is fitted on the bank and is linear, so a top-2 sub-vector lies exactly on the segment between its two
    vectors (the edge of the simplex); t-SNE embeds bank and sub-vectors jointly, as the paper does.
    """
    bank = sel.bank_last.astype(np.float64)
    sub = sel.composed().astype(np.float64)
    keep = np.arange(len(sub))
    if len(sub) > max_subvectors:
        keep = np.sort(np.random.default_rng(0).choice(len(sub), max_subvectors, replace=False))
    sub, matrix = sub[keep], sel.matrix[keep]
    fig, axes = _subplots(1, len(methods), figsize=(6.2 * len(methods), 5.6), squeeze=False)
    for ax, method in zip(axes[0], methods, strict=True):
        if method == "pca":
            from sklearn.decomposition import PCA

            pca = PCA(n_components=2).fit(bank)
            pb, ps = pca.transform(bank), pca.transform(sub)
            title = "PCA of the bank (linear: sub-vectors on simplex edges)"
        elif method == "tsne":
            from sklearn.manifold import TSNE

            both = np.concatenate([bank, sub])
            perplexity = float(min(30, max(2, (len(both) - 1) / 3)))
            both = TSNE(
                n_components=2, perplexity=perplexity, init="pca", random_state=0, max_iter=tsne_iter
            ).fit_transform(both)
            pb, ps = both[: len(bank)], both[len(bank) :]
            title = "t-SNE of bank and sub-vectors jointly"
        else:
            raise VBLoRAError(f"unknown embedding method {method!r}; use 'pca' or 'tsne'")
        for m, c, name in ((0, "#dd8452", "sub-vector of A"), (1, "#55a868", "sub-vector of B")):
            pts = ps[matrix == m]
            ax.scatter(pts[:, 0], pts[:, 1], s=5, c=c, alpha=0.5, label=name, linewidths=0)
        sc = ax.scatter(
            pb[:, 0],
            pb[:, 1],
            s=28,
            c=sel.usage(),
            cmap="Blues",
            edgecolors="k",
            linewidths=0.5,
            label="bank vector",
            zorder=3,
        )
        ax.set(title=title, xticks=[], yticks=[])
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.02), ncol=3, frameon=False, markerscale=1.5)
    fig.colorbar(sc, ax=axes[0, -1], label="bank vector usage (times selected)")
    fig.suptitle(
        f"Vector bank ({sel.num_vectors} vectors of length {bank.shape[1]}) and "
        f"{len(sub)} composed sub-vectors, step {sel.steps[-1]}"
    )
    return _save(fig, path)


def plot_churn(sel: Selection, path) -> Path:
    """Fraction of sub-vectors whose selected set (and whose top-1 vector) changed in each recording interval."""
    fig, ax = _subplots(figsize=(7, 4.2))
    if len(sel.steps) > 1:
        top1 = (sel.indices[1:, :, 0] != sel.indices[:-1, :, 0]).mean(axis=1)
        ax.plot(sel.steps[1:], sel.churn(), marker="o", ms=3, label="selected set changed")
        ax.plot(sel.steps[1:], top1, marker="s", ms=3, label="top-1 vector changed")
        ax.legend(frameon=False)
    else:
        ax.text(0.5, 0.5, "only one record: no interval to compare", ha="center", transform=ax.transAxes)
    every = sel.meta.get("every")
    ax.set(
        xlabel="training step (end of interval)",
        ylabel="fraction of sub-vectors",
        ylim=(0, None),
        title=f"Selection churn per recording interval ({every} steps)" if every else "Selection churn",
    )
    ax.grid(alpha=0.3)
    return _save(fig, path)


FIGURES: dict[str, Callable[..., Path]] = {
    "fig3_footprint": plot_footprint,
    "fig4_initial_vs_final": plot_initial_vs_final,
    "fig5_footprint_periods": plot_footprint_periods,
    "fig6_weights_by_depth": plot_weights_by_depth,
    "fig7_weights_by_module": plot_weights_by_module,
    "fig8_usage_histogram": plot_usage_histogram,
    "fig9_bank_embedding": plot_bank_embedding,
    "selection_churn": plot_churn,
}


def plot_all(run_dir, out_dir=None, only: list[str] | None = None) -> dict[str, Path]:
    """Write every figure of `run_dir`'s recorded selection as PNGs into `out_dir` (default RUN_DIR/figures)."""
    sel = load_selection(run_dir)
    out = Path(out_dir) if out_dir else Path(run_dir) / "figures"
    names = only or list(FIGURES)
    unknown = set(names) - set(FIGURES)
    if unknown:
        raise VBLoRAError(f"unknown figure(s) {sorted(unknown)}; choose from {list(FIGURES)}")
    return {name: FIGURES[name](sel, out / f"{name}.png") for name in names}
