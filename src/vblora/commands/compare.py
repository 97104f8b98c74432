"""`vblora compare`: run several methods over several seeds on one task; print and save a Table-1-like summary."""

from __future__ import annotations


def register(subparsers) -> None:
    from vblora.train.flags import add_run_flags

    p = subparsers.add_parser("compare", help="run methods x seeds through `vblora train` and tabulate test scores",
                              description=__doc__)
    p.add_argument("--methods", default="vblora,lora,vera,tied-lora,full",
                   help="comma-separated: vblora,lora,vera,tied-lora,full")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    p.add_argument("--set", dest="method_overrides", action="append", default=[], metavar="METHOD:KEY=VALUE",
                   help="per-method setting, e.g. --set vblora:epochs=2 --set lora:lr=1e-3")
    add_run_flags(p)  # --method / --seed are ignored: --methods and --seeds decide
    p.set_defaults(func=run)


def _parse_overrides(items: list[str]) -> dict[str, dict]:
    from vblora.train.errors import SetupError
    from vblora.train.flags import assignments

    out: dict[str, dict] = {}
    for item in items:
        method, sep, kv = item.partition(":")
        if not sep or "=" not in kv:
            raise SetupError(f"--set expects METHOD:KEY=VALUE, got '{item}'")
        out.setdefault(method, {}).update(assignments([kv]))
    return out


def run(args) -> int:
    from pathlib import Path

    from vblora.train.flags import given
    from vblora.experiments.compare import run_compare

    base = {k: v for k, v in given(args).items() if k not in ("method", "seed")}
    out = Path(base.pop("output", None) or "runs/compare")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    run_compare(methods, list(range(args.seeds)), out, base.pop("recipe", None), base,
                _parse_overrides(args.method_overrides))
    print(f"saved {out / 'compare.md'} and {out / 'compare.json'}")
    return 0
