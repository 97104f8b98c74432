"""Leaving VB-LoRA: an exact plain LoRA adapter in HF PEFT's LoRA format, or the merged full model.

A VB-LoRA module *is* a rank-r LoRA module whose `A (r, in)` and `B (out, r)` are composed from the bank, so the
export writes those two matrices as they are (no SVD, no approximation) with `lora_alpha = r` (scaling 1). Any
LoRA runtime can then serve the adapter.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from vblora.inject import _unwrap, adapted_layers, trained_copies
from vblora.interop import PREFIX, snapshot_of, write_peft_dir
from vblora.snapshot import lora_factors, subvectors


def export_lora(model_or_path, out_dir: str | os.PathLike) -> Path:
    """Write an adapted model (or adapter file) as a PEFT LoRA adapter directory: `lora_A.weight (r, in)`,
    `lora_B.weight (out, r)` per Linear / Conv1D module (`fan_in_fan_out=True` when GPT-2 Conv1D is adapted),
    `lora_embedding_A (r, num_embeddings)` / `lora_embedding_B (dim, r)` per Embedding, `lora_alpha = r`."""
    snap, _ = snapshot_of(model_or_path)
    cfg = snap.config
    sub = subvectors(snap)  # (N, b) float32, the eval-time composition
    tensors: dict[str, torch.Tensor] = {}
    for m in snap.modules:
        A, B = lora_factors(sub, m, cfg.rank)  # (r, in), (out, r)
        stem = f"{PREFIX}{m.name}."
        if m.kind == "embedding":
            tensors[stem + "lora_embedding_A"], tensors[stem + "lora_embedding_B"] = A.contiguous(), B.contiguous()
        else:
            tensors[stem + "lora_A.weight"], tensors[stem + "lora_B.weight"] = A.contiguous(), B.contiguous()
    for name, state in snap.extras.items():
        tensors.update({f"{PREFIX}{name}.{key}": t for key, t in state.items()})
    config = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None, "revision": None,
        "inference_mode": True, "r": cfg.rank, "lora_alpha": cfg.rank, "lora_dropout": cfg.dropout,
        "target_modules": [m.name for m in snap.modules], "exclude_modules": None,
        "fan_in_fan_out": any(m.kind == "conv1d" for m in snap.modules), "bias": "none", "use_rslora": False,
        "use_dora": False, "init_lora_weights": True, "modules_to_save": sorted(snap.extras) or None,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
    }
    if snap.architecture:
        config["auto_mapping"] = {"base_model_class": snap.architecture, "parent_library": None}
    return write_peft_dir(out_dir, config, tensors)


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every dW = B A added (new tensors; the model is not modified), adapter
    wrappers removed and trained heads (`modules_to_save`) in place of the originals."""
    model = _unwrap(model)
    layers, copies = adapted_layers(model), trained_copies(model)
    renames = [(f"{n}.base.", f"{n}.") for n in layers] + [(f"{n}.trained.", f"{n}.") for n in copies]
    drops = ("vblora_bank.",) + tuple(f"{n}.original." for n in copies)
    out = {}
    for key, t in model.state_dict().items():
        if key.startswith(drops):
            continue
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = t
    for name, layer in layers.items():
        w = layer.base.weight
        if not layer.merged:  # a merged layer's base weight already holds dW
            out[f"{name}.weight"] = (w.float() + layer.delta_weight().to(w.device)).to(w.dtype)
    return out


def merge_and_save(model: nn.Module, out_dir: str | os.PathLike, **save_kwargs) -> Path:
    """Save the merged full model (W + B A in every adapted module) with `save_pretrained`, loadable by the base
    model's own class with no vblora installed. The adapted model itself is left unchanged. Plain nn.Modules
    (no `save_pretrained`) get `out_dir/model.safetensors`."""
    out = Path(out_dir)
    state = merged_state_dict(model)
    base = _unwrap(model)
    if hasattr(base, "save_pretrained"):
        out.mkdir(parents=True, exist_ok=True)
        base.save_pretrained(out, state_dict=state, **save_kwargs)
    else:
        from vblora.safefile import write_safetensors

        # safetensors refuses shared storage: clone tensors that alias one another
        seen, clean = set(), {}
        for k, t in state.items():
            ptr = t.untyped_storage().data_ptr()
            clean[k] = t.clone() if ptr in seen else t
            seen.add(ptr)
        write_safetensors(out / "model.safetensors", clean, {"format": "pt"})
    return out
