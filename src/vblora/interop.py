"""HF PEFT's VB-LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`), both directions.

PEFT keeps per-module logits `vblora_logits_A (r, in/b, h)` and `vblora_logits_B (out/b, r, h)` (our bank rows
`slot.a_start...` viewed in those shapes) and the bank under `base_model.vblora_vector_bank`. With
`save_only_topk_weights` it writes `<...>.vblora_logits_A_topk_indices (r, in/b, k)` (uint8 for h < 256, int16 below
2**15, else int32) and `<...>_topk_weights (r, in/b, k-1)` float32 instead, and re-inflates dense -inf logits on
load; `import_peft` builds our inference form straight from them instead. Plain-LoRA export and merging are in
`vblora.lora_export`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from vblora.config import VBLoRAConfig
from vblora.errors import AdapterFormatError, VBLoRAError
from vblora.inject import _unwrap, add_vblora, get_bank, trained_copies
from vblora.layers import base_dims, layer_class
from vblora.packing import complete_weights
from vblora.safefile import atomic_write, read_safetensors, write_safetensors
from vblora.snapshot import AdapterSnapshot, refuse_adapted, take_snapshot

PREFIX = "base_model.model."
BANK_KEY = "base_model.vblora_vector_bank"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_A, _B = ".vblora_logits_A", ".vblora_logits_B"
_IDX, _W = "_topk_indices", "_topk_weights"


def snapshot_of(model_or_path) -> tuple[AdapterSnapshot, nn.Module | None]:
    """A snapshot from an adapted model, an AdapterSnapshot, or an adapter file (then no model)."""
    if isinstance(model_or_path, AdapterSnapshot):
        return model_or_path, None
    if isinstance(model_or_path, nn.Module):
        return take_snapshot(model_or_path), _unwrap(model_or_path)
    from vblora.storage import read_adapter

    return read_adapter(model_or_path)[0], None


def write_peft_dir(out_dir: str | os.PathLike, config: dict, tensors: dict[str, torch.Tensor]) -> Path:
    """Write a PEFT adapter directory; each file atomically, weights first (config last marks completion)."""
    out = Path(out_dir)
    write_safetensors(out / WEIGHTS_FILE, tensors, {"format": "pt"})
    atomic_write(out / CONFIG_FILE, (json.dumps(config, indent=2, sort_keys=True) + "\n").encode())
    return out


def peft_index_dtype(num_vectors: int) -> torch.dtype:
    """PEFT's choice of index dtype (model.py `_get_adapter_state_dict`), so its loader sees what it writes."""
    return torch.uint8 if num_vectors < 2**8 else torch.int16 if num_vectors < 2**15 else torch.int32


# -- export ---------------------------------------------------------------------------------------------------------

