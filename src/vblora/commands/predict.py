"""`vblora predict RUN_DIR|ADAPTER [--input FILE]`: predictions of a trained VB-LoRA run on new text, as JSON lines
(default) or CSV, with label names. Input: a CSV/TSV/JSONL/JSON file (the run's text columns), a .txt file or stdin
(one text per line)."""

from __future__ import annotations

import sys


def run(args) -> int:
    import contextlib
    import csv
    import json

    from vblora.train.predict import check_sizes, load_predictor, predict, read_inputs

    check_sizes(args.batch_size, args.max_new_tokens)  # before the model loads
    p = load_predictor(args.source, model=args.model)
    p.text_column = args.text_column or p.text_column
    stdin = getattr(sys.stdin, "buffer", sys.stdin)  # bytes: bounded lines, non-UTF-8 input named, not a traceback
    rows = predict(p, read_inputs(p, args.input, stdin), args.batch_size, args.max_new_tokens)
    with (
        open(args.output, "w", newline="", encoding="utf-8")
        if args.output
        else contextlib.nullcontext(sys.stdout) as out
    ):
        if args.format == "csv":
            writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["text"])
            writer.writeheader()
            writer.writerows(rows)
        else:
            out.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="predict with a trained run or adapter: labels, values or generations")
    p.add_argument("source", help="run directory (results.json + adapter/) or adapter directory / .safetensors")
    p.add_argument(
        "--input",
        default=None,
        help="CSV/TSV/JSONL/JSON file of the run's text columns, or .txt "
        "with one text per line (default: one text per line on stdin)",
    )
    p.add_argument("--output", default=None, help="write here instead of stdout")
    p.add_argument("--format", choices=["jsonl", "csv"], default="jsonl", help="output format (default jsonl)")
    p.add_argument("--model", default=None, help="base model directory (default: the one the adapter records)")
    p.add_argument("--text-column", default=None, help="input column of the text (default: the run's)")
    p.add_argument("--batch-size", type=int, default=32, help="examples per forward pass (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="causal LMs: generated tokens (default 32)")
    p.set_defaults(func=run)
