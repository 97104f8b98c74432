"""Ablations of the paper (Table 5: selection rules; Table 6: sub-vector length) and the shared-bank experiment.

Each study is a list of *variants* (VB-LoRA config changes) run over several seeds by `train_variant`, which uses
the `vblora train` pipeline's data, model loading and metrics (`vblora.train.{tasks,models,methods,metrics}`) with a
plain `transformers.Trainer`, so every VB-LoRA knob (selection rule, noise, temperature, eval top-k, a given or
frozen bank) and the selection recorder can be set per run. One run writes DIR/results.json; a run whose
results.json exists is reused, so a killed study continues where it stopped. `summarize` gives median and spread.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

TAU = 1.0 / 3.0


@dataclass
class Variant:
    name: str          # row label
    training: str      # the training rule, as the paper's Table 5 writes it
    vb: dict           # VBLoRAConfig changes (selection, topk, noise_std, temperature, num_vectors, vector_length)
    eval_topk: tuple = ()  # evaluate the trained model with these top-k (one row each); () = the config's own
    run: dict = field(default_factory=dict)  # RunConfig changes


def selection_variants() -> list[Variant]:
    """Table 5: Select-all; Top-k k=1,2,3,6; Noisy Top-1/2; GS and ST-GS (tau=1/3) evaluated with Top-1/Top-2."""
    v = [Variant("select-all", "softmax over the bank", {"selection": "all"})]
    v += [Variant(f"top-{k}", f"top-{k} softmax", {"selection": "topk", "topk": k}) for k in (1, 2, 3, 6)]
    v += [Variant(f"noisy-top-{k}", f"noisy top-{k} softmax", {"selection": "noisy_topk", "topk": k})
          for k in (1, 2)]
    v += [Variant("gumbel", "Gumbel-softmax (tau=1/3)", {"selection": "gumbel", "temperature": TAU}, (1, 2)),
          Variant("st-gumbel", "straight-through Gumbel-softmax (tau=1/3)",
                  {"selection": "st_gumbel", "temperature": TAU}, (1, 2))]
    return v


def vector_length_variants(budget: int, lengths=(64, 128, 256, 512)) -> list[Variant]:
    """Table 6: sub-vector length b at a fixed bank budget h*b (h = budget // b)."""
    return [Variant(f"b={b}", f"h={budget // b}", {"vector_length": b, "num_vectors": budget // b}) for b in lengths]


@dataclass
class Budget:
    """What one run may spend. The CPU default: 2,000 training examples, one epoch, batch 16."""

    max_train_samples: int | None = 2000
    max_eval_samples: int | None = None
    epochs: float = 1.0
    batch_size: int = 16

    def overrides(self) -> dict:
        """RunConfig settings of this budget (the eval cap applies to validation and, if the pipeline has it, test)."""
        import dataclasses

        from vblora.train.options import RunConfig

        out = {"epochs": self.epochs, "batch_size": self.batch_size, "max_train_samples": self.max_train_samples,
               "max_eval_samples": self.max_eval_samples}
        if "max_test_samples" in {f.name for f in dataclasses.fields(RunConfig)}:
            out["max_test_samples"] = self.max_eval_samples
        return out

    def describe(self) -> str:
        n = f"{self.max_train_samples:,}" if self.max_train_samples else "all"
        ev = f"first {self.max_eval_samples:,}" if self.max_eval_samples else "all"
        return (f"{n} training examples, {self.epochs:g} epoch(s), batch {self.batch_size}; "
                f"{ev} validation/test examples")


def _vblora_config(run, targets, heads, vb: dict):
    import vblora
    from vblora.train.methods import _exact_regex

    base = dict(target_modules=run.target_modules if run.target_modules == "all-linear" else _exact_regex(targets),
                rank=run.rank, num_vectors=run.num_vectors, vector_length=run.vector_length, topk=run.topk,
                dropout=run.dropout, modules_to_save=tuple(heads), seed=run.seed)
    return vblora.VBLoRAConfig(**{**base, **vb})


def train_variant(run, vb: dict, out_dir, *, eval_topk: tuple = (), record_every: int | None = None,
                  bank_init=None, freeze_bank: bool = False, save_adapter: str | None = None,
                  eval_splits: tuple = ("validation", "test"), log=print) -> dict:
    """Train VB-LoRA as `run` (a `vblora.train.options.RunConfig`) says, with VBLoRAConfig changes `vb`.

    eval_topk: also evaluate with these top-k softmax rules (Table 5's GS rows); record_every: record the selection
    every N steps into out_dir; bank_init: a `(h, b)` tensor to start the bank from; freeze_bank: train only the
    logits (and the head); save_adapter: "embed" or "reference" writes out_dir/adapter (+ bank.safetensors).
    Returns (and writes to out_dir/results.json) test/validation metrics, counts and timings.
    """
    import torch
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, set_seed

    import vblora
    from vblora.train import methods, models, tasks
    from vblora.train import metrics as M

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    set_seed(run.seed)
    path, gguf = models.resolve_model(run.model, run.gguf_file)
    tok = models.load_tokenizer(path, gguf)
    data = tasks.build(run, tok)
    if data.kind != "classification":
        raise ValueError(f"ablations run on classification tasks (got {data.kind})")
    set_seed(run.seed)
    model = models.load_model(path, gguf, data.kind, data.labels.num_labels, data.labels.names)
    models.set_pad_token(model, tok)
    targets, heads = methods.resolve_targets(model, run), methods.head_modules(model, run)
    vcfg = _vblora_config(run, targets, heads, vb)
    model = vblora.add_vblora(model, vcfg)
    bank = vblora.get_bank(model)
    if bank_init is not None:
        with torch.no_grad():
            bank.bank.copy_(bank_init.to(bank.bank.dtype))
    if freeze_bank:
        bank.bank.requires_grad_(False)
    groups = vblora.parameter_groups(model, lr_bank=run.lr_bank, lr_logits=run.lr_logits, lr_other=run.lr_head,
                                     weight_decay=run.weight_decay)

    class _T(Trainer):
        def create_optimizer(self, model=None):
            if self.optimizer is None:
                self.optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "name"} for g in groups])
            return self.optimizer

    args = TrainingArguments(output_dir=str(out / "trainer"), per_device_train_batch_size=run.batch_size,
                             per_device_eval_batch_size=run.eval_batch_size, num_train_epochs=run.epochs,
                             learning_rate=run.lr_head, lr_scheduler_type=run.lr_scheduler,
                             warmup_steps=run.warmup_ratio, max_grad_norm=run.max_grad_norm, eval_strategy="no",
                             save_strategy="no", logging_strategy="no", seed=run.seed, data_seed=run.seed,
                             report_to="none", remove_unused_columns=False, dataloader_num_workers=0,
                             disable_tqdm=True, use_cpu=not torch.cuda.is_available())
    callbacks = []
    if record_every:
        from vblora.analysis.selection import SelectionCallback
        callbacks.append(SelectionCallback(every=record_every, run_dir=out))

    def metrics_fn(p):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return M.classification_metrics(preds, p.label_ids)

    trainer = _T(model=model, args=args, train_dataset=data.train, data_collator=DataCollatorWithPadding(tok),
                 compute_metrics=metrics_fn, callbacks=callbacks)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # no metric dicts on stdout; we log one line per run
    t_train = time.time()
    train_out = trainer.train()
    train_time = time.time() - t_train
    evals = {}
    for k in eval_topk or (None,):
        if k is not None:  # evaluate the same trained logits with another top-k softmax
            bank.config = bank.config.replace(eval_topk=k)
            bank._eval_cache = None
        key = f"top{k}" if k is not None else "default"
        evals[key] = {split: _strip(trainer.evaluate(getattr(data, split), metric_key_prefix=split))
                      for split in eval_splits}
        evals[key]["stored_parameters"] = float(vblora.count_parameters(model)["stored"])  # depends on eval k
    counts = vblora.count_parameters(model)
    bank_bytes = 4 * counts["bank"]
    results = {"variant_vb": vb, "evals": evals, "train_loss": float(train_out.training_loss),
               "train_time_s": round(train_time, 1), "wall_time_s": None, "seed": run.seed,
               "freeze_bank": freeze_bank, "bank_init": bank_init is not None,
               "counts": {k: v for k, v in counts.items() if isinstance(v, (int, float))},
               "task_bytes_without_bank": counts["stored_bytes"] - bank_bytes,
               "vblora_config": vcfg.to_dict(), "data": {"train": len(data.train), "validation": len(data.validation),
                                                         "test": len(data.test), **data.info},
               "run_config": {k: v for k, v in run.to_dict().items() if k != "extra"}}
    if save_adapter:
        from vblora import storage

        adir = out / "adapter"
        f = storage.save_adapter(model, adir, bank=save_adapter)
        results["adapter_file_bytes"] = Path(f).stat().st_size
        if save_adapter == "reference":
            results["bank_file_bytes"] = Path(storage.save_bank(model, adir)).stat().st_size
    torch.save(bank.bank.detach().cpu(), out / "bank.pt")
    results["wall_time_s"] = round(time.time() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    log(f"[ablate] {out.name}: " + ", ".join(f"{k} test acc {v['test']['accuracy']:.4f}" for k, v in evals.items())
        + f" ({train_time:.0f} s training)")
    return results


def _strip(m: dict) -> dict:
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    return {k.split("_", 1)[1]: float(v) for k, v in m.items() if not any(k.endswith(s) for s in skip)}


def run_study(variants: list[Variant], seeds: list[int], out, run_overrides: dict, budget: Budget,
              recipe: str | None = None, train_fn=train_variant, eval_splits: tuple = ("test",),
              log=print) -> list[dict]:
    """Every variant x seed (reusing finished runs), then the summary rows (also written to OUT/ablation.json)."""
    from vblora.train.options import build_config

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict]] = {v.name: [] for v in variants}
    for seed in seeds:  # seeds outermost: a study cut short still has every variant at the first seeds
        for v in variants:
            d = out / f"{v.name}-seed{seed}"
            if (d / "results.json").exists():
                results[v.name].append(json.loads((d / "results.json").read_text()))
                continue
            ov = {**run_overrides, **v.run, "seed": seed, **budget.overrides()}
            cfg = build_config(recipe, ov)
            try:
                results[v.name].append(train_fn(cfg, v.vb, d, eval_topk=v.eval_topk, eval_splits=eval_splits,
                                                log=log))
            except Exception as e:  # one failing variant must not lose the others
                log(f"[ablate] {d.name} FAILED: {type(e).__name__}: {e}")
            rows = summarize(variants, results)
            (out / "ablation.json").write_text(json.dumps({"budget": budget.describe(), "seeds": seeds,
                                                           "rows": rows}, indent=2))
    return summarize(variants, results)


