"""Leaving VB-LoRA entirely: the merged full model (W + B A in every adapted module), loadable by the base model's
own class with no vblora installed. dW comes from the stored rule (`VBLoRALayer.delta_weight`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vblora.inject import BANK_ATTR, adapted_layers, trained_copies, unwrap
from vblora.layout import dense_weight, is_quantized, is_quantized_param, weight_of
from vblora.storage.files import replace_dir, write_safetensors


@torch.no_grad()
def merged_state_dict(model: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The base model's state dict with every dW = B A added (new tensors; the model is not modified), adapter
    wrappers removed and trained heads (`modules_to_save`) in place of the originals. A weight the base model ties
    to an adapted one (an input embedding shared with the output head) keeps the unmerged value under its own key:
    only the adapted use changed.

    Quantized base layers (bitsandbytes 4-bit / 8-bit), adapted or not, come out dequantized: their packed weight
    and quantization state become one float weight `(out, in)`, W (+ dW, added in float32) in `dtype`, by default
    the dtype of the model's unquantized parameters (the compute dtype when the base was loaded in it), else
    float32. `dtype` casts every floating tensor."""
    model = unwrap(model)
    layers, copies = adapted_layers(model), trained_copies(model)
    renames = [(f"{n}.base.", f"{n}.") for n in layers] + [(f"{n}.trained.", f"{n}.") for n in copies]
    drops = (f"{BANK_ATTR}.", *tuple(f"{n}.original." for n in copies))

    def rename(key: str) -> str:
        return next((new + key[len(old) :] for old, new in renames if key.startswith(old)), key)

    out = {rename(k): t for k, t in model.state_dict(keep_vars=False).items() if not k.startswith(drops)}
    quantized = {
        rename(f"{n}."): m
        for n, m in model.named_modules()  # "x.q_proj." -> its quantized Linear
        if isinstance(m, nn.Linear) and is_quantized(m)
    }
    plain = dtype or next(
        (
            p.dtype
            for n, p in model.named_parameters()
            if p.is_floating_point() and not is_quantized_param(p) and not n.startswith(BANK_ATTR)
        ),
        torch.float32,
    )
    for prefix, m in quantized.items():  # packed codes, absmax, quant map, SCB, ... -> one float weight
        for key in [k for k in out if k.startswith(prefix) and k != prefix + "bias"]:
            del out[key]
        w = dense_weight(m)  # float32, one layer at a time
        layer = layers.get(prefix[:-1])
        out[prefix + "weight"] = (w + layer.delta_weight().to(w.device) if layer is not None else w).to(plain)
    for name, layer in layers.items():
        if layer.quantized:
            continue
        w = weight_of(layer.base)
        dw = layer.delta_weight().to(w.device)  # dW composed once per layer
        merged = w.float() if layer.merged else w.float() + dw
        unmerged = w.float() - dw if layer.merged else w.float()
        for key, t in out.items():  # tied copies of the same tensor keep the base value
            if t.data_ptr() == w.data_ptr() and key != f"{name}.weight":
                out[key] = unmerged.to(w.dtype)
        out[f"{name}.weight"] = merged.to(w.dtype)
    if dtype is not None:
        out = {k: t.to(dtype) if t.is_floating_point() else t for k, t in out.items()}
    return out


def merge_and_save(
    model: nn.Module, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None, **save_kwargs
) -> Path:
    """Save the merged full model (W + B A in every adapted module), loadable by the base model's own class with no
    vblora installed.

    Written as a whole (an earlier export is replaced once this one is complete). The adapted model itself is left
    unchanged. Tied embeddings of which only one use was adapted are saved untied (`tie_word_embeddings=False`), so
    a loader that honours the flag gets the adapted model. A quantized base (bitsandbytes) is written dequantized,
    with no `quantization_config`: the base class loads it in full precision (quantize it again at load time if
    wanted).

    Args:
        model: an adapted model (merged or not).
        out_dir: the output directory: empty, absent, or a previous merged export.
        dtype: casts every floating tensor (e.g. `torch.bfloat16`); default: see `merged_state_dict`.
        **save_kwargs (Any): passed to the model's `save_pretrained`.

    Returns:
        `out_dir` as a Path: `save_pretrained`'s files, or `model.safetensors` for a plain `nn.Module`.

    Raises:
        TargetError: the model has no adapter.
        VBLoRAError: `out_dir` holds other files than a previous export (nothing is replaced).
    """
    state = merged_state_dict(model, dtype)
    base = unwrap(model)
    # safetensors refuses shared storage: clone tensors that alias one another
    seen, clean = set(), {}
    for k, t in state.items():
        ptr = t.untyped_storage().data_ptr()
        clean[k] = t.clone() if ptr in seen else t
        seen.add(ptr)

    def write(d: Path) -> None:
        save_pretrained = getattr(base, "save_pretrained", None)  # a transformers model's
        if save_pretrained is None:
            write_safetensors(d / "model.safetensors", clean, {"format": "pt"})
            return
        config: Any = getattr(base, "config", None)
        adapted = {weight_of(layer.base).data_ptr(): f"{n}.base.weight" for n, layer in adapted_layers(base).items()}
        tie = (
            config is not None
            and getattr(config, "tie_word_embeddings", False)
            and any(  # an adapted weight has another use too
                t.data_ptr() in adapted and key != adapted[t.data_ptr()] for key, t in base.state_dict().items()
            )
        )
        # transformers saves a quantized model's own state dict, ignoring ours, while it has an hf_quantizer
        quantizer = base.__dict__.get("hf_quantizer")
        if tie:
            config.tie_word_embeddings = False
        if quantizer is not None:
            base.__dict__["hf_quantizer"] = None
        try:
            save_pretrained(d, state_dict=clean, **save_kwargs)
        finally:
            if tie:
                config.tie_word_embeddings = True
            if quantizer is not None:
                base.__dict__["hf_quantizer"] = quantizer
        path = d / "config.json"
        saved = json.loads(path.read_text()) if path.exists() else None
        if saved is not None and ("quantization_config" in saved or dtype is not None):
            saved.pop("quantization_config", None)  # the weights are dequantized: load without quantizing
            if dtype is not None:
                saved["dtype"] = str(dtype).removeprefix("torch.")
            path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")

    return replace_dir(
        out_dir, write, replaceable=lambda d: any(d.glob("*.safetensors")) or (d / "config.json").exists()
    )
