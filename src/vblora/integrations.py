"""`AdapterTrainer`: VB-LoRA inside the transformers `Trainer` (and TRL's trainers), through its public hooks.

Used in place of `transformers.Trainer`, with the Trainer's own arguments (or mixed in ahead of another Trainer
class: `class SFT(vblora.AdapterTrainer, trl.SFTTrainer): pass`). What changes against the plain Trainer:

- checkpoints (`checkpoint-N/`) hold the trainable tensors only: the bank `(h, b)`, the full logits `(N, h)`, the
  trained heads (`model.safetensors`, a subset of the model's state dict, so the Trainer's own resume reads it),
  plus the Trainer's optimizer, scheduler, RNG and trainer state; never the frozen base (14 GB per checkpoint on a 7B
  model with the plain Trainer; megabytes here, docs/training.md);
- `train(resume_from_checkpoint=...)` first checks and restores the trainable tensors itself (one clear error for a
  checkpoint of another model or other settings), and the logged losses continue the interrupted run's bookkeeping:
  the per-step `loss` and the final `train_loss` equal an uninterrupted run's (`LossBook`);
- `save_model(DIR)` writes the native adapter (`vblora.load_adapter` reads it) and the tokenizer;
- a 4-bit / 8-bit base with the adapter on it is accepted (the Trainer otherwise refuses a quantized model that is
  not a PEFT model).

Overrides public methods only (`__init__`, `train`, `training_step`, `log`, `save_model`): none whose name starts
with `_`. transformers is imported here only: `import vblora` stays torch-only.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer_pt_utils import nested_gather
from transformers.trainer_utils import get_last_checkpoint

from vblora.bank import VectorBank
from vblora.inject import BANK_ATTR, unwrap
from vblora.storage.checkpoint import load_trainable, save_trainable
from vblora.storage.native import save_adapter

# the warning the Trainer logs when it loads a weights file that is a subset of the model (ours, by design)
PARTIAL_LOAD_WARNING = "There were missing keys in the checkpoint model loaded"


class LossBook:
    """The training-loss sums the Trainer keeps in private attributes, kept here so that a checkpoint can carry them:
    `window` (a device tensor: the micro-batch losses since the last logged step, no host sync per step), `total`
    (the logged windows' sum, averaged over processes) and `last_logged` (the step of the last log)."""

    def __init__(self, device, saved: dict | None = None):
        saved = saved or {}
        self.window = torch.tensor(float(saved.get("window", 0.0)), device=device)
        self.total, self.last_logged = float(saved.get("total", 0.0)), int(saved.get("last_logged", 0))

    def add(self, loss: torch.Tensor, step: int, nan_filter: bool) -> None:
        """One micro-batch's loss (as `training_step` returns it); a non-finite one replaced as the Trainer does."""
        if nan_filter and not torch.isfinite(loss).all():
            self.window += self.window / (1 + step - self.last_logged)
        else:
            self.window += loss.detach().to(self.window.device)

    def gathered_window(self, parallel_mode) -> float:
        """The window's sum averaged over processes (a collective: every process calls it)."""
        return nested_gather(self.window, parallel_mode).mean().item()

    def drain(self, step: int, parallel_mode) -> float:
        """At a logging step: the mean loss per step since the last log; the window moves into the total."""
        window = self.gathered_window(parallel_mode)
        mean = window / max(step - self.last_logged, 1)
        self.window.zero_()
        self.total += window
        self.last_logged = step
        return mean

    def state(self, parallel_mode) -> dict:
        """What a checkpoint stores (a collective: every process calls it)."""
        return {"window": self.gathered_window(parallel_mode), "total": self.total, "last_logged": self.last_logged}

    def run_loss(self, step: int, parallel_mode) -> float:
        """The whole run's mean loss per step, across any number of resumes."""
        return (self.total + self.gathered_window(parallel_mode)) / max(step, 1)


class AdapterTrainer(Trainer):
    """A `transformers.Trainer` whose checkpoints hold the trainable state only and resume exactly (module docs)."""

    # the Trainer types it `PreTrainedModel | nn.Module | None`, the `model` argument's type; its __init__ sets it from
    # `model` or `model_init` and raises when it has neither, so it is a module from then on
    model: nn.Module

    def __init__(self, *args, **kwargs):
        model = kwargs.get("model", args[0] if args else None)
        self.loss_book: LossBook | None = None
        with accepted_quantized(model):
            super().__init__(*args, **kwargs)

    # ---- saving -------------------------------------------------------------------------------------------------
    def checkpoint_extra(self) -> dict:
        """JSON stored with a checkpoint's trainable tensors; subclasses add their own keys. A collective."""
        return {"losses": self.loss_book.state(self.args.parallel_mode)} if self.loss_book is not None else {}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """A checkpoint's model part (`_internal_call`, from the Trainer): the trainable tensors and
        `checkpoint_extra()`. Called by a user: the native adapter of a VB-LoRA model (else the trainable tensors)
        and the tokenizer. Every process calls it; the main process writes."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if output_dir is None:  # TrainingArguments fills in "trainer_output" when it is not given
            raise ValueError("AdapterTrainer.save_model: no output_dir, and args.output_dir is None")
        extra = self.checkpoint_extra()  # every process: it may gather across processes
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        vblora_model = isinstance(getattr(unwrap(self.model), BANK_ATTR, None), VectorBank)
        if _internal_call or not vblora_model:
            save_trainable(self.model, output_dir, extra)
        else:
            save_adapter(self.model, output_dir)
        if not _internal_call and self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    # ---- training and resuming ----------------------------------------------------------------------------------
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        """`Trainer.train`; a checkpoint to resume from is checked and its trainable tensors and loss sums restored
        first (AdapterFormatError naming what differs), then the Trainer restores the rest."""
        if resume_from_checkpoint is True:
            checkpoint = get_last_checkpoint(self.args.output_dir)
            if checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        else:  # a directory; False, None or "" start afresh, as the Trainer reads them
            checkpoint = None if isinstance(resume_from_checkpoint, bool) else resume_from_checkpoint
        saved = load_trainable(self.model, checkpoint) if checkpoint else {}
        self.loss_book = LossBook(self.args.device, saved.get("losses"))
        with quiet_partial_load():
            return super().train(checkpoint or None, trial, ignore_keys_for_eval, **kwargs)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.loss_book is not None:
            self.loss_book.add(loss, self.state.global_step, self.args.logging_nan_inf_filter)
        return loss

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        """The logged `loss` and `train_loss` from `LossBook`: equal to an uninterrupted run's after a resume (the
        Trainer's own restart from zero at the resumed step)."""
        if self.loss_book is not None and "loss" in logs:
            logs["loss"] = self.loss_book.drain(self.state.global_step, self.args.parallel_mode)
        if self.loss_book is not None and "train_loss" in logs:
            logs["train_loss"] = self.run_loss()
        super().log(logs, *args, **kwargs)

    def run_loss(self) -> float:
        """The whole run's mean training loss per step (also across resumes); a collective. RuntimeError before
        `train()`."""
        if self.loss_book is None:
            raise RuntimeError("AdapterTrainer.run_loss: no training run yet (call train() first)")
        return self.loss_book.run_loss(self.state.global_step, self.args.parallel_mode)

    # ---- a loop of your own: accelerate ---------------------------------------------------------------------------
    @staticmethod
    def register_accelerate_hooks(accelerator) -> tuple:
        """For an accelerate loop: `accelerator.save_state(DIR)` writes each prepared model's trainable tensors only
        (`DIR/model.safetensors`, `DIR/model_1/...` for a second model) beside accelerate's optimizer, scheduler,
        sampler and RNG files, and `load_state(DIR)` restores them (checked: AdapterFormatError on a mismatch).
        Through accelerate's public save / load pre-hooks, which take a model's weights out of accelerate's own
        saving and loading. Returns the two hook handles (`.remove()` undoes)."""

        def where(output_dir, i: int) -> str:
            return output_dir if i == 0 else os.path.join(output_dir, f"model_{i}")

        def save(models, weights, output_dir):
            for i in reversed(range(len(models))):
                if accelerator.is_main_process:
                    os.makedirs(where(output_dir, i), exist_ok=True)
                    save_trainable(models[i], where(output_dir, i))
                weights.pop(i)

        def load(models, input_dir):
            for i in reversed(range(len(models))):
                load_trainable(models[i], where(input_dir, i))
                models.pop(i)

        return accelerator.register_save_state_pre_hook(save), accelerator.register_load_state_pre_hook(load)


@contextlib.contextmanager
def accepted_quantized(model):
    """transformers refuses to train a quantized model unless it is a PEFT model ("purely quantized"); a model that
    carries trainable adapter tensors is not purely quantized: for the length of that check only, it is not reported
    as quantized (the public `is_quantized` flag transformers sets on the model when loading it)."""
    adapter = getattr(model, "is_quantized", False) is True and any(p.requires_grad for p in model.parameters())
    if adapter:
        model.is_quantized = False
    try:
        yield
    finally:
        if adapter:
            model.is_quantized = True


class _DropPartialLoadWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(PARTIAL_LOAD_WARNING)


@contextlib.contextmanager
def quiet_partial_load():
    """Without the Trainer's warning that the checkpoint lacks the base's keys: it holds the trainable ones only, by
    design, and `load_trainable` checked those before."""
    log = logging.getLogger("transformers.trainer")
    drop = _DropPartialLoadWarning()
    log.addFilter(drop)
    try:
        yield
    finally:
        log.removeFilter(drop)
