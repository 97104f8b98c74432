"""Label columns are numeric or categorical as a whole; bad values, bad quoting and missing columns are `file:line`
errors that say what to do, with physical line numbers (issue 11, "Labels")."""

from __future__ import annotations

import json

import pytest

from vblora.train import data as user_data
from vblora.train.errors import DataError


def _split(path, text_col="text", label_col="label", labels=None, pair_col=None, names=None):
    return user_data.load_split(user_data.read_table(path, names=names), text_col, pair_col, label_col, labels)


def _error(fn, *args, **kw) -> str:
    with pytest.raises(DataError) as e:
        fn(*args, **kw)
    return str(e.value)


# ---- one rule: numeric or categorical as a whole --------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "NaN", "inf", "-inf", "Infinity"])
def test_non_finite_value_in_a_float_column_is_an_error_not_string_classes(tmp_path, bad):
    f = tmp_path / "train.csv"
    f.write_text(f"text,score\na,0.5\nb,1.25\nc,{bad}\nd,3\n")
    msg = _error(_split, f, label_col="score")
    assert f"train.csv:4: column 'score': label '{bad}' is not a finite number" in msg
    assert "other labels are numbers (e.g. '0.5')" in msg and "fix the value or remove the row" in msg


def test_nan_in_an_integer_class_column_is_an_error(tmp_path):
    f = tmp_path / "train.tsv"
    f.write_text("text\tlabel\na\t0\nb\t1\nc\t1\nd\tnan\n")
    assert "train.tsv:5: column 'label': label 'nan' is not a finite number" in _error(_split, f)


@pytest.mark.parametrize("blank", ["", "   "])
def test_blank_label_is_an_error_with_what_to_do(tmp_path, blank):
    f = tmp_path / "train.csv"
    f.write_text(f"text,score\na,0.5\nb,{blank}\nc,1.5\n")
    assert _error(_split, f, label_col="score").endswith(
        "train.csv:3: column 'score' is empty; fill it in or remove the row"
    )


