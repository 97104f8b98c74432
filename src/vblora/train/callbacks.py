"""The pipeline's Trainer callbacks: the best validation epoch (`BestTracker`, kept across a kill / resume), the
evaluation of an epoch whose checkpoint was written just before it (`CatchUpEvaluation`), and the divergence guard
(`DivergenceGuard`). Public `TrainerCallback` events only."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from transformers import TrainerCallback

from vblora.storage import load_checkpoint, save_checkpoint
from vblora.storage.checkpoint import trainable_state
from vblora.train import checkpoints as run_checkpoints
from vblora.train import metrics as task_metrics
from vblora.train.config import RunConfig
from vblora.train.errors import DivergedError


class BestTracker(TrainerCallback):
    """The trainable state of the best validation epoch: in memory (every process) and in DIR/best (rank 0, for
    resume; its value, epoch and metrics inside the one checkpoint file). On resume from step `resume_step`, a best
    state saved at or before it is read through the model before the Trainer restores that checkpoint over it."""

    def __init__(self, model, metric: str, ckpt_dir: Path, is_main: bool, resume_step: int | None):
        self.model, self.key, self.dir, self.is_main = model, f"eval_{metric}", ckpt_dir / "best", is_main
        self.sign = 1.0 if task_metrics.greater_is_better(metric) else -1.0
        self.best = self.best_epoch = self.state = self.metrics = None  # metrics: validation, best epoch
        self.active = True
        if resume_step is not None and (self.dir / "checkpoint.pt").exists():
            with run_checkpoints.restoring(self.dir, "best epoch's state"):
                info = load_checkpoint(model, self.dir, restore_rng=False)["extra"]
                if info["step"] <= resume_step:  # a later one is recomputed when the run gets there again
                    self.best, self.best_epoch, self.metrics = info["value"], info["epoch"], info["metrics"]
                    self.state = trainable_state(model)

    def on_evaluate(self, args, state, control, metrics=None, **kw):
        if not self.active or not metrics or self.key not in metrics:
            return
        value = float(metrics[self.key])
        if self.best is None or self.sign * value > self.sign * self.best:
            self.best, self.best_epoch = value, round(float(state.epoch or 0), 4)
            self.metrics = {k: float(v) for k, v in metrics.items()}
            self.state = trainable_state(self.model)
            if self.is_main:
                save_checkpoint(
                    self.model,
                    self.dir,
                    rng=False,
                    extra={
                        "value": self.best,
                        "epoch": self.best_epoch,
                        "metrics": self.metrics,
                        "step": state.global_step,
                    },
                )


class CatchUpEvaluation(TrainerCallback):
    """A run resumed from a checkpoint written at the end of an epoch before that epoch's evaluation (a save step
    that is the epoch's last: the Trainer saves at the step's end and evaluates at the epoch's end) evaluates that
    epoch first, as the uninterrupted run did; without it the epoch would never be scored (its row missing, maybe
    another best epoch)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kw):
        epoch, step = state.epoch or 0.0, state.global_step
        if args.eval_strategy != "epoch" or self.trainer.eval_dataset is None or step == 0 or epoch != round(epoch):
            return
        if not any(any(k.startswith("eval_") for k in h) and h.get("step") == step for h in state.log_history):
            self.trainer.evaluate()


class DivergenceGuard(TrainerCallback):
    """Stops the run when the gradient norm of the trained tensors (checked before every optimizer step: one host
    sync) or a logged loss stops being finite. Under fp16 the loss scaler skips overflowing steps itself: stop after
    16 in a row."""

    def __init__(self, cfg: RunConfig, model):
        self.cfg, self.nonfinite = cfg, 0
        self.params = [p for p in model.parameters() if p.requires_grad]

    def on_pre_optimizer_step(self, args, state, control, **kw):
        norms = [p.grad.detach().float().norm() for p in self.params if p.grad is not None]
        norm = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        if math.isfinite(norm):
            self.nonfinite = 0
            return
        self.nonfinite += 1
        if not args.fp16 or self.nonfinite >= 16:
            raise DivergedError(
                divergence_message(self.cfg, state.global_step + 1, state.max_steps, f"the gradient norm is {norm}")
            )

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs and not math.isfinite(logs["loss"]):
            raise DivergedError(
                divergence_message(self.cfg, state.global_step, state.max_steps, f"the loss is {logs['loss']}")
            )


def divergence_message(cfg: RunConfig, step: int, steps: int, what: str) -> str:
    rates = (("lr_bank", "lr_logits") if cfg.method == "vblora" else ("lr",)) + ("lr_head",)
    now = ", ".join(f"--{k.replace('_', '-')} {cfg.method_lr() if k == 'lr' else getattr(cfg, k):g}" for k in rates)
    fixes = [f"Lower the learning rates (now {now})", f"raise --warmup-ratio (now {cfg.warmup_ratio:g})"]
    fixes += ["clip the gradients (--max-grad-norm 1)"] if cfg.max_grad_norm <= 0 else []
    fixes += ["use --bf16 or full precision instead of --fp16 (float16 overflows)"] if cfg.fp16 else []
    return (
        f"training diverged at step {step} of {steps}: {what}. {'; '.join(fixes)}; then rerun with "
        f"--overwrite (an earlier run's adapter/ and results.json in {cfg.output} are left as they were)"
    )
