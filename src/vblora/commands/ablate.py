"""`vblora ablate selection | vector-length | shared-bank`: the paper's Tables 5 and 6, and a shared bank across tasks.

Every variant x seed is one `vblora train` run (vblora.experiments.ablate), scored the same way: best validation
epoch, test at that epoch. Runs land in OUT/<variant>-seed<k>/results.json and are reused when the command is run
again, so a killed study continues. The table (median, min-max, mean +- std over seeds, with the budget it ran
under) is printed and saved as OUT/ablation.md and OUT/ablation.json.
"""

from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser, out: str) -> None:
    from vblora.train.flags import add_output_flag, add_study_flags

    add_study_flags(p, "--set model=PATH train_file=data.csv lr_logits=0.02")
    add_output_flag(p, out, "study directory")
    p.add_argument("--recipe", default=None, help="`vblora train` recipe the runs start from (default minilm-vader)")
    p.add_argument(
        "--max-train-samples",
        type=int,
        default=2000,
        help="training examples per run (default 2000, a CPU budget; 0 = all)",
    )
    p.add_argument("--max-eval-samples", type=int, default=0, help="test examples scored (default 0 = all)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs per run (default 1)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (1 is fastest on a busy shared machine; default: torch's choice)",
    )


def run(args) -> int:
    from pathlib import Path

    from vblora.experiments import ablate as ablation
    from vblora.train.errors import SetupError
    from vblora.train.flags import assignments

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    budget, out = (
        ablation.Budget(args.max_train_samples or None, args.max_eval_samples or None, args.epochs, args.batch_size),
        Path(args.output),
    )
    overrides, note = assignments(args.set)[0], f"Budget per run: {budget.describe()}; seeds {args.seeds}."
    if args.study == "shared-bank":  # the study writes OUT/shared_bank.json, we add the table
        from vblora.experiments.shared_bank import format_shared_bank, shared_bank_study
        from vblora.train import vader

        if "train_file" not in overrides:
            paths = vader.fetch_corpus(args.task2)  # {"train": path, "validation": path, "test": path}
            overrides.update(dataset="none", **{f"{split}_file": str(path) for split, path in paths.items()})
        rows = shared_bank_study(args.bank, args.seeds, out, overrides, budget, args.recipe)
        table = format_shared_bank(
            rows, f"Shared bank: task 2 = {overrides['train_file']}; bank from {args.bank}\n\n{note}"
        )
        (out / "shared_bank.md").write_text(table + "\n")
    else:  # the study writes OUT/ablation.json, we add the table
        if args.study == "selection":
            variants, title = ablation.selection_variants(), "Selection rules (paper Table 5)"
        else:
            variants = ablation.vector_length_variants(args.budget, tuple(args.lengths))
            title = f"Sub-vector length at a fixed bank budget h*b = {args.budget:,} (paper Table 6)"
        if args.variants:
            unknown = set(args.variants) - {v.name for v in variants}
            if unknown:
                raise SetupError(f"unknown variant(s) {sorted(unknown)}; choose from {[v.name for v in variants]}")
            variants = [v for v in variants if v.name in args.variants]
        table = ablation.format_table(
            ablation.run_study(variants, args.seeds, out, overrides, budget, args.recipe), f"{title}\n\n{note}"
        )
        (out / "ablation.md").write_text(table + "\n")
    print(table)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "ablate",
        help="ablations: selection rules (Table 5), vector length (Table 6), shared bank across tasks",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="study", metavar="STUDY")
    studies = {
        "selection": "Select-all, Top-1/2/3/6, Noisy Top-1/2, GS and ST-GS (tau=1/3) evaluated with Top-1/Top-2",
        "vector-length": "b in {64,128,256,512} at a fixed bank budget h*b",
        "shared-bank": "task 2 with a fresh bank vs the frozen task-1 bank (logits only)",
    }
    s, v, b = (sub.add_parser(name, help=help_) for name, help_ in studies.items())
    for q, example in ((s, "top-1 top-2"), (v, "b=128")):
        q.add_argument("--variants", nargs="+", default=None, help=f"only these variants (e.g. {example})")
    v.add_argument("--budget", type=int, default=12288, help="bank budget h*b (default 12288: h=192,96,48,24)")
    v.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512], help="sub-vector lengths b")
    b.add_argument(
        "--bank",
        required=True,
        help="task-1 bank: a bank.safetensors (vblora.save_bank), a bank.pt, an adapter, or a run directory",
    )
    b.add_argument(
        "--task2",
        default="tweets",
        choices=["tweets", "amazon", "nyt"],
        help="VADER corpus for task 2 (default tweets), unless --set train_file=... is given",
    )
    for name, q in zip(studies, (s, v, b), strict=True):
        _common(q, f"runs/ablate-{name}")
        q.set_defaults(func=run)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])
