"""Reading the user's labelled text files (CSV, TSV incl. GLUE layouts, JSONL, JSON list) into checked examples.

Every error is a `DataError` that names the file and the physical line (as `grep -n` or an editor counts lines, also
after a quoted CSV field that spans lines), and the column, because a bad row in a 100k-line file is otherwise a hunt.
CSV is read with the stdlib csv module (a newline inside a quoted field is kept as a newline); an unclosed quote is
reported where it starts. TSV is read without quote handling (GLUE TSVs have unbalanced quotes inside sentences).

Labels follow one rule, decided on the training file: a label column is numeric or categorical as a whole.
- Numeric: every label is a finite number. If all are integer-valued ("0", "1", "1.0", " 2") the task is
  classification with the integers as class ids in numeric order ("2" before "10"); if any is not an integer
  ("0.5") it is regression. Integer scores are thus classes; pass `--task regression` to regress on them.
- Categorical: every label is a class name (text that is not a number); classes are in sorted order. Here "nan" or
  "inf" are names like any other (e.g. "nan" is the ISO 639-3 code of Min Nan).
- A value that breaks the rule is an error at its file:line: a blank label, `nan` / `inf` / `-inf` or a word among
  numbers, or a number among class names (the minority type is the one reported; a tie goes to the first row's type).
The label set comes from the training file; a label outside it in validation/test is an error, not a new class.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, overload

from vblora.train.errors import DataError

# GLUE TSV layouts (as distributed by the GLUE benchmark): (text, text pair, label, header names if headerless).
GLUE_LAYOUTS: dict[str, dict] = {
    "sst2": {"text": "sentence", "pair": None, "label": "label"},
    "cola": {
        "text": "sentence",
        "pair": None,
        "label": "label",
        "names": ["source", "label", "original_label", "sentence"],
    },  # CoLA train/dev have no header
    "mrpc": {"text": "#1 String", "pair": "#2 String", "label": "Quality"},
    "qnli": {"text": "question", "pair": "sentence", "label": "label"},
    "rte": {"text": "sentence1", "pair": "sentence2", "label": "label"},
    "stsb": {"text": "sentence1", "pair": "sentence2", "label": "score"},
    "qqp": {"text": "question1", "pair": "question2", "label": "is_duplicate"},
    "mnli": {"text": "sentence1", "pair": "sentence2", "label": "gold_label"},
}


@dataclass
class Table:
    """Rows of one file, each with the 1-based line it came from (for error messages), and the file's columns."""

    path: Path
    rows: list[dict]
    lines: list[int]
    columns: list[str]


SUFFIX_FORMATS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".tsv": "tsv",
    ".tab": "tsv",
    ".csv": "csv",
    ".txt": "csv",
}


