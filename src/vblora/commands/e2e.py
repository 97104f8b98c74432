"""`vblora e2e`: E2E NLG data-to-text with VB-LoRA (paper Table 2), from a recipe (default e2e-gpt2-medium).

Loads a local causal LM (fp32) and its tokenizer, adapts it with the recipe's VB-LoRA settings, trains with Table 8's
loop (`vblora.analysis.e2e_data.train_e2e`), reports the validation loss, merges the adapter and decodes the test
file's unique MRs (beam search per the recipe's `extra.e2e`), and scores BLEU/NIST/METEOR/ROUGE-L/CIDEr.
Writes OUTPUT/results.json, OUTPUT/predictions.txt (one line per unique test MR) and OUTPUT/adapter/.
Flags override the recipe. Nothing is downloaded: model and CSVs (`mr,ref`) are local files. See docs/e2e.md.
"""

from __future__ import annotations

import argparse

# flag -> (type, help); None = keep the recipe's value. The first group are RunConfig fields.
RUN_FLAGS = {
    "epochs": (float, "training epochs (recipe: 4 medium, 5 large)"),
    "batch-size": (int, "training batch size (recipe: 8)"),
    "max-length": (int, "maximum tokens per training example (recipe: 512)"),
    "max-train-samples": (int, "use only the first N training rows"),
    "max-eval-samples": (int, "use only the first N validation rows"),
    "max-test-samples": (int, "score only the first N unique test MRs"),
    "rank": (int, "VB-LoRA rank"), "num-vectors": (int, "bank size h"), "vector-length": (int, "sub-vector length b"),
    "topk": (int, "VB-LoRA k"), "lr-bank": (float, "bank learning rate"), "lr-logits": (float, "logits learning rate"),
    "weight-decay": (float, "AdamW weight decay"), "seed": (int, "seed of initialisation and data order"),
    "output": (str, "run directory (default: the recipe's, runs/e2e-gpt2-medium)"),
    "logging-steps": (int, "print the training loss every N steps (0: never)"),
}
E2E_FLAGS = {  # the recipe's extra.e2e
    "warmup-steps": (int, "linear warm-up steps (Table 8: 500)"),
    "label-smoothing": (float, "label smoothing (Table 8: 0.1)"),
    "num-beams": (int, "beam size at test time (recipe: 10; 1 = greedy)"),
    "length-penalty": (float, "beam length penalty (recipe: 0.8)"),
    "no-repeat-ngram-size": (int, "no-repeat n-gram size (recipe: 4; 0 = off)"),
    "max-new-tokens": (int, "generated tokens per MR (recipe: 64)"),
}