def export_peft(model_or_path, out_dir: str | os.PathLike, *, save_only_topk_weights: bool = False) -> Path:
    """Write an adapted model (or an adapter file) as an HF PEFT VB-LoRA adapter directory.

    Full-logits variant: a model still in training form exports its real logits (PEFT can resume training);
    otherwise logits are rebuilt from the selection (log-weights at the chosen indices, a finite floor elsewhere),
    which PEFT's top-k turns back into the same sub-vectors. PEFT's `topk` is our `stored_topk`. An int8 adapter is
    dequantised. Raises AdapterFormatError naming the module PEFT cannot represent (Embedding targets, or a
    vector_length that does not divide a dimension).
    """
    snap, model = snapshot_of(model_or_path)
    cfg = snap.config
    h, b = snap.bank.shape
    k, r = cfg.stored_topk, cfg.rank
    for m in snap.modules:
        if m.kind == "embedding":
            raise AdapterFormatError(f"PEFT's VB-LoRA cannot represent module {m.name}: Embedding targets are not "
                                     f"supported there; use vblora.export_lora for a plain LoRA adapter")
        if m.in_features % b or m.out_features % b:
            raise AdapterFormatError(f"PEFT's VB-LoRA cannot represent module {m.name}: vector_length {b} does not "
                                     f"divide its dimensions in={m.in_features}, out={m.out_features}")
    logits = None
    if not save_only_topk_weights:
        bank = get_bank(model) if model is not None else None
        if bank is not None and not bank.frozen:
            logits = bank.logits.detach().float().cpu()  # (N, h), exact and trainable
        else:
            logits = logits_from_selection(snap.indices, snap.weights, h)
    tensors = {BANK_KEY: snap.bank.float().contiguous()}
    for m in snap.modules:
        s = m.slot
        parts = {_A: (slice(s.a_start, s.a_start + s.a_count), (r, m.in_features // b)),
                 _B: (slice(s.b_start, s.b_start + s.b_count), (m.out_features // b, r))}
        for suffix, (rows, shape) in parts.items():
            key = f"{PREFIX}{m.name}{suffix}"
            if logits is not None:
                tensors[key] = logits[rows].reshape(*shape, h).contiguous()
            else:
                tensors[key + _IDX] = snap.indices[rows].reshape(*shape, k).to(peft_index_dtype(h)).contiguous()
                tensors[key + _W] = snap.weights[rows, :k - 1].reshape(*shape, k - 1).float().contiguous()
    for name, state in snap.extras.items():
        tensors.update({f"{PREFIX}{name}.{key}": t for key, t in state.items()})
    peft_config = {
        "peft_type": "VBLORA", "task_type": None, "auto_mapping": None, "base_model_name_or_path": None,
        "revision": None, "inference_mode": True, "r": r, "num_vectors": h, "vector_length": b, "topk": k,
        "target_modules": [m.name for m in snap.modules], "exclude_modules": None,
        "save_only_topk_weights": bool(save_only_topk_weights), "vblora_dropout": cfg.dropout,
        "fan_in_fan_out": any(m.kind == "conv1d" for m in snap.modules), "bias": "none",
        "modules_to_save": sorted(snap.extras) or None, "init_vector_bank_bound": cfg.init_bank_bound,
        "init_logits_std": cfg.init_logits_std, "layers_to_transform": None, "layers_pattern": None,
    }
    if snap.architecture:
        peft_config["auto_mapping"] = {"base_model_class": snap.architecture, "parent_library": None}
    return write_peft_dir(out_dir, peft_config, tensors)


def logits_from_selection(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """`(N, k)` indices and weights -> `(N, h)` logits whose top-k softmax gives back the weights.

    Selected entries hold log(weight); the rest a finite floor 30 below the smallest selected logit (finite, so
    PEFT's training-time inf check passes and the selection is unambiguous).
    """
    chosen = weights.float().clamp_min(1e-30).log()  # (N, k)
    floor = float(chosen.min()) - 30.0
    return torch.full((indices.shape[0], num_vectors), floor).scatter_(1, indices.long(), chosen)


# -- import ---------------------------------------------------------------------------------------------------------

def read_peft_dir(in_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """`(adapter_config, tensors, directory)` of a PEFT VB-LoRA adapter; refuses pickle (`adapter_model.bin`)."""
    d = Path(in_dir)
    if not (d / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no PEFT adapter at {d} (missing {CONFIG_FILE})")
    try:
        conf = json.loads((d / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{d / CONFIG_FILE}: corrupt JSON ({e})") from None
    if not isinstance(conf, dict) or conf.get("peft_type") != "VBLORA":
        raise AdapterFormatError(f"{d}: peft_type {conf.get('peft_type') if isinstance(conf, dict) else None!r} "
                                 f"is not a VB-LoRA adapter (expected 'VBLORA')")
    if not (d / WEIGHTS_FILE).is_file():
        extra = " (adapter_model.bin is a pickle; re-save it with safe_serialization=True)" \
            if (d / "adapter_model.bin").exists() else ""
        raise AdapterFormatError(f"{d}: missing {WEIGHTS_FILE}{extra}")
    if conf.get("bias", "none") != "none":
        raise AdapterFormatError(f"{d}: bias={conf['bias']!r} is not supported (only 'none')")
    tensors, _, _ = read_safetensors(d / WEIGHTS_FILE)
    return conf, tensors, d


def import_peft(base_model: nn.Module, in_dir: str | os.PathLike, *, strict: bool = True,
                trainable: bool = False) -> nn.Module:
    """Wrap `base_model` in place with an HF PEFT VB-LoRA adapter directory and return it.

    The full-logits variant becomes our training form (logits kept, so training can continue); the
    `save_only_topk_weights` variant becomes the inference form directly from indices and weights, never
    allocating `(N, h)` logits. With trainable=False (default) the adapter is frozen and the model put in eval mode.
    """
    refuse_adapted(base_model)
    conf, tensors, d = read_peft_dir(in_dir)
    base = _unwrap(base_model)
    topk_only = bool(conf.get("save_only_topk_weights"))
    bank = tensors.pop(BANK_KEY, None)
    if bank is None:
        bank = next((tensors.pop(k) for k in list(tensors) if k.startswith(BANK_KEY + ".")), None)
    if bank is None or bank.dim() != 2:
        raise AdapterFormatError(f"{d}: missing the vector bank '{BANK_KEY}'")
    h, b = bank.shape
    suffix = _A + (_IDX if topk_only else "")
    names = [key[len(PREFIX):-len(suffix)] for key in tensors if key.startswith(PREFIX) and key.endswith(suffix)]
    if not names:
        raise AdapterFormatError(f"{d}: no '*{suffix}' tensors; adapter_config save_only_topk_weights="
                                 f"{topk_only} does not match the weights file")
    _check_base(base, names, conf, b, d, strict)
    try:
        cfg = VBLoRAConfig(
            target_modules=tuple(names), rank=int(conf["r"]), num_vectors=h, vector_length=b,
            topk=int(conf["topk"]), dropout=float(conf.get("vblora_dropout", 0.0)),
            init_bank_bound=float(conf.get("init_vector_bank_bound", 0.02)),
            init_logits_std=float(conf.get("init_logits_std", 0.1)),
            modules_to_save=tuple(conf.get("modules_to_save") or ()))
        model = add_vblora(base, cfg, with_logits=not topk_only)
    except (VBLoRAError, KeyError, TypeError, ValueError) as e:
        raise AdapterFormatError(f"{d}: cannot build the adapter: {e}") from None
    vb = get_bank(model)
    k, r = cfg.stored_topk, cfg.rank

    def take(key: str, shape: tuple) -> torch.Tensor:
        t = tensors.pop(key, None)
        if t is None or tuple(t.shape) != shape:
            got = None if t is None else tuple(t.shape)
            raise AdapterFormatError(f"{d}: tensor '{key}' is {got}, expected {shape}")
        return t

    with torch.no_grad():
        vb.bank.copy_(bank.float())
        for name, slot in vb.layout:
            layer_in, layer_out = base_dims(model.get_submodule(name).base)
            for part, rows, shape in ((_A, slice(slot.a_start, slot.a_start + slot.a_count), (r, layer_in // b)),
                                      (_B, slice(slot.b_start, slot.b_start + slot.b_count), (layer_out // b, r))):
                key = PREFIX + name + part
                if topk_only:
                    idx = take(key + _IDX, (*shape, k)).long().reshape(-1, k)
                    w = take(key + _W, (*shape, k - 1)).float().reshape(-1, k - 1)
                    if (idx < 0).any() or (idx >= h).any() or not torch.isfinite(w).all():
                        raise AdapterFormatError(f"{d}: {key}: indices out of [0, {h}) or non-finite weights")
                    vb.indices[rows] = idx
                    vb.weights[rows] = complete_weights(w).to(vb.weights.dtype)
                else:
                    vb.logits[rows] = take(key, (*shape, h)).float().reshape(-1, h)
        for name, copy in trained_copies(model).items():
            prefix = f"{PREFIX}{name}."
            state = {key[len(prefix):]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
            try:
                copy.trained.load_state_dict(state, strict=True)
            except RuntimeError as e:
                raise AdapterFormatError(f"{d}: modules_to_save {name}: {e}") from None
    if tensors:
        raise AdapterFormatError(f"{d}: unexpected tensors {sorted(tensors)[:5]}")
    if not vb.frozen and not torch.isfinite(vb.logits).all():
        vb.freeze_selection()  # -inf logits (a re-inflated top-k adapter saved in full): inference form only
    if not trainable:
        vb.requires_grad_(False)
        for c in trained_copies(model).values():
            c.trained.requires_grad_(False)
        model.eval()
    return model


def _check_base(base: nn.Module, names: list[str], conf: dict, b: int, d: Path, strict: bool) -> None:
    problems = []
    arch = (conf.get("auto_mapping") or {}).get("base_model_class")
    if strict and arch and arch != type(base).__name__:
        problems.append(f"architecture: adapter was saved from {arch}, base model is {type(base).__name__}")
    for name in names:
        try:
            module = base.get_submodule(name)
        except AttributeError:
            problems.append(f"module {name} is missing from the base model")
            continue
        if layer_class(module) is None or isinstance(module, nn.Embedding):
            problems.append(f"module {name} is a {type(module).__name__}, not a Linear / Conv1D")
            continue
        fan_in, fan_out = base_dims(module)
        if fan_in % b or fan_out % b:
            problems.append(f"module {name} ({fan_in}->{fan_out}) is not divisible by vector_length {b}")
    if problems:
        raise AdapterFormatError(f"{d}: adapter does not fit this base model: " + "; ".join(problems[:6]))

