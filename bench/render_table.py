"""Render a bench/speed.py results JSON (and optionally a bench/parity.py JSON) as markdown tables.

python bench/render_table.py bench/results/speed-cuda-....json [--parity parity.json]
"""

from __future__ import annotations

import argparse
import json
import sys

NAMES = {"lora_r4": "PEFT LoRA r=4", "lora_r64": "PEFT LoRA r=64", "peft_vblora": "PEFT VB-LoRA", "ours": "ours"}
CASE_TITLES = {
    "roberta_qv": "RoBERTa-base shape, {dtype}, bs {batch}x{seq}, q/v (h={h}, b={b})",
    "roberta_all": "RoBERTa-base shape, {dtype}, bs {batch}x{seq}, all linear (h={h}, b={b})",
    "llama1b_all": "LLaMA 1.1B shape, {dtype}, bs {batch}x{seq}, all linear (h={h}, b={b})",
    "smollm2_all": "SmolLM2-135M shape ({layers} layers), {dtype}, bs {batch}x{seq}, all linear (h={h}, b={b})",
}


def ms(s: dict | None) -> str:
    if not s:
        return "n/a"
    return f"{s['median']:.1f} ({s['min']:.1f}-{s['max']:.1f})"


def mib(x) -> str:
    if not x:
        return "n/a"
    return f"{x / 2**20:,.0f}" if x >= 10 * 2**20 else f"{x / 2**20:.2f}"


def num(x) -> str:
    if x is None:
        return "n/a"
    return f"{x / 1e6:.3f}M" if x >= 1e5 else f"{x:,.0f}"


def ratio(a, b) -> str:
    return f"{a / b:.2f}" if a and b else "n/a"


def render(res: dict, summary_only: bool = False) -> str:
    env = res.get("env", {})
    v = env.get("versions", {})
    where = env.get("gpu") or f"CPU ({env.get('processor')}, {env.get('cpu_count')} cores)"
    lines = [
        f"Device: {where}; torch {v.get('torch')}, transformers {v.get('transformers')}, peft {v.get('peft')}; "
        f"{env.get('date')}. Times in ms: median (min-max) over {res.get('args', {}).get('steps')} "
        f"interleaved steps; ratios are of medians.",
        "",
    ]
    summary = [
        "| case | LoRA r=4 train | PEFT VB-LoRA train | ours train | ours / LoRA r=4 | PEFT VB-LoRA / ours | "
        "ours fwd / LoRA r=4 fwd | ours merged fwd / base fwd | peak: ours / LoRA r=64 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    details = []
    for name, c in res.get("cases", {}).items():
        if "methods" not in c:
            summary.append(f"| {name} | {c.get('error') or c.get('skipped')} |||||||")
            continue
        title = CASE_TITLES.get(name, name).format(**c["case"])
        m = c["methods"]

        def med(meth, key, m=m):
            return (m.get(meth, {}).get(key) or {}).get("median")

        base = c.get("base", {})
        base_fwd = (base.get("fwd_merged_phase_ms") or base.get("fwd_ms") or {}).get("median")
        summary.append(
            f"| {title} | {ms(m.get('lora_r4', {}).get('train_ms'))} | {ms(m.get('peft_vblora', {}).get('train_ms'))} "
            f"| {ms(m.get('ours', {}).get('train_ms'))} | {ratio(med('ours', 'train_ms'), med('lora_r4', 'train_ms'))} "
            f"| {ratio(med('peft_vblora', 'train_ms'), med('ours', 'train_ms'))} "
            f"| {ratio(med('ours', 'fwd_ms'), med('lora_r4', 'fwd_ms'))} "
            f"| {ratio(med('ours', 'fwd_merged_ms'), base_fwd)} "
            f"| {ratio(m.get('ours', {}).get('peak_bytes'), m.get('lora_r64', {}).get('peak_bytes'))} |"
        )
        pr = {k: v["median"] for k, v in (c.get("paired_ratios") or {}).items() if v}
        paired = ("; medians of per-round ratios: " + ", ".join(f"{k} {v:.3f}" for k, v in pr.items())) if pr else ""
        details += [
            f"**{title}** (base model forward: {ms(base.get('fwd_ms'))} ms in the unmerged phase, "
            f"{ms(base.get('fwd_merged_phase_ms'))} ms in the merged phase{paired})",
            "",
            "| method | train step | fwd unmerged | fwd merged | peak MiB | static MiB | trainable | stored "
            "| logits+grad+AdamW MiB (share of peak) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for meth, r in m.items():
            share = f" ({100 * r['logits_share_of_peak']:.1f}%)" if r.get("logits_share_of_peak") else ""
            logits = f"{mib(r.get('logits_state_bytes'))}{share}" if r.get("logits_state_bytes") else "-"
            details.append(
                f"| {NAMES.get(meth, meth)} | {ms(r.get('train_ms'))} | {ms(r.get('fwd_ms'))} "
                f"| {ms(r.get('fwd_merged_ms'))} | {mib(r.get('peak_bytes'))} | {mib(r.get('static_bytes'))} "
                f"| {num(r.get('trainable'))} | {num(r.get('stored'))} | {logits} |"
            )
        if c.get("errors"):
            details.append(f"\nerrors: {c['errors']}")
        details.append("")
    return "\n".join(lines + summary + ([] if summary_only else ["", *details]))


def render_parity(par: dict) -> str:
    lines = [
        f"Parity on {par.get('gpu') or par.get('device')} (torch {par.get('torch')}):",
        "",
        "| check | result | details |",
        "|---|---|---|",
    ]
    for name, r in par.get("checks", {}).items():
        det = ", ".join(
            f"{k}={v:.2e}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items() if k not in ("ok", "trace")
        )
        lines.append(f"| {name} | {'PASS' if r.get('ok') else 'FAIL'} | {det} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("results", nargs="*", help="speed JSON file(s)")
    p.add_argument("--parity", action="append", default=[], help="parity JSON file(s)")
    p.add_argument("--summary-only", action="store_true", help="one summary row per case, no per-method tables")
    args = p.parse_args(argv)
    parts = []
    for path in args.results:
        try:
            with open(path) as f:
                parts.append(render(json.load(f), args.summary_only))
        except (OSError, ValueError) as e:
            parts.append(f"({path}: {e})")
    for path in args.parity:
        try:
            with open(path) as f:
                parts.append(render_parity(json.load(f)))
        except (OSError, ValueError) as e:
            parts.append(f"({path}: {e})")
    print("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