def register(subparsers) -> None:
    p = subparsers.add_parser("e2e", help="E2E NLG (Table 2): train VB-LoRA on E2E CSVs, decode, score "
                                          "BLEU/NIST/METEOR/ROUGE-L/CIDEr", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local causal-LM directory (e.g. GPT-2 Medium weights)")
    p.add_argument("--train-file", required=True, help="E2E training CSV (mr,ref), e.g. trainset.csv")
    p.add_argument("--validation-file", default=None, help="E2E CSV for the validation loss, e.g. devset.csv")
    p.add_argument("--test-file", required=True, help="E2E CSV with references, e.g. testset_w_refs.csv")
    p.add_argument("--recipe", default="e2e-gpt2-medium", help="e2e-gpt2-medium (default), e2e-gpt2-large or a .yaml")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--max-steps", type=int, default=None, help="stop after N optimizer steps (default: the epochs)")
    p.add_argument("--eval-batch-size", type=int, default=16, help="MRs decoded per batch (default 16)")
    for flag, (typ, help_) in {**RUN_FLAGS, **E2E_FLAGS}.items():
        p.add_argument(f"--{flag}", type=typ, default=None, help=help_)
    p.add_argument("--metric-tokenizer", default="auto", choices=("auto", "java", "python"),
                   help="PTB tokenizer before METEOR/ROUGE-L/CIDEr (default auto: Java when it runs)")
    p.add_argument("--meteor-modules", nargs="+", default=None, metavar="MODULE",
                   help="METEOR modules, e.g. 'exact stem synonym' (default: the official configuration)")
    p.set_defaults(func=run)


def _given(args, flags) -> dict:
    return {f.replace("-", "_"): getattr(args, f.replace("-", "_")) for f in flags
            if getattr(args, f.replace("-", "_")) is not None}


def _read_rows(path, what: str):
    from pathlib import Path

    from vblora.analysis import e2e_data as ed
    from vblora.train.errors import DataError

    if not Path(path).is_file():
        raise DataError(f"{what} '{path}' does not exist (give a local E2E CSV with the header mr,ref)")
    try:
        return ed.read_e2e_csv(path)
    except (ValueError, UnicodeDecodeError) as e:
        raise DataError(f"{what}: {e}") from None


def run(args) -> int:
    from vblora.errors import VBLoRAError

    try:
        return _run(args)
    except VBLoRAError as e:  # TrainError (DataError, SetupError) and the core's errors: user errors
        print(f"vblora e2e: error: {e}")
        return 2


def _run(args) -> int:
    import json
    import time
    from pathlib import Path

    import torch

    import vblora
    from vblora.analysis import e2e_data as ed
    from vblora.analysis.e2e_metrics import format_scores
    from vblora.train.errors import DataError, SetupError
    from vblora.train.models import load_model, load_tokenizer, resolve_model, set_pad_token
    from vblora.train.options import build_config

    t0 = time.perf_counter()
    files = {"train_file": args.train_file, "validation_file": args.validation_file, "test_file": args.test_file}
    cfg = build_config(args.recipe, {"model": args.model, "device": args.device, **files, **_given(args, RUN_FLAGS)})
    if cfg.method != "vblora" or cfg.task != "causal-lm":
        raise SetupError(f"recipe {cfg.recipe}: method {cfg.method!r}, task {cfg.task!r}; `vblora e2e` runs VB-LoRA "
                         "on a causal LM (use e2e-gpt2-medium / e2e-gpt2-large)")
    try:
        opts = {**ed.e2e_options(cfg.extra), **_given(args, E2E_FLAGS)}
    except ValueError as e:
        raise SetupError(f"recipe {cfg.recipe}: {e}") from None
    train_rows = _read_rows(cfg.train_file, "--train-file")[:cfg.max_train_samples or None]
    val_rows = _read_rows(cfg.validation_file, "--validation-file")[:cfg.max_eval_samples or None] \
        if cfg.validation_file else None
    test_set = [x for x in ed.group_by_mr(_read_rows(cfg.test_file, "--test-file")) if x.refs]
    if not test_set:
        raise DataError(f"--test-file '{cfg.test_file}' has no references to score against (column 'ref')")
    test_set = test_set[:cfg.max_test_samples or None]
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SetupError("--device cuda: no CUDA GPU is visible on this machine (use --device cpu or auto)")
    device = torch.device("cuda" if cfg.device != "cpu" and torch.cuda.is_available() else "cpu")

    path, gguf = resolve_model(cfg.model, cfg.gguf_file)
    try:
        tok = load_tokenizer(path, gguf)
    except (OSError, ValueError) as e:
        raise SetupError(f"cannot load a tokenizer from '{path}': {e}") from None
    torch.manual_seed(cfg.seed)
    model = load_model(path, gguf, "causal-lm")
    set_pad_token(model, tok)
    vcfg = vblora.VBLoRAConfig(target_modules=cfg.target_modules, rank=cfg.rank, num_vectors=cfg.num_vectors,
                               vector_length=cfg.vector_length, topk=cfg.topk, dropout=cfg.dropout, seed=cfg.seed)
    model = vblora.add_vblora(model, vcfg).to(device)
    counts = vblora.count_parameters(model)
    pad = ed.pad_id_of(tok)
    kw = dict(template=opts["prompt_template"], linearize=opts["linearize_mr"])
    try:
        train = ed.build_train_examples(train_rows, tok, cfg.max_length, **kw)
        val = ed.build_train_examples(val_rows, tok, cfg.max_length, **kw) if val_rows else None
    except ValueError as e:
        raise DataError(str(e)) from None
    print(f"vblora e2e: {cfg.recipe} on {cfg.model} ({device}): {len(train)} training rows, {len(test_set)} test MRs, "
          f"{counts['stored']:,.0f} stored parameters", flush=True)

    t1 = time.perf_counter()
    losses = ed.train_e2e(model, train, pad, epochs=cfg.epochs, batch_size=cfg.batch_size, lr_bank=cfg.lr_bank,
                          lr_logits=cfg.lr_logits, lr_other=cfg.lr_head, weight_decay=cfg.weight_decay,
                          warmup_steps=opts["warmup_steps"], label_smoothing=opts["label_smoothing"],
                          max_steps=args.max_steps, max_grad_norm=cfg.max_grad_norm, seed=cfg.seed,
                          log_every=cfg.logging_steps)
    train_s = time.perf_counter() - t1
    metrics: dict = {}
    if val:
        metrics["validation"] = {"loss": ed.eval_loss(model, val, pad, args.eval_batch_size), "examples": len(val)}

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    adapter_file = vblora.save_adapter(model, out / "adapter")  # the trained form, before merging
    vblora.merge(model)  # docs/e2e.md: decoding a merged model is ~2x faster
    t2 = time.perf_counter()
    scores = ed.evaluate_e2e(model, tok, test_set, batch_size=args.eval_batch_size, **ed.decoding_kwargs(opts),
                             metric_tokenizer=args.metric_tokenizer, predictions_path=out / "predictions.txt",
                             meteor_modules=tuple(args.meteor_modules) if args.meteor_modules else None)
    eval_s = time.perf_counter() - t2
    scores.pop("predictions")
    metrics["test"] = {k.lower(): v for k, v in scores.items()}
    results = {
        "task": "e2e", "recipe": cfg.recipe, "model": cfg.model, "device": str(device),
        "metrics": metrics,
        "stored_parameters": counts["stored"], "trainable_parameters": counts["trainable"],
        "adapter_bytes": adapter_file.stat().st_size,
        "steps": len(losses), "train_loss_first": losses[0], "train_loss_last": losses[-1],
        "train_examples": len(train), "test_mrs": len(test_set),
        "config": {**cfg.to_dict(), "max_steps": args.max_steps, "eval_batch_size": args.eval_batch_size}, "e2e": opts,
        "train_time_s": train_s, "eval_time_s": eval_s, "wall_time_s": time.perf_counter() - t0,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(format_scores(scores))
    for metric, note in scores["notes"].items():
        print(f"  {metric}: {note}")
    print(f"saved {out / 'results.json'}, {out / 'predictions.txt'} and {adapter_file} "
          f"({results['adapter_bytes']:,} bytes)")
    return 0
