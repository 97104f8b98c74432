"""Ablation studies: the variant tables match the paper, and run_study runs every variant x seed, resumes,
and summarises median and spread (with a fake training function; the real runs are in docs/analysis.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vblora.experiments import ablate as ablation


def test_selection_variants_are_table_5():
    v = {x.name: x for x in ablation.selection_variants()}
    assert list(v) == [
        "select-all",
        "top-1",
        "top-2",
        "top-3",
        "top-6",
        "noisy-top-1",
        "noisy-top-2",
        "gumbel",
        "st-gumbel",
    ]
    assert v["select-all"].vb == {"selection": "all"}
    assert v["gumbel"].eval_topk == (1, 2) and v["st-gumbel"].vb["selection"] == "st_gumbel"
    assert v["st-gumbel"].vb["temperature"] == pytest.approx(1 / 3)
    import vblora  # every variant is a valid VBLoRAConfig

    for x in v.values():
        vblora.VBLoRAConfig(**{"num_vectors": 90, **x.vb})


def test_vector_length_variants_keep_the_budget():
    v = ablation.vector_length_variants(12288)
    assert [(x.vb["vector_length"], x.vb["num_vectors"]) for x in v] == [(64, 192), (128, 96), (256, 48), (512, 24)]


def _fake_train(calls):
    def fn(cfg, log=print):  # what `vblora.train.pipeline.train` returns and writes, reduced to what studies read
        vb = cfg.vblora
        calls.append((vb.selection, vb.topk, cfg.seed, cfg.max_train_samples, cfg.epochs))
        acc = 0.7 + 0.01 * vb.topk + 0.001 * cfg.seed
        split = {"validation": {"accuracy": acc}, "test": {"accuracy": acc}}
        r = {
            "metrics": split,
            "primary_metric": "accuracy",
            "seed": cfg.seed,
            "config": cfg.to_dict(),
            "stored_parameters": 1000.0,
            "train_time_s": 1.0,
            "eval_topk": {
                str(k): {s: {"accuracy": acc - 0.01 * k} for s in split} | {"stored_parameters": 900.0}
                for k in cfg.extra_eval_topk
            },
        }
        Path(cfg.output).mkdir(parents=True, exist_ok=True)
        (Path(cfg.output) / "results.json").write_text(json.dumps(r))
        return r

    return fn


def test_run_study_every_variant_and_seed_then_resumes(tmp_path):
    calls = []
    variants = [x for x in ablation.selection_variants() if x.name in ("top-1", "top-2", "gumbel")]
    budget = ablation.Budget(max_train_samples=100, epochs=0.5)
    rows = ablation.run_study(variants, [0, 1, 2], tmp_path, {}, budget, train_fn=_fake_train(calls))
    assert len(calls) == 9 and {c[3:] for c in calls} == {(100, 0.5)}
    assert {c[:2] for c in calls} == {("topk", 1), ("topk", 2), ("gumbel", 2)}
    by = {r["variant"]: r for r in rows}
    assert list(by) == ["top-1", "top-2", "gumbel (eval top-1)", "gumbel (eval top-2)"]
    assert by["top-2"]["runs"] == 3 and by["top-2"]["median"] == pytest.approx(0.721)
    assert by["top-2"]["min"] == pytest.approx(0.72) and by["top-2"]["max"] == pytest.approx(0.722)
    assert by["gumbel (eval top-2)"]["inference"] == "top-2 softmax"
    table = ablation.format_table(rows, "T")
    assert "| top-2 | top-2 softmax | top-2 softmax | 72.1 | 72.0-72.2 |" in table
    saved = json.loads((tmp_path / "ablation.json").read_text())
    assert saved["budget"].startswith("100 training examples") and len(saved["rows"]) == 4
    calls.clear()  # a second call reuses every finished run
    assert ablation.run_study(variants, [0, 1, 2], tmp_path, {}, budget, train_fn=_fake_train(calls)) == rows
    assert calls == []
    # other settings (here the budget) or a damaged results.json: those runs are done again, not reused
    (tmp_path / "top-1-seed0" / "results.json").write_text("{trunc")
    ablation.run_study(variants, [0], tmp_path, {}, budget, train_fn=_fake_train(calls))
    assert calls == [("topk", 1, 0, 100, 0.5)]
    calls.clear()
    ablation.run_study(
        variants, [0], tmp_path, {}, ablation.Budget(max_train_samples=100, epochs=1.0), train_fn=_fake_train(calls)
    )
    assert len(calls) == 3 and {c[4] for c in calls} == {1.0}


def test_cli_lists_studies(capsys):
    from vblora.cli import main

    with pytest.raises(SystemExit):
        main(["ablate", "selection", "--help"])
    assert "--seeds" in capsys.readouterr().out
