"""`vblora train`: fine-tune a local transformers model on local data with VB-LoRA or a baseline.

With no arguments: the offline default task (MiniLM-L6, VADER movie snippets, VB-LoRA all-linear, CPU, ~5 min).
Every setting is a flag (one per field of vblora.train.config.RunConfig and vblora.VBLoRAConfig); the defaults
shown are what a run without --recipe does; a recipe replaces them and flags override both.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from vblora.train.flags import run_flags

    p = subparsers.add_parser(
        "train",
        help="fine-tune a model with VB-LoRA or a baseline; writes results.json",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=run_flags("train"),
    )
    p.add_argument("--list-recipes", action="store_true", help="list shipped recipes and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from vblora.train.config import build_config, load_recipe, recipe_names
    from vblora.train.flags import given

    if args.list_recipes:
        for name in recipe_names():
            desc = str(load_recipe(name, keep_description=True).get("description", "")).strip().split(". ")[0]
            print(f"{name:28s} {desc}")
        return 0
    from vblora.train.pipeline import train

    train(build_config(None, given(args)))  # user errors: one line and exit 2, by vblora.cli
    return 0
