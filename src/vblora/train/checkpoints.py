"""`vblora train`'s checkpoints: complete or absent, and resumed only when they continue this very run.

The Trainer (`vblora.AdapterTrainer`) writes `checkpoint-N` (the trainable tensors in `model.safetensors`, optimizer,
scheduler, RNG and trainer state) into its output directory, `checkpoints/.saving`; once every process has written
its part, rank 0 renames it to `checkpoints/checkpoint-N` (`Publisher`, on the Trainer's public `on_save` event). A
kill or a full disk mid-save leaves the earlier checkpoints and a stale `.saving`, which the next start removes.
`find_resume` takes the newest checkpoint that is complete and readable (damaged ones found on the way are removed,
with a note) and refuses, in one line, one saved with other settings or lacking optimizer / scheduler / RNG state:
resuming from it would not continue the run exactly (`--resume-partial` continues anyway, with a warning), and one
whose training data file changed since (its sha256 is part of the run's identity). Every checkpoint records the
settings that decide the training trajectory and the loss bookkeeping (`vblora.integrations.LossBook`), so a resumed
run logs the losses of an uninterrupted one. `check_loadable` reads the optimizer, scheduler and RNG files before the
Trainer does, so a damaged or crafted one is one ResumeError instead of a traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from transformers import TrainerCallback
from transformers.trainer_pt_utils import safe_globals

from vblora.errors import VBLoRAError
from vblora.storage.checkpoint import TRAINABLE_FILE, read_trainable
from vblora.train.errors import ResumeError

STAGING, KEEP = ".saving", 2
# settings that may change between a checkpoint and its resume: they do not touch the training trajectory
FREE_ON_RESUME = {
    "recipe",
    "output",
    "resume",
    "resume_partial",
    "overwrite",
    "device",
    "logging_steps",
    "save_steps",
    "eval_batch_size",
    "extra_eval_topk",
    "num_samples",
    "max_new_tokens",
    "generate_eval",
    "record_selection_every",
    "test_file",
    "max_test_samples",
}


def first_line(e: BaseException) -> str:
    """The gist of an exception in one short line (torch's messages run to paragraphs, with terminal colours)."""
    text = re.sub(r"\x1b\[[0-9;]*m|^\[enforce fail at [^]]*\][ .]*", "", str(e).strip())
    text = text.split("\n")[0].split(". ")[0][:200]
    text += ")" * (text.count("(") - text.count(")"))  # a nested message cut short
    return text if isinstance(e, VBLoRAError) else f"{type(e).__name__}: {text}"


def rng_file(rank: int, world: int) -> str:
    """The Trainer's RNG-state file of process `rank` in a checkpoint."""
    return "rng_state.pth" if world == 1 else f"rng_state_{rank}.pth"


def run_identity(cfg, train_examples: int, processes: int) -> dict:
    """What a checkpoint must share with the run resuming it (plain JSON types: it is stored with the checkpoint),
    including the content of the training data file (`train_sha256`): the same path and row count with edited rows
    is another run."""
    settings = {k: v for k, v in cfg.to_dict().items() if k not in FREE_ON_RESUME}
    data = {"train_sha256": file_sha256(cfg.train_file)} if getattr(cfg, "train_file", None) else {}
    return json.loads(
        json.dumps({**settings, **data, "train_examples": train_examples, "processes": processes}, default=str)
    )


def file_sha256(path) -> str | None:
    """sha256 of a file's bytes, read in 1 MiB blocks (None if it is not a readable file)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError:
        return None
    return h.hexdigest()


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
    """(why `d` cannot be resumed from, or None; the extras its trainable state recorded)."""
    for name in ("trainer_state.json", TRAINABLE_FILE):  # the last and the first file the Trainer writes
        if not (d / name).is_file():
            return f"incomplete: no {name}", {}
    try:
        state = json.loads((d / "trainer_state.json").read_text())
        if (
            not isinstance(state, dict)
            or not isinstance(state.get("global_step"), int)
            or not isinstance(state.get("log_history"), list)
        ):
            return "unreadable: trainer_state.json is not a Trainer state (no global_step / log_history)", {}
        extra = read_trainable(d)[2].get("extra")
    except (OSError, ValueError, RecursionError) as e:  # AdapterFormatError and JSONDecodeError are ValueErrors
        return f"unreadable: {first_line(e)}", {}
    return None, extra if isinstance(extra, dict) else {}


def find_resume(ckpt: Path, identity: dict, partial: bool, rank: int, world: int, log) -> tuple[Path, dict] | None:
    """The newest complete checkpoint under `ckpt` and its extras; None if there is none at all."""
    skipped = []
    for d in checkpoints(ckpt):
        if (d / "checkpoint.pt").is_file() and not (d / TRAINABLE_FILE).is_file():
            raise ResumeError(
                f"--resume: {d} was written by an older vblora (checkpoint.pt, before checkpoints held "
                f"{TRAINABLE_FILE}); finish the run with that version, or pass --overwrite to start "
                f"again"
            )
        problem, extra = _damage(d)
        if problem:
            skipped.append(f"{d.name} ({problem})")
            if rank == 0:
                shutil.rmtree(d, ignore_errors=True)
            continue
        theirs = extra["run"] if isinstance(extra.get("run"), dict) else identity
        diff = [
            f"{k} {theirs.get(k)!r} -> {identity.get(k)!r}"
            for k in sorted(set(theirs) | set(identity))
            if theirs.get(k) != identity.get(k)
        ]
        if theirs.get("train_sha256") != identity.get("train_sha256") and not partial:
            raise ResumeError(
                f"--resume: the training file {identity.get('train_file')} changed since {d} was saved "
                f"(sha256 {str(theirs.get('train_sha256'))[:12]}... then, "
                f"{str(identity.get('train_sha256'))[:12]}... now), so resuming would not continue that "
                f"run; restore the file, or pass --overwrite to start again on the new one"
            )
        rng = rng_file(rank, world)
        missing = [f for f in ("optimizer.pt", "scheduler.pt", rng) if not (d / f).is_file()]
        problems = " and ".join(
            ([f"was saved with other settings: {', '.join(diff)} (checkpoint -> now)"] if diff else [])
            + ([f"lacks {', '.join(missing)}"] if missing else [])
        )
        if problems and not partial:
            raise ResumeError(
                f"--resume: {d} {problems}, so resuming would not continue that run exactly; rerun with "
                f"its settings, pass --resume-partial to continue anyway, or --overwrite to start again"
            )
        if problems:
            log(
                f"vblora train: warning: {d} {problems}; continuing anyway (--resume-partial): the run will not "
                f"match an uninterrupted one"
            )
        note = f"; removed damaged {', '.join(skipped)}" if skipped else ""
        log(f"vblora train: resuming from {d} (step {d.name[11:]}){note}")
        return d, extra
    if skipped:
        raise ResumeError(
            f"--resume: no complete checkpoint in {ckpt} (removed damaged {', '.join(skipped)}); "
            f"--overwrite starts the run again"
        )
    return None


@contextlib.contextmanager
def restoring(checkpoint, what: str):
    """Turn any failure to read a part of `checkpoint` (damaged, crafted, other settings) into one ResumeError."""
    try:
        yield
    except (VBLoRAError, pickle.UnpicklingError, RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        raise ResumeError(
            f"--resume: cannot restore the {what} from {checkpoint} ({first_line(e)}); --overwrite starts the run again"
        ) from None


def check_loadable(d: Path, rank: int, world: int) -> None:
    """Read the optimizer, scheduler and RNG files of `d` as the Trainer will (tensors and plain containers only),
    before it does: a damaged or crafted file is one ResumeError naming the part, never a traceback or code run."""
    rng = rng_file(rank, world)
    for what, names in (("optimizer and scheduler state", ("optimizer.pt", "scheduler.pt")), ("RNG state", (rng,))):
        with restoring(d, what), safe_globals():  # the numpy types the Trainer's RNG state holds, as it allows
            for name in names:
                if (d / name).is_file():
                    torch.load(d / name, map_location="cpu", weights_only=True)


class Publisher(TrainerCallback):
    """After each save (every process has returned from it): rank 0 renames `.saving/checkpoint-N` into place."""

    def __init__(self, ckpt: Path, accelerator, is_main: bool):
        self.ckpt, self.accelerator, self.is_main = ckpt, accelerator, is_main

    def on_save(self, args, state, control, **kw):
        self.accelerator.wait_for_everyone()  # every process has written its RNG state
        if self.is_main:
            name = f"checkpoint-{state.global_step}"
            publish(self.ckpt / STAGING / name, self.ckpt / name)

    def staged(self, step: int) -> Path:
        """Where checkpoint-`step` is written before it is published."""
        return self.ckpt / STAGING / f"checkpoint-{step}"