def read_table(path: str | Path, fmt: str | None = None, names: list[str] | None = None) -> Table:
    """Read a CSV/TSV (first line is the header unless `names` is given), JSONL or JSON-list file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")
    fmt = fmt or SUFFIX_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown data format '{path.suffix.lower()}' (use .csv, .tsv, .jsonl or .json, or "
            f"pass --data-format)"
        )
    try:
        text = path.read_text(encoding="utf-8").removeprefix("\ufeff")  # a BOM (Excel) is not part of the header
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    if fmt in ("csv", "tsv"):
        table = _read_delimited(path, text, "\t" if fmt == "tsv" else ",", names)
    elif fmt == "jsonl":
        table = _read_jsonl(path, text)
    elif fmt == "json":
        table = _read_json_list(path, text)
    else:
        raise DataError(f"{path}: unknown data format '{fmt}'")
    if not table.rows:
        raise DataError(f"{path}: no data rows")
    return table


def _read_delimited(path: Path, text: str, delim: str, names: list[str] | None) -> Table:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    file_type = "TSV" if delim == "\t" else "CSV"
    # GLUE TSVs: unbalanced quotes in sentences
    quoting: Literal[0, 1, 2, 3] = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
    # Lines split on "\n" only (str.splitlines would also split on \u2028, \x0c, ...) and keep it, so a newline in a
    # quoted field survives and reader.line_num counts physical lines.
    physical = io.StringIO(text).readlines()
    reader = csv.reader(physical, delimiter=delim, quoting=quoting)
    rows, lines = [], []
    header = names
    end = 0  # physical line on which the previous record ended
    try:
        for rec in reader:
            start, end = end + 1, reader.line_num
            if quoting != csv.QUOTE_NONE and (end > start or end == len(physical)):
                _check_quotes(path, physical, start, end, rec)
            if not rec or all(not c.strip() for c in rec):
                continue  # blank line
            if header is None:
                header = [c.strip() for c in rec]
                if len(set(header)) != len(header):
                    raise DataError(f"{path}:{start}: duplicate column names in header {header}")
                continue
            if len(rec) != len(header):
                span = (
                    f" in the record on lines {start}-{end} (a quoted field spans lines: check for a stray or "
                    f"unclosed quote)"
                    if end > start
                    else ""
                )
                raise DataError(
                    f"{path}:{start}: expected {len(header)} columns ({', '.join(header)}), found {len(rec)}{span}"
                )
            rows.append(dict(zip(header, rec, strict=True)))
            lines.append(start)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed {file_type}: {e}") from None
    return Table(path, rows, lines, list(header or []))


def _check_quotes(path: Path, physical: list[str], start: int, end: int, rec: list[str]) -> None:
    """A record read leniently over lines start..end must also read strictly (the check that catches quotes gone
    wrong: the lenient reader takes an unclosed quote's field to the end of the file, or to the next stray quote)."""
    strict = csv.reader(physical[start - 1 : end], strict=True)
    try:
        for _ in strict:
            pass
    except csv.Error as e:
        if "unexpected end of data" in str(e):  # ends inside a quoted field: the last one, holding all the newlines
            opened = max(start, end - rec[-1].count("\n") + physical[-1].endswith("\n"))
            raise DataError(
                f"unclosed quote starting at {path}:{opened}: the quoted field runs to the end of the "
                f'file; close it (a quote that is part of the text is written "" inside a quoted '
                f"field)"
            ) from None
        if end == start:
            return  # one line: the lenient reading ("a" ,1 -> 'a ') is kept
        raise DataError(
            f"{path}:{start}: malformed CSV: a quoted field runs over lines {start}-{end} and has text "
            f"after its closing quote on line {start - 1 + strict.line_num} ({e}); check for a stray or "
            f"unclosed quote"
        ) from None


def _read_jsonl(path: Path, text: str) -> Table:
    rows, lines = [], []
    for i, line in enumerate(text.split("\n"), start=1):  # "\n" only: JSON strings may hold a raw \u2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: column {e.colno}: invalid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{i}: expected a JSON object per line, found {type(obj).__name__}")
        rows.append(obj)
        lines.append(i)
    return Table(path, rows, lines, sorted({k for r in rows for k in r}))


def _read_json_list(path: Path, text: str) -> Table:
    """A JSON array of objects (Alpaca layout); line numbers are those where each object starts."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: column {e.colno}: invalid JSON: {e.msg}") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):
        obj = obj["data"]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"{path}: expected a JSON list of objects")
    starts = [i + 1 for i, line in enumerate(text.split("\n")) if line.lstrip().startswith("{")]
    lines = starts if len(starts) == len(obj) else [1] * len(obj)
    return Table(path, obj, lines, sorted({k for r in obj for k in r}))


@overload
def column(table: Table, name: str, i: int, *, required: Literal[True] = True) -> str: ...
@overload
def column(table: Table, name: str, i: int, *, required: bool) -> str | None: ...
def column(table: Table, name: str, i: int, *, required: bool = True) -> str | None:
    """Value of column `name` in row i as a string; names file, line and column when it is missing or empty."""
    row = table.rows[i]
    if name not in row:
        if i == 0 or required:
            if name not in table.columns:
                raise DataError(
                    f"{table.path}:{table.lines[i]}: no column '{name}' (columns: {', '.join(table.columns)})"
                )
            raise DataError(
                f"{table.path}:{table.lines[i]}: no column '{name}' in this record (it has: "
                f"{', '.join(map(str, row)) or 'nothing'}); add it or remove the record"
            )
        return None
    value = row[name]
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataError(f"{table.path}:{table.lines[i]}: column '{name}' is empty; fill it in or remove the row")
        return None
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


def _require_columns(table: Table, wanted: dict[str, str | None]) -> None:
    """Check that the columns `wanted` ({flag: column}) exist; else list those present as suggestions for the flags."""
    cols = table.columns
    missing = {flag: name for flag, name in wanted.items() if name and name not in cols}
    if not missing:
        return
    free = [c for c in cols if c not in wanted.values()]
    what = " or ".join(f"'{n}'" for n in missing.values())
    if len(missing) == 1:
        flag = next(iter(missing))
        hint = (
            f"pass {flag} {free[0]}"
            if len(free) == 1
            else f"pass {flag} with one of: {', '.join(free)}"
            if free
            else f"add the column or pass {flag}"
        )
    else:
        hint = "pass " + " and ".join(missing)
    raise DataError(f"no column {what} in {table.path}; columns: {', '.join(cols) or 'none'}; {hint}")


# ---- labels -------------------------------------------------------------------------------------------------


def _value_type(s: str) -> str:
    """'number' (finite), 'non-finite' (nan, inf, -inf, ...) or 'name'."""
    try:
        return "number" if math.isfinite(float(s)) else "non-finite"
    except ValueError:
        return "name"


def _as_number(s: str) -> float | None:
    return float(s) if _value_type(s) == "number" else None


_FIX = "fix the value or remove the row"
_RULE = "a label column is all numbers or all class names"


@dataclass
class LabelSpace:
    """Either classes (names in a fixed order; model label i = names[i]) or regression (names empty)."""

    names: list[str]
    regression: bool = False

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.names)

    def encode(self, raw: str, where: str) -> float | int:
        if self.regression:
            v = _as_number(raw)
            if v is None:
                raise DataError(f"{where}: label '{raw}' is not a finite number (regression task); {_FIX}")
            return v
        key = _canon(raw)
        if key not in self._index:
            raise DataError(f"{where}: label '{raw}' is not one of the training labels {self.names}; {_FIX}")
        return self._index[key]

    def __post_init__(self):
        self._index = {_canon(n): i for i, n in enumerate(self.names)}


def _canon(raw: str) -> str:
    s = str(raw).strip()
    v = _as_number(s)
    return str(int(v)) if v is not None and v == int(v) else s  # "1", "1.0", " 1" are one class


def infer_labels(values: list[str], where: list[str] | None = None) -> LabelSpace:
    """Label set from the training labels (the rule is in the module docstring); `where[i]` locates values[i].
    (`--task regression` skips this: tasks.py starts from a regression LabelSpace.)"""
    where = where or [f"label {i + 1}" for i in range(len(values))]
    for v, w in zip(values, where, strict=True):
        if not str(v).strip():
            raise DataError(f"{w}: label is empty; fill it in or remove the row")
    types = [_value_type(v) for v in values]
    n_num, n_name = types.count("number"), types.count("name")
    if n_num and n_num < len(types):  # numbers mixed with non-finite values or names
        numeric = n_num > n_name or (n_num == n_name and types[0] == "number")
        example = values[types.index("number" if numeric else "name")]
        bad = next(i for i, k in enumerate(types) if (k != "number") == numeric)
        if numeric:
            raise DataError(
                f"{where[bad]}: label '{values[bad]}' is not a finite number, while the column's other "
                f"labels are numbers (e.g. '{example}'); {_RULE}: {_FIX}"
            )
        raise DataError(
            f"{where[bad]}: label '{values[bad]}' is a number, while the column's other labels are "
            f"class names (e.g. '{example}'); {_RULE}: {_FIX}"
        )
    nums = [n for n in map(_as_number, values) if n is not None]
    all_numbers = len(nums) == len(values)
    if all_numbers and any(n != int(n) for n in nums):
        return LabelSpace([], regression=True)
    if all_numbers and all(n == int(n) for n in nums):
        names = [str(x) for x in sorted({int(n) for n in nums})]  # numeric order: "2" before "10"
    else:
        names = sorted({v.strip() for v in values})
    if len(names) < 2:
        raise DataError(f"the training labels have a single class {names}; need at least two")
    return LabelSpace(names)


@dataclass
class Examples:
    """Checked classification/regression examples of one split."""

    texts: list[str]
    pairs: list[str] | None
    labels: list  # int class ids or float targets


def load_split(
    table: Table, text_col: str, pair_col: str | None, label_col: str, labels: LabelSpace | None
) -> tuple[Examples, LabelSpace]:
    """Extract text/pair/label columns; infers the label space when `labels` is None (training split)."""
    _require_columns(table, {"--text-column": text_col, "--text-pair-column": pair_col, "--label-column": label_col})
    texts = [column(table, text_col, i) for i in range(len(table.rows))]
    pairs = [column(table, pair_col, i) for i in range(len(table.rows))] if pair_col else None
    raw = [column(table, label_col, i) for i in range(len(table.rows))]
    where = [f"{table.path}:{line}: column '{label_col}'" for line in table.lines]
    if labels is None:
        labels = infer_labels(raw, where=where)
    ids = [labels.encode(r, w) for r, w in zip(raw, where, strict=True)]
    return Examples(texts, pairs, ids), labels
