"""Predictions of a trained VB-LoRA run (or a bare adapter) on new text: what `vblora predict` prints.

The adapter carries what is needed: the base model's name or path, its class (a classifier's head size and label
names, `id2label`), so `predict(source)` needs nothing else; `model=` overrides the recorded base. A run directory
also contributes its task (regression vs classification) and its text columns.

Input is read with bounds, so no input takes the process down: a line (one text on stdin or in a .txt file, one
record of a CSV/TSV/JSONL file) longer than `MAX_LINE_BYTES`, bytes that are not UTF-8 text, or a NUL byte is one
`DataError` naming the source and the line. The model reads at most `max_length` tokens of a text anyway.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from vblora.storage import load_adapter, read_adapter
from vblora.train import data as user_data
from vblora.train import models
from vblora.train.errors import DataError, SetupError
from vblora.train.evaluate import generate
from vblora.train.tasks import prompt_text


@dataclass
class Predictor:
    model: Any  # a transformers model adapted with load_adapter (its config carries id2label)
    tokenizer: Any
    task: str  # classification | regression | causal-lm
    text_column: str = "text"
    text_pair_column: str | None = None
    max_length: int = 256


def load_predictor(source: str | Path, model: str | None = None, gguf_file: str | None = None) -> Predictor:
    """A run directory (results.json + adapter/) or an adapter (directory or .safetensors) on its base model."""
    source = Path(source)
    run = read_run(source / "results.json") if (source / "results.json").is_file() else {}
    adapter = source / "adapter" if run else source
    if run and run.get("method", "vblora") != "vblora":
        raise SetupError(
            f"{source}: a {run['method']} run; `vblora predict` reads VB-LoRA adapters (load "
            f"{adapter} with peft for the baselines)"
        )
    snap, _ = read_adapter(adapter)
    cfg = run.get("config", {})
    name = model or run.get("model") or snap.name_or_path
    if not name:
        raise SetupError(f"{adapter} does not record its base model; pass --model (a local model directory)")
    path, gguf = models.resolve_model(name, gguf_file or cfg.get("gguf_file"))
    if snap.task_type == "CAUSAL_LM":
        task = "causal-lm"
    elif snap.task_type != "SEQ_CLS":
        raise SetupError(
            f"{adapter}: a {snap.task_type or 'bare'} model adapter; predict handles sequence "
            f"classification, regression and causal LMs"
        )
    else:
        task = "regression" if run.get("task") == "regression" or len(snap.id2label or {}) == 1 else "classification"
    names = list((snap.id2label or {}).values())
    with models.fresh_head_expected(progress=False):  # the adapter brings the trained head
        base = models.load_model(path, gguf, task, max(1, len(names)), names if task == "classification" else None)
    tok = models.load_tokenizer(path, gguf)
    models.set_pad_token(base, tok)
    return Predictor(
        load_adapter(base, adapter),
        tok,
        task,
        cfg.get("text_column") or "text",
        cfg.get("text_pair_column"),
        int(cfg.get("max_length") or 256),
    )


def read_run(path: Path) -> dict:
    """A run's results.json; a damaged one is one SetupError naming it (and what to pass instead)."""
    try:
        run = json.loads(path.read_bytes())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise SetupError(
            f"{path} cannot be read ({e}); restore it, or pass the adapter directory "
            f"{path.parent / 'adapter'} (with --model if it records no base)"
        ) from None
    if not isinstance(run, dict):
        raise SetupError(
            f"{path} holds a JSON {type(run).__name__}, not a run's results; restore it, or pass the "
            f"adapter directory {path.parent / 'adapter'}"
        )
    return run


MAX_LINE_BYTES = 1 << 20  # 1 MiB per line: far above any max_length, far below what a process can hold
# Input formats by suffix: .txt is one text per line (as stdin), the others are tables of the run's text columns.
INPUT_FORMATS = {**{k: v for k, v in user_data.SUFFIX_FORMATS.items() if k != ".txt"}, ".txt": "lines"}


