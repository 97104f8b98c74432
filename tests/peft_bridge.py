"""Build HF PEFT's VB-LoRA model with exactly our bank and logits (the reference for parity tests)."""

from __future__ import annotations

import copy

import torch

from vblora import adapted_layers, get_bank


def peft_twin(base_model, ours, target_modules, fan_in_fan_out: bool = False):
    """A PEFT VB-LoRA model over a copy of `base_model` whose bank and per-module logits equal ours."""
    from peft import VBLoRAConfig as PeftVBLoRAConfig
    from peft import get_peft_model

    bank = get_bank(ours)
    cfg = bank.config
    pcfg = PeftVBLoRAConfig(
        target_modules=list(target_modules),
        r=cfg.rank,
        num_vectors=cfg.num_vectors,
        vector_length=cfg.vector_length,
        topk=cfg.topk,
        vblora_dropout=0.0,
        fan_in_fan_out=fan_in_fan_out,
    )
    twin = get_peft_model(copy.deepcopy(base_model), pcfg)
    h = cfg.num_vectors
    with torch.no_grad():
        twin.base_model.vblora_vector_bank["default"].copy_(bank.bank)
        for name, layer in adapted_layers(ours).items():
            peft_layer = twin.base_model.model.get_submodule(name)
            s, r, b = layer.slot, layer.rank, cfg.vector_length
            peft_layer.vblora_logits_A["default"].copy_(
                bank.logits[s.a_start : s.a_start + s.a_count].view(r, layer.in_features // b, h)
            )
            peft_layer.vblora_logits_B["default"].copy_(
                bank.logits[s.b_start : s.b_start + s.b_count].view(layer.out_features // b, r, h)
            )
    return twin


def peft_flat_grads(twin, ours):
    """PEFT's (bank grad, logits grads flattened into our (N, h) order)."""
    bank = get_bank(ours)
    flat = torch.zeros_like(bank.logits)
    for name, layer in adapted_layers(ours).items():
        peft_layer = twin.base_model.model.get_submodule(name)
        s = layer.slot
        flat[s.a_start : s.a_start + s.a_count] = peft_layer.vblora_logits_A["default"].grad.reshape(s.a_count, -1)
        flat[s.b_start : s.b_start + s.b_count] = peft_layer.vblora_logits_B["default"].grad.reshape(s.b_count, -1)
    return twin.base_model.vblora_vector_bank["default"].grad, flat
