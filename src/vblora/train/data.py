"""Reading the user's labelled text files (CSV, TSV incl. GLUE layouts, JSONL) into checked examples.

Every error names the file, the line and the column, because a bad row in a 100k-line file is otherwise a hunt.
The label set comes from the training file; a label outside it in validation/test is an error, not a new class.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vblora.train.errors import DataError

# GLUE TSV layouts (as distributed by the GLUE benchmark): (text, text pair, label, header names if headerless).
GLUE_LAYOUTS: dict[str, dict] = {
    "sst2": {"text": "sentence", "pair": None, "label": "label"},
    "cola": {"text": "sentence", "pair": None, "label": "label",
             "names": ["source", "label", "original_label", "sentence"]},  # CoLA train/dev have no header
    "mrpc": {"text": "#1 String", "pair": "#2 String", "label": "Quality"},
    "qnli": {"text": "question", "pair": "sentence", "label": "label"},
    "rte": {"text": "sentence1", "pair": "sentence2", "label": "label"},
    "stsb": {"text": "sentence1", "pair": "sentence2", "label": "score"},
    "qqp": {"text": "question1", "pair": "question2", "label": "is_duplicate"},
    "mnli": {"text": "sentence1", "pair": "sentence2", "label": "gold_label"},
}


@dataclass
class Table:
    """Rows of one file, each with the 1-based line it came from (for error messages)."""

    path: Path
    rows: list[dict]
    lines: list[int]
    columns: list[str] = field(default_factory=list)


def file_format(path: Path, fmt: str | None = None) -> str:
    if fmt:
        return fmt
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix == ".json":
        return "json"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix in (".csv", ".txt"):
        return "csv"
    raise DataError(f"{path}: unknown data format '{suffix}' (use .csv, .tsv, .jsonl or .json, or pass --data-format)")


def read_table(path: str | Path, fmt: str | None = None, names: list[str] | None = None) -> Table:
    """Read a CSV/TSV (first line is the header unless `names` is given), JSONL or JSON-list file."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: data file not found")
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected a data file")
    fmt = file_format(path, fmt)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not valid UTF-8 ({e.reason})") from None
    if fmt in ("csv", "tsv"):
        return _read_delimited(path, text, "\t" if fmt == "tsv" else ",", names)
    if fmt == "jsonl":
        return _read_jsonl(path, text)
    if fmt == "json":
        return _read_json_list(path, text)
    raise DataError(f"{path}: unknown data format '{fmt}'")


def _read_delimited(path: Path, text: str, delim: str, names: list[str] | None) -> Table:
    # GLUE TSVs contain unbalanced quotes inside sentences, so TSV is read without quote handling.
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    quoting = csv.QUOTE_NONE if delim == "\t" else csv.QUOTE_MINIMAL
    reader = csv.reader(text.splitlines(), delimiter=delim, quoting=quoting)
    rows, lines = [], []
    header = names
    try:
        for i, rec in enumerate(reader, start=1):
            if not rec or all(not c.strip() for c in rec):
                continue  # blank line
            if header is None:
                header = [c.strip() for c in rec]
                if len(set(header)) != len(header):
                    raise DataError(f"{path}:{i}: duplicate column names in header {header}")
                continue
            if len(rec) != len(header):
                raise DataError(f"{path}:{i}: expected {len(header)} columns ({', '.join(header)}), found {len(rec)}")
            rows.append(dict(zip(header, rec)))
            lines.append(i)
    except csv.Error as e:
        raise DataError(f"{path}:{reader.line_num}: malformed {'TSV' if delim == chr(9) else 'CSV'}: {e}") from None
    if not rows:
        raise DataError(f"{path}: no data rows")
    return Table(path, rows, lines, list(header or []))


def _read_jsonl(path: Path, text: str) -> Table:
    rows, lines = [], []
    for i, line in enumerate(text.splitlines(), start=1):
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
    if not rows:
        raise DataError(f"{path}: no data rows")
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
    starts = [i + 1 for i, line in enumerate(text.splitlines()) if line.lstrip().startswith("{")]
    lines = starts if len(starts) == len(obj) else [1] * len(obj)
    if not obj:
        raise DataError(f"{path}: no data rows")
    return Table(path, obj, lines, sorted({k for r in obj for k in r}))


def column(table: Table, name: str, i: int, *, required: bool = True) -> str | None:
    """Value of column `name` in row i as a string; names file, line and column when it is missing."""
    row = table.rows[i]
    if name not in row:
        if i == 0 or required:
            cols = ", ".join(table.columns or row.keys())
            raise DataError(f"{table.path}:{table.lines[i]}: no column '{name}' (columns: {cols})")
        return None
    value = row[name]
    if value is None or (isinstance(value, str) and not value.strip()):
        if required:
            raise DataError(f"{table.path}:{table.lines[i]}: column '{name}' is empty")
        return None
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)


# ---- labels -------------------------------------------------------------------------------------------------


def _as_number(s: str) -> float | None:
    try:
        v = float(s)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


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
                raise DataError(f"{where}: label '{raw}' is not a number (regression task)")
            return v
        key = _canon(raw)
        if key not in self._index:
            raise DataError(f"{where}: label '{raw}' is not one of the training labels {self.names}")
        return self._index[key]

    def __post_init__(self):
        self._index = {_canon(n): i for i, n in enumerate(self.names)}


def _canon(raw: str) -> str:
    s = str(raw).strip()
    v = _as_number(s)
    return str(int(v)) if v is not None and v == int(v) else s  # "1", "1.0", " 1" are one class


def infer_labels(values: list[str], task: str | None = None) -> LabelSpace:
    """Label set from the training labels: integers or strings -> classes; any non-integer number -> regression."""
    nums = [_as_number(v) for v in values]
    if task == "regression" or (task is None and all(n is not None for n in nums) and any(n != int(n) for n in nums)):
        return LabelSpace([], regression=True)
    if all(n is not None and n == int(n) for n in nums):
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


def load_split(table: Table, text_col: str, pair_col: str | None, label_col: str,
               labels: LabelSpace | None) -> tuple[Examples, LabelSpace]:
    """Extract text/pair/label columns; infers the label space when `labels` is None (training split)."""
    texts = [column(table, text_col, i) for i in range(len(table.rows))]
    pairs = [column(table, pair_col, i) for i in range(len(table.rows))] if pair_col else None
    raw = [column(table, label_col, i) for i in range(len(table.rows))]
    if labels is None:
        labels = infer_labels(raw)
    where = [f"{table.path}:{line}: column '{label_col}'" for line in table.lines]
    ids = [labels.encode(r, w) for r, w in zip(raw, where)]
    return Examples(texts, pairs, ids), labels
