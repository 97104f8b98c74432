"""Held-out evaluation for causal-LM tasks: token-weighted loss / perplexity and generations (greedy or beam).

Trainer's eval loss averages per-batch means; `lm_loss` weights every response token equally, which is what
perplexity means. Generations are greedy (deterministic), batched with left padding.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vblora.train import metrics, tasks


@torch.no_grad()
def lm_loss(model, dataset, collator, batch_size: int) -> dict[str, float]:
    """Mean next-token cross-entropy over all response tokens of `dataset`, and its perplexity."""
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i in range(0, len(dataset), batch_size):
        batch = collator(dataset[i : i + batch_size])  # a list of example dicts (TaskData)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
        shift_logits, shift_labels = logits[:, :-1].float(), batch["labels"][:, 1:]  # predict t+1
        loss = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]),
            shift_labels.reshape(-1),
            ignore_index=-100,
            reduction="sum",
        )
        total += float(loss)
        count += int((shift_labels != -100).sum())
    mean = total / max(count, 1)
    return {"loss": mean, "perplexity": metrics.perplexity(mean), "tokens": count, "examples": len(dataset)}


@torch.no_grad()
def generate(
    model,
    tok,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 16,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    no_repeat_ngram_size: int = 0,
) -> list[str]:
    """Continuations of `prompts` (already templated), greedy or beam search, decoded without special tokens."""
    model.eval()
    device = next(model.parameters()).device
    side = tok.padding_side
    tok.padding_side = "left"  # decoder-only: pad on the left so every prompt ends where generation starts
    kw = dict(
        max_new_tokens=max_new_tokens,
        num_beams=num_beams,
        do_sample=False,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    if num_beams > 1:
        kw.update(length_penalty=length_penalty, early_stopping=True)
    if no_repeat_ngram_size:
        kw["no_repeat_ngram_size"] = no_repeat_ngram_size
    outs = []
    try:
        for i in range(0, len(prompts), batch_size):
            enc = tok(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False).to(
                device
            )
            gen = model.generate(**enc, **kw)
            outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)  # new tokens
    finally:
        tok.padding_side = side
    return outs


def answer_word(text: str) -> str:
    words = text.strip().lower().replace(".", " ").split()
    return words[0] if words else ""


def generate_answers(model, tok, data, cfg, out_dir: Path | None) -> dict[str, float]:
    """Score greedy answers on the test split (GSM8K exact match; sentiment answer accuracy) and write samples."""
    if out_dir is None:
        return {}
    recs = data.raw.get("test") or []
    sentiment = cfg.dataset == "vader-movie-instruct"
    n_score = (
        cfg.generate_eval
        if cfg.generate_eval is not None
        else (len(recs) if (sentiment or data.task == "gsm8k") else 0)
    )
    n = min(len(recs), max(n_score, cfg.num_samples))
    if n == 0:
        return {}
    prompts = [tasks.prompt_text(tok, r["instruction"], r["input"]) for r in recs[:n]]
    gens = generate(model, tok, prompts, cfg.max_new_tokens)
    result: dict[str, float] = {}
    if n_score:
        refs, preds = [r["output"] for r in recs[:n_score]], gens[:n_score]
        if data.task == "gsm8k":
            result["exact_match"] = metrics.exact_match(preds, refs)
        elif sentiment:
            result["answer_accuracy"] = sum(answer_word(p) == r for p, r in zip(preds, refs, strict=True)) / len(refs)
        result["generated"] = n_score
    with open(Path(out_dir) / "samples.jsonl", "w", encoding="utf-8") as f:
        for r, g in zip(recs[: cfg.num_samples or n], gens, strict=False):  # the first num_samples
            f.write(
                json.dumps(
                    {"instruction": r["instruction"], "input": r["input"], "reference": r["output"], "generation": g},
                    ensure_ascii=False,
                )
                + "\n"
            )
    return result
