"""Predictions of a trained VB-LoRA run (or a bare adapter) on new text: what `vblora predict` prints.

The adapter carries what is needed: the base model's name or path, its class (a classifier's head size and label
names, `id2label`), so `predict(source)` needs nothing else; `model=` overrides the recorded base. A run directory
also contributes its task (regression vs classification) and its text columns.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

from vblora.storage import load_adapter, read_adapter
from vblora.train import data as D
from vblora.train import models
from vblora.train.errors import SetupError
from vblora.train.evaluate import generate
from vblora.train.tasks import prompt_text


@dataclass
class Predictor:
    model: torch.nn.Module
    tokenizer: object
    kind: str  # classification | regression | causal-lm
    text_column: str = "text"
    text_pair_column: str | None = None
    max_length: int = 256


def load_predictor(source: str | Path, model: str | None = None, gguf_file: str | None = None) -> Predictor:
    """A run directory (results.json + adapter/) or an adapter (directory or .safetensors) on its base model."""
    source = Path(source)
    run = json.loads((source / "results.json").read_text()) if (source / "results.json").is_file() else {}
    adapter = source / "adapter" if run else source
    if run and run.get("method", "vblora") != "vblora":
        raise SetupError(f"{source}: a {run['method']} run; `vblora predict` reads VB-LoRA adapters (load "
                         f"{adapter} with peft for the baselines)")
    snap, _ = read_adapter(adapter)
    cfg = run.get("config", {})
    name = model or run.get("model") or snap.name_or_path
    if not name:
        raise SetupError(f"{adapter} does not record its base model; pass --model (a local model directory)")
    path, gguf = models.resolve_model(name, gguf_file or cfg.get("gguf_file"))
    if snap.task_type == "CAUSAL_LM":
        kind = "causal-lm"
    elif snap.task_type != "SEQ_CLS":
        raise SetupError(f"{adapter}: a {snap.task_type or 'bare'} model adapter; predict handles sequence "
                         f"classification, regression and causal LMs")
    else:
        kind = "regression" if run.get("task") == "regression" or len(snap.id2label or {}) == 1 else "classification"
    names = list((snap.id2label or {}).values())
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "classifier MISSING": the adapter brings the trained head
    hf_logging.disable_progress_bar()
    try:
        base = models.load_model(path, gguf, kind, max(1, len(names)), names if kind == "classification" else None)
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    tok = models.load_tokenizer(path, gguf)
    models.set_pad_token(base, tok)
    return Predictor(load_adapter(base, adapter), tok, kind, cfg.get("text_column") or "text",
                     cfg.get("text_pair_column"), int(cfg.get("max_length") or 256))


def read_inputs(p: Predictor, file: str | None, lines) -> list[tuple[str, str | None]]:
    """`(text, pair)` per example: a CSV/TSV/JSONL file's text columns, or one text per input line."""
    if file is None:
        return [(line.rstrip("\n"), None) for line in lines if line.strip()]
    table = D.read_table(file)
    return [(D.column(table, p.text_column, i), D.column(table, p.text_pair_column, i) if p.text_pair_column
             else None) for i in range(len(table.rows))]


@torch.no_grad()
def predict(p: Predictor, examples: list[tuple[str, str | None]], batch_size: int = 32,
            max_new_tokens: int = 32) -> list[dict]:
    """One dict per example: `label` and `score` (classification), `value` (regression) or `generation`."""
    out = []
    for start in range(0, len(examples), batch_size):
        batch = examples[start:start + batch_size]
        texts, pairs = [t for t, _ in batch], [q for _, q in batch]
        if p.kind == "causal-lm":
            prompts = [prompt_text(p.tokenizer, t, q or "") for t, q in batch]  # the training template
            out += [{"text": t, "generation": g} for t, g in zip(texts, generate(p.model, p.tokenizer, prompts,
                                                                                max_new_tokens))]
            continue
        enc = p.tokenizer(texts, pairs if any(q is not None for q in pairs) else None, truncation=True,
                          max_length=p.max_length, padding=True, return_tensors="pt")
        logits = p.model(**enc).logits.float()  # (B, labels)
        if p.kind == "regression":
            out += [{"text": t, "value": float(v)} for t, v in zip(texts, logits[:, 0])]
            continue
        probs = logits.softmax(-1)
        best = probs.argmax(-1)
        out += [{"text": t, "label": p.model.config.id2label[int(i)], "score": round(float(probs[r, i]), 6)}
                for r, (t, i) in enumerate(zip(texts, best))]
    return out
