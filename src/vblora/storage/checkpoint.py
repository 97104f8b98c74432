"""Training checkpoints: the whole trainable state of ANY model (VB-LoRA's bank and `(N, h)` logits, trained heads,
or a baseline's LoRA / VeRA / full weights), optionally with optimizer, scheduler, step and RNG state, so a run can
resume exactly. Separate from adapter files on purpose: a checkpoint holds the logits and the optimizer moments
(many times the adapter's size); an adapter holds only the stored triplet. `vblora train` checkpoints through here.

The file is written with `torch.save` (atomically) and read with `torch.load(weights_only=True)`: plain containers
and tensors only, so loading never runs code. Everything in `extra` must be of those types too.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from vblora.errors import AdapterFormatError
from vblora.inject import BANK_ATTR, unwrap
from vblora.storage.files import (
    atomic_write,
    parse_json_metadata,
    read_safetensors,
    write_safetensors,
)

FORMAT, FORMAT_VERSION = "vblora-checkpoint", 2
CHECKPOINT_FILE = "checkpoint.pt"
# The trainable tensors of a transformers-Trainer checkpoint directory: the Trainer's own weights file name, so its
# resume reads them itself (a subset of the model's state dict: the frozen base is never written)
TRAINABLE_FILE, TRAINABLE_FORMAT = "model.safetensors", "vblora-trainable"


def checkpoint_file(path: str | os.PathLike) -> Path:
    """`path` itself if it names a .pt file, else `path/checkpoint.pt`."""
    path = Path(path)
    return path if path.suffix == ".pt" else path / CHECKPOINT_FILE


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter that trains, by qualified name (CPU copies), plus a frozen VB-LoRA selection's buffers."""
    model = unwrap(model)
    state = {n: p.detach().cpu().clone() for n, p in model.named_parameters() if p.requires_grad}
    bank = getattr(model, BANK_ATTR, None)
    if bank is not None and bank.frozen:
        state.update(
            {
                f"{BANK_ATTR}.indices": bank.indices.cpu().clone(),
                f"{BANK_ATTR}.weights": bank.weights.detach().cpu().clone(),
            }
        )
    return state


