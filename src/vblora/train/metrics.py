"""Metrics as GLUE reports them, as plain fractions in [0, 1] (correlations in [-1, 1]), with plain key names."""

from __future__ import annotations

import math
import re

import numpy as np


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """logits (n, C), labels (n,) -> accuracy, F1 (binary: of class 1; else macro), Matthews correlation."""
    from sklearn.metrics import f1_score, matthews_corrcoef

    pred = np.asarray(logits).argmax(-1)
    labels = np.asarray(labels).astype(int)
    binary = np.asarray(logits).shape[-1] == 2
    return {
        "accuracy": float((pred == labels).mean()),
        "f1": float(f1_score(labels, pred, average="binary" if binary else "macro", zero_division=0)),
        "matthews_correlation": float(matthews_corrcoef(labels, pred)) if len(set(labels.tolist())) > 1 else 0.0,
    }


def regression_metrics(pred: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """pred (n,) or (n, 1), target (n,) -> Pearson, Spearman (STS-B's metrics) and MSE."""
    from scipy.stats import pearsonr, spearmanr

    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    target = np.asarray(target, dtype=np.float64).reshape(-1)
    constant = np.ptp(pred) == 0 or np.ptp(target) == 0  # correlation undefined: report 0, not NaN
    return {
        "pearson": 0.0 if constant else float(pearsonr(pred, target)[0]),
        "spearman": 0.0 if constant else float(spearmanr(pred, target)[0]),
        "mse": float(np.mean((pred - target) ** 2)),
    }


def primary_metric(task: str) -> str:
    """The metric that picks the best epoch (on validation) and that `compare` reports."""
    return {"classification": "accuracy", "regression": "pearson", "causal-lm": "loss", "gsm8k": "exact_match"}[task]


def greater_is_better(metric: str) -> bool:
    return metric not in ("loss", "perplexity", "mse")


_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def final_number(text: str) -> str | None:
    """The answer number of a GSM8K-style solution: after '####' if present, else the last number in the text.

    Normalised (commas and trailing zeros removed) so '1,000', '1000.0' and '1000' compare equal.
    """
    nums = _NUM.findall(text.split("####")[-1]) if text is not None else []
    if not nums:
        return None
    v = float((nums[0] if "####" in text else nums[-1]).replace(",", ""))  # the pattern always parses
    if not math.isfinite(v):  # e.g. 400 digits
        return None
    return str(int(v)) if v == int(v) else repr(v)


def exact_match(predictions: list[str], references: list[str]) -> float:
    """Fraction of predictions whose final number equals the reference's."""
    hits = sum(
        final_number(p) is not None and final_number(p) == final_number(r)
        for p, r in zip(predictions, references, strict=True)
    )
    return hits / len(references) if references else 0.0


def perplexity(mean_loss: float) -> float:
    return float(math.exp(min(mean_loss, 50.0)))
