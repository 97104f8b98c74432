"""`vblora train`: one run from a RunConfig to DIR/results.json and DIR/adapter/, on transformers.Trainer.

Trainer gives the loop, progress bars, gradient accumulation, mixed precision, resumable checkpoints and
torchrun/accelerate scale-out (DDP; gloo on CPU). We add: the per-method AdamW groups (VB-LoRA's three learning
rates), checkpoints holding only the trainable tensors, best-epoch selection on validation (kept across a
kill/resume), and evaluation of the best state on test.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments, set_seed

from vblora.train import metrics as M
from vblora.train import methods, models, tasks
from vblora.train.errors import SetupError
from vblora.train.evaluate import generate_answers, lm_loss
from vblora.train.options import RunConfig
from vblora.train.sampling import LengthGroupedEpochSampler, item_lengths

TRAINABLE_FILE = "trainable.pt"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise SetupError(f"checkpoint does not fit this model (e.g. {missing[:3]}); was it made by another method?")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


class _Trainer(Trainer):
    """Trainer with our optimizer groups and trainable-only checkpoints (a frozen base is never re-saved)."""

    def __init__(self, *a, param_groups=None, group_by_length=False, **kw):
        self._groups = param_groups
        self._group_by_length = group_by_length
        super().__init__(*a, **kw)

    def _get_train_sampler(self, train_dataset=None):
        if not self._group_by_length:
            return super()._get_train_sampler(train_dataset)
        ds = train_dataset if train_dataset is not None else self.train_dataset
        a = self.args  # group by the global batch, so 1 process and N processes see the same batches
        global_batch = a.per_device_train_batch_size * a.gradient_accumulation_steps * max(1, a.world_size)
        return LengthGroupedEpochSampler(item_lengths(ds), global_batch, a.seed)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = [{k: v for k, v in g.items() if k != "name"} for g in self._groups]
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        return self.optimizer

    def _save(self, output_dir=None, state_dict=None):
        output_dir = output_dir or self.args.output_dir
        os.makedirs(output_dir, exist_ok=True)
        torch.save(trainable_state(self.model), os.path.join(output_dir, TRAINABLE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        state = torch.load(os.path.join(resume_from_checkpoint, TRAINABLE_FILE), map_location="cpu")
        load_trainable(model or self.model, state)


class BestTracker(TrainerCallback):
    """Keeps the trainable state of the best validation epoch, in memory and (rank 0) on disk for resume."""

    def __init__(self, model, metric: str, ckpt_dir: Path, is_main: bool):
        self.model, self.key, self.dir, self.is_main = model, f"eval_{metric}", ckpt_dir, is_main
        self.sign = 1.0 if M.greater_is_better(metric) else -1.0
        self.best, self.best_epoch, self.state, self.active = None, None, None, True
        self.metrics: dict | None = None  # validation metrics of the best epoch
        f = ckpt_dir / "best.json"
        if f.exists() and (ckpt_dir / "best_trainable.pt").exists():
            info = json.loads(f.read_text())
            self.best, self.best_epoch, self.metrics = info["value"], info["epoch"], info.get("metrics")
            self.state = torch.load(ckpt_dir / "best_trainable.pt", map_location="cpu")

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if not self.active or not metrics or self.key not in metrics:
            return
        value = float(metrics[self.key])
        if self.best is None or self.sign * value > self.sign * self.best:
            self.best, self.best_epoch = value, round(float(state.epoch or 0), 4)
            self.metrics = {k: float(v) for k, v in metrics.items()}
            self.state = trainable_state(self.model)
            if self.is_main:
                self.dir.mkdir(parents=True, exist_ok=True)
                torch.save(self.state, self.dir / "best_trainable.pt")
                (self.dir / "best.json").write_text(json.dumps({"value": self.best, "epoch": self.best_epoch,
                                                                "metrics": self.metrics}))


def _device_args(cfg: RunConfig) -> dict:
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise SetupError("--device cuda: no CUDA GPU is visible on this machine (use --device cpu or auto)")
    if cfg.fp16 and not cuda:
        raise SetupError("--fp16 needs a CUDA GPU; this machine has none (drop --fp16, or use --bf16 on CPU)")
    use_cpu = cfg.device == "cpu" or not cuda
    if cfg.fp16 and use_cpu:
        raise SetupError("--fp16 with --device cpu: fp16 training needs CUDA (use --bf16 on CPU)")
    multi = int(os.environ.get("WORLD_SIZE", "1")) > 1  # torchrun / accelerate launch
    return {"use_cpu": use_cpu, "ddp_backend": "gloo" if (use_cpu and multi) else None}


def _prepare_output(cfg: RunConfig, is_main: bool) -> tuple[Path, Path, str | None]:
    out = Path(cfg.output)
    ckpt = out / "checkpoints"
    has = ckpt.exists() and any(p.name.startswith("checkpoint-") for p in ckpt.iterdir())
    resume = None
    if has and cfg.resume:
        resume = True
    elif has and not cfg.overwrite:
        raise SetupError(f"{ckpt} holds checkpoints of an earlier run: pass --resume to continue it or --overwrite "
                         f"to start again")
    elif cfg.overwrite and out.exists() and is_main:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(out / "adapter", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    return out, ckpt, resume


def _compute_metrics(kind: str):
    def fn(p):
        preds = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        if kind == "regression":
            return M.regression_metrics(preds, p.label_ids)
        return M.classification_metrics(preds, p.label_ids)
    return fn


def versions() -> dict:
    import peft
    import transformers

    import vblora
    return {"vblora": vblora.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "python": platform.python_version(), "platform": platform.platform()}


def train(cfg: RunConfig, log=print, callbacks: list | None = None) -> dict:
    t0 = time.time()
    dev = _device_args(cfg)
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    is_main = rank == 0
    out, ckpt, resume = _prepare_output(cfg, is_main)

    set_seed(cfg.seed)
    path, gguf = models.resolve_model(cfg.model, cfg.gguf_file)
    tok = models.load_tokenizer(path, gguf)
    data = tasks.build(cfg, tok)
    lm = data.kind in ("causal-lm", "gsm8k")
    model_kind = "causal-lm" if lm else data.kind
    set_seed(cfg.seed)  # the head's random init does not depend on how much data loading consumed
    model = models.load_model(path, gguf, model_kind, data.labels.num_labels if data.labels else 0,
                              data.labels.names if data.labels else None)
    models.set_pad_token(model, tok)
    adapted = methods.apply_method(model, cfg)
    model = adapted.model

    metric = M.primary_metric(data.kind)
    args = TrainingArguments(
        output_dir=str(ckpt), per_device_train_batch_size=cfg.batch_size, per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum, num_train_epochs=cfg.epochs, learning_rate=cfg.lr_head,
        weight_decay=cfg.weight_decay, lr_scheduler_type=cfg.lr_scheduler, warmup_steps=cfg.warmup_ratio,
        max_grad_norm=cfg.max_grad_norm, eval_strategy="epoch",
        save_strategy="steps" if cfg.save_steps else "epoch", save_steps=cfg.save_steps or 500,
        save_total_limit=2, logging_steps=cfg.logging_steps, seed=cfg.seed, data_seed=cfg.seed, report_to="none",
        bf16=cfg.bf16, fp16=cfg.fp16, remove_unused_columns=False, dataloader_num_workers=0,
        ddp_find_unused_parameters=False, prediction_loss_only=lm,
        # token-count loss scaling across processes is right for causal LM losses only; a classifier's mean loss
        # would be multiplied by the world size
        average_tokens_across_devices=lm, disable_tqdm=not sys.stderr.isatty(),  # progress bars on a terminal, loss lines in logs
        **dev)
    collator = tasks.LMCollator(tok.pad_token_id) if lm else _padding_collator(tok)
    tracker = BestTracker(model, metric, ckpt, is_main)
    if cfg.record_selection_every and cfg.method == "vblora" and is_main:
        from vblora.analysis.selection import SelectionCallback
        callbacks = [*(callbacks or []), SelectionCallback(every=cfg.record_selection_every, run_dir=out)]
    trainer = _Trainer(model=model, args=args, train_dataset=data.train, eval_dataset=data.validation,
                       data_collator=collator, compute_metrics=None if lm else _compute_metrics(data.kind),
                       callbacks=[tracker, *(callbacks or [])], param_groups=adapted.param_groups,
                       group_by_length=cfg.group_by_length)
    log(f"vblora train: {cfg.method} on {Path(path).name} ({data.kind}), {len(data.train)} train / "
        f"{len(data.validation)} validation / {len(data.test)} test examples, {len(adapted.targets)} adapted modules, "
        f"{adapted.trainable_parameters:,} trainable, {adapted.stored_parameters:,.0f} stored parameters"
        + (f", {world} processes" if world > 1 else ""))
    t_train = time.time()
    train_out = trainer.train(resume_from_checkpoint=resume)
    train_time = time.time() - t_train
    tracker.active = False
    per_epoch = _per_epoch(trainer.state.log_history)  # before the final evaluations add their own entries
    if tracker.state is not None:
        load_trainable(trainer.model, tracker.state)

    if lm:
        val = lm_loss(trainer.model, data.validation, collator, cfg.eval_batch_size)
        test = lm_loss(trainer.model, data.test, collator, cfg.eval_batch_size)
        gen = generate_answers(trainer.model, tok, data, cfg, out if is_main else None)
        test.update(gen)
    else:
        # the best epoch's validation metrics were computed on exactly this state: no second pass
        val = _strip(tracker.metrics) if tracker.metrics else _strip(trainer.evaluate(data.validation,
                                                                                       metric_key_prefix="eval"))
        test = _strip(trainer.evaluate(data.test, metric_key_prefix="test"))

    results = {
        "metrics": {"validation": val, "test": test},
        "stored_parameters": adapted.stored_parameters,
        "adapter_bytes": 0,
        "trainable_parameters": adapted.trainable_parameters,
        "method": cfg.method, "task": data.kind, "primary_metric": metric, "recipe": cfg.recipe, "seed": cfg.seed,
        "model": path, "best_epoch": tracker.best_epoch,
        "per_epoch": per_epoch,
        "train_loss": float(train_out.training_loss), "wall_time_s": None, "train_time_s": round(train_time, 2),
        "world_size": world, "device": "cpu" if dev["use_cpu"] else torch.cuda.get_device_name(0),
        "adapted_modules": len(adapted.targets), "targets": adapted.targets, "details": adapted.details,
        "data": {**data.info, "train": len(data.train), "validation": len(data.validation), "test": len(data.test)},
        "config": cfg.to_dict(), "versions": versions(),
    }
    if cfg.dataset and cfg.dataset.startswith("vader"):
        from vblora.train import vader
        results["data"]["split"] = vader.split_info()
    if is_main:
        adapter_dir, fresh = out / "adapter", out / "adapter.saving"
        shutil.rmtree(fresh, ignore_errors=True)
        adapted.save(fresh)  # an earlier adapter is replaced only once the new one is completely written
        shutil.rmtree(adapter_dir, ignore_errors=True)
        fresh.rename(adapter_dir)
        results["adapter_bytes"] = methods.adapter_bytes(adapter_dir)
        results["adapter_dir"] = str(adapter_dir)
        results["wall_time_s"] = round(time.time() - t0, 2)
        # CPU seconds of this process (all threads): on a shared machine wall time says little, this does
        ru = resource.getrusage(resource.RUSAGE_SELF)
        results["cpu_time_s"] = round(ru.ru_utime + ru.ru_stime, 2)
        results["load_average"] = list(os.getloadavg())
        (out / "results.json").write_text(json.dumps(results, indent=2, default=_json_default))
        log(summary_line(results) + f"  -> {out / 'results.json'}")
    return results


def _padding_collator(tok):
    from transformers import DataCollatorWithPadding
    return DataCollatorWithPadding(tok)  # pads each batch to its own longest sequence (dynamic padding)


def _strip(m: dict) -> dict:
    """`eval_accuracy` -> `accuracy`; keep metrics, drop runtime counters."""
    skip = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    return {k.split("_", 1)[1]: float(v) for k, v in m.items() if not any(k.endswith(s) for s in skip)}


def _per_epoch(history: list[dict]) -> list[dict]:
    rows, train_loss = [], None
    for h in history:
        if "loss" in h:
            train_loss = h["loss"]
        if "eval_loss" in h:
            rows.append({"epoch": h.get("epoch"), "step": h.get("step"), "train_loss": train_loss,
                         "validation": _strip({k: v for k, v in h.items() if k.startswith("eval_")})})
    return rows


def _json_default(o):
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, tuple)):
        return list(o)
    return str(o)


def summary_line(r: dict) -> str:
    t = r["metrics"]["test"]
    key = r["primary_metric"] if r["primary_metric"] in t else next(iter(t), None)
    shown = ", ".join(f"{k} {t[k]:.4f}" for k in (key, "perplexity", "exact_match", "answer_accuracy")
                      if k in t and k is not None)
    wall = f", wall {r['wall_time_s']:.0f} s" if r.get("wall_time_s") else ""
    return (f"{r['method']}: test {shown} | stored parameters {r['stored_parameters']:,.0f} | "
            f"adapter bytes {r['adapter_bytes']:,} | best epoch {r['best_epoch']}{wall}")
