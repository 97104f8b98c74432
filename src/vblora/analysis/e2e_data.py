"""E2E NLG data-to-text (paper Table 2): the E2E CSV files, causal-LM training examples, decoding and scoring.

The official files (tuetschek/e2e-dataset: trainset.csv, devset.csv, testset_w_refs.csv) have the header `mr,ref`
and one row per reference, so an MR with five references appears on five rows. Training uses every row
(prompt = the MR, target = one reference, loss on the target only); evaluation uses each unique MR once, with all
its references, and scores one output per MR with `vblora.analysis.e2e_metrics` (as e2e-metrics does).

Works with any local `transformers` causal LM, GPT-2 included (its `Conv1D` layers are adapted by the core).
Nothing here downloads anything: models, tokenizers and data come from local paths.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from vblora.analysis.e2e_metrics import METRICS, compute_e2e_metrics

PROMPT_TEMPLATE = "{mr} ||"  # the MR, linearised, then the separator the LoRA/VeRA E2E data uses
TARGET_TEMPLATE = " {ref}"   # a leading space so GPT-2's BPE starts the reference as a new word
# e2e-metrics' read_tsv repairs these mis-encoded characters of the released files; we do the same
_FIXES = (("Ł", "£"), ("Â£", "£"), ("Ã©", "é"), ("ã©", "é"))


@dataclass(frozen=True)
class E2EInstance:
    """One unique input: the meaning representation and all its references (empty for an unreferenced test)."""

    mr: str
    refs: tuple[str, ...]


# ------------------------------------------------------------------------------------------------ reading
def _fix(text: str) -> str:
    for bad, good in _FIXES:
        text = text.replace(bad, good)
    return text.strip()


def read_e2e_csv(path: str | Path) -> list[tuple[str, str | None]]:
    """Rows `(mr, ref)` of an E2E CSV (columns `mr` and `ref`, any case; `ref` may be absent: then None)."""
    path = Path(path)
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty file")
        cols = [h.strip().lower() for h in header]
        if "mr" not in cols:
            raise ValueError(f"{path}: no 'mr' column in the header {header} (the E2E files start with 'mr,ref')")
        i_mr, i_ref = cols.index("mr"), (cols.index("ref") if "ref" in cols else None)
        rows = []
        for line, row in enumerate(reader, start=2):
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) != len(cols):
                raise ValueError(f"{path}:{line}: {len(row)} fields, the header has {len(cols)}")
            ref = _fix(row[i_ref]) if i_ref is not None else None
            rows.append((_fix(row[i_mr]), ref))
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def group_by_mr(rows: list[tuple[str, str | None]]) -> list[E2EInstance]:
    """Unique MRs in order of first appearance, each with its references (e2e-metrics groups consecutive rows;
    the official files keep an MR's rows together, so both give the same groups there)."""
    refs: dict[str, list[str]] = {}
    for mr, ref in rows:
        refs.setdefault(mr, [])
        if ref:
            refs[mr].append(ref)
    return [E2EInstance(mr, tuple(r)) for mr, r in refs.items()]


def load_eval_set(path: str | Path) -> list[E2EInstance]:
    """The evaluation set of a file: unique MRs with their lists of references."""
    return group_by_mr(read_e2e_csv(path))


def linearize_mr(mr: str) -> str:
    """`name[The Eagle], eatType[pub]` -> `name : The Eagle | eatType : pub` (the LoRA/VeRA E2E input format).
    Text that is not in the bracket format is returned unchanged."""
    parts = []
    for slot in mr.split("],"):
        slot = slot.strip().rstrip("]")
        if "[" not in slot:
            return mr
        key, _, value = slot.partition("[")
        parts.append(f"{key.strip()} : {value.strip()}")
    return " | ".join(parts)


def prompt_text(mr: str, template: str = PROMPT_TEMPLATE, linearize: bool = True) -> str:
    return template.format(mr=linearize_mr(mr) if linearize else mr)


# ------------------------------------------------------------------------------------------------ training
def build_train_examples(rows: list[tuple[str, str | None]] | str | Path, tokenizer, max_length: int = 512,
                         template: str = PROMPT_TEMPLATE, target_template: str = TARGET_TEMPLATE,
                         linearize: bool = True) -> list[dict]:
    """One example per (mr, ref) row: `input_ids` = prompt ++ target ++ eos, `labels` = -100 on the prompt.

    Sequences longer than `max_length` are cut from the end; a row whose target would vanish is dropped.
    """
    if isinstance(rows, (str, Path)):
        rows = read_e2e_csv(rows)
    eos = tokenizer.eos_token_id
    out = []
    for mr, ref in rows:
        if not ref:
            continue
        p = tokenizer(prompt_text(mr, template, linearize), add_special_tokens=False)["input_ids"]
        t = tokenizer(target_template.format(ref=ref), add_special_tokens=False)["input_ids"]
        t = t + ([eos] if eos is not None else [])
        ids = (p + t)[:max_length]
        if len(ids) <= len(p):
            continue
        out.append({"input_ids": ids, "labels": [-100] * len(p) + ids[len(p):]})
    if not out:
        raise ValueError("no training example left (no references, or max_length shorter than the prompts)")
    return out


def pad_id_of(tokenizer) -> int:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return pad


def collate(examples: list[dict], pad_id: int) -> dict:
    """Right-pad a batch: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    n = max(len(e["input_ids"]) for e in examples)
    ids = torch.full((len(examples), n), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), n), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, e in enumerate(examples):
        k = len(e["input_ids"])
        ids[i, :k] = torch.tensor(e["input_ids"])
        labels[i, :k] = torch.tensor(e["labels"])
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def lm_loss(logits, labels, label_smoothing: float = 0.0):
    """Next-token cross-entropy on the labelled (target) positions, with label smoothing (Table 8: 0.1)."""
    import torch.nn.functional as F

    logits = logits[:, :-1].float()  # (B, T-1, V): position t predicts token t+1
    target = labels[:, 1:]
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100,
                           label_smoothing=label_smoothing)


def train_e2e(model, examples: list[dict], pad_id: int, epochs: float = 1.0, batch_size: int = 8,
              lr_bank: float = 1e-3, lr_logits: float = 1e-2, lr_other: float = 1e-4, weight_decay: float = 0.01,
              warmup_steps: int = 500, label_smoothing: float = 0.1, max_steps: int | None = None,
              max_grad_norm: float | None = 1.0, seed: int = 0, log_every: int = 0) -> list[float]:
    """A plain loop with Table 8's optimisation (AdamW, linear schedule with warm-up, label smoothing) on a
    VB-LoRA model (`vblora.parameter_groups` learning rates). Returns the loss of every step.

    `vblora train` has its own loop; this one serves tests, notebooks and scripts that only need E2E.
    """
    import torch

    import vblora

    device = next(model.parameters()).device
    groups = vblora.parameter_groups(model, lr_bank=lr_bank, lr_logits=lr_logits, lr_other=lr_other,
                                     weight_decay=weight_decay)
    opt = torch.optim.AdamW(groups)
    per_epoch = math.ceil(len(examples) / batch_size)
    total = max_steps if max_steps is not None else max(1, math.ceil(per_epoch * epochs))
    warm = min(warmup_steps, total)

    def schedule(step: int) -> float:  # linear warm-up, then linear decay to 0 at `total`
        if step < warm:
            return (step + 1) / (warm + 1)
        return max(0.0, (total - step) / max(1, total - warm))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    model.train()
    while len(losses) < total:
        order = torch.randperm(len(examples), generator=gen).tolist()
        for i in range(0, len(order), batch_size):
            batch = {k: v.to(device) for k, v in collate([examples[j] for j in order[i:i + batch_size]],
                                                         pad_id).items()}
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss = lm_loss(logits, batch["labels"], label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], max_grad_norm)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            if log_every and len(losses) % log_every == 0:
                print(f"step {len(losses)}/{total} loss {losses[-1]:.4f}", flush=True)
            if len(losses) >= total:
                break
    model.eval()
    return losses


def eval_loss(model, examples: list[dict], pad_id: int, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (no label smoothing) over the target tokens of `examples`: the validation
    loss of an E2E run (token-weighted, so batch composition does not change it)."""
    import torch
    import torch.nn.functional as F

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(examples), batch_size):
                batch = {k: v.to(device) for k, v in collate(examples[i:i + batch_size], pad_id).items()}
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                target = batch["labels"][:, 1:]
                total += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)),
                                               target.reshape(-1), ignore_index=-100, reduction="sum"))
                count += int((target != -100).sum())
    finally:
        model.train(was_training)
    return total / max(1, count)

