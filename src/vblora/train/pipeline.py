"""`train(cfg)`: the one training pipeline, from a RunConfig to DIR/results.json and DIR/adapter/.

transformers.Trainer gives the loop, progress bars, gradient accumulation, mixed precision, label smoothing,
resumable checkpoints and torchrun/accelerate scale-out (DDP; gloo on CPU); `vblora.AdapterTrainer` (the public
integration, src/vblora/integrations.py) makes its checkpoints hold the trainable tensors only and resume with the
loss bookkeeping of an uninterrupted run. We add: the per-method AdamW groups (VB-LoRA's three learning rates),
checkpoints that are complete or absent and resume only the run they belong to (train/checkpoints.py), a divergence
guard, the best validation epoch (kept across a kill/resume; train/callbacks.py), and scoring of that state on test,
plus the task's own evaluation (generation) and other eval top-k. An earlier run's adapter/ and results.json stay
until a complete run replaces them. Every experiment (compare, ablations, E2E) is a loop of configs over `train`, so
all are scored the same way. This is the only place in the package that builds a Trainer, through public Trainer
hooks but one (`_get_train_sampler`, pinned in tests/train/test_private_api.py). docs/reliability.md lists the
faults tried.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import (
    DataCollatorWithPadding,
    TrainingArguments,
    set_seed,
)

import vblora
from vblora.errors import AdapterFormatError
from vblora.integrations import AdapterTrainer
from vblora.layout import require_bitsandbytes
from vblora.storage.checkpoint import copy_trainable
from vblora.storage.files import atomic_write, replace_dir
from vblora.train import checkpoints as run_checkpoints
from vblora.train import evaluate, methods, models, tasks, vader
from vblora.train import metrics as task_metrics
from vblora.train import results as results_file
from vblora.train.callbacks import BestTracker, CatchUpEvaluation, DivergenceGuard
from vblora.train.config import RunConfig
from vblora.train.errors import ResumeError, SaveError, SetupError
from vblora.train.sampling import LengthGroupedEpochSampler, item_lengths


class _Trainer(AdapterTrainer):
    """`vblora.AdapterTrainer` (checkpoints of the trainable tensors only, exact loss bookkeeping across a resume,
    a quantized base accepted) with our optimizer groups, length-grouped batches and the run's identity stored in
    every checkpoint. One private override remains: `_get_train_sampler` (tests/train/test_private_api.py pins its
    signature)."""

    def __init__(self, *a, cfg: RunConfig, param_groups: list[dict], run: dict, log=print, **kw):
        self.cfg, self.param_groups, self.run_identity, self.say = cfg, param_groups, run, log
        super().__init__(*a, **kw)
        if cfg.fsdp:
            # The Trainer's own path for a model sharded before it gets it (transformers' load-time FSDP2): no DDP
            # wrap, no second sharding; the trainable tensors, left whole, are broadcast from rank 0 and their
            # gradients averaged over the processes once per accumulation window. Set after __init__, which refuses
            # optimizer checkpoints for such models: theirs are sharded, ours hold whole tensors only (rank 0 writes).
            self.is_distributed_loading_by_transformers = True

    def checkpoint_extra(self) -> dict:
        return {**super().checkpoint_extra(), "run": self.run_identity}

    def _get_train_sampler(self, train_dataset=None):
        if not self.cfg.group_by_length:
            return super()._get_train_sampler(train_dataset)
        ds = train_dataset if train_dataset is not None else self.train_dataset
        a = self.args  # group by the global batch, so 1 process and N processes see the same batches
        global_batch = a.per_device_train_batch_size * a.gradient_accumulation_steps * max(1, a.world_size)
        return LengthGroupedEpochSampler(item_lengths(ds), global_batch, a.seed)

    def create_optimizer(self, model=None):
        if self.optimizer is None:
            groups = [{k: v for k, v in g.items() if k != "name"} for g in self.param_groups]
            adamw = torch.optim.AdamW
            if self.cfg.quantize and not self.args.use_cpu:
                # QLoRA's paged AdamW: optimizer state paged to host memory under memory spikes
                adamw = require_bitsandbytes().optim.PagedAdamW
            elif self.cfg.quantize:
                self.say("vblora train: --quantize on the CPU: paged AdamW needs CUDA; using torch AdamW")
            self.optimizer = adamw(groups, lr=self.args.learning_rate, betas=(0.9, 0.999), eps=1e-8)
        return self.optimizer


class _ShardedArguments(TrainingArguments):
    """--fsdp: train/sharding.py placed the sharded model (`.to()` on its DTensors would fail); the Trainer's
    documented switch for integrations that place the model themselves."""

    @property
    def place_model_on_device(self) -> bool:
        return False


def train(cfg: RunConfig, callbacks: list | None = None, log=print, task=tasks.build) -> dict:
    """Train `cfg` and score it; `task(cfg, tokenizer) -> TaskData` builds the data (default: tasks.build).

    Returns (and rank 0 writes to cfg.output/results.json) validation and test metrics of the best epoch, counts,
    sizes and timings.
    """
    t0 = time.time()
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))  # torchrun / accelerate
    dev = _device_args(cfg, world)
    is_main = rank == 0
    if cfg.fsdp and world < 2:
        raise SetupError(
            "--fsdp shards the base over several processes: launch with torchrun --nproc-per-node N "
            "-m vblora train ... (N >= 2), or drop --fsdp"
        )
    out, ckpt, resume = _check_output(cfg)

    set_seed(cfg.seed)
    path, gguf = models.resolve_model(cfg.model, cfg.gguf_file)
    tok = models.load_tokenizer(path, gguf)
    data = task(cfg, tok)
    lm = data.task in ("causal-lm", "gsm8k")
    set_seed(cfg.seed)  # the head's random init does not depend on how much data loading consumed
    quant = (
        models.quantization(
            cfg.quantize,
            cfg.quant_type,
            cfg.double_quant,
            cfg.compute_dtype,
            cfg.vblora.modules_to_save or (),
            dev["use_cpu"],
            cfg.fsdp,
        )
        if cfg.quantize
        else None
    )
    model = models.load_model(
        path,
        gguf,
        "causal-lm" if lm else data.task,
        data.labels.num_labels if data.labels else 0,
        data.labels.names if data.labels else None,
        quant=quant,
    )
    models.set_pad_token(model, tok)
    if cfg.quantize:
        models.enable_qlora_checkpointing(model)
    adapted = methods.apply_method(model, cfg)
    model = adapted.model

    identity = run_checkpoints.run_identity(cfg, len(data.train), world)
    found = run_checkpoints.find_resume(ckpt, identity, cfg.resume_partial, rank, world, log) if resume else None
    if cfg.resume and not resume:
        log(f"vblora train: --resume: no checkpoint in {ckpt}; starting from the beginning")
    if is_main:  # a fresh start keeps no checkpoint or best state of an earlier run; a resume no half-written save
        shutil.rmtree(ckpt / run_checkpoints.STAGING if found else ckpt, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)  # only now: a run that cannot start leaves no directory behind
    metric = task_metrics.primary_metric(data.task)
    has_val = data.validation is not None
    # the Trainer writes checkpoint-N under .saving; run_checkpoints.Publisher renames each into checkpoints/ once
    # complete
    args = (_ShardedArguments if cfg.fsdp else TrainingArguments)(
        output_dir=str(ckpt / run_checkpoints.STAGING),
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.eval_batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps or -1,
        learning_rate=cfg.lr_head,
        weight_decay=cfg.weight_decay,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_steps or cfg.warmup_ratio,  # a float < 1 is a ratio of the steps
        max_grad_norm=cfg.max_grad_norm,
        label_smoothing_factor=cfg.label_smoothing,
        eval_strategy="epoch" if has_val else "no",
        save_strategy="steps" if cfg.save_steps else "epoch",
        save_steps=cfg.save_steps or 500,
        logging_steps=cfg.logging_steps or 1,
        logging_strategy="steps" if cfg.logging_steps else "no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        report_to="none",
        bf16=cfg.bf16,
        fp16=cfg.fp16,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        prediction_loss_only=lm,
        save_total_limit=None,  # checkpoints.publish keeps 2
        logging_nan_inf_filter=False,  # a non-finite loss stops the run (DivergenceGuard), never averaged away
        # --fsdp: FSDP holds frozen parameters only, so it has no gradient to reduce and nothing to defer between
        # micro-batches (the Trainer averages the whole trainable tensors at the window's end)
        accelerator_config={"gradient_accumulation_kwargs": {"sync_each_batch": True}} if cfg.fsdp else None,
        # token-count loss scaling across processes is right for causal-LM losses only; a classifier's mean loss
        # would be multiplied by the world size
        average_tokens_across_devices=lm,
        disable_tqdm=not sys.stderr.isatty(),  # bars on a terminal, lines in logs
        **dev,
    )
    if cfg.fsdp:  # after TrainingArguments, which started the process group
        from vblora.train import sharding

        sharding.shard_model(model, sharding.device_mesh(args.device), average_gradients=False)  # Trainer averages
    # LM: right-padded with -100 labels; else padded to each batch's own longest sequence (dynamic padding)
    collator = tasks.LMCollator(tok.pad_token_id) if lm else DataCollatorWithPadding(tok)
    tracker = BestTracker(model, metric, ckpt, is_main, int(found[0].name[11:]) if found else None)
    callbacks = [tracker, DivergenceGuard(cfg, model), *(callbacks or [])]
    if cfg.record_selection_every and cfg.method == "vblora" and is_main:
        from vblora.train.selection import SelectionCallback

        callbacks.append(SelectionCallback(every=cfg.record_selection_every, run_dir=out))
    trainer = _Trainer(
        model=model,
        args=args,
        train_dataset=data.train,
        eval_dataset=data.validation,
        data_collator=collator,
        compute_metrics=None if lm else _compute_metrics(data.task),
        callbacks=callbacks,
        cfg=cfg,
        param_groups=adapted.param_groups,
        run=identity,
        log=log,
    )
    publisher = run_checkpoints.Publisher(ckpt, trainer.accelerator, is_main)
    trainer.add_callback(publisher)
    trainer.add_callback(CatchUpEvaluation(trainer))
    if found:
        run_checkpoints.check_loadable(found[0], rank, world)
    log(
        f"vblora train: {cfg.method} on {Path(path).name} ({data.task}), {len(data.train)} train / "
        f"{len(data.validation or ())} validation / {len(data.test)} test examples, {len(adapted.targets)} adapted "
        f"modules, {adapted.trainable_parameters:,} trainable, {adapted.stored_parameters:,.0f} stored parameters"
        + (f", {world} processes" if world > 1 else "")
    )
    t_train = time.time()
    try:
        trainer.train(resume_from_checkpoint=str(found[0]) if found else None)
    except AdapterFormatError as e:  # only the trainable tensors' check raises it (AdapterTrainer.train)
        if not found:
            raise
        raise ResumeError(
            f"--resume: cannot restore the trainable tensors from {found[0]} "
            f"({run_checkpoints.first_line(e)}); --overwrite starts the run again"
        ) from None
    except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
        if not publisher.staged(trainer.state.global_step).exists():
            raise
        step = trainer.state.global_step
        raise SaveError(
            f"could not write checkpoint-{step} ({run_checkpoints.first_line(e)}; is the disk full?); "
            f"the checkpoints before it are intact and --resume continues from them"
        ) from e
    train_loss = trainer.run_loss()  # the whole run's, also after a resume (AdapterTrainer's LossBook)
    train_time = time.time() - t_train
    tracker.active = False
    # before the final evaluations add their own entries
    per_epoch = results_file.per_epoch_rows(trainer.state.log_history)
    if tracker.state is not None:
        copy_trainable(trainer.model, tracker.state)

    def score(split) -> dict:
        ds = getattr(data, split)
        if ds is None:
            return {}
        if lm:
            return evaluate.lm_loss(trainer.model, ds, collator, cfg.eval_batch_size)
        return results_file.strip_prefix(trainer.evaluate(ds, metric_key_prefix=split))

    # the best epoch's validation metrics were computed on exactly this state: no second pass
    val = results_file.strip_prefix(tracker.metrics) if tracker.metrics and not lm else score("validation")
    test = score("test")
    t_eval = time.time()
    with _samples_dir(cfg, out, is_main) as samples:
        if data.evaluate is not None:  # the task's own scoring of the best state, e.g. generation
            test.update(data.evaluate(trainer.model, tok, data, cfg, samples))
        elif lm:
            test.update(evaluate.generate_answers(trainer.model, tok, data, cfg, samples))
    by_k = {}
    for k in cfg.extra_eval_topk:  # paper Table 5: the same trained logits scored with another top-k
        with _eval_topk(trainer.model, k):
            by_k[str(k)] = {
                "validation": score("validation"),
                "test": score("test"),
                "stored_parameters": float(vblora.count_parameters(trainer.model)["stored"]),
            }

    results = {
        "metrics": {"validation": val, "test": test},
        "eval_topk": by_k,
        "stored_parameters": adapted.stored_parameters,
        "adapter_bytes": 0,
        "trainable_parameters": adapted.trainable_parameters,
        "method": cfg.method,
        "task": data.task,
        "primary_metric": metric,
        "recipe": cfg.recipe,
        "seed": cfg.seed,
        "model": path,
        "best_epoch": tracker.best_epoch,
        "per_epoch": per_epoch,
        "steps": trainer.state.global_step,
        "train_loss": train_loss,
        "wall_time_s": None,
        "train_time_s": round(train_time, 2),
        "eval_time_s": round(time.time() - t_eval, 2),
        "world_size": world,
        "device": "cpu" if dev["use_cpu"] else torch.cuda.get_device_name(0),
        "adapted_modules": len(adapted.targets),
        "targets": adapted.targets,
        "details": adapted.details,
        "data": {
            **data.info,
            "train": len(data.train),
            "validation": len(data.validation or ()),
            "test": len(data.test),
        },
        "config": cfg.to_dict(),
        "versions": results_file.library_versions(),
    }
    if cfg.dataset and cfg.dataset.startswith("vader"):
        results["data"]["split"] = vader.split_info()
    # --fsdp: the adapter header samples a few base weights; every process gathers the base (sharding imported above)
    with sharding.gathered(model) if cfg.fsdp else contextlib.nullcontext():
        adapter_dir = replace_dir(out / "adapter", adapted.save, replaceable=lambda d: True) if is_main else None
    if adapter_dir is not None:  # the main process; an earlier adapter and results.json are replaced only once
        # the new ones are completely written
        results.update(
            adapter_bytes=methods.adapter_bytes(adapter_dir),
            adapter_dir=str(adapter_dir),
            wall_time_s=round(time.time() - t0, 2),
        )
        # CPU seconds of this process (all threads): on a shared machine wall time says little, this does
        ru = resource.getrusage(resource.RUSAGE_SELF)
        results.update(cpu_time_s=round(ru.ru_utime + ru.ru_stime, 2), load_average=list(os.getloadavg()))
        atomic_write(out / "results.json", json.dumps(results, indent=2, default=results_file.json_default).encode())
        log(results_file.summary_line(results) + f"  -> {out / 'results.json'}")
    return results


@contextlib.contextmanager
def _eval_topk(model, k: int):
    """Score with top-`k` softmax (and count the stored adapter at that k); the config is restored after."""
    bank = vblora.get_bank(model)
    config = bank.config
    bank.config = config.replace(eval_topk=k)  # the inference cache is keyed on the config: no reset needed
    try:
        yield
    finally:
        bank.config = config


@contextlib.contextmanager
def _samples_dir(cfg: RunConfig, out: Path, is_main: bool):
    """Where the task's own evaluation writes its samples; None: skip it. Rank 0: the run directory. Under --fsdp
    every process must generate too (each forward gathers the sharded base): the others write to a scratch dir."""
    if is_main or not cfg.fsdp:
        yield out if is_main else None
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="vblora-fsdp-") as scratch:
        yield Path(scratch)


def _device_args(cfg: RunConfig, world: int) -> dict:
    cuda = torch.cuda.is_available()
    if cfg.device == "cuda" and not cuda:
        raise SetupError("--device cuda: no CUDA GPU is visible on this machine (use --device cpu or auto)")
    if cfg.fp16 and not cuda:
        raise SetupError("--fp16 needs a CUDA GPU; this machine has none (drop --fp16, or use --bf16 on CPU)")
    use_cpu = cfg.device == "cpu" or not cuda
    if cfg.fp16 and use_cpu:
        raise SetupError("--fp16 with --device cpu: fp16 training needs CUDA (use --bf16 on CPU)")
    return {"use_cpu": use_cpu, "ddp_backend": "gloo" if (use_cpu and world > 1) else None}


def _check_output(cfg: RunConfig) -> tuple[Path, Path, bool]:
    """(run dir, its checkpoints dir, whether to resume). Nothing is removed here: a run that cannot start changes
    nothing; --overwrite removes the earlier checkpoints once the model is built (adapter/ and results.json stay)."""
    out = Path(cfg.output)
    ckpt = out / "checkpoints"
    has = bool(run_checkpoints.checkpoints(ckpt))
    if has and not cfg.resume and not cfg.overwrite:
        raise SetupError(
            f"{ckpt} holds checkpoints of an earlier run: pass --resume to continue it or --overwrite to start again"
        )
    return out, ckpt, has and cfg.resume


def _compute_metrics(task: str):
    metrics = task_metrics.regression_metrics if task == "regression" else task_metrics.classification_metrics

    def fn(p):
        return metrics(p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions, p.label_ids)

    return fn
