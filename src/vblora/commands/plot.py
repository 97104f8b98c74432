"""`vblora plot RUN_DIR`: the vector-selection figures (paper Figs. 3-9 and selection churn) of a recorded run."""

from __future__ import annotations


def run(args) -> int:
    from vblora.errors import VBLoRAError
    from vblora.plots import FIGURES, plot_all

    if args.list:
        for name, fn in FIGURES.items():
            print(f"{name:24s} {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    if not args.run_dir:
        raise VBLoRAError("give RUN_DIR (or --list)")
    for name, path in plot_all(args.run_dir, args.output, only=args.only).items():
        print(f"{name:24s} {path}")
    return 0


def register(subparsers) -> None:
    from vblora.train.flags import add_output_flag

    p = subparsers.add_parser(
        "plot",
        help="write the vector-selection figures of a run recorded with selection recording on",
        description="Reads RUN_DIR/selection.npz and selection.json (written by the selection recorder during "
        "training) and writes PNGs: footprint over training (fig3, fig5), initial vs final selection "
        "(fig4), top-k weight per bank vector by depth (fig6) and by module type and A/B (fig7), vector "
        "usage histogram (fig8), 2-D embedding of the bank with the sub-vectors (fig9), selection churn.",
    )
    p.add_argument("run_dir", nargs="?", help="run directory holding selection.npz / selection.json")
    add_output_flag(p, None, "output folder (none: RUN_DIR/figures)")
    p.add_argument("--only", nargs="+", default=None, metavar="NAME", help="only these figures (see --list)")
    p.add_argument("--list", action="store_true", help="list the figures and exit")
    p.set_defaults(func=run)