def adapter_identity(model: nn.Module) -> dict | None:
    """The VB-LoRA config and module table of `model` (None for a model without a bank)."""
    bank = getattr(unwrap(model), BANK_ATTR, None)
    if bank is None:
        return None
    return {"config": bank.config.to_dict(), "modules": [m.to_row() for m in bank.layout.entries]}


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    step: int = 0,
    extra: dict | None = None,
    rng: bool = True,
) -> Path:
    """Write a resumable training checkpoint atomically: the trainable tensors (never the frozen base), the adapter's
    settings and module table, and, if given, the optimizer's and scheduler's state.

    Args:
        model: the model being trained (VB-LoRA or any other method; its trainable parameters are saved).
        path: a directory (the file is `checkpoint.pt` inside it) or a path ending in `.pt`.
        optimizer: its state is saved too when given.
        scheduler (torch.optim.lr_scheduler.LRScheduler | None): its state is saved too when given.
        step: the training step, returned by `load_checkpoint`.
        extra: any picklable values to keep with the checkpoint, returned by `load_checkpoint`.
        rng: also save torch's CPU random state (restored by `load_checkpoint`).

    Returns:
        The path of the written file.

    Raises:
        OSError: the file cannot be written (an earlier checkpoint at `path` is left intact).
    """
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "adapter": adapter_identity(model),
        "trainable": trainable_state(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "extra": extra or {},
        "rng": {"torch": torch.get_rng_state()} if rng else None,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(checkpoint_file(path), buffer.getvalue())


def save_trainable(model: nn.Module, directory: str | os.PathLike, extra: dict | None = None) -> Path:
    """Write `directory/model.safetensors`: the trainable tensors (`trainable_state`) by their state-dict names, and
    in its metadata the adapter identity and `extra` (JSON types). Atomic: a kill leaves the previous file or none."""
    info = {"format": TRAINABLE_FORMAT, "adapter": adapter_identity(model), "extra": extra or {}}
    return write_safetensors(
        Path(directory) / TRAINABLE_FILE, trainable_state(model), {"format": "pt", TRAINABLE_FORMAT: json.dumps(info)}
    )


def read_trainable(directory: str | os.PathLike) -> tuple[Path, dict[str, torch.Tensor], dict]:
    """`(file, tensors, info)` of what `save_trainable` wrote; AdapterFormatError for anything else (a full model's
    weights included) or a damaged file. Never unpickles."""
    file = Path(directory) / TRAINABLE_FILE
    if not file.is_file():
        raise FileNotFoundError(f"no {TRAINABLE_FILE} in {directory}")
    tensors, metadata, _ = read_safetensors(file)
    if TRAINABLE_FORMAT not in metadata:
        raise AdapterFormatError(
            f"{file}: not the trainable state of a vblora checkpoint (no '{TRAINABLE_FORMAT}' metadata)"
        )
    return file, tensors, parse_json_metadata(file, metadata, TRAINABLE_FORMAT)


def load_trainable(model: nn.Module, directory: str | os.PathLike) -> dict:
    """Restore what `save_trainable` wrote into `model` (checked first: nothing changes on a mismatch); -> its extra."""
    file, tensors, info = read_trainable(directory)
    restore_trainable(model, file, info.get("adapter"), tensors)
    return info.get("extra") or {}


def read_checkpoint(path: str | os.PathLike) -> tuple[Path, dict]:
    """`(file, payload)` of a checkpoint; AdapterFormatError for anything that is not one (never runs code)."""
    file = checkpoint_file(path)
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except (
        pickle.UnpicklingError,
        RuntimeError,
        EOFError,
        ValueError,
        OSError,
        AttributeError,
        TypeError,
        KeyError,
        IndexError,
    ) as e:
        raise AdapterFormatError(f"{file}: not a loadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AdapterFormatError(f"{file}: not a vblora training checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(
            f"{file}: unknown checkpoint format version {payload.get('format_version')!r} "
            f"(this vblora reads version {FORMAT_VERSION})"
        )
    return file, payload


def load_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    restore_rng: bool = True,
) -> dict:
    """Restore a checkpoint into `model` (built the same way on the same base) and, if given, the optimizer and
    scheduler.

    Args:
        model: the model to restore, adapted with the same settings on the same base as the saved one.
        path: the checkpoint directory or `.pt` file (`save_checkpoint`'s output).
        optimizer: restored from the checkpoint when given (it must hold an optimizer state).
        scheduler (torch.optim.lr_scheduler.LRScheduler | None): restored from the checkpoint when given.
        restore_rng: also restore torch's CPU random state, if the checkpoint holds it.

    Returns:
        `{"step": ..., "extra": ...}` as saved.

    Raises:
        FileNotFoundError: no checkpoint at `path`.
        AdapterFormatError: a damaged file, one without the optimizer state asked for, or a model that does not
            match (method, settings, modules or shapes), saying what differs; nothing is modified then.
    """
    file, payload = read_checkpoint(path)
    if optimizer is not None and payload["optimizer"] is None:
        raise AdapterFormatError(f"{file}: checkpoint holds no optimizer state")
    restore_trainable(model, file, payload.get("adapter"), payload["trainable"])
    if optimizer is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng and payload.get("rng"):
        torch.set_rng_state(payload["rng"]["torch"])
    return {"step": payload["step"], "extra": payload["extra"]}


def restore_trainable(model: nn.Module, file: Path, theirs: dict | None, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (what `trainable_state` took, saved with adapter identity `theirs`) into `model`, after checking
    that it fits: AdapterFormatError naming `file` and what differs otherwise, and nothing is modified then."""
    mine = adapter_identity(model)
    if (mine is None) != (theirs is None):
        raise AdapterFormatError(
            f"{file}: checkpoint and model differ in method (one has a VB-LoRA bank, the other not)"
        )
    if mine is not None and theirs is not None:  # both or neither (checked above)
        if theirs["config"] != mine["config"]:
            diff = {k: (v, mine["config"].get(k)) for k, v in theirs["config"].items() if mine["config"].get(k) != v}
            raise AdapterFormatError(
                f"{file}: checkpoint was saved with other VB-LoRA settings: {diff} (checkpoint, model)"
            )
        if theirs["modules"] != mine["modules"]:
            raise AdapterFormatError(f"{file}: checkpoint was saved from a model with other adapted modules or shapes")
    target = trainable_state(model)
    missing, unexpected = sorted(set(target) - set(state)), sorted(set(state) - set(target))
    if missing or unexpected:
        raise AdapterFormatError(
            f"{file}: checkpoint does not fit this model: missing {missing[:3]}, unexpected "
            f"{unexpected[:3]} (was it made by another method or other settings?)"
        )
    for name, t in state.items():
        if not isinstance(t, torch.Tensor) or t.shape != target[name].shape:
            raise AdapterFormatError(
                f"{file}: checkpoint tensor '{name}' has shape "
                f"{tuple(getattr(t, 'shape', ()))}, the model needs {tuple(target[name].shape)}"
            )
    copy_trainable(model, state)


def copy_trainable(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy `state` (what `trainable_state` took: trained parameters and a frozen selection's buffers) into the
    model's tensors, unchecked: the caller's state came from this model."""
    live = dict(unwrap(model).named_parameters()) | dict(unwrap(model).named_buffers())
    with torch.no_grad():
        for name, t in state.items():
            live[name].copy_(t.to(live[name].device, live[name].dtype))
