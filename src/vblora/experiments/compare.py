"""`vblora compare`: every method x seed through the same `train()`, then a Table-1-like summary.

Each run writes OUT/<method>-seed<k>/results.json; a run whose results.json exists is reused, so a killed compare
continues where it stopped. The summary (mean, std, median of the primary test metric; stored parameters) is
printed and saved as OUT/compare.md and OUT/compare.json.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from vblora.experiments.ablate import spread
from vblora.experiments.reuse import finished
from vblora.storage.files import atomic_write
from vblora.train.config import build_config
from vblora.train.pipeline import train


def run_compare(
    methods: list[str],
    seeds: list[int],
    out: Path,
    recipe: str | None,
    base_overrides: dict,
    method_overrides: dict[str, dict],
    log=print,
    train_fn=train,
) -> dict:
    # every run's settings first: a bad setting or recipe is one error before any training, not a FAILED per run;
    # seed-major: a compare stopped early still has every method at the first seeds. Each run: defaults <- recipe
    # <- flags <- this method's --set (the paper-style per-method settings, LoRA r=4 alpha 8, VeRA r=256, Tied-LoRA
    # r=8, VB-LoRA r=4 k=2, are RunConfig's defaults, never forced over a recipe or a flag)
    configs = [
        build_config(
            recipe,
            {
                **base_overrides,
                **method_overrides.get(method, {}),
                "method": method,
                "seed": seed,
                "output": str(out / f"{method}-seed{seed}"),
                "overwrite": True,
            },
        )
        for seed in seeds
        for method in methods
    ]
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, list[dict]] = {m: [] for m in methods}
    for cfg in configs:
        t = time.time()
        try:
            runs[cfg.method].append(finished(cfg.output, cfg, log) or train_fn(cfg, log=log))
        except Exception as e:  # one failing method must not lose the others' hours
            log(f"[compare] {cfg.method} seed {cfg.seed} FAILED: {type(e).__name__}: {e}")
            runs[cfg.method].append({"error": f"{type(e).__name__}: {e}"})
        log(f"[compare] {cfg.method} seed {cfg.seed} done in {time.time() - t:.0f} s")
        write_summary(summarize(runs, seeds), out)
    summary = summarize(runs, seeds)
    write_summary(summary, out)
    log(format_table(summary))
    return summary


def summarize(runs: dict[str, list[dict]], seeds: list[int]) -> dict:
    rows = []
    for method, rs in runs.items():
        ok = [r for r in rs if "metrics" in r]
        if not ok:
            rows.append({"method": method, "runs": 0, "errors": [r.get("error") for r in rs]})
            continue
        key = ok[0]["primary_metric"]
        vals = [float(r["metrics"]["test"][key]) for r in ok]
        rows.append(
            {
                "method": method,
                "metric": key,
                "runs": len(ok),
                "seeds": [r["seed"] for r in ok],
                "stored_parameters": ok[0]["stored_parameters"],
                "adapter_bytes": ok[0]["adapter_bytes"],
                **{f"test_{k}": v for k, v in spread(vals).items()},
                "test_values": vals,
                "validation_mean": statistics.fmean(float(r["metrics"]["validation"][key]) for r in ok),
                "train_time_s_mean": statistics.fmean(r.get("train_time_s") or 0 for r in ok),
                "epochs": ok[0]["config"]["epochs"],
                "errors": [r.get("error") for r in rs if "error" in r],
            }
        )
    return {"rows": rows, "seeds": seeds}


def format_table(summary: dict) -> str:
    head = (
        "| method | stored params | adapter bytes | epochs | seeds run | test mean | test std | test median | "
        "validation mean | train time (s) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in summary["rows"]:
        if not r["runs"]:
            state = f"failed: {r['errors'][0]}" if r["errors"] else "not run yet"
            lines.append(f"| {r['method']} | {state} | | | | | | | | |")
            continue
        lines.append(
            f"| {r['method']} | {r['stored_parameters']:,.0f} | {r['adapter_bytes']:,} | {r['epochs']:g} | "
            f"{r['runs']} | {r['test_mean']:.4f} | {r['test_std']:.4f} | {r['test_median']:.4f} | "
            f"{r['validation_mean']:.4f} | {r['train_time_s_mean']:.0f} |"
        )
    metric = next((r["metric"] for r in summary["rows"] if r.get("runs")), "metric")
    return f"Test {metric} over seeds {summary['seeds']}:\n\n" + "\n".join(lines)


def write_summary(summary: dict, out: Path) -> None:
    """compare.json and compare.md, each replaced whole (a reader or a kill never sees half a table)."""
    atomic_write(out / "compare.json", json.dumps(summary, indent=2).encode())
    atomic_write(out / "compare.md", (format_table(summary) + "\n").encode())