def read_lines(stream, where: str, limit: int = MAX_LINE_BYTES) -> list[str]:
    """The non-blank lines of a binary stream (text streams are accepted too) as text, each read with `readline`
    bounded by `limit` bytes, so a 1 GB line costs 1 MiB; a longer line, non-UTF-8 bytes or a NUL is a DataError."""
    out: list[str] = []
    n = 0
    while True:
        n += 1
        raw = stream.readline(limit + 1)
        if not raw:
            return out
        raw = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
        line = raw.rstrip(b"\r\n")
        if len(line) > limit:
            raise DataError(
                f"{where}:{n}: line longer than {limit:,} bytes; give one text per line (split or shorten it)"
            )
        if b"\0" in line:
            raise DataError(f"{where}:{n}: binary data (a NUL byte); predict reads text, one example per line")
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as e:
            raise DataError(
                f"{where}:{n}: not UTF-8 text (byte {e.start + 1}: {e.reason}); predict reads text, "
                f"one example per line"
            ) from None
        if text.strip():
            out.append(text)


def read_inputs(p: Predictor, file: str | None, stdin) -> list[tuple[str, str | None]]:
    """`(text, pair)` per example: one text per line of `stdin` (a binary stream) or of a .txt file, or a
    CSV/TSV/JSONL/JSON file's text columns."""
    if file is None:
        return [(line, None) for line in read_lines(stdin, "stdin")]
    path = Path(file)
    fmt = INPUT_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"{path}: unknown input format '{path.suffix}' (predict reads "
            f"{', '.join(sorted(INPUT_FORMATS))}; .txt is one text per line)"
        )
    if path.is_dir():
        raise DataError(f"{path}: is a directory, expected an input file")
    with open(path, "rb") as f:  # also the bound on the line-oriented tables, before they are read whole
        lines = read_lines(f, str(path)) if fmt in ("lines", "csv", "tsv", "jsonl") else None
    if fmt == "lines":
        assert lines is not None  # read above for this format
        return [(line, None) for line in lines]
    table = user_data.read_table(path, fmt)
    return [
        (
            user_data.column(table, p.text_column, i),
            user_data.column(table, p.text_pair_column, i) if p.text_pair_column else None,
        )
        for i in range(len(table.rows))
    ]


def check_sizes(batch_size: int, max_new_tokens: int) -> None:
    """Both at least 1 (a batch size of -5 once dropped every input silently)."""
    for flag, value in (("--batch-size", batch_size), ("--max-new-tokens", max_new_tokens)):
        if not isinstance(value, int) or value < 1:
            raise SetupError(f"{flag} must be a whole number >= 1 (got {value})")


@torch.no_grad()
def predict(
    p: Predictor, examples: list[tuple[str, str | None]], batch_size: int = 32, max_new_tokens: int = 32
) -> list[dict]:
    """One dict per example: `label` and `score` (classification), `value` (regression) or `generation`."""
    check_sizes(batch_size, max_new_tokens)
    out: list[dict] = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        texts, pairs = [t for t, _ in batch], [q for _, q in batch]
        if p.task == "causal-lm":
            prompts = [prompt_text(p.tokenizer, t, q or "") for t, q in batch]  # the training template
            out += [
                {"text": t, "generation": g}
                for t, g in zip(texts, generate(p.model, p.tokenizer, prompts, max_new_tokens), strict=True)
            ]
            continue
        enc = p.tokenizer(
            texts,
            pairs if any(q is not None for q in pairs) else None,
            truncation=True,
            max_length=p.max_length,
            padding=True,
            return_tensors="pt",
        )
        logits = p.model(**enc).logits.float()  # (B, labels)
        if p.task == "regression":
            out += [{"text": t, "value": float(v)} for t, v in zip(texts, logits[:, 0], strict=True)]
            continue
        probs = logits.softmax(-1)
        best = probs.argmax(-1)
        out += [
            {"text": t, "label": p.model.config.id2label[int(i)], "score": round(float(probs[r, i]), 6)}
            for r, (t, i) in enumerate(zip(texts, best, strict=True))
        ]
    return out