def summarize(variants: list[Variant], results: dict[str, list[dict]], split: str = "test",
              metric: str = "accuracy") -> list[dict]:
    rows = []
    for v in variants:
        rs = results.get(v.name, [])
        for k in v.eval_topk or (None,):
            key = f"top{k}" if k is not None else "default"
            vals = [r["evals"][key][split][metric] for r in rs if key in r.get("evals", {})]
            vvals = [r["evals"][key]["validation"][metric] for r in rs
                     if "validation" in r.get("evals", {}).get(key, {})]
            label = f"{v.name} (eval top-{k})" if k is not None else v.name
            ev = f"top-{k} softmax" if k is not None else _eval_rule(v)
            row = {"variant": label, "training": v.training, "inference": ev, "runs": len(vals),
                   "seeds": [r["seed"] for r in rs if key in r.get("evals", {})], "values": vals}
            if vals:
                row.update(median=statistics.median(vals), min=min(vals), max=max(vals),
                           mean=statistics.fmean(vals), std=statistics.stdev(vals) if len(vals) > 1 else 0.0,
                           validation_median=statistics.median(vvals) if vvals else None,
                           stored_parameters=rs[0]["evals"][key].get("stored_parameters", rs[0]["counts"]["stored"]),
                           train_time_s=statistics.fmean(r["train_time_s"] for r in rs))
            rows.append(row)
    return rows