# Settings of an E2E run that `RunConfig` has no field for; recipes keep them under `extra.e2e`.
# Table 8: warm-up steps, label smoothing. The LoRA/VeRA E2E evaluation: beam 10, length penalty 0.8,
# no-repeat n-gram 4, 64 new tokens.
E2E_DEFAULTS = {"warmup_steps": 500, "label_smoothing": 0.1, "num_beams": 10, "length_penalty": 0.8,
                "no_repeat_ngram_size": 4, "max_new_tokens": 64, "prompt_template": PROMPT_TEMPLATE,
                "linearize_mr": True}


def e2e_options(extra: dict | None) -> dict:
    """A recipe's `extra["e2e"]` completed with `E2E_DEFAULTS` (unknown keys are an error, not ignored)."""
    given = dict((extra or {}).get("e2e") or {})
    unknown = sorted(set(given) - set(E2E_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown extra.e2e setting(s) {unknown}; known: {sorted(E2E_DEFAULTS)}")
    return {**E2E_DEFAULTS, **given}


def decoding_kwargs(options: dict) -> dict:
    """The `generate_e2e` / `evaluate_e2e` keyword arguments of `e2e_options(...)`."""
    return {"num_beams": options["num_beams"], "length_penalty": options["length_penalty"],
            "no_repeat_ngram_size": options["no_repeat_ngram_size"], "max_new_tokens": options["max_new_tokens"],
            "template": options["prompt_template"], "linearize": options["linearize_mr"]}


# ---------------------------------------------------------------------------------------------- generation
def generate_e2e(model, tokenizer, mrs: list[str], num_beams: int = 1, max_new_tokens: int = 64,
                 batch_size: int = 16, length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 template: str = PROMPT_TEMPLATE, linearize: bool = True) -> list[str]:
    """One output per MR, greedy (`num_beams=1`) or beam search, decoded up to eos / the first newline.

    Prompts are left-padded by hand (the tokenizer's padding side is left untouched) so every prompt ends where
    generation starts. The LoRA/VeRA E2E evaluation uses num_beams=10, length_penalty=0.8,
    no_repeat_ngram_size=4, max_new_tokens=64 (see the recipes).
    """
    import torch

    pad = pad_id_of(tokenizer)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    outs: list[str] = []
    try:
        with torch.no_grad():
            for i in range(0, len(mrs), batch_size):
                enc = [tokenizer(prompt_text(m, template, linearize), add_special_tokens=False)["input_ids"]
                       for m in mrs[i:i + batch_size]]
                n = max(len(e) for e in enc)
                ids = torch.full((len(enc), n), pad, dtype=torch.long)
                mask = torch.zeros((len(enc), n), dtype=torch.long)
                for j, e in enumerate(enc):
                    ids[j, n - len(e):] = torch.tensor(e)
                    mask[j, n - len(e):] = 1
                kwargs = dict(max_new_tokens=max_new_tokens, num_beams=num_beams, do_sample=False,
                              pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
                if num_beams > 1:
                    kwargs.update(length_penalty=length_penalty, early_stopping=True)
                if no_repeat_ngram_size:
                    kwargs["no_repeat_ngram_size"] = no_repeat_ngram_size
                gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
                for row in gen[:, n:].tolist():
                    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id in row:
                        row = row[:row.index(tokenizer.eos_token_id)]
                    text = tokenizer.decode(row, skip_special_tokens=True)
                    outs.append(text.strip().split("\n")[0].strip())
    finally:
        model.train(was_training)
    return outs


def write_predictions(path: str | Path, outputs: list[str]) -> None:
    """The official system-output format: one line per unique MR, in the evaluation set's order."""
    Path(path).write_text("".join(o.replace("\n", " ") + "\n" for o in outputs), encoding="utf-8")


def write_references(path: str | Path, eval_set: list[E2EInstance]) -> None:
    """measure_scores.py's multi-reference text format: an MR's references on consecutive lines, blank line
    between MRs (so `measure_scores.py refs.txt preds.txt -p` can cross-check our numbers)."""
    Path(path).write_text("\n".join("\n".join(x.refs) + "\n" for x in eval_set), encoding="utf-8")


def evaluate_e2e(model, tokenizer, eval_set: list[E2EInstance], num_beams: int = 1, max_new_tokens: int = 64,
                 batch_size: int = 16, length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
                 metrics: tuple[str, ...] = METRICS, metric_tokenizer: str = "auto",
                 meteor_modules: tuple[str, ...] | None = None, predictions_path: str | Path | None = None,
                 template: str = PROMPT_TEMPLATE, linearize: bool = True) -> dict:
    """Generate one output per unique MR and score it against all its references with the E2E metric set.

    Returns `compute_e2e_metrics`' dict (BLEU, NIST, METEOR, ROUGE_L, CIDEr on e2e-metrics' scale; a metric that
    cannot run is None with the reason in "notes") plus "predictions" (the outputs, in `eval_set` order).
    """
    eval_set = [x for x in eval_set if x.refs]
    if not eval_set:
        raise ValueError("the evaluation set has no references to score against")
    preds = generate_e2e(model, tokenizer, [x.mr for x in eval_set], num_beams=num_beams,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, length_penalty=length_penalty,
                         no_repeat_ngram_size=no_repeat_ngram_size, template=template, linearize=linearize)
    if predictions_path is not None:
        write_predictions(predictions_path, preds)
    scores = compute_e2e_metrics(preds, [list(x.refs) for x in eval_set], metrics=metrics,
                                 tokenizer=metric_tokenizer, meteor_modules=meteor_modules)
    scores["predictions"] = preds
    return scores


def score_files(refs_csv: str | Path, predictions: str | Path, **kwargs) -> dict:
    """Score a system-output file (one line per unique MR, in the CSV's first-appearance order) against an E2E
    CSV with references, like `measure_scores.py REFS.csv PRED.txt`."""
    eval_set = load_eval_set(refs_csv)
    text = Path(predictions).read_text(encoding="utf-8")
    lines = text.split("\n")[:-1] if text.endswith("\n") else text.split("\n")  # empty outputs are lines too
    preds = [line.strip() for line in lines]  # measure_scores.py strips each line too
    if len(preds) != len(eval_set):
        raise ValueError(f"{predictions}: {len(preds)} lines for {len(eval_set)} unique MRs in {refs_csv}")
    return compute_e2e_metrics(preds, [list(x.refs) for x in eval_set], **kwargs)


def main(argv: list[str] | None = None) -> int:
    """`python -m vblora.analysis.e2e_data REFS.csv PRED.txt [--tokenizer auto|java|python] [--json OUT]`"""
    import argparse
    import json

    from vblora.analysis.e2e_metrics import format_scores

    ap = argparse.ArgumentParser(prog="python -m vblora.analysis.e2e_data", description=main.__doc__)
    ap.add_argument("refs_csv")
    ap.add_argument("predictions")
    ap.add_argument("--tokenizer", default="auto", choices=("auto", "java", "python"))
    ap.add_argument("--json", default=None, help="also write the scores here as JSON")
    args = ap.parse_args(argv)
    scores = score_files(args.refs_csv, args.predictions, tokenizer=args.tokenizer)
    print(format_scores(scores))
    for metric, note in scores["notes"].items():
        print(f"{metric}: {note}")
    if args.json:
        Path(args.json).write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
