"""Ablations of the paper: Table 5 (selection rules) and Table 6 (sub-vector length at a fixed bank budget).

A study is a list of *variants* (settings changes) run over several seeds; each run is `vblora.train.pipeline.train`
with the study's settings, so it is scored exactly as `vblora train` scores it (best validation epoch, test at that
epoch) and `vblora ablate` and `vblora train` give the same number for the same settings. A run writes
OUT/<variant>-seed<k>/results.json; a run whose results.json exists is reused, so a killed study continues where
it stopped. `summarize` gives median and spread over seeds.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vblora.experiments.reuse import finished
from vblora.storage.files import atomic_write
from vblora.train.config import build_config
from vblora.train.pipeline import train

TAU = 1.0 / 3.0


@dataclass
class Variant:
    name: str  # row label
    training: str  # the training rule, as the paper's Table 5 writes it
    vb: dict  # VBLoRAConfig changes (selection, topk, noise_std, temperature, num_vectors, vector_length)
    eval_topk: tuple = ()  # also score the trained model with these top-k (one row each); () = the config's own
    run: dict = field(default_factory=dict)  # other RunConfig changes


def selection_variants() -> list[Variant]:
    """Table 5: Select-all; Top-k k=1,2,3,6; Noisy Top-1/2; GS and ST-GS (tau=1/3) evaluated with Top-1/Top-2."""
    v = [Variant("select-all", "softmax over the bank", {"selection": "all"})]
    v += [Variant(f"top-{k}", f"top-{k} softmax", {"selection": "topk", "topk": k}) for k in (1, 2, 3, 6)]
    v += [Variant(f"noisy-top-{k}", f"noisy top-{k} softmax", {"selection": "noisy_topk", "topk": k}) for k in (1, 2)]
    v += [
        Variant("gumbel", "Gumbel-softmax (tau=1/3)", {"selection": "gumbel", "temperature": TAU}, (1, 2)),
        Variant(
            "st-gumbel",
            "straight-through Gumbel-softmax (tau=1/3)",
            {"selection": "st_gumbel", "temperature": TAU},
            (1, 2),
        ),
    ]
    return v


def vector_length_variants(budget: int, lengths=(64, 128, 256, 512)) -> list[Variant]:
    """Table 6: sub-vector length b at a fixed bank budget h*b (h = budget // b)."""
    return [Variant(f"b={b}", f"h={budget // b}", {"vector_length": b, "num_vectors": budget // b}) for b in lengths]


@dataclass
class Budget:
    """What one run may spend. The CPU default: 2,000 training examples, one epoch, batch 16."""

    max_train_samples: int | None = 2000
    max_eval_samples: int | None = None
    epochs: float = 1.0
    batch_size: int = 16

    def overrides(self) -> dict:
        """RunConfig settings of this budget (fields of the same names; the eval cap applies to validation and test)."""
        return {**asdict(self), "max_test_samples": self.max_eval_samples}

    def describe(self) -> str:
        n = f"{self.max_train_samples:,}" if self.max_train_samples else "all"
        ev = f"first {self.max_eval_samples:,}" if self.max_eval_samples else "all"
        return (
            f"{n} training examples, {self.epochs:g} epoch(s), batch {self.batch_size}; {ev} validation/test examples"
        )


def run_config(variant: Variant, seed: int, out_dir, run_overrides: dict, budget: Budget, recipe: str | None = None):
    """The RunConfig of one variant x seed: recipe <- user's settings <- variant <- seed and budget."""
    return build_config(
        recipe,
        {
            **run_overrides,
            **variant.run,
            **variant.vb,
            "seed": seed,
            **budget.overrides(),
            "extra_eval_topk": list(variant.eval_topk),
            "output": str(out_dir),
            "overwrite": True,
        },
    )


def spread(vals: list[float]) -> dict:
    """Median, min, max, mean and sample std (0 for one value) of a non-empty list."""
    return {
        "median": statistics.median(vals),
        "min": min(vals),
        "max": max(vals),
        "mean": statistics.fmean(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
    }


def run_study(
    variants: list[Variant],
    seeds: list[int],
    out,
    run_overrides: dict,
    budget: Budget,
    recipe: str | None = None,
    train_fn=train,
    log=print,
) -> list[dict]:
    """Every variant x seed (reusing finished runs), then the summary rows (also written to OUT/ablation.json)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {v.name: [] for v in variants}
    # every run's settings first: a bad setting or recipe is one error before any training, not a FAILED per run;
    # seeds outermost: a study cut short still has every variant at the first seeds
    runs = [
        (v, run_config(v, seed, out / f"{v.name}-seed{seed}", run_overrides, budget, recipe))
        for seed in seeds
        for v in variants
    ]
    for v, cfg in runs:
        try:
            results[v.name].append(finished(cfg.output, cfg, log) or train_fn(cfg, log=log))
        except Exception as e:  # one failing variant must not lose the others
            log(f"[ablate] {Path(cfg.output).name} FAILED: {type(e).__name__}: {e}")
        summary = {"budget": budget.describe(), "seeds": seeds, "rows": summarize(variants, results)}
        atomic_write(out / "ablation.json", json.dumps(summary, indent=2).encode())
    return summarize(variants, results)


def scores(r: dict, k: int | None) -> dict | None:
    """{'validation', 'test', 'stored_parameters'} of a run's results, at its own eval rule (k None) or top-k."""
    if k is None:
        return {**r["metrics"], "stored_parameters": r["stored_parameters"]}
    return r.get("eval_topk", {}).get(str(k))


def summarize(variants: list[Variant], results: dict[str, list[dict]]) -> list[dict]:
    """One row per variant and evaluation rule: the test metric's median and spread over the seeds run."""
    rows = []
    for v in variants:
        rs = results.get(v.name, [])
        for k in v.eval_topk or (None,):
            got = [(r, s) for r in rs if (s := scores(r, k)) is not None]
            vals = [s["test"][r["primary_metric"]] for r, s in got]
            vvals = [s["validation"][r["primary_metric"]] for r, s in got if s.get("validation")]
            row = {
                "variant": f"{v.name} (eval top-{k})" if k is not None else v.name,
                "training": v.training,
                "inference": f"top-{k} softmax" if k is not None else _eval_rule(v),
                "runs": len(vals),
                "seeds": [r["seed"] for r, _ in got],
                "values": vals,
            }
            if vals:
                row.update(
                    spread(vals),
                    validation_median=statistics.median(vvals) if vvals else None,
                    metric=got[0][0]["primary_metric"],
                    stored_parameters=got[0][1]["stored_parameters"],
                    train_time_s=statistics.fmean(r["train_time_s"] for r, _ in got),
                )
            rows.append(row)
    return rows


def _eval_rule(v: Variant) -> str:
    if v.vb.get("selection") == "all":
        return "softmax over the bank"
    return f"top-{v.vb['topk']} softmax" if "topk" in v.vb else "top-k softmax (config)"


def format_table(rows: list[dict], title: str) -> str:
    metric = next((r["metric"] for r in rows if r["runs"]), "accuracy")
    lines = [
        title,
        "",
        f"| variant | training | inference | test {metric}: median | min-max | mean +- std | "
        f"runs | stored params | train s |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if not r["runs"]:
            lines.append(f"| {r['variant']} | {r['training']} | {r['inference']} | - | - | - | 0 | - | - |")
            continue
        lines.append(
            f"| {r['variant']} | {r['training']} | {r['inference']} | {100 * r['median']:.1f} | "
            f"{100 * r['min']:.1f}-{100 * r['max']:.1f} | {100 * r['mean']:.1f} +- {100 * r['std']:.1f} | "
            f"{r['runs']} | {r['stored_parameters']:,.0f} | {r['train_time_s']:.0f} |"
        )
    return "\n".join(lines)
