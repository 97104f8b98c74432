"""E2E NLG data-to-text (paper Table 2) as a causal-LM task of the training pipeline, and its evaluation.

The official files (tuetschek/e2e-dataset: trainset.csv, devset.csv, testset_w_refs.csv) have the header `mr,ref`
and one row per reference, so an MR with five references appears on five rows. Training uses every row
(prompt = the MR, target = one reference, loss on the target only) through `vblora.train.pipeline.train`, with
Table 8's warm-up steps and label smoothing as run settings; the best state is evaluated by decoding each unique
test MR once (beam search) and scoring it against all its references with `e2e_metrics` (as e2e-metrics does).
`run_e2e(cfg, opts)` is `vblora e2e`. Works with any local causal LM, GPT-2 included; nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path

from vblora.experiments.e2e_metrics import METRICS, compute_e2e_metrics
from vblora.train.config import RunConfig, opt, setting_fields
from vblora.train.errors import DataError, SetupError
from vblora.train.typed_settings import typed

PROMPT_TEMPLATE = "{mr} ||"  # the MR, linearised, then the separator the LoRA/VeRA E2E data uses
TARGET_TEMPLATE = " {ref}"  # a leading space so GPT-2's BPE starts the reference as a new word
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
    """Rows `(mr, ref)` of an E2E CSV (columns `mr` and `ref`, any case; `ref` may be absent: then None). The file is
    read by `vblora.train.data.read_table`, so a malformed one is a DataError naming its line."""
    from vblora.train.data import read_table

    table = read_table(path, "csv")
    cols = {c.strip().lower(): c for c in table.columns}
    if "mr" not in cols:
        raise DataError(f"{path}: no 'mr' column in the header {table.columns} (the E2E files start with 'mr,ref')")
    ref = cols.get("ref")
    return [(_fix(row[cols["mr"]]), _fix(row[ref]) if ref else None) for row in table.rows]


def group_by_mr(rows: list[tuple[str, str | None]]) -> list[E2EInstance]:
    """Unique MRs in order of first appearance, each with its references (e2e-metrics groups consecutive rows;
    the official files keep an MR's rows together, so both give the same groups there)."""
    refs: dict[str, list[str]] = {}
    for mr, ref in rows:
        refs.setdefault(mr, []).extend([ref] if ref else [])
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


@dataclass(frozen=True)
class E2EOptions:
    """Decoding and scoring of the E2E evaluation (recipe key `extra.e2e`; `vblora e2e` flags). Defaults: the
    LoRA/VeRA E2E evaluation the paper follows (beam 10, length penalty 0.8, no-repeat 4-gram)."""

    num_beams: int = opt(10, "beam size at test time (1 = greedy)")
    length_penalty: float = opt(0.8, "beam length penalty")
    no_repeat_ngram_size: int = opt(4, "no-repeat n-gram size (0 = off)")
    prompt_template: str = opt(PROMPT_TEMPLATE, "prompt of an MR ({mr}: the MR, linearised if linearize_mr)")
    linearize_mr: bool = opt(True, "write name[X], eatType[Y] as 'name : X | eatType : Y'")
    metric_tokenizer: str = opt(
        "auto", "PTB tokenizer before METEOR/ROUGE-L/CIDEr: auto (Java when it runs) | java | python"
    )
    meteor_modules: list[str] | None = opt(
        None, "METEOR modules, e.g. exact stem synonym (none: the official configuration)"
    )

    @classmethod
    def from_recipe(cls, extra: dict | None, given: dict | None = None) -> E2EOptions:
        """A recipe's `extra.e2e` <- `given` (flags); run settings kept there by older recipes are skipped
        (`build_config` lifts them)."""
        values = {k: v for k, v in ((extra or {}).get("e2e") or {}).items() if k not in setting_fields()}
        values.update(given or {})
        known = {f.name for f in dataclasses.fields(cls)}
        if set(values) - known:
            raise SetupError(f"unknown extra.e2e setting(s) {sorted(set(values) - known)}; known: {sorted(known)}")
        return typed(cls, values, "extra.e2e setting")

    def prompt(self, mr: str) -> str:
        return self.prompt_template.format(mr=linearize_mr(mr) if self.linearize_mr else mr)

    def generate_kwargs(self) -> dict:
        return {
            "num_beams": self.num_beams,
            "length_penalty": self.length_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }


# ------------------------------------------------------------------------------------------------ the task
def build_examples(
    rows: list[tuple[str, str | None]], tokenizer, max_length: int = 512, opts: E2EOptions = E2EOptions()
) -> list[dict]:
    """One example per (mr, ref) row: `input_ids` = prompt ++ target ++ eos, `labels` = -100 on the prompt.

    Sequences longer than `max_length` are cut from the end; a row whose target would vanish is dropped.
    """
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    out = []
    for mr, ref in rows:
        if not ref:
            continue
        p = tokenizer(opts.prompt(mr), add_special_tokens=False)["input_ids"]
        t = tokenizer(TARGET_TEMPLATE.format(ref=ref), add_special_tokens=False)["input_ids"] + eos
        ids = (p + t)[:max_length]
        if len(ids) > len(p):
            out.append({"input_ids": ids, "attention_mask": [1] * len(ids), "labels": [-100] * len(p) + ids[len(p) :]})
    if not out:
        raise DataError("no E2E training example left (no references, or max_length shorter than the prompts)")
    return out


def _rows(path, what: str):
    if not path or not Path(path).is_file():
        raise DataError(f"{what} '{path}' does not exist (give a local E2E CSV with the header mr,ref)")
    try:
        return read_e2e_csv(path)
    except DataError as e:
        raise DataError(f"{what}: {e}") from None


def task(opts: E2EOptions):
    """The pipeline task of the E2E CSVs (`train(cfg, task=task(opts))`): LM examples of every row; the test set is
    the unique referenced MRs of --test-file (capped by max_test_samples), decoded and scored on the best state."""
    from vblora.train.tasks import TaskData

    def build(cfg: RunConfig, tok) -> TaskData:
        train = _rows(cfg.train_file, "--train-file")[: cfg.max_train_samples or None]
        val = (
            _rows(cfg.validation_file, "--validation-file")[: cfg.max_eval_samples or None]
            if cfg.validation_file
            else None
        )
        test_rows = _rows(cfg.test_file, "--test-file")
        test_set = [x for x in group_by_mr(test_rows) if x.refs][: cfg.max_test_samples or None]
        if not test_set:
            raise DataError(f"--test-file '{cfg.test_file}' has no references to score against (column 'ref')")
        keep = {x.mr for x in test_set}
        encode = functools.partial(build_examples, tokenizer=tok, max_length=cfg.max_length, opts=opts)
        return TaskData(
            "causal-lm",
            encode(train),
            encode(val) if val else None,
            encode([r for r in test_rows if r[0] in keep]),
            raw={"test": test_set},
            info={
                "files": {"train": cfg.train_file, "validation": cfg.validation_file, "test": cfg.test_file},
                "test_mrs": len(test_set),
            },
            evaluate=functools.partial(_evaluate, opts=opts),
        )

    return build


def _evaluate(model, tok, data, cfg: RunConfig, out_dir: Path | None, opts: E2EOptions) -> dict:
    """BLEU, NIST, METEOR, ROUGE_L, CIDEr (lower-cased keys), notes and num_inputs; writes predictions.txt."""
    import vblora

    if out_dir is None:  # not the main process
        return {}
    merged = cfg.method == "vblora"
    if merged:
        vblora.merge(model)  # docs/e2e.md: decoding a merged model is ~2x faster
    try:
        scores = evaluate_e2e(
            model,
            tok,
            data.raw["test"],
            opts,
            cfg.max_new_tokens,
            cfg.eval_batch_size,
            predictions_path=out_dir / "predictions.txt",
        )
    finally:
        if merged:
            vblora.unmerge(model)
    scores.pop("predictions")
    return {k.lower(): v for k, v in scores.items()}


def run_e2e(cfg: RunConfig, opts: E2EOptions, log=print) -> dict:
    """`vblora e2e`: the pipeline on the E2E task; results.json gains the E2E options under "e2e". Under torchrun
    only rank 0 rewrites it (as the pipeline writes it), atomically: a reader never sees a half-written file."""
    import json
    import os

    from vblora.storage.files import atomic_write
    from vblora.train import results as results_file
    from vblora.train.pipeline import train

    results = train(cfg, log=log, task=task(opts))
    results["e2e"] = dataclasses.asdict(opts)
    results["test_mrs"] = results["data"]["test_mrs"]
    if int(os.environ.get("RANK", "0")) == 0:  # the pipeline's rule for the main process (torchrun / accelerate)
        atomic_write(
            Path(cfg.output) / "results.json",
            (json.dumps(results, indent=2, default=results_file.json_default) + "\n").encode(),
        )
    return results


# ---------------------------------------------------------------------------------------------- generation
def generate_e2e(
    model, tokenizer, mrs: list[str], opts: E2EOptions = E2EOptions(), max_new_tokens: int = 64, batch_size: int = 16
) -> list[str]:
    """One output per MR (the first line of the continuation), decoded as `opts` says."""
    from vblora.train.evaluate import generate

    outs = generate(
        model, tokenizer, [opts.prompt(m) for m in mrs], max_new_tokens, batch_size, **opts.generate_kwargs()
    )
    return [o.strip().split("\n")[0].strip() for o in outs]


def write_references(path: str | Path, eval_set: list[E2EInstance]) -> None:
    """measure_scores.py's multi-reference text format: an MR's references on consecutive lines, blank line
    between MRs (so `measure_scores.py refs.txt preds.txt -p` can cross-check our numbers)."""
    Path(path).write_text("\n".join("\n".join(x.refs) + "\n" for x in eval_set), encoding="utf-8")


def evaluate_e2e(
    model,
    tokenizer,
    eval_set: list[E2EInstance],
    opts: E2EOptions = E2EOptions(),
    max_new_tokens: int = 64,
    batch_size: int = 16,
    metrics: tuple[str, ...] = METRICS,
    predictions_path: str | Path | None = None,
) -> dict:
    """Generate one output per unique MR and score it against all its references with the E2E metric set.

    Returns `compute_e2e_metrics`' dict (BLEU, NIST, METEOR, ROUGE_L, CIDEr on e2e-metrics' scale; a metric that
    cannot run is None with the reason in "notes") plus "predictions" (the outputs, in `eval_set` order).
    """
    eval_set = [x for x in eval_set if x.refs]
    if not eval_set:
        raise ValueError("the evaluation set has no references to score against")
    preds = generate_e2e(model, tokenizer, [x.mr for x in eval_set], opts, max_new_tokens, batch_size)
    if predictions_path is not None:  # the official system-output format: one line per unique MR, in order
        Path(predictions_path).write_text("".join(p.replace("\n", " ") + "\n" for p in preds), encoding="utf-8")
    scores = compute_e2e_metrics(
        preds,
        [list(x.refs) for x in eval_set],
        metrics=metrics,
        tokenizer=opts.metric_tokenizer,
        meteor_modules=tuple(opts.meteor_modules) if opts.meteor_modules else None,
    )
    scores["predictions"] = preds
    return scores


def score_files(refs_csv: str | Path, predictions: str | Path, **kwargs) -> dict:
    """Score a system-output file (one line per unique MR, in the CSV's first-appearance order) against an E2E
    CSV with references, like `measure_scores.py REFS.csv PRED.txt`."""
    eval_set = load_eval_set(refs_csv)
    lines = Path(predictions).read_text(encoding="utf-8").removesuffix("\n").split("\n")  # empty outputs count
    preds = [line.strip() for line in lines]  # measure_scores.py strips each line too
    if len(preds) != len(eval_set):
        raise ValueError(f"{predictions}: {len(preds)} lines for {len(eval_set)} unique MRs in {refs_csv}")
    return compute_e2e_metrics(preds, [list(x.refs) for x in eval_set], **kwargs)


def main(argv: list[str] | None = None) -> int:
    """`python -m vblora.experiments.e2e REFS.csv PRED.txt [--tokenizer auto|java|python] [--json OUT]`"""
    import argparse
    import json

    from vblora.experiments.e2e_metrics import format_scores

    ap = argparse.ArgumentParser(prog="python -m vblora.experiments.e2e", description=main.__doc__)
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
