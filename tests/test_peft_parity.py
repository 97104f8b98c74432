"""Outputs and gradients equal HF PEFT's VB-LoRA with the same bank and logits (float32, 1e-5)."""

import copy

import pytest
import torch

import vblora
from tiny_models import output_of, tiny_gpt2, tiny_roberta, tokens

pytest.importorskip("peft")
from peft_bridge import peft_flat_grads, peft_twin

ROBERTA_ALL = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
CASES = [
    ("roberta-qv", tiny_roberta, ["query", "value"], False),
    ("roberta-all6", tiny_roberta, ROBERTA_ALL, False),
    ("gpt2-c_attn", tiny_gpt2, ["c_attn"], True),
    ("gpt2-attn-proj-fc", tiny_gpt2, ["c_attn", "c_proj", "c_fc"], True),
]


@pytest.mark.parametrize("name,build,targets,fan_in_fan_out", CASES, ids=[c[0] for c in CASES])
def test_outputs_and_grads_match_peft(name, build, targets, fan_in_fan_out):
    base = build()
    cfg = vblora.VBLoRAConfig(
        target_modules=targets, rank=4, num_vectors=12, vector_length=32, topk=2, init_logits_std=0.5, seed=3
    )
    ours = vblora.add_vblora(copy.deepcopy(base), cfg)
    twin = peft_twin(base, ours, targets, fan_in_fan_out)
    n_ours = len(vblora.adapted_layers(ours))
    assert n_ours == sum(
        1
        for n, _ in twin.named_modules()
        if n.endswith(tuple(targets)) and "base_layer" not in n and hasattr(twin.get_submodule(n), "vblora_logits_A")
    )

    ids = tokens()
    ours.train(), twin.train()
    out_ours, out_peft = output_of(ours, ids), output_of(twin, ids)
    torch.testing.assert_close(out_ours, out_peft, rtol=1e-5, atol=1e-5)
    probe = torch.randn_like(out_ours)
    (out_ours * probe).sum().backward()
    (out_peft * probe).sum().backward()
    bank = vblora.get_bank(ours)
    peft_bank_grad, peft_logits_grad = peft_flat_grads(twin, ours)
    assert bank.bank.grad.abs().sum() > 0 and bank.logits.grad.abs().sum() > 0
    torch.testing.assert_close(bank.bank.grad, peft_bank_grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(bank.logits.grad, peft_logits_grad, rtol=1e-5, atol=1e-5)


def test_merged_weights_match_peft_merge():
    base = tiny_gpt2()
    targets = ["c_attn", "c_proj", "c_fc"]
    ours = vblora.add_vblora(
        copy.deepcopy(base),
        vblora.VBLoRAConfig(target_modules=targets, rank=2, num_vectors=8, vector_length=32, init_logits_std=0.5),
    )
    twin = peft_twin(base, ours, targets, fan_in_fan_out=True)
    merged_peft = twin.merge_and_unload()
    merged_ours = vblora.unload(ours, merge=True)
    for (n1, p1), (n2, p2) in zip(merged_ours.named_parameters(), merged_peft.named_parameters(), strict=True):
        assert n1 == n2
        torch.testing.assert_close(p1, p2, rtol=1e-5, atol=1e-6)
