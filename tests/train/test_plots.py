"""Every figure runs headless on a tiny recorded run and writes a non-empty PNG; `vblora plot` writes them all."""

from __future__ import annotations

import pytest
from _selection_run import recorded_run

from vblora import plots
from vblora.train.selection import load_selection

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    recorded_run(d, steps=6, every=2)
    return d


def _is_png(path) -> bool:
    return path.stat().st_size > 2000 and path.read_bytes()[:8] == PNG


@pytest.mark.parametrize("name", [n for n in plots.FIGURES if n != "fig9_bank_embedding"])
def test_each_figure_writes_a_png(run_dir, tmp_path, name):
    path = plots.FIGURES[name](load_selection(run_dir), tmp_path / f"{name}.png")
    assert _is_png(path)


def test_bank_embedding_pca_and_tsne(run_dir, tmp_path):
    sel = load_selection(run_dir)
    assert _is_png(plots.plot_bank_embedding(sel, tmp_path / "pca.png", methods=("pca",)))
    assert _is_png(
        plots.plot_bank_embedding(sel, tmp_path / "tsne.png", methods=("tsne",), max_subvectors=40, tsne_iter=250)
    )


def test_subset_of_subvectors_and_single_record(run_dir, tmp_path):
    sel = load_selection(run_dir)
    assert _is_png(plots.plot_footprint(sel, tmp_path / "sub.png", max_subvectors=20))
    sel.steps, sel.indices, sel.weights = sel.steps[:1], sel.indices[:1], sel.weights[:1]
    assert _is_png(plots.plot_churn(sel, tmp_path / "churn1.png"))
    assert _is_png(plots.plot_footprint_periods(sel, tmp_path / "periods1.png"))


def test_cli_plot_writes_requested_figures(run_dir, tmp_path, capsys):
    from vblora.cli import main

    assert (
        main(["plot", str(run_dir), "--out", str(tmp_path), "--only", "fig8_usage_histogram", "selection_churn"]) == 0
    )
    assert _is_png(tmp_path / "fig8_usage_histogram.png") and _is_png(tmp_path / "selection_churn.png")
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "selection recording" in capsys.readouterr().err


def test_cli_plot_without_a_recording_names_a_real_train_flag(tmp_path, capsys):
    """The one-line error tells how to record a selection with a flag `vblora train` actually has."""
    import re

    from vblora.cli import main

    assert main(["plot", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err
    flags = re.findall(r"--[a-z][a-z-]+", err)
    assert flags, err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    train_help = capsys.readouterr().out
    for flag in flags:
        assert flag in train_help, f"{flag} (named by: {err}) is not a vblora train flag"