def _eval_rule(v: Variant) -> str:
    if v.vb.get("selection") == "all":
        return "softmax over the bank"
    return f"top-{v.vb.get('topk', 2)} softmax" if "topk" in v.vb else "top-k softmax (config)"


def format_table(rows: list[dict], title: str, metric: str = "accuracy") -> str:
    lines = [title, "", f"| variant | training | inference | test {metric}: median | min-max | mean +- std | "
                        f"runs | stored params | train s |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if not r["runs"]:
            lines.append(f"| {r['variant']} | {r['training']} | {r['inference']} | - | - | - | 0 | - | - |")
            continue
        lines.append(f"| {r['variant']} | {r['training']} | {r['inference']} | {100 * r['median']:.1f} | "
                     f"{100 * r['min']:.1f}-{100 * r['max']:.1f} | {100 * r['mean']:.1f} +- {100 * r['std']:.1f} | "
                     f"{r['runs']} | {r['stored_parameters']:,.0f} | {r['train_time_s']:.0f} |")
    return "\n".join(lines)


# -- shared bank across tasks -------------------------------------------------------------------------------------

VADER_CORPORA = {"movies": "movieReviewSnippets", "tweets": "tweets", "amazon": "amazonReviewSnippets",
                 "nyt": "nytEditorialSnippets"}


def vader_corpus(name: str, root: Path | None = None) -> dict[str, Path]:
    """Another VADER ground-truth corpus (tweets, amazon, nyt) as binary sentiment, split like the default task.

    Reads `hutto_ICWSM_2014/<corpus>_GroundTruth.txt` from the same sha256-checked vaderSentiment 3.3.2 sdist that
    `vblora data fetch` downloads; label = sign of the mean human rating (zeros dropped); seeded 80/10/10 split.
    """
    import io
    import tarfile

    from vblora.train import vader

    if name not in VADER_CORPORA:
        raise ValueError(f"unknown VADER corpus {name!r}; choose one of {list(VADER_CORPORA)}")
    root = root or vader.cache_dir()
    out = root / f"vader-{name}"
    paths = {s: out / f"{s}.jsonl" for s in ("train", "validation", "test")}
    if all(p.exists() for p in paths.values()):
        return paths
    sdist = vader.download_sdist(root / "downloads").read_bytes()
    if vader._sha256(sdist) != vader.SDIST_SHA256:
        raise ValueError("vaderSentiment sdist does not match its pinned sha256; delete it and fetch again")
    with tarfile.open(fileobj=io.BytesIO(sdist)) as outer:
        inner = outer.extractfile(vader.INNER).read()
    if vader._sha256(inner) != vader.INNER_SHA256:
        raise ValueError(f"{vader.INNER} does not match its pinned sha256")
    with tarfile.open(fileobj=io.BytesIO(inner)) as t:
        raw = t.extractfile(f"hutto_ICWSM_2014/{VADER_CORPORA[name]}_GroundTruth.txt").read().decode("utf-8")
    splits = vader.make_split(vader.parse_ground_truth(raw))
    out.mkdir(parents=True, exist_ok=True)
    for split, recs in splits.items():
        paths[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
    (out / "info.json").write_text(json.dumps({"source": vader.PACKAGE, "file": VADER_CORPORA[name],
                                               "sizes": {k: len(v) for k, v in splits.items()}}, indent=2))
    return paths


def shared_bank_study(bank, seeds: list[int], out, task_overrides: dict, budget: Budget, recipe: str | None = None,
                      train_fn=train_variant, log=print) -> list[dict]:
    """Task 2 with a fresh, trained bank vs the task-1 `bank` (an `(h, b)` tensor) frozen (only logits + head train).

    The fresh run saves its adapter with the bank embedded; the frozen run with `bank="reference"` (sha256 only):
    its adapter file is what each further task costs once the shared bank is stored.
    """
    from vblora.train.options import build_config

    out = Path(out)
    arms = [("fresh bank (trained on task 2)", dict(bank_init=None, freeze_bank=False, save_adapter="embed")),
            ("shared task-1 bank, frozen", dict(bank_init=bank, freeze_bank=True, save_adapter="reference"))]
    h, b = bank.shape
    rows = []
    for label, kw in arms:
        rs = []
        for seed in seeds:
            d = out / f"{'fresh' if kw['bank_init'] is None else 'frozen'}-seed{seed}"
            if (d / "results.json").exists():
                rs.append(json.loads((d / "results.json").read_text()))
                continue
            ov = {**task_overrides, "seed": seed, **budget.overrides(), "num_vectors": h, "vector_length": b}
            rs.append(train_fn(build_config(recipe, ov), {}, d, log=log, **kw))
        vals = [r["evals"]["default"]["test"]["accuracy"] for r in rs]
        rows.append({"arm": label, "runs": len(vals), "values": vals, "median": statistics.median(vals),
                     "min": min(vals), "max": max(vals),
                     "adapter_file_bytes": rs[0].get("adapter_file_bytes"),
                     "bank_file_bytes": rs[0].get("bank_file_bytes"),
                     "task_bytes_without_bank": rs[0]["task_bytes_without_bank"],
                     "trainable": rs[0]["counts"]["trainable"]})
        (out / "shared_bank.json").write_text(json.dumps({"budget": budget.describe(), "seeds": seeds,
                                                          "rows": rows}, indent=2))
    return rows


def format_shared_bank(rows: list[dict], title: str) -> str:
    lines = [title, "", "| task-2 arm | test accuracy: median | min-max | runs | trainable params | "
                        "adapter file bytes per task |", "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['arm']} | {100 * r['median']:.1f} | {100 * r['min']:.1f}-{100 * r['max']:.1f} | "
                     f"{r['runs']} | {r['trainable']:,} | {r['adapter_file_bytes'] or 0:,} |")
    return "\n".join(lines)
