"""Helpers shared by the training-pipeline tests (data writers, fast-run overrides)."""

from __future__ import annotations

import json
import random

WORDS_POS = ["good", "great", "fine", "nice", "superb", "lovely"]
WORDS_NEG = ["bad", "awful", "poor", "terrible", "dull", "boring"]
WORDS_NEU = ["the", "a", "movie", "film", "was", "is", "very", "plot", "acting", "and", "it", "this"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
LM_SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
LM_WORDS = (
    WORDS_POS
    + WORDS_NEG
    + WORDS_NEU
    + [
        "###",
        "Instruction:",
        "Response:",
        "Input:",
        "Below",
        "positive",
        "negative",
        "answer",
        "sentiment",
        "what",
        "add",
        "plus",
        "#",
        "user",
        "assistant",
        ":",
        "<|im_start|>",
        "<|im_end|>",
    ]
    + [str(i) for i in range(30)]
)


def sentence(rng: random.Random, positive: bool) -> str:
    words = [*rng.sample(WORDS_NEU, 3), rng.choice(WORDS_POS if positive else WORDS_NEG)]
    rng.shuffle(words)
    return " ".join(words)


def make_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        pos = i % 2 == 0
        rows.append({"text": sentence(rng, pos), "label": "positive" if pos else "negative"})
    return rows


def write_csv(path, rows: list[dict], delim: str = ",") -> str:
    cols = list(rows[0])
    lines = [delim.join(cols)] + [delim.join(str(r[c]) for c in cols) for r in rows]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_overrides(model: str, files: dict, out, **kw) -> dict:
    """Overrides for a fast tiny run on CPU (vector length 32 divides hidden 64 and FFN 128)."""
    base = {
        "model": model,
        **files,
        "output": str(out),
        "device": "cpu",
        "epochs": 2,
        "batch_size": 8,
        "eval_batch_size": 16,
        "vector_length": 32,
        "num_vectors": 16,
        "max_length": 16,
        "logging_steps": 1000,
        "lr_head": 1e-2,
        "overwrite": True,
    }
    base.update(kw)
    return base
