"""`vblora e2e`: E2E NLG data-to-text with VB-LoRA (paper Table 2), from a recipe (default e2e-gpt2-medium).

The `vblora train` pipeline on the E2E task (vblora.experiments.e2e): a local causal LM adapted with the recipe's
settings, trained with Table 8's warm-up steps and label smoothing, its best validation epoch (validation loss)
merged and decoding the test file's unique MRs (beam search), scored with BLEU/NIST/METEOR/ROUGE-L/CIDEr.
Writes OUTPUT/results.json, OUTPUT/predictions.txt (one line per unique test MR) and OUTPUT/adapter/.
Every `vblora train` flag applies (defaults shown: the e2e-gpt2-medium recipe's); nothing is downloaded: model and
CSVs (`mr,ref`) are local files. See docs/e2e.md.
"""

from __future__ import annotations

import argparse

RECIPE = "e2e-gpt2-medium"


def options_flags() -> tuple[type]:
    """The E2E decoding options (E2EOptions) as flags, the help showing the recipe's values."""
    import dataclasses
    import typing

    from vblora.experiments.e2e import E2EOptions
    from vblora.train.config import load_recipe
    from vblora.train.typed_settings import flag_dataclass

    fields = {f.name: f for f in dataclasses.fields(E2EOptions)}
    recipe = dataclasses.asdict(E2EOptions.from_recipe(load_recipe(RECIPE).get("extra")))
    return (flag_dataclass("E2EFlags", fields, typing.get_type_hints(E2EOptions), recipe, recipe),)


def register(subparsers) -> None:
    from vblora.train.flags import run_flags

    p = subparsers.add_parser(
        "e2e",
        help="E2E NLG (Table 2): train VB-LoRA on E2E CSVs, decode, score BLEU/NIST/METEOR/ROUGE-L/CIDEr",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        parents=run_flags("e2e", RECIPE, (), options_flags),
    )
    p.set_defaults(func=run)


def run(args) -> int:
    import dataclasses

    from vblora.experiments import e2e
    from vblora.experiments.e2e_metrics import METRICS, format_scores
    from vblora.train.config import build_config
    from vblora.train.errors import SetupError
    from vblora.train.flags import given

    for flag in ("model", "train_file", "test_file"):
        if not getattr(args, flag, None):
            raise SetupError(f"--{flag.replace('_', '-')} is required (a local path)")
    cfg = build_config(RECIPE, given(args))
    opts = e2e.E2EOptions.from_recipe(cfg.extra, given(args, [f.name for f in dataclasses.fields(e2e.E2EOptions)]))
    res = e2e.run_e2e(cfg, opts)
    test = res["metrics"]["test"]
    print(format_scores({m: test[m.lower()] for m in METRICS if m.lower() in test}))
    for metric, note in test.get("notes", {}).items():
        print(f"  {metric}: {note}")
    print(f"saved {cfg.output}/results.json, predictions.txt and adapter/ ({res['adapter_bytes']:,} bytes)")
    return 0
