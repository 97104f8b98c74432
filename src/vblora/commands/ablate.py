"""`vblora ablate selection | vector-length | shared-bank`: the paper's Tables 5 and 6, and a shared bank across tasks.

Every variant x seed is one `vblora train` run (vblora.experiments.ablate), scored the same way: best validation
epoch, test at that epoch. Runs land in OUT/<variant>-seed<k>/results.json and are reused when the command is run
again, so a killed study continues. The table (median, min-max, mean +- std over seeds, with the budget it ran
under) is printed and saved as OUT/ablation.md and OUT/ablation.json.
"""

from __future__ import annotations

import argparse


def _common(p: argparse.ArgumentParser, out: str) -> None:
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default 0 1 2)")
    p.add_argument("--out", default=out, help=f"study directory (default {out})")
    p.add_argument("--recipe", default=None, help="`vblora train` recipe the runs start from (default minilm-vader)")
    p.add_argument("--max-train-samples", type=int, default=2000,
                   help="training examples per run (default 2000, a CPU budget; 0 = all)")
    p.add_argument("--max-eval-samples", type=int, default=0, help="test examples scored (default 0 = all)")
    p.add_argument("--epochs", type=float, default=1.0, help="epochs per run (default 1)")
    p.add_argument("--batch-size", type=int, default=16, help="batch size (default 16)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (1 is fastest on a busy shared machine; default: torch's choice)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="any other `vblora train` setting (YAML values), e.g. model=PATH train_file=... lr_logits=0.02")


def _budget(args):
    if getattr(args, "threads", None):
        import torch
        torch.set_num_threads(args.threads)
    from vblora.experiments.ablate import Budget
    return Budget(args.max_train_samples or None, args.max_eval_samples or None, args.epochs, args.batch_size)


def _overrides(args) -> dict:
    from vblora.train.flags import assignments
    return assignments(args.set, "ablate")


def _study(args, variants, title: str) -> int:
    import json
    from pathlib import Path

    from vblora.experiments import ablate as A

    if args.variants:
        unknown = set(args.variants) - {v.name for v in variants}
        if unknown:
            print(f"vblora ablate: unknown variant(s) {sorted(unknown)}; choose from {[v.name for v in variants]}")
            return 2
        variants = [v for v in variants if v.name in args.variants]
    budget, out = _budget(args), Path(args.out)
    rows = A.run_study(variants, args.seeds, out, _overrides(args), budget, args.recipe)
    table = A.format_table(rows, f"{title}\n\nBudget per run: {budget.describe()}; seeds {args.seeds}.")
    print(table)
    (out / "ablation.md").write_text(table + "\n")
    (out / "ablation.json").write_text(json.dumps({"budget": budget.describe(), "seeds": args.seeds, "rows": rows},
                                                  indent=2))
    return 0


def run_selection(args) -> int:
    from vblora.experiments.ablate import selection_variants
    return _study(args, selection_variants(), "Selection rules (paper Table 5)")


def run_vector_length(args) -> int:
    from vblora.experiments.ablate import vector_length_variants
    variants = vector_length_variants(args.budget, tuple(args.lengths))
    return _study(args, variants, f"Sub-vector length at a fixed bank budget h*b = {args.budget:,} (paper Table 6)")


def run_shared_bank(args) -> int:
    import json
    from pathlib import Path

    from vblora.experiments.shared_bank import format_shared_bank, shared_bank_study
    from vblora.train import vader

    task = _overrides(args)
    if "train_file" not in task:
        paths = vader.fetch_corpus(args.task2)
        task.update(dataset="none", train_file=str(paths["train"]), validation_file=str(paths["validation"]),
                    test_file=str(paths["test"]))
    budget, out = _budget(args), Path(args.out)
    rows = shared_bank_study(args.bank, args.seeds, out, task, budget, args.recipe)
    table = format_shared_bank(rows, f"Shared bank: task 2 = {task.get('train_file')}; bank from {args.bank}\n\n"
                                     f"Budget per run: {budget.describe()}; seeds {args.seeds}.")
    print(table)
    (out / "shared_bank.md").write_text(table + "\n")
    (out / "shared_bank.json").write_text(json.dumps({"budget": budget.describe(), "rows": rows}, indent=2))
    return 0


def _guarded(fn):
    def run(args) -> int:  # user errors (bad settings, missing files) print one line and exit 2
        from vblora.train.flags import user_errors
        return user_errors("ablate", lambda: fn(args))
    return run


def register(subparsers) -> None:
    p = subparsers.add_parser("ablate", help="ablations: selection rules (Table 5), vector length (Table 6), "
                                             "shared bank across tasks", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="study", metavar="STUDY")
    s = sub.add_parser("selection", help="Select-all, Top-1/2/3/6, Noisy Top-1/2, GS and ST-GS (tau=1/3) "
                                         "evaluated with Top-1/Top-2")
    _common(s, "runs/ablate-selection")
    s.add_argument("--variants", nargs="+", default=None, help="only these variants (e.g. top-1 top-2)")
    s.set_defaults(func=_guarded(run_selection))
    v = sub.add_parser("vector-length", help="b in {64,128,256,512} at a fixed bank budget h*b")
    _common(v, "runs/ablate-vector-length")
    v.add_argument("--budget", type=int, default=12288, help="bank budget h*b (default 12288: h=192,96,48,24)")
    v.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512], help="sub-vector lengths b")
    v.add_argument("--variants", nargs="+", default=None, help="only these variants (e.g. b=128)")
    v.set_defaults(func=_guarded(run_vector_length))
    b = sub.add_parser("shared-bank", help="task 2 with a fresh bank vs the frozen task-1 bank (logits only)")
    _common(b, "runs/ablate-shared-bank")
    b.add_argument("--bank", required=True, help="task-1 bank: a bank.safetensors (vblora.save_bank), a bank.pt, an "
                                                 "adapter, or a run directory")
    b.add_argument("--task2", default="tweets", choices=["tweets", "amazon", "nyt"],
                   help="VADER corpus for task 2 (default tweets), unless --set train_file=... is given")
    b.set_defaults(func=_guarded(run_shared_bank))
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])
