"""Leaving VB-LoRA entirely: the merged full model (W + B A in every adapted module), loadable by the base model's
own class with no vblora installed. dW comes from the stored rule (`VBLoRALayer.delta_weight`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from vblora.inject import adapted_layers, trained_copies, unwrap
from vblora.storage.files import write_safetensors


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every dW = B A added (new tensors; the model is not modified), adapter
    wrappers removed and trained heads (`modules_to_save`) in place of the originals."""
    model = unwrap(model)
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
    base = unwrap(model)
    if hasattr(base, "save_pretrained"):
        out.mkdir(parents=True, exist_ok=True)
        base.save_pretrained(out, state_dict=state, **save_kwargs)
    else:
        # safetensors refuses shared storage: clone tensors that alias one another
        seen, clean = set(), {}
        for k, t in state.items():
            ptr = t.untyped_storage().data_ptr()
            clean[k] = t.clone() if ptr in seen else t
            seen.add(ptr)
        write_safetensors(out / "model.safetensors", clean, {"format": "pt"})
    return out
