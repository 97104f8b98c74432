"""End-to-end `train()` on a tiny BERT: every method, results.json schema, regression, pairs, errors, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _train_helpers import make_rows, run_overrides, write_csv, write_jsonl

from vblora.train.config import build_config
from vblora.train.errors import DataError, SetupError
from vblora.train.pipeline import train

METHODS = ["vblora", "lora", "vera", "tied-lora", "full"]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_and_writes_results(tiny_bert, cls_files, tmp_path, method):
    cfg = build_config(
        None,
        run_overrides(
            tiny_bert, cls_files, tmp_path / "run", method=method, vera_rank=16, lr=1e-2 if method != "full" else 1e-3
        ),
    )
    res = train(cfg, log=lambda *a: None)
    on_disk = json.loads((tmp_path / "run" / "results.json").read_text())
    assert on_disk["method"] == method
    for split in ("validation", "test"):
        m = on_disk["metrics"][split]
        assert {"accuracy", "f1", "matthews_correlation"} <= set(m)
        assert 0.0 <= m["accuracy"] <= 1.0 and 0.0 <= m["f1"] <= 1.0
    adapter = tmp_path / "run" / "adapter"
    assert on_disk["adapter_bytes"] == sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file()) > 0
    assert len(on_disk["per_epoch"]) == 2 and on_disk["best_epoch"] in (1.0, 2.0)
    assert on_disk["config"]["method"] == method and on_disk["versions"]["torch"] == torch.__version__
    assert on_disk["adapted_modules"] == (0 if method == "full" else 12)  # 6 linear modules x 2 layers
    # stored parameters: exact formulas on this model (2 layers, hidden 64, FFN 128, classifier 64*2+2)
    head = 64 * 2 + 2
    per_layer_lora = 4 * (64 + 64) * 4 + 4 * (64 + 128) * 2  # q,k,v,o + intermediate + output, r=4
    if method == "lora":
        assert res["stored_parameters"] == 2 * per_layer_lora + head
    elif method == "vera":
        assert res["stored_parameters"] == 2 * (4 * (16 + 64) + (16 + 128) + (16 + 64)) + head
    elif method == "tied-lora":
        assert res["stored_parameters"] == 8 * (4 * 128 + 2 * 192) + 2 * (4 * (8 + 64) + (8 + 128) + (8 + 64)) + head
    elif method == "full":
        assert res["stored_parameters"] == res["trainable_parameters"] > 50_000
    else:  # bank 16x32 + 224 sub-vectors x (2 uint8 indices = 0.5 float + 1 free weight) + head
        assert res["stored_parameters"] == 16 * 32 + 224 * 1.5 + head
    assert res["metrics"]["test"]["accuracy"] == on_disk["metrics"]["test"]["accuracy"]


def test_training_learns_a_separable_task(tiny_bert, cls_files, tmp_path):
    cfg = build_config(
        None, run_overrides(tiny_bert, cls_files, tmp_path / "run", method="lora", lr=1e-2, epochs=10, lr_head=1e-2)
    )
    res = train(cfg, log=lambda *a: None)
    assert res["metrics"]["test"]["accuracy"] >= 0.75  # chance is 0.5
    losses = [e["validation"]["loss"] for e in res["per_epoch"]]
    assert losses[-1] < losses[0]


def test_regression_from_float_labels_jsonl(tiny_bert, tmp_path):
    def rows(n, seed):
        return [
            {"text": r["text"], "score": (1.5 if r["label"] == "positive" else -1.25) + 0.01 * i}
            for i, r in enumerate(make_rows(n, seed))
        ]

    files = {
        "train_file": write_jsonl(tmp_path / "tr.jsonl", rows(64, 0)),
        "validation_file": write_jsonl(tmp_path / "va.jsonl", rows(16, 1)),
        "test_file": write_jsonl(tmp_path / "te.jsonl", rows(16, 2)),
    }
    cfg = build_config(
        None, run_overrides(tiny_bert, files, tmp_path / "run", label_column="score", method="lora", lr=2e-2, epochs=3)
    )
    res = train(cfg, log=lambda *a: None)
    assert res["task"] == "regression" and res["primary_metric"] == "pearson"
    assert {"pearson", "spearman", "mse"} <= set(res["metrics"]["test"])
    assert -1.0 <= res["metrics"]["test"]["pearson"] <= 1.0


def test_glue_tsv_text_pairs(tiny_bert, tmp_path):
    def tsv(name, n, seed):  # MRPC layout: Quality, #1 ID, #2 ID, #1 String, #2 String
        lines = ["Quality\t#1 ID\t#2 ID\t#1 String\t#2 String"]
        for i, r in enumerate(make_rows(n, seed)):
            lines.append(f'{int(r["label"] == "positive")}\t{i}\t{i + 1000}\t{r["text"]}\tthe "movie')
        (tmp_path / name).write_text("\n".join(lines) + "\n")
        return str(tmp_path / name)

    files = {"train_file": tsv("train.tsv", 32, 0), "validation_file": tsv("dev.tsv", 8, 1)}
    cfg = build_config(None, run_overrides(tiny_bert, files, tmp_path / "run", glue_task="mrpc", epochs=1))
    res = train(cfg, log=lambda *a: None)
    assert res["data"]["label_names"] == ["0", "1"]
    assert res["data"]["test"] == 8  # no test file: the validation split is reported as test


def test_errors_are_clear(tiny_bert, cls_files, tmp_path):
    with pytest.raises(SetupError, match="does not exist"):
        train(build_config(None, run_overrides(str(tmp_path / "nope"), cls_files, tmp_path / "r")))
    from vblora.errors import VBLoRAError

    with pytest.raises(VBLoRAError, match=r"not in BertForSequenceClassification|matched"):
        train(build_config(None, run_overrides(tiny_bert, cls_files, tmp_path / "r", target_modules=["qkv_proj"])))
    if not torch.cuda.is_available():
        with pytest.raises(SetupError, match="fp16"):
            train(build_config(None, run_overrides(tiny_bert, cls_files, tmp_path / "r", fp16=True)))
        with pytest.raises(SetupError, match="no CUDA GPU"):
            train(build_config(None, run_overrides(tiny_bert, cls_files, tmp_path / "r", device="cuda")))
    bad = tmp_path / "bad.csv"
    write_csv(bad, [*make_rows(4, 3), {"text": "the film", "label": "meh"}])
    with pytest.raises(DataError, match=r"bad\.csv:6: column 'label': label 'meh' is not one of"):
        train(build_config(None, run_overrides(tiny_bert, {**cls_files, "test_file": str(bad)}, tmp_path / "r")))
    with pytest.raises(DataError, match="no column 'sentence'"):
        train(build_config(None, run_overrides(tiny_bert, cls_files, tmp_path / "r", text_column="sentence")))


def test_existing_checkpoints_need_resume_or_overwrite(tiny_bert, cls_files, tmp_path):
    train(build_config(None, run_overrides(tiny_bert, cls_files, tmp_path / "run", epochs=1)), log=lambda *a: None)
    with pytest.raises(SetupError, match="--resume"):
        train(build_config(None, run_overrides(tiny_bert, cls_files, tmp_path / "run", overwrite=False)))


def test_cli_train_prints_summary(tiny_bert, cls_files, tmp_path, capsys):
    from vblora.cli import main

    argv = [
        "train",
        "--model",
        tiny_bert,
        "--output",
        str(tmp_path / "cli"),
        "--device",
        "cpu",
        "--epochs",
        "1",
        "--vector-length",
        "32",
        "--num-vectors",
        "16",
        "--batch-size",
        "8",
    ]
    for k, v in cls_files.items():
        argv += [f"--{k.replace('_', '-')}", v]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "stored parameters" in out and "adapter bytes" in out
    assert Path(tmp_path / "cli" / "results.json").exists()
    assert main(["train", "--model", str(tmp_path / "missing"), "--output", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err