def test_word_among_numbers_and_number_among_names_are_errors(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text("text,score\na,0.5\nb,1.5\nc,N/A\nd,2.5\n")
    assert (
        "train.csv:4: column 'score': label 'N/A' is not a finite number, while the column's other labels are "
        "numbers" in _error(_split, f, label_col="score")
    )
    f.write_text("text,label\na,pos\nb,neg\nc,1\nd,pos\n")
    msg = _error(_split, f)
    assert (
        "train.csv:4: column 'label': label '1' is a number, while the column's other labels are class names "
        "(e.g. 'pos')"
        in msg
        and "all numbers or all class names" in msg
    )


def test_jsonl_labels_follow_the_same_rule(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "a", "y": 0.5}\n\n{"text": "b", "y": 1.5}\n{"text": "c", "y": NaN}\n')
    assert "train.jsonl:4: column 'y': label 'nan' is not a finite number" in _error(_split, f, label_col="y")
    f.write_text('{"text": "a", "y": 0.5}\n{"text": "b", "y": null}\n')
    assert "train.jsonl:2: column 'y' is empty; fill it in or remove the row" in _error(_split, f, label_col="y")


def test_validation_labels_are_checked_against_the_training_kind(tmp_path):
    (tmp_path / "train.csv").write_text("text,score\na,0.5\nb,1.5\n")
    _, space = _split(tmp_path / "train.csv", label_col="score")
    (tmp_path / "dev.csv").write_text("text,score\na,0.5\nb,nan\n")
    msg = _error(_split, tmp_path / "dev.csv", label_col="score", labels=space)
    assert "dev.csv:3: column 'score': label 'nan' is not a finite number (regression task); fix the value" in msg
    forced = user_data.LabelSpace([], regression=True)  # --task regression
    assert "dev.csv:3" in _error(_split, tmp_path / "dev.csv", label_col="score", labels=forced)


# ---- valid files parse as before ------------------------------------------------------------------------------


def test_valid_label_columns_parse_as_before(tmp_path):
    f = tmp_path / "reg.csv"
    f.write_text("text,score\na,0.5\nb,-1.25\nc,3\nd,1e-2\n")
    ex, space = _split(f, label_col="score")
    assert space.regression and space.num_labels == 1 and ex.labels == [0.5, -1.25, 3.0, 0.01]
    f = tmp_path / "ints.jsonl"
    f.write_text(
        "".join(
            json.dumps(r) + "\n"
            for r in [
                {"text": "a", "label": 1},
                {"text": "b", "label": 0},
                {"text": "c", "label": "1.0"},
                {"text": "d", "label": 10},
            ]
        )
    )
    ex, space = _split(f)
    assert space.names == ["0", "1", "10"] and ex.labels == [1, 0, 1, 2]
    f = tmp_path / "names.csv"
    f.write_text("text,label\na,pos\nb,neg\nc, pos\nd,nan\n")  # among class names, "nan" is a name (Min Nan)
    ex, space = _split(f)
    assert space.names == ["nan", "neg", "pos"] and ex.labels == [2, 1, 2, 0]


def test_glue_tsv_layouts_parse_as_before(tmp_path):
    f = tmp_path / "stsb.tsv"
    f.write_text('index\tgenre\tsentence1\tsentence2\tscore\n0\tmain\tA "quoted\tB.\t5.000\n1\tmain\tC.\tD.\t0.750\n')
    lay = user_data.GLUE_LAYOUTS["stsb"]
    ex, space = _split(f, lay["text"], lay["label"], pair_col=lay["pair"])
    assert space.regression and ex.labels == [5.0, 0.75] and ex.texts == ['A "quoted', "C."]
    f = tmp_path / "mnli.tsv"
    f.write_text("sentence1\tsentence2\tgold_label\na\tb\tentailment\nc\td\tneutral\ne\tf\tcontradiction\n")
    ex, space = _split(f, "sentence1", "gold_label", pair_col="sentence2")
    assert space.names == ["contradiction", "entailment", "neutral"] and ex.labels == [1, 2, 0]


# ---- physical line numbers, quoting -----------------------------------------------------------------------------


def test_csv_lines_are_physical_after_a_multiline_quoted_field(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text('text,score\n"one\ntwo\nthree",0.5\nb,1.5\n\nc,nan\n')
    t = user_data.read_table(f)
    assert t.lines == [2, 5, 7] and t.rows[0]["text"] == "one\ntwo\nthree"
    assert "train.csv:7: column 'score': label 'nan'" in _error(_split, f, label_col="score")
    f.write_text('text,label\n"multi\nline",1\nb,0,extra\n')
    assert "train.csv:4: expected 2 columns (text, label), found 3" in _error(user_data.read_table, f)


def test_line_separators_other_than_newline_do_not_split_records(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text("text,label\na\u2028b\x0cc,1\nd,0\n")
    assert user_data.read_table(f).lines == [2, 3]
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "a\u2028b", "label": 1}\n{"text": "d", "label": 0}\n')
    assert user_data.read_table(f).lines == [1, 2]


@pytest.mark.parametrize(
    "body, line",
    [
        ('ok,1\n"broken,0\nmore,1\n', 3),  # the quote swallows the rest: 1 column instead of 2
        ('ok,1\nx,"broken\nmore,1\n', 3),  # ... or the right number of columns, silently
        ('"two\nlines",1\nok,0\n"broken,0', 5),  # after a multi-line field, no final newline
        ('ok,1\n"two\nlines",1\nx,"broken\n', 5),
    ],
)
def test_unclosed_quote_is_named_with_its_line(tmp_path, body, line):
    f = tmp_path / "train.csv"
    f.write_text("text,label\n" + body)
    msg = _error(user_data.read_table, f)
    assert msg.startswith(f"unclosed quote starting at {f}:{line}: the quoted field runs to the end of the file")


def test_stray_quote_inside_the_file_points_at_the_multiline_record(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text('text,label\nok,1\n"broken,0\nmore,1\n"fine",1\n')  # leniently: 2 columns, text to line 5
    msg = _error(user_data.read_table, f)
    assert (
        "train.csv:3: malformed CSV: a quoted field runs over lines 3-5 and has text after its closing quote on line 5"
        in msg
        and "stray or unclosed quote" in msg
    )
    f.write_text('text,label\nok,1\n"broken\nmore",1,2\nok,0\n')
    msg = _error(user_data.read_table, f)
    assert "train.csv:3: expected 2 columns (text, label), found 3 in the record on lines 3-4" in msg
    f.write_text('text,label\n"a" ,1\n"b"c,0\n')  # single-line leniency is kept
    assert [r["text"] for r in user_data.read_table(f).rows] == ["a ", "bc"]


def test_utf8_bom_is_not_part_of_the_first_column_name(tmp_path):
    f = tmp_path / "excel.csv"
    f.write_bytes("\ufefftext,label\na,pos\nb,neg\n".encode())
    assert user_data.read_table(f).columns == ["text", "label"]


# ---- missing columns ----------------------------------------------------------------------------------------


def test_missing_label_or_text_column_suggests_the_columns_present(tmp_path):
    f = tmp_path / "train.csv"
    f.write_text("sentence,score\na,0.5\nb,1.5\n")
    assert (
        _error(_split, f, text_col="sentence")
        == f"no column 'label' in {f}; columns: sentence, score; pass --label-column score"
    )
    assert _error(_split, f, label_col="score").endswith("columns: sentence, score; pass --text-column sentence")
    assert _error(_split, f).endswith(
        f"no column 'text' or 'label' in {f}; columns: sentence, score; pass --text-column and --label-column"
    )
    f.write_text("text,a,b\nx,1,0\ny,0,1\n")
    assert _error(_split, f).endswith("columns: text, a, b; pass --label-column with one of: a, b")
    f.write_text("text,label\nx,1\ny,0\n")
    assert _error(_split, f, pair_col="text2").endswith(
        "columns: text, label; add the column or pass --text-pair-column"
    )


def test_jsonl_missing_key_lists_the_keys_present(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text('{"text": "a", "label": 1}\n{"text": "b", "label": 0}\n{"text": "c", "lable": 1}\n')
    assert (
        _error(_split, f)
        == f"{f}:3: no column 'label' in this record (it has: text, lable); add it or remove the record"
    )
    f.write_text('{"sentence": "a", "y": 1}\n{"sentence": "b", "y": 0}\n')
    assert (
        _error(_split, f, text_col="sentence") == f"no column 'label' in {f}; columns: sentence, y; "
        "pass --label-column y"
    )
