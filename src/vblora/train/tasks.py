"""From a RunConfig to tokenized train/validation/test datasets for the two task families.

Classification/regression: one example = `input_ids`, `attention_mask` (+ `token_type_ids`), `labels`; batches are
padded dynamically (DataCollatorWithPadding) to their longest member, capped at `max_length`.
Causal LM (Alpaca, GSM8K): the prompt (chat template when the tokenizer has one) and the response are tokenized
separately and concatenated, and `labels` is -100 on the prompt so the loss covers the response only.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from vblora.train import data as user_data
from vblora.train import vader
from vblora.train.config import RunConfig
from vblora.train.errors import DataError

ALPACA_PROMPT = (
    "Below is an instruction that describes a task{ctx}. Write a response that appropriately completes "
    "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
SENTIMENT_INSTRUCTION = "Is the sentiment of this movie review positive or negative? Answer with one word."


@dataclass
class TaskData:
    """Tokenized splits: each a list of example dicts (a list is all a Trainer and a DataLoader need of a dataset)."""

    task: str  # classification|regression|causal-lm|gsm8k (regression inferred from labels)
    train: list[dict]
    validation: list[dict] | None  # None: no best-epoch selection, the final state is scored
    test: list[dict]
    labels: user_data.LabelSpace | None = None
    raw: dict = field(default_factory=dict)  # split -> list of raw records (LM: prompts/answers for generation)
    info: dict = field(default_factory=dict)
    # the task's own scoring of the best state, (model, tokenizer, data, cfg, out_dir | None) -> test metrics;
    # None: LM tasks score greedy answers (evaluate.generate_answers)
    evaluate: Callable | None = None

    @classmethod
    def from_splits(cls, task: str, splits: dict, labels, raw: dict, info: dict) -> TaskData:
        """From {split: examples} with train and validation (None: none); the test split defaults to validation."""
        test = splits.get("test", splits["validation"])
        return cls(task, splits["train"], splits["validation"], test, labels, raw, info)


def _files(cfg: RunConfig) -> dict[str, str]:
    if cfg.dataset in ("vader-movie", "vader-movie-instruct"):
        return {k: str(v) for k, v in vader.fetch(log=lambda *_: None).items()}
    if cfg.dataset:
        raise DataError(f"unknown dataset '{cfg.dataset}' (built in: vader-movie, vader-movie-instruct)")
    files = {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file}
    if not files["train"]:
        raise DataError("--train-file is required when no built-in dataset is used")
    if not files["validation"]:
        raise DataError("--validation-file is required (the best epoch is chosen on it)")
    return {k: v for k, v in files.items() if v}


def _split_cap(cfg: RunConfig, split: str) -> int | None:
    return {"train": cfg.max_train_samples, "validation": cfg.max_eval_samples, "test": cfg.max_test_samples}[split]


def build(cfg: RunConfig, tokenizer) -> TaskData:
    files = _files(cfg)
    if cfg.task in ("causal-lm", "gsm8k") or cfg.dataset == "vader-movie-instruct":
        return _build_lm(cfg, tokenizer, files)
    return _build_classification(cfg, tokenizer, files)


# ---- classification / regression ------------------------------------------------------------------------------


def _build_classification(cfg: RunConfig, tokenizer, files: dict[str, str]) -> TaskData:
    text_col, pair_col, label_col, names = cfg.text_column, cfg.text_pair_column, cfg.label_column, None
    if cfg.glue_task:
        if cfg.glue_task not in user_data.GLUE_LAYOUTS:
            raise DataError(f"unknown GLUE task '{cfg.glue_task}' (one of {', '.join(user_data.GLUE_LAYOUTS)})")
        lay = user_data.GLUE_LAYOUTS[cfg.glue_task]
        text_col, pair_col, label_col, names = lay["text"], lay["pair"], lay["label"], lay.get("names")
    labels = user_data.LabelSpace([], regression=True) if cfg.task == "regression" else None
    splits, raw = {}, {}
    for split, path in files.items():  # train, validation[, test]
        table = user_data.read_table(path, cfg.data_format, names)
        ex, labels = user_data.load_split(table, text_col, pair_col, label_col, labels)
        cap = _split_cap(cfg, split)  # None: all
        enc = tokenizer(
            ex.texts[:cap], ex.pairs[:cap] if ex.pairs else None, truncation=True, max_length=cfg.max_length
        )
        items = [
            {**{k: enc[k][i] for k in enc}, "labels": float(y) if labels.regression else int(y)}
            for i, y in enumerate(ex.labels[:cap])
        ]
        splits[split], raw[split] = items, {"n": len(items), "file": path}
    assert labels is not None  # inferred from the train split, which `files` always holds
    if cfg.dataset == vader.DATASET and labels.names == ["0", "1"]:  # the class ids of the built-in data, named
        labels = user_data.LabelSpace(list(vader.LABEL_NAMES))
    task = "regression" if labels.regression else "classification"
    return TaskData.from_splits(task, splits, labels, raw, {"files": files, "label_names": labels.names})


# ---- causal LM (Alpaca instruction tuning, GSM8K, instruction-style sentiment) ----------------------------------


def _lm_records(cfg: RunConfig, path: str) -> list[dict]:
    """-> [{"instruction", "input", "output"}] from Alpaca JSON/JSONL, GSM8K JSONL or the VADER split."""
    table = user_data.read_table(path, cfg.data_format)
    out = []
    for i in range(len(table.rows)):
        if cfg.dataset == "vader-movie-instruct":
            text, label = user_data.column(table, "text", i), user_data.column(table, "label", i)
            out.append({"instruction": SENTIMENT_INSTRUCTION, "input": text, "output": vader.LABEL_NAMES[int(label)]})
        elif cfg.task == "gsm8k":  # GSM8K {question, answer}; MetaMathQA {query, response} likewise
            q = "question" if "question" in table.rows[i] or "query" not in table.rows[i] else "query"
            a = "answer" if "answer" in table.rows[i] or "response" not in table.rows[i] else "response"
            out.append(
                {"instruction": user_data.column(table, q, i), "input": "", "output": user_data.column(table, a, i)}
            )
        else:
            out.append(
                {
                    "instruction": user_data.column(table, "instruction", i),
                    "input": user_data.column(table, "input", i, required=False) or "",
                    "output": user_data.column(table, "output", i),
                }
            )
    return out


def _user(instruction: str, inp: str) -> dict:
    return {"role": "user", "content": instruction + (f"\n\n{inp}" if inp else "")}


def prompt_text(tokenizer, instruction: str, inp: str) -> str:
    """The prompt up to where the response starts (chat template with generation prompt, else Alpaca's)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([_user(instruction, inp)], tokenize=False, add_generation_prompt=True)
    ctx = ", paired with an input that provides further context" if inp else ""
    block = f"### Input:\n{inp}\n\n" if inp else ""
    return ALPACA_PROMPT.format(ctx=ctx, instruction=instruction, input_block=block)


def response_text(tokenizer, instruction: str, inp: str, output: str) -> str:
    """What follows the prompt in a full training sequence (the answer plus the end-of-turn/eos marker)."""
    if getattr(tokenizer, "chat_template", None):
        msgs = [_user(instruction, inp), {"role": "assistant", "content": output}]
        full = tokenizer.apply_chat_template(msgs, tokenize=False)
        prompt = prompt_text(tokenizer, instruction, inp)
        if full.startswith(prompt):
            return full[len(prompt) :]
    return output + (tokenizer.eos_token or "")


def encode_lm(tokenizer, rec: dict, max_length: int) -> dict | None:
    """input_ids = prompt ++ response, labels = -100 on the prompt; None when the response is truncated away."""
    p = tokenizer(prompt_text(tokenizer, rec["instruction"], rec["input"]), add_special_tokens=False)["input_ids"]
    r = tokenizer(response_text(tokenizer, rec["instruction"], rec["input"], rec["output"]), add_special_tokens=False)[
        "input_ids"
    ]
    if (
        tokenizer.bos_token_id is not None
        and getattr(tokenizer, "add_bos_token", False)
        and (not p or p[0] != tokenizer.bos_token_id)
    ):
        p = [tokenizer.bos_token_id, *p]
    ids = (p + r)[:max_length]
    labels = ([-100] * len(p) + r)[:max_length]
    if all(x == -100 for x in labels):
        return None
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}


def _build_lm(cfg: RunConfig, tokenizer, files: dict[str, str]) -> TaskData:
    splits, raw, dropped = {}, {}, 0
    for split, path in files.items():  # train, validation[, test]
        recs = _lm_records(cfg, path)[: _split_cap(cfg, split)]
        encoded = [encode_lm(tokenizer, rec, cfg.max_length) for rec in recs]
        items = [e for e in encoded if e is not None]
        dropped += len(encoded) - len(items)
        if not items:
            raise DataError(f"{path}: every example's response is cut off by --max-length {cfg.max_length}")
        splits[split], raw[split] = items, recs
    task = "gsm8k" if cfg.task == "gsm8k" else "causal-lm"
    return TaskData.from_splits(task, splits, None, raw, {"files": files, "dropped_truncated": dropped})


class LMCollator:
    """Right-pads input_ids with pad id, attention_mask with 0 and labels with -100."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, items: list[dict]) -> dict:
        n = max(len(it["input_ids"]) for it in items)
        pads = {"input_ids": self.pad_id, "attention_mask": 0, "labels": -100}
        return {k: torch.tensor([it[k] + [pad] * (n - len(it[k])) for it in items]) for k, pad in pads.items()}
