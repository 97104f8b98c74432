"""Leaving VB-LoRA for any LoRA runtime: an exact plain LoRA adapter in HF PEFT's LoRA format.

A VB-LoRA module *is* a rank-r LoRA module whose `A (r, in)` and `B (out, r)` are composed from the bank, so the
export writes those two matrices as they are (no SVD, no approximation) with `lora_alpha = r` (scaling 1).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from vblora.storage.peft_vblora import PREFIX, peft_config_common, snapshot_of, write_peft_dir


def export_lora(model_or_path, out_dir: str | os.PathLike) -> Path:
    """Write an adapted model (or adapter file) as a PEFT LoRA adapter directory: `lora_A.weight (r, in)`,
    `lora_B.weight (out, r)` per Linear / Conv1D module (`fan_in_fan_out=True` when GPT-2 Conv1D is adapted),
    `lora_embedding_A (r, num_embeddings)` / `lora_embedding_B (dim, r)` per Embedding, `lora_alpha = r`."""
    snap = snapshot_of(model_or_path)
    layout, sub = snap.layout, snap.subvectors()  # (N, b) float32, the stored rule
    tensors: dict[str, torch.Tensor] = {}
    for m in snap.modules:
        A, B = layout.factors(sub, m)  # (r, in), (out, r)
        stem = f"{PREFIX}{m.name}."
        if m.kind == "embedding":
            tensors[stem + "lora_embedding_A"], tensors[stem + "lora_embedding_B"] = A.contiguous(), B.contiguous()
        else:
            tensors[stem + "lora_A.weight"], tensors[stem + "lora_B.weight"] = A.contiguous(), B.contiguous()
    for name, state in snap.extras.items():
        tensors.update({f"{PREFIX}{name}.{key}": t for key, t in state.items()})
    r = snap.config.rank
    config = {**peft_config_common(snap), "peft_type": "LORA", "lora_alpha": r, "lora_dropout": snap.config.dropout,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "rank_pattern": {},
              "alpha_pattern": {}}
    return write_peft_dir(out_dir, config, tensors)
