"""Reading data files: formats, GLUE layouts, label spaces, and errors that name file, line and column."""

from __future__ import annotations

import pytest
from _train_helpers import write_csv, write_jsonl

from vblora.train import data as user_data
from vblora.train.errors import DataError


def test_csv_tsv_jsonl_read_the_same_rows(tmp_path):
    rows = [{"text": 'a, quoted "x"', "label": "pos"}, {"text": "b", "label": "neg"}]
    (tmp_path / "d.csv").write_text('text,label\n"a, quoted ""x""",pos\nb,neg\n')
    write_csv(tmp_path / "d.tsv", [{"text": 'a, quoted "x"', "label": "pos"}, rows[1]], delim="\t")
    write_jsonl(tmp_path / "d.jsonl", rows)
    for name in ("d.csv", "d.tsv", "d.jsonl"):
        t = user_data.read_table(tmp_path / name)
        assert [r["text"] for r in t.rows] == ['a, quoted "x"', "b"], name
        assert t.lines == [2, 3] if name != "d.jsonl" else [1, 2]


def test_glue_cola_headerless_layout(tmp_path):
    (tmp_path / "train.tsv").write_text(
        "gj04\t1\t\tThe sailors rode the breeze clear of the rocks.\n"
        "gj04\t0\t*\tThe more books I ask to whom he will give.\n"
    )
    lay = user_data.GLUE_LAYOUTS["cola"]
    t = user_data.read_table(tmp_path / "train.tsv", names=lay["names"])
    ex, labels = user_data.load_split(t, lay["text"], lay["pair"], lay["label"], None)
    assert labels.names == ["0", "1"] and ex.labels == [1, 0]
    assert ex.texts[1].startswith("The more books")


def test_label_spaces():
    assert user_data.infer_labels(["2", "10", "2"]).names == ["2", "10"]  # numeric order
    assert user_data.infer_labels(["b", "a"]).names == ["a", "b"]
    ls = user_data.infer_labels(["0.5", "1.25", "3"])
    assert ls.regression and ls.num_labels == 1
    ints = user_data.infer_labels(["0", "1"])
    assert ints.encode("1.0", "f:1") == 1 and ints.encode(" 0", "f:2") == 0
    with pytest.raises(DataError, match="single class"):
        user_data.infer_labels(["x", "x"])


def test_unknown_label_names_file_line_column(tmp_path):
    train = user_data.read_table(write_csv(tmp_path / "train.csv", [{"t": "a", "y": "pos"}, {"t": "b", "y": "neg"}]))
    _, labels = user_data.load_split(train, "t", None, "y", None)
    dev = user_data.read_table(write_csv(tmp_path / "dev.csv", [{"t": "a", "y": "pos"}, {"t": "b", "y": "neutral"}]))
    with pytest.raises(
        DataError,
        match=r"dev\.csv:3: column 'y': label 'neutral' is not one of the training "
        r"labels \['neg', 'pos'\]",
    ):
        user_data.load_split(dev, "t", None, "y", labels)


def test_malformed_files(tmp_path):
    with pytest.raises(DataError, match="not found"):
        user_data.read_table(tmp_path / "missing.csv")
    (tmp_path / "bad.tsv").write_text("text\tlabel\nok\t1\nbroken row without tab\n")
    with pytest.raises(DataError, match=r"bad\.tsv:3: expected 2 columns \(text, label\), found 1"):
        user_data.read_table(tmp_path / "bad.tsv")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n{"text": "b", "label": }\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: column 24: invalid JSON"):
        user_data.read_table(tmp_path / "bad.jsonl")
    (tmp_path / "empty.csv").write_text("text,label\n")
    with pytest.raises(DataError, match="no data rows"):
        user_data.read_table(tmp_path / "empty.csv")
    t = user_data.read_table(write_jsonl(tmp_path / "m.jsonl", [{"text": "a", "label": 1}, {"text": "", "label": 0}]))
    with pytest.raises(DataError, match=r"m\.jsonl:2: column 'text' is empty"):
        user_data.load_split(t, "text", None, "label", None)
    with pytest.raises(
        DataError,
        match=r"no column 'sentence' in .*m\.jsonl; columns: label, text; "
        r"pass --text-column text",
    ):
        user_data.load_split(t, "sentence", None, "label", None)
    (tmp_path / "x.parquet").write_text("")
    with pytest.raises(DataError, match="unknown data format"):
        user_data.read_table(tmp_path / "x.parquet")
    (tmp_path / "bin.csv").write_bytes(b"text,label\nok,1\n\xff\xfe,0\n")
    with pytest.raises(DataError, match=r"bin\.csv:3: not valid UTF-8"):
        user_data.read_table(tmp_path / "bin.csv")
