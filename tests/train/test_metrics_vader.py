"""Metrics pinned on hand-computed values; VADER parsing/splitting without the network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from vblora.train import metrics, vader


def test_classification_metrics_hand_computed():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])  # predictions 0, 1, 0, 1
    labels = np.array([0, 1, 1, 1])
    m = metrics.classification_metrics(logits, labels)
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.8)  # precision 1, recall 2/3
    # MCC = (TP*TN - FP*FN) / sqrt(...) = (2*1 - 0*1) / sqrt(2*3*1*2)
    assert m["matthews_correlation"] == pytest.approx(2 / np.sqrt(12))


def test_regression_metrics():
    m = metrics.regression_metrics(np.array([[1.0], [2.0], [3.0], [5.0]]), np.array([2.0, 4.0, 6.0, 8.0]))
    assert m["spearman"] == pytest.approx(1.0)
    assert m["pearson"] == pytest.approx(np.corrcoef([1, 2, 3, 5], [2, 4, 6, 8])[0, 1])
    assert metrics.regression_metrics(np.ones(3), np.arange(3.0))["pearson"] == 0.0  # constant prediction: 0, not NaN


def test_gsm8k_final_number():
    assert metrics.final_number("She has 3 + 4 = 7 apples.\n#### 1,000") == "1000"
    assert metrics.final_number("The answer is 12.50 dollars") == "12.5"
    assert metrics.final_number("no number") is None
    assert metrics.exact_match(["... so 18", "#### 7", "none"], ["#### 18", "#### 8", "#### 3"]) == pytest.approx(1 / 3)


def test_vader_parse_and_split_are_fixed():
    text = "\n".join(f"{i}\t{(-1) ** i * (i % 4) / 2}\tsentence {i}" for i in range(1, 101)) + "\r\n"
    recs = vader.parse_ground_truth(text)
    assert len(recs) == 75  # ratings with i % 4 == 0 are 0: dropped
    assert all(r["label"] == int(r["rating"] > 0) for r in recs)
    a, b = vader.make_split(recs), vader.make_split(list(reversed(recs)))
    assert [r["id"] for r in a["test"]] == [r["id"] for r in b["test"]]  # independent of input order
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (60, 7, 8)
    ids = [r["id"] for s in a.values() for r in s]
    assert sorted(ids) == sorted(r["id"] for r in recs)
    with pytest.raises(vader.DataError, match=r"^hutto_ICWSM_2014/tweets_GroundTruth.txt:2: expected 3"):
        vader.parse_ground_truth("1\t0.5\tfine\n2\tno rating", "hutto_ICWSM_2014/tweets_GroundTruth.txt")


def test_vader_fetch_checks_hashes(tmp_path, monkeypatch):
    """A corrupted download is refused (no network: the 'download' is a local bogus file)."""
    (tmp_path / "downloads").mkdir()
    (tmp_path / "downloads" / vader.SDIST).write_bytes(b"not the archive")
    with pytest.raises(vader.DataError, match="sha256"):
        vader.fetch(tmp_path)
    assert not vader.split_paths(tmp_path)["train"].exists()


@pytest.mark.slow
def test_vader_fetch_real(tmp_path):
    """Downloads from PyPI (network): sizes of the pinned split."""
    paths = vader.fetch(tmp_path)
    sizes = {k: len(Path(p).read_text().splitlines()) for k, p in paths.items()}
    assert sizes == {"train": 8454, "validation": 1056, "test": 1058}
    first = json.loads(Path(paths["train"]).read_text().splitlines()[0])
    assert set(first) == {"id", "text", "rating", "label"}
