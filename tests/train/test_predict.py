"""`vblora predict`: a trained run predicts on new text with its label names; the adapter alone suffices."""

from __future__ import annotations

import io
import json
import sys

from _train_helpers import make_rows, run_overrides, write_csv
from vblora.cli import main
from vblora.train.config import build_config
from vblora.train.pipeline import train


def test_predict_from_run_dir_adapter_file_and_stdin(tiny_bert, cls_files, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    res = train(build_config(None, run_overrides(tiny_bert, cls_files, run)), log=lambda *a: None)
    rows = make_rows(16, 2)
    new = write_csv(tmp_path / "new.csv", [{"text": r["text"]} for r in rows])  # no label column needed
    capsys.readouterr()  # the training log
    assert main(["predict", str(run), "--input", new]) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["text"] for p in preds] == [r["text"] for r in rows]
    assert {p["label"] for p in preds} <= {"negative", "positive"} and all(0.5 <= p["score"] <= 1 for p in preds)
    accuracy = sum(p["label"] == r["label"] for p, r in zip(preds, rows)) / len(rows)
    assert accuracy == res["metrics"]["test"]["accuracy"]  # the same examples as the run's test split
    # the adapter alone (it records its base model and label names), reading stdin, CSV out
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(r["text"] + "\n" for r in rows)))
    assert main(["predict", str(run / "adapter"), "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "text,label,score" and [line.split(",")[1] for line in out[1:]] == [p["label"] for p in preds]


def test_predict_without_a_recorded_base_says_what_to_pass(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nothing")]) == 2
    assert "error:" in capsys.readouterr().err
