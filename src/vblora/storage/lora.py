"""Leaving VB-LoRA for any LoRA runtime: an exact plain LoRA adapter in HF PEFT's LoRA format.

A VB-LoRA module *is* a rank-r LoRA module whose `A (r, in)` and `B (out, r)` are composed from the bank, so the
export writes those two matrices as they are (no SVD, no approximation) with `lora_alpha = r` (scaling 1).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vblora.storage.peft_vblora import PREFIX, snapshot_of, untrained_heads, write_peft_dir


def export_lora(model_or_path, out_dir: str | os.PathLike) -> Path:
    """Write an adapted model (or adapter file) as an HF PEFT LoRA adapter directory, exactly (no approximation).

    Per Linear / Conv1D module `lora_A.weight (r, in)` and `lora_B.weight (out, r)` (`fan_in_fan_out=True` when
    GPT-2 Conv1D is adapted); per Embedding `lora_embedding_A (r, num_embeddings)` and
    `lora_embedding_B (dim, r)`; `lora_alpha = r` (scaling 1). Trained heads travel as `modules_to_save`.

    Args:
        model_or_path (nn.Module | AdapterSnapshot | str | os.PathLike): an adapted model, an
            `AdapterSnapshot`, or a native adapter file or directory.
        out_dir: the output directory: empty, absent, or a previous PEFT export.

    Returns:
        `out_dir` as a Path, holding `adapter_config.json` and `adapter_model.safetensors`.

    Raises:
        AdapterFormatError: the adapter file is damaged.
        TargetError: a model without an adapter.
        VBLoRAError: `out_dir` holds other files than a previous export (nothing is replaced).
    """
    snap = snapshot_of(model_or_path)
    layout, sub = snap.layout, snap.subvectors()  # (N, b) float32, the stored rule
    tensors: dict[str, torch.Tensor] = {}
    for m in snap.modules:
        A, B = layout.factors(sub, m)  # (r, in), (out, r)
        keys = ("lora_embedding_A", "lora_embedding_B") if m.kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        tensors.update({f"{PREFIX}{m.name}.{key}": t.contiguous() for key, t in zip(keys, (A, B), strict=True)})
    r = snap.config.rank
    config = {
        "peft_type": "LORA",
        "lora_alpha": r,
        "lora_dropout": snap.config.dropout,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    # from a model, an untrained head's base weights travel too, so PEFT's task class (which wraps the head) loads it
    heads = untrained_heads(model_or_path, snap) if isinstance(model_or_path, torch.nn.Module) else None
    return write_peft_dir(out_dir, snap, config, tensors, heads)
