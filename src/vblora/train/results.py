"""What a finished run writes and prints: the rows and fields of results.json and the one summary line."""

from __future__ import annotations

import platform

import numpy as np
import peft
import torch
import transformers

import vblora


def library_versions() -> dict:
    """The versions a run records in results.json (what produced its numbers)."""
    return {
        "vblora": vblora.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def strip_prefix(m: dict) -> dict:
    """`eval_accuracy` -> `accuracy`; keep metrics, drop runtime counters."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    return {k.split("_", 1)[1]: float(v) for k, v in m.items() if not any(k.endswith(s) for s in skip)}


def per_epoch_rows(history: list[dict]) -> list[dict]:
    """One row per evaluation in the Trainer's log history: epoch, step, the last logged train loss, validation."""
    rows, train_loss = [], None
    for h in history:
        if "loss" in h:
            train_loss = h["loss"]
        if "eval_loss" in h:
            rows.append(
                {
                    "epoch": h.get("epoch"),
                    "step": h.get("step"),
                    "train_loss": train_loss,
                    "validation": strip_prefix({k: v for k, v in h.items() if k.startswith("eval_")}),
                }
            )
    return rows


def json_default(o):
    """numpy scalars as numbers, sets and tuples as lists, anything else as its string (json.dumps's default)."""
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    return list(o) if isinstance(o, (set, tuple)) else str(o)


def summary_line(r: dict) -> str:
    """The one line `vblora train` prints at the end: test metrics, stored parameters, adapter bytes, best epoch."""
    t = r["metrics"]["test"]
    key = r["primary_metric"] if r["primary_metric"] in t else next(iter(t), None)
    shown = ", ".join(
        f"{k} {t[k]:.4f}" for k in dict.fromkeys((key, "perplexity", "exact_match", "answer_accuracy")) if k in t
    )
    wall = f", wall {r['wall_time_s']:.0f} s" if r.get("wall_time_s") else ""
    best = "-" if r["best_epoch"] is None else format(r["best_epoch"], "g")
    return (
        f"{r['method']}: test {shown} | stored parameters {r['stored_parameters']:,.0f} | "
        f"adapter bytes {r['adapter_bytes']:,} | best epoch {best}{wall}"
    )
