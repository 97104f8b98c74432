"""Training checkpoints: the full trainable state (bank, logits, trained heads, optimizer, scheduler, step), so a run
can resume exactly. Separate from adapter files on purpose: a checkpoint holds the `(N, h)` logits and the optimizer
moments (many times the adapter's size); an adapter holds only the stored triplet.

The file is written with `torch.save` (atomically) and read with `torch.load(weights_only=True)`: plain containers
and tensors only, so loading never runs code. Everything in `extra` must be of those types too.
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path

import torch
from torch import nn

from vblora.errors import AdapterFormatError
from vblora.inject import _unwrap, get_bank, trained_copies
from vblora.safefile import atomic_write
from vblora.snapshot import module_entries

FORMAT, FORMAT_VERSION = "vblora-checkpoint", 1
CHECKPOINT_FILE = "checkpoint.pt"


def _file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.suffix == ".pt" else path / CHECKPOINT_FILE


def _model_state(model: nn.Module) -> dict:
    """The trainable VB-LoRA state of `model`: bank `(h, b)`, logits `(N, h)` (or frozen indices/weights), heads."""
    bank = get_bank(model)
    state = {"bank": bank.bank.detach().cpu()}
    if bank.frozen:
        state.update(indices=bank.indices.detach().cpu(), weights=bank.weights.detach().cpu())
    else:
        state["logits"] = bank.logits.detach().cpu()
    state["modules_to_save"] = {n: {k: v.detach().cpu() for k, v in c.trained.state_dict().items()}
                                for n, c in trained_copies(model).items()}
    return state


def save_checkpoint(model: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, step: int = 0, extra: dict | None = None, rng: bool = True) -> Path:
    """Write a resumable training checkpoint to `path/checkpoint.pt` (or `path` if it ends in .pt)."""
    model = _unwrap(model)
    bank = get_bank(model)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": bank.config.to_dict(),
        "modules": [m.to_row() for m in module_entries(model)],
        "model": _model_state(model),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "extra": extra or {},
        "rng": {"torch": torch.get_rng_state()} if rng else None,
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return atomic_write(_file(path), buffer.getvalue())


def load_checkpoint(model: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
                    scheduler=None, restore_rng: bool = True) -> dict:
    """Restore a checkpoint into `model` (built with the same config on the same base) and, if given, the
    optimizer and scheduler. Returns `{"step": ..., "extra": ...}`. Raises AdapterFormatError on a damaged file
    or a model that does not match."""
    model = _unwrap(model)
    file = _file(path)
    if not file.is_file():
        raise FileNotFoundError(f"no checkpoint at {file}")
    try:
        payload = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError, AttributeError, TypeError,
            KeyError, IndexError) as e:
        raise AdapterFormatError(f"{file}: not a loadable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise AdapterFormatError(f"{file}: not a vblora training checkpoint")
    if payload.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{file}: unknown checkpoint format version {payload.get('format_version')!r}")
    bank = get_bank(model)
    if payload["config"] != bank.config.to_dict():
        diff = {k: (v, bank.config.to_dict().get(k)) for k, v in payload["config"].items()
                if bank.config.to_dict().get(k) != v}
        raise AdapterFormatError(f"{file}: checkpoint config differs from the model's: {diff} (checkpoint, model)")
    if payload["modules"] != [m.to_row() for m in module_entries(model)]:
        raise AdapterFormatError(f"{file}: checkpoint was saved from a model with other adapted modules or shapes")
    state = payload["model"]
    with torch.no_grad():
        _copy(file, "bank", bank.bank, state["bank"])
        if bank.frozen != ("logits" not in state):
            raise AdapterFormatError(f"{file}: checkpoint and model differ in form (logits vs frozen selection)")
        if bank.frozen:
            _copy(file, "indices", bank.indices, state["indices"])
            _copy(file, "weights", bank.weights, state["weights"])
        else:
            _copy(file, "logits", bank.logits, state["logits"])
        for name, copy in trained_copies(model).items():
            copy.trained.load_state_dict(state["modules_to_save"][name])
    bank._eval_cache = None
    if optimizer is not None:
        if payload["optimizer"] is None:
            raise AdapterFormatError(f"{file}: checkpoint holds no optimizer state")
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng and payload.get("rng"):
        torch.set_rng_state(payload["rng"]["torch"])
    return {"step": payload["step"], "extra": payload["extra"]}


def _copy(file: Path, name: str, dst: torch.Tensor, src: torch.Tensor) -> None:
    if not isinstance(src, torch.Tensor) or src.shape != dst.shape:
        raise AdapterFormatError(f"{file}: checkpoint tensor '{name}' has shape "
                                 f"{tuple(getattr(src, 'shape', ()))}, the model needs {tuple(dst.shape)}")
    dst.copy_(src)
