"""`vblora compare`: run several methods over several seeds on one task; print and save a Table-1-like summary.

Every run starts from the defaults, then --recipe, then the flags, then `--set` (a `METHOD:` prefix limits a setting to
that method); nothing is replaced behind the user's back. `--seeds` lists seed numbers, as in `vblora ablate`.
"""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    from vblora.train.flags import add_output_flag, add_study_flags, run_flags

    p = subparsers.add_parser(
        "compare",
        help="run methods x seeds through `vblora train` and tabulate test scores",
        description=__doc__,
        parents=run_flags("compare", None, ("method", "seed", "output")),
    )
    p.add_argument(
        "--methods", default="vblora,lora,vera,tied-lora,full", help="comma-separated: vblora,lora,vera,tied-lora,full"
    )
    add_study_flags(p, "--set epochs=1 --set lora:lr=1e-3 vblora:lr_logits=0.02", scoped_by="METHOD")
    add_output_flag(p, "runs/compare", "study directory: compare.md, compare.json, <method>-seed<k>/")
    p.set_defaults(func=run)


def run(args) -> int:
    from pathlib import Path

    from vblora.experiments.compare import run_compare
    from vblora.train.flags import assignments, given

    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    common, per_method = assignments(args.set, scopes=tuple(methods))
    base = {**given(args), **common}
    if len(args.seeds) == 1:  # compare's --seeds was a count until 0.x: say what a lone number now means
        print(
            f"vblora compare: note: --seeds {args.seeds[0]} runs the one seed {args.seeds[0]} (seed numbers, as in "
            f"ablate; --seeds 0 1 2 for three)",
            file=sys.stderr,
        )
    out = Path(args.output)
    run_compare(methods, args.seeds, out, base.pop("recipe", None), base, per_method)
    print(f"saved {out / 'compare.md'} and {out / 'compare.json'}")
    return 0
