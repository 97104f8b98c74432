"""`vblora train`'s checkpoints: complete or absent, and resumed only when they continue this very run.

The Trainer writes `checkpoint-N` (the trainable tensors through `vblora.storage.save_checkpoint`, optimizer,
scheduler, RNG and trainer state) into `checkpoints/.saving/checkpoint-N`; once every process has written its part,
rank 0 renames it to `checkpoints/checkpoint-N` (`publish`). A kill or a full disk mid-save leaves the earlier
checkpoints and a stale `.saving`, which the next start removes. `find_resume` takes the newest checkpoint that is
complete and readable (damaged ones found on the way are removed, with a note) and refuses, in one line, one
saved with other settings or lacking optimizer / scheduler / RNG state: resuming from it would not continue the run
exactly (`--resume-partial` continues anyway, with a warning). Every checkpoint records the settings that decide the
training trajectory and the Trainer's loss bookkeeping, so a resumed run logs the losses of an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import re
import shutil
from pathlib import Path

from transformers.trainer_pt_utils import nested_gather

from vblora.errors import VBLoRAError
from vblora.storage import load_checkpoint, save_checkpoint
from vblora.storage.checkpoint import read_checkpoint
from vblora.train.errors import ResumeError, SaveError

STAGING, KEEP = ".saving", 2
# settings that may change between a checkpoint and its resume: they do not touch the training trajectory
FREE_ON_RESUME = {"recipe", "output", "resume", "resume_partial", "overwrite", "device", "logging_steps", "save_steps",
                  "eval_batch_size", "extra_eval_topk", "num_samples", "max_new_tokens", "generate_eval",
                  "record_selection_every", "test_file", "max_test_samples"}
def first_line(e: BaseException) -> str:
    """The gist of an exception in one short line (torch's messages run to paragraphs, with terminal colours)."""
    text = re.sub(r"\x1b\[[0-9;]*m|^\[enforce fail at [^]]*\][ .]*", "", str(e).strip())
    text = text.split("\n")[0].split(". ")[0][:200]
    text += ")" * (text.count("(") - text.count(")"))  # a nested message cut short
    return text if isinstance(e, VBLoRAError) else f"{type(e).__name__}: {text}"


def run_identity(cfg, train_examples: int, processes: int) -> dict:
    """What a checkpoint must share with the run resuming it (plain JSON types: it is stored in checkpoint.pt)."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in FREE_ON_RESUME}
    return json.loads(json.dumps({**settings, "train_examples": train_examples, "processes": processes}, default=str))


def checkpoints(ckpt: Path) -> list[Path]:
    """`checkpoint-N` directories, newest first."""
    found = [p for p in ckpt.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()] if ckpt.is_dir() else []
    return sorted(found, key=lambda p: int(p.name[11:]), reverse=True)


def publish(staged: Path, final: Path) -> None:
    """Make a completely written checkpoint visible under its name (one rename); keep the newest KEEP."""
    shutil.rmtree(final, ignore_errors=True)
    staged.rename(final)
    with contextlib.suppress(OSError):
        staged.parent.rmdir()  # .saving, now empty
    for old in checkpoints(final.parent)[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)


def _damage(d: Path) -> tuple[str | None, dict]:
    """(why `d` cannot be resumed from, or None; the extras its checkpoint.pt recorded)."""
    for name in ("trainer_state.json", "checkpoint.pt"):  # the last and the first file the Trainer writes
        if not (d / name).is_file():
            return f"incomplete: no {name}", {}
    try:
        json.loads((d / "trainer_state.json").read_text())
        extra = read_checkpoint(d)[1].get("extra")
    except (OSError, ValueError) as e:  # AdapterFormatError and JSONDecodeError are ValueErrors
        return f"unreadable: {first_line(e)}", {}
    return None, extra if isinstance(extra, dict) else {}


def find_resume(ckpt: Path, identity: dict, partial: bool, rank: int, world: int, log) -> tuple[Path, dict] | None:
    """The newest complete checkpoint under `ckpt` and its extras; None if there is none at all."""
    skipped = []
    for d in checkpoints(ckpt):
        problem, extra = _damage(d)
        if problem:
            skipped.append(f"{d.name} ({problem})")
            if rank == 0:
                shutil.rmtree(d, ignore_errors=True)
            continue
        theirs = extra["run"] if isinstance(extra.get("run"), dict) else identity
        diff = [f"{k} {theirs.get(k)!r} -> {identity.get(k)!r}" for k in sorted(set(theirs) | set(identity))
                if theirs.get(k) != identity.get(k)]
        rng = "rng_state.pth" if world == 1 else f"rng_state_{rank}.pth"
        missing = [f for f in ("optimizer.pt", "scheduler.pt", rng) if not (d / f).is_file()]
        problems = " and ".join(([f"was saved with other settings: {', '.join(diff)} (checkpoint -> now)"] if diff
                                 else []) + ([f"lacks {', '.join(missing)}"] if missing else []))
        if problems and not partial:
            raise ResumeError(f"--resume: {d} {problems}, so resuming would not continue that run exactly; rerun with "
                              f"its settings, pass --resume-partial to continue anyway, or --overwrite to start again")
        if problems:
            log(f"vblora train: warning: {d} {problems}; continuing anyway (--resume-partial): the run will not "
                f"match an uninterrupted one")
        note = f"; removed damaged {', '.join(skipped)}" if skipped else ""
        log(f"vblora train: resuming from {d} (step {d.name[11:]}){note}")
        return d, extra
    if skipped:
        raise ResumeError(f"--resume: no complete checkpoint in {ckpt} (removed damaged {', '.join(skipped)}); "
                          f"--overwrite starts the run again")
    return None


@contextlib.contextmanager
def restoring(checkpoint, what: str):
    """Turn any failure to read a part of `checkpoint` (damaged, crafted, other settings) into one ResumeError."""
    try:
        yield
    except (VBLoRAError, pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        raise ResumeError(f"--resume: cannot restore the {what} from {checkpoint} ({first_line(e)}); --overwrite "
                          f"starts the run again") from None


class CheckpointHooks:
    """Mixed into the pipeline's Trainer: `checkpoint-N` written under `.saving` and renamed into place once every
    process has written its part; the trainable tensors only (a frozen base is never re-saved), with the run's
    identity (`_run`) and the loss bookkeeping (`_losses`, restored by `restore_losses` when resuming); every part read
    back on resume turns any failure into one ResumeError."""

    _run: dict | None = None
    _losses: dict | None = None  # on resume: the checkpoint's; then the one being saved
    _staging: Path | None = None

    def _save(self, output_dir=None, state_dict=None):
        save_checkpoint(self.model, output_dir or self.args.output_dir, rng=False,
                        extra={"run": self._run, "losses": self._losses})

    def _save_checkpoint(self, model, trial):
        pending = nested_gather(self._tr_loss.detach(), self.args.parallel_mode).mean().item()  # every process
        self._losses = {"total": self._total_loss_scalar, "pending": pending, "logged": self._globalstep_last_logged}
        self._staging = Path(self.args.output_dir) / STAGING
        try:
            super()._save_checkpoint(model, trial)  # into _get_output_dir(), i.e. .saving/checkpoint-N
        except (OSError, RuntimeError) as e:  # torch.save reports a full disk as a RuntimeError of its zip writer
            raise SaveError(f"could not write checkpoint-{self.state.global_step} ({first_line(e)}; is the disk "
                            f"full?); the checkpoints before it are intact and --resume continues from them") from e
        finally:
            self._staging = None
        self.accelerator.wait_for_everyone()  # every process has written its RNG state
        if self.args.should_save:
            name = f"checkpoint-{self.state.global_step}"
            publish(Path(self.args.output_dir) / STAGING / name, Path(self.args.output_dir) / name)

    def _get_output_dir(self, trial):
        return str(self._staging) if self._staging is not None else super()._get_output_dir(trial)

    def restore_losses(self) -> None:
        """At the start of training: the loss sums and the last logged step of the checkpoint resumed from."""
        if self._losses:
            self._tr_loss += self._losses["pending"]
            self._total_loss_scalar, self._globalstep_last_logged = self._losses["total"], self._losses["logged"]
            self._initial_global_step = 0  # train_loss = the whole run's loss sum / its steps

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with restoring(resume_from_checkpoint, "trainable tensors"):
            load_checkpoint(model or self.model, resume_from_checkpoint, restore_rng=False)

    def _load_optimizer_and_scheduler(self, checkpoint):
        with restoring(checkpoint, "optimizer and scheduler state"):
            super()._load_optimizer_and_scheduler(checkpoint)

    def _load_rng_state(self, checkpoint):
        with restoring(checkpoint, "RNG state"):
            super()._load_rng_state(checkpoint)
