"""`vblora predict`: a trained run predicts on new text with its label names; the adapter alone suffices."""

from __future__ import annotations

import io
import json
import sys

import pytest
from _train_helpers import make_rows, run_overrides, write_csv

from vblora.cli import main
from vblora.train import predict as prediction
from vblora.train import vader
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
    accuracy = sum(p["label"] == r["label"] for p, r in zip(preds, rows, strict=True)) / len(rows)
    assert accuracy == res["metrics"]["test"]["accuracy"]  # the same examples as the run's test split
    # the adapter alone (it records its base model and label names), reading stdin, CSV out
    monkeypatch.setattr(sys, "stdin", io.StringIO("".join(r["text"] + "\n" for r in rows)))
    assert main(["predict", str(run / "adapter"), "--format", "csv"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "text,label,score" and [line.split(",")[1] for line in out[1:]] == [p["label"] for p in preds]


def test_predict_without_a_recorded_base_says_what_to_pass(tmp_path, capsys):
    assert main(["predict", str(tmp_path / "nothing")]) == 2
    assert "error:" in capsys.readouterr().err


# ---- hostile and mistaken input (issue 19, item 10): one line naming the problem, exit 2, no traceback ----------
@pytest.fixture(scope="module")
def trained_run(tiny_bert, tmp_path_factory):
    import random

    d = tmp_path_factory.mktemp("predict-run")
    files = {
        "train_file": write_csv(d / "train.csv", make_rows(32, 0)),
        "validation_file": write_csv(d / "dev.csv", make_rows(8, 1)),
    }
    random.seed(0)
    train(build_config(None, run_overrides(tiny_bert, files, d / "run", epochs=1)), log=lambda *a: None)
    return d / "run"


def _stdin(monkeypatch, data: bytes):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8"))


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def test_binary_stdin_is_one_line(trained_run, capsys, monkeypatch):
    _stdin(monkeypatch, b"a good movie\n\x89PNG\r\n\x1a\n\xff\xd8\xff\x00\x00\n")
    assert main(["predict", str(trained_run)]) == 2
    _one_line_error(capsys, "stdin:2", "not UTF-8")
    _stdin(monkeypatch, b"a good movie\n\x00\x00\x00\x00\n")  # valid UTF-8, still binary
    assert main(["predict", str(trained_run)]) == 2
    _one_line_error(capsys, "stdin:2", "NUL")


@pytest.mark.parametrize(
    "flag,value", [("--batch-size", "0"), ("--batch-size", "-5"), ("--max-new-tokens", "0"), ("--max-new-tokens", "-1")]
)
def test_sizes_below_one_are_refused(trained_run, capsys, monkeypatch, flag, value):
    _stdin(monkeypatch, b"a good movie\n")
    assert main(["predict", str(trained_run), flag, value]) == 2  # -5 used to exit 0 with every input dropped
    _one_line_error(capsys, flag, ">= 1")


def test_corrupt_results_json_is_one_line(trained_run, tmp_path, capsys, monkeypatch):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    _stdin(monkeypatch, b"a good movie\n")
    for damage in (b'{"model": "x", "conf', b"\xff\xfe garbage", b"[1, 2]"):
        (run / "results.json").write_bytes(damage)
        assert main(["predict", str(run)]) == 2
        _one_line_error(capsys, "results.json", "adapter")
    assert main(["predict", str(run / "adapter")]) == 0  # the way out the message names works


def test_a_huge_line_is_refused_without_reading_it_whole(trained_run, capsys, monkeypatch):
    huge = b"good " * (prediction.MAX_LINE_BYTES // 5 + 10)  # just over the bound: the same branch a 1 GB line takes
    _stdin(monkeypatch, b"a good movie\n" + huge + b"\nbad\n")
    assert main(["predict", str(trained_run)]) == 2
    _one_line_error(capsys, "stdin:2", "longer than")

    class Endless:  # a line that never ends: reading must stop after the bound, not hold it all
        served = 0

        def readline(self, limit=-1):
            assert 0 < limit <= prediction.MAX_LINE_BYTES + 1
            self.served += limit
            return b"x" * limit

    stream = Endless()
    with pytest.raises(prediction.DataError, match="longer than"):
        prediction.read_lines(stream, "stdin")
    assert stream.served == prediction.MAX_LINE_BYTES + 1


def test_input_files_by_suffix(trained_run, tmp_path, capsys):
    bin_file = tmp_path / "texts.bin"
    bin_file.write_bytes(b"good\n")
    assert main(["predict", str(trained_run), "--input", str(bin_file)]) == 2
    err = _one_line_error(capsys, "texts.bin", ".txt")
    assert "--data-format" not in err  # predict has no such flag
    txt = tmp_path / "texts.txt"  # one text per line, commas and quotes included: not CSV
    lines = ["good, great film", 'awful "plot", dull', "text,label"]
    txt.write_text("\n".join(lines) + "\n\n")
    assert main(["predict", str(trained_run), "--input", str(txt)]) == 0
    preds = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["text"] for p in preds] == lines
    long_csv = tmp_path / "long.csv"  # the line bound holds for tables too
    long_csv.write_bytes(b"text\n" + b"a" * (prediction.MAX_LINE_BYTES + 1) + b"\n")
    assert main(["predict", str(trained_run), "--input", str(long_csv)]) == 2
    _one_line_error(capsys, "long.csv:2", "longer than")


def test_the_default_vader_run_predicts_label_names(tiny_bert, tmp_path, capsys, monkeypatch):
    """The built-in movie data has class ids 0/1 in its files; the adapter must record negative/positive."""
    rows = make_rows(32, 0)
    split = tmp_path / "vader-movie"
    split.mkdir()
    paths = {}
    for name, part in (("train", rows[:24]), ("validation", rows[24:]), ("test", rows[24:])):
        paths[name] = split / f"{name}.jsonl"  # the layout vader.fetch writes: label = int(rating > 0)
        paths[name].write_text(
            "".join(
                json.dumps({"id": i, "text": r["text"], "rating": 1.0, "label": int(r["label"] == "positive")}) + "\n"
                for i, r in enumerate(part)
            )
        )
    monkeypatch.setattr(vader, "fetch", lambda *a, **k: paths)
    over = run_overrides(tiny_bert, {}, tmp_path / "run", epochs=1)
    res = train(build_config(None, over), log=lambda *a: None)
    assert res["config"]["dataset"] == "vader-movie" and res["data"]["label_names"] == ["negative", "positive"]
    capsys.readouterr()
    _stdin(monkeypatch, b"a good movie\nan awful film\n")
    assert main(["predict", str(tmp_path / "run")]) == 0
    labels = {json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()}
    assert labels and labels <= {"negative", "positive"}
