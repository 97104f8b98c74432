"""`vblora train`: fine-tune a local transformers model on local data with VB-LoRA or a baseline.

With no arguments: the `minilm-vader` recipe (MiniLM-L6, VADER movie snippets, VB-LoRA all-linear, CPU, ~5 min).
Flags override the recipe; every flag maps to a RunConfig field (vblora/train/options.py).
"""

from __future__ import annotations

import argparse

# flag -> (type, help). Flags default to None, meaning "keep the recipe's value".
FLAGS = {
    "model": (str, "local model directory, or alias 'minilm' / 'smollm2'"),
    "gguf-file": (str, "GGUF weights file inside --model"),
    "method": (str, "vblora | lora | vera | tied-lora | full"),
    "task": (str, "classification | regression | causal-lm | gsm8k (regression is also inferred from float labels)"),
    "dataset": (str, "built-in data: vader-movie | vader-movie-instruct"),
    "train-file": (str, "training data (CSV, TSV incl. GLUE layouts, JSONL; Alpaca JSON for causal-lm)"),
    "validation-file": (str, "validation data (the best epoch is chosen on it)"),
    "test-file": (str, "test data (reported at the best validation epoch)"),
    "data-format": (str, "csv | tsv | jsonl | json (default: from the file suffix)"),
    "glue-task": (str, "GLUE TSV layout: sst2 cola mrpc qnli rte stsb qqp mnli"),
    "text-column": (str, "column of the text (default 'text')"),
    "text-pair-column": (str, "column of the second text, for pair tasks"),
    "label-column": (str, "column of the label (default 'label')"),
    "max-train-samples": (int, "use only the first N training examples"),
    "max-eval-samples": (int, "use only the first N validation examples"),
    "max-test-samples": (int, "use only the first N test examples"),
    "max-length": (int, "maximum tokens per example (batches are padded dynamically)"),
    "rank": (int, "rank of VB-LoRA and LoRA"),
    "num-vectors": (int, "VB-LoRA bank size h"),
    "vector-length": (int, "VB-LoRA sub-vector length b"),
    "topk": (int, "VB-LoRA k"),
    "selection": (str, "VB-LoRA selection rule: topk | all | noisy_topk | gumbel | st_gumbel (paper Table 5)"),
    "noise-std": (float, "noise std of noisy_topk"),
    "temperature": (float, "temperature of gumbel / st_gumbel"),
    "eval-topk": (int, "VB-LoRA k at evaluation and in the stored adapter (default: --topk)"),
    "bank": (str, "start VB-LoRA from a trained bank: bank.safetensors (vblora.save_bank), an adapter, or a run dir"),
    "record-selection-every": (int, "record each sub-vector's top-k selection every N steps (for vblora plot)"),
    "lora-alpha": (float, "LoRA alpha"),
    "dropout": (float, "adapter dropout"),
    "vera-rank": (int, "VeRA rank"),
    "tied-rank": (int, "Tied-LoRA rank"),
    "epochs": (float, "training epochs"),
    "batch-size": (int, "batch size per process"),
    "eval-batch-size": (int, "evaluation batch size"),
    "grad-accum": (int, "gradient accumulation steps"),
    "lr-bank": (float, "VB-LoRA vector bank learning rate"),
    "lr-logits": (float, "VB-LoRA logits learning rate"),
    "lr-head": (float, "learning rate of the trained head (modules_to_save)"),
    "lr": (float, "adapter learning rate of LoRA/VeRA/Tied-LoRA/full"),
    "weight-decay": (float, "AdamW weight decay"),
    "warmup-ratio": (float, "linear warm-up as a fraction of the steps"),
    "seed": (int, "seed of initialisation and data order"),
    "output": (str, "run directory: results.json, adapter/, checkpoints/"),
    "device": (str, "auto | cpu | cuda"),
    "save-steps": (int, "also checkpoint every N optimizer steps"),
    "logging-steps": (int, "log the training loss every N steps"),
    "num-samples": (int, "greedy generations written to samples.jsonl (LM tasks)"),
    "max-new-tokens": (int, "generation length (LM tasks)"),
    "generate-eval": (int, "score greedy answers on the first N test examples (LM tasks)"),
}


def add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=None, help="shipped recipe name or a .yaml path (default: minilm-vader)")
    for flag, (typ, help_) in FLAGS.items():
        p.add_argument(f"--{flag}", type=typ, default=None, help=help_)
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="module names/suffixes, 'all-linear' (linear layers of the blocks) or one regex")
    p.add_argument("--modules-to-save", nargs="*", default=None, help="modules trained in full (default: the head)")
    p.add_argument("--freeze-bank", action="store_true", default=None,
                   help="with --bank: train only the logits (and head); the adapter stores the bank's hash, not the bank")
    p.add_argument("--bf16", action="store_true", default=None, help="bfloat16 autocast")
    p.add_argument("--fp16", action="store_true", default=None, help="float16 autocast (CUDA only)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from the last checkpoint in --output")
    p.add_argument("--overwrite", action="store_true", default=None, help="discard earlier checkpoints in --output")
    p.add_argument("--no-group-by-length", dest="group_by_length", action="store_false", default=None,
                   help="plain random batches instead of length-grouped ones (which need ~half the padding)")


def overrides(args: argparse.Namespace) -> dict:
    keys = [f.replace("-", "_") for f in FLAGS] + ["target_modules", "modules_to_save", "bf16", "fp16", "resume",
                                                   "overwrite", "freeze_bank", "group_by_length"]
    out = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    tm = out.get("target_modules")
    if tm is not None and len(tm) == 1 and (tm[0] == "all-linear" or any(c in tm[0] for c in "*()[]|\\^$")):
        out["target_modules"] = tm[0]  # one regex or 'all-linear'
    return out


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="fine-tune a model with VB-LoRA or a baseline; writes results.json",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_flags(p)
    p.add_argument("--list-recipes", action="store_true", help="list shipped recipes and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from vblora.train.errors import TrainError
    from vblora.train.options import build_config, recipe_names

    if args.list_recipes:
        import yaml
        from importlib import resources
        for name in recipe_names():
            text = (resources.files("vblora.recipes") / f"{name}.yaml").read_text()
            desc = (yaml.safe_load(text) or {}).get("description", "").strip().split(". ")[0]
            print(f"{name:28s} {desc}")
        return 0
    try:
        cfg = build_config(args.recipe, overrides(args))
        from vblora.train.run import train
        train(cfg)
    except TrainError as e:
        print(f"vblora train: error: {e}")
        return 2
    except Exception as e:  # the core's errors (TargetError, ConfigError) are user errors too
        from vblora.errors import VBLoRAError
        if isinstance(e, VBLoRAError):
            print(f"vblora train: error: {e}")
            return 2
        raise
    return 0
