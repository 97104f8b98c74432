"""A bank shared across tasks: task 2 trained with a fresh bank vs with the task-1 bank frozen (logits + head only).

Both arms are `vblora.train.pipeline.train` runs (the frozen arm with `bank=PATH, freeze_bank=True`, whose adapter
references the bank by sha256 and keeps the bank file beside it once): the frozen arm's adapter file is what each
further task costs once the shared bank is stored. Task 2 defaults to another VADER corpus (`vader.fetch_corpus`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from vblora.experiments.ablate import Budget, spread
from vblora.experiments.reuse import finished
from vblora.storage.files import atomic_write
from vblora.train.config import build_config
from vblora.train.methods import read_bank_tensor
from vblora.train.pipeline import train


def shared_bank_study(
    bank_path,
    seeds: list[int],
    out,
    task_overrides: dict,
    budget: Budget,
    recipe: str | None = None,
    train_fn=train,
    log=print,
) -> list[dict]:
    out = Path(out)
    h, b = read_bank_tensor(bank_path)[0].shape
    arms: list[tuple[str, str, dict[str, Any]]] = [
        ("fresh", "fresh bank (trained on task 2)", {"bank": None, "freeze_bank": False}),
        ("frozen", "shared task-1 bank, frozen", {"bank": str(bank_path), "freeze_bank": True}),
    ]
    rows = []
    for key, label, arm in arms:
        rs = []
        for seed in seeds:
            cfg = build_config(
                recipe,
                {
                    **task_overrides,
                    **arm,
                    "seed": seed,
                    **budget.overrides(),
                    "num_vectors": h,
                    "vector_length": b,
                    "output": str(out / f"{key}-seed{seed}"),
                    "overwrite": True,
                },
            )
            rs.append(finished(cfg.output, cfg, log) or train_fn(cfg, log=log))
        vals = [r["metrics"]["test"][r["primary_metric"]] for r in rs]
        counts, bank_file = rs[0]["details"], out / f"{key}-seed{seeds[0]}" / "bank.safetensors"
        rows.append(
            {
                "arm": label,
                "runs": len(vals),
                "values": vals,
                **spread(vals),
                "adapter_file_bytes": rs[0]["adapter_bytes"],
                "bank_file_bytes": bank_file.stat().st_size if bank_file.exists() else None,
                "task_bytes_without_bank": counts["stored_bytes"] - 4 * counts["bank"],
                "trainable": rs[0]["trainable_parameters"],
            }
        )
        summary = {"budget": budget.describe(), "seeds": seeds, "rows": rows}
        atomic_write(out / "shared_bank.json", json.dumps(summary, indent=2).encode())
    return rows


def format_shared_bank(rows: list[dict], title: str) -> str:
    lines = [
        title,
        "",
        "| task-2 arm | test accuracy: median | min-max | runs | trainable params | adapter file bytes per task |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['arm']} | {100 * r['median']:.1f} | {100 * r['min']:.1f}-{100 * r['max']:.1f} | "
            f"{r['runs']} | {r['trainable']:,} | {r['adapter_file_bytes'] or 0:,} |"
        )
    return "\n".join(lines)
