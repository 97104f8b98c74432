"""Leaving VB-LoRA entirely: the merged full model (W + B A in every adapted module), loadable by the base model's
own class with no vblora installed. dW comes from the stored rule (`VBLoRALayer.delta_weight`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from vblora.inject import adapted_layers, trained_copies, unwrap
from vblora.storage.files import replace_dir, write_safetensors


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict with every dW = B A added (new tensors; the model is not modified), adapter
    wrappers removed and trained heads (`modules_to_save`) in place of the originals. A weight the base model ties
    to an adapted one (an input embedding shared with the output head) keeps the unmerged value under its own key:
    only the adapted use changed."""
    model = unwrap(model)
    layers, copies = adapted_layers(model), trained_copies(model)
    renames = [(f"{n}.base.", f"{n}.") for n in layers] + [(f"{n}.trained.", f"{n}.") for n in copies]
    drops = ("vblora_bank.",) + tuple(f"{n}.original." for n in copies)
    out = {}
    for key, t in model.state_dict(keep_vars=False).items():
        if key.startswith(drops):
            continue
        for old, new in renames:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = t
    for name, layer in layers.items():
        w = layer.base.weight
        merged = w.float() if layer.merged else w.float() + layer.delta_weight().to(w.device)
        plain = w.float() - layer.delta_weight().to(w.device) if layer.merged else w.float()
        for key, t in out.items():  # tied copies of the same tensor keep the base value
            if t.data_ptr() == w.data_ptr() and key != f"{name}.weight":
                out[key] = plain.to(w.dtype)
        out[f"{name}.weight"] = merged.to(w.dtype)
    return out


def ties_adapted_weight(model: nn.Module) -> bool:
    """Whether the model ties an adapted weight to another use (then the merged model must be saved untied)."""
    model = unwrap(model)
    adapted = {layer.base.weight.data_ptr(): f"{n}.base.weight" for n, layer in adapted_layers(model).items()}
    return any(t.data_ptr() in adapted and key != adapted[t.data_ptr()] for key, t in model.state_dict().items())


def merge_and_save(model: nn.Module, out_dir: str | os.PathLike, **save_kwargs) -> Path:
    """Save the merged full model (W + B A in every adapted module) with `save_pretrained`, loadable by the base
    model's own class with no vblora installed; written as a whole (an earlier export is replaced once this one is
    complete). The adapted model itself is left unchanged. Plain nn.Modules (no `save_pretrained`) get
    `out_dir/model.safetensors`. Tied embeddings of which only one use was adapted are saved untied
    (`tie_word_embeddings=False`), so a loader that honours the flag gets the adapted model."""
    state = merged_state_dict(model)
    base = unwrap(model)
    # safetensors refuses shared storage: clone tensors that alias one another
    seen, clean = set(), {}
    for k, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        clean[k] = t.clone() if ptr in seen else t
        seen.add(ptr)

    def write(d: Path) -> None:
        if not hasattr(base, "save_pretrained"):
            write_safetensors(d / "model.safetensors", clean, {"format": "pt"})
            return
        config = getattr(base, "config", None)
        tie = ties_adapted_weight(base) and getattr(config, "tie_word_embeddings", False)
        if tie:
            config.tie_word_embeddings = False
        try:
            base.save_pretrained(d, state_dict=clean, **save_kwargs)
        finally:
            if tie:
                config.tie_word_embeddings = True

    return replace_dir(out_dir, write, replaceable=lambda d: any(d.glob("*.safetensors")) or (d / "config.json").exists())
