"""Tied-LoRA: Table 1's parameter count on RoBERTa-base q/v, tying, zero update at init, what trains."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel, RobertaConfig, RobertaForSequenceClassification

from vblora.train.tied_lora import TiedLoRALinear, add_tied_lora, layer_pattern


def test_roberta_base_qv_rank8_is_43200():
    with torch.device("meta"):  # full RoBERTa-base shape, no memory
        model = RobertaForSequenceClassification(RobertaConfig())
    names = [n for n, _ in model.named_modules() if n.endswith(("attention.self.query", "attention.self.value"))]
    assert len(names) == 24
    add_tied_lora(model, names, rank=8)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)  # what the pipeline counts (no heads)
    assert trainable == 2 * 2 * 8 * 768 + 12 * 2 * (8 + 768) == 43_200


def _tiny():
    torch.manual_seed(0)
    return BertModel(
        BertConfig(
            vocab_size=50,
            hidden_size=32,
            num_hidden_layers=3,
            num_attention_heads=2,
            intermediate_size=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )
    )


def test_tied_across_layers_and_zero_update_at_init():
    model = _tiny()
    x = torch.randint(0, 50, (2, 7))
    before = model(x).last_hidden_state
    names = [n for n, _ in model.named_modules() if n.endswith(("query", "intermediate.dense"))]
    add_tied_lora(model, names, rank=4)
    after = model(x).last_hidden_state
    assert torch.equal(before, after)  # B = 0 at init
    layers = [m for m in model.modules() if isinstance(m, TiedLoRALinear)]
    assert len(layers) == 6 and len(model.tied_lora.A) == 2  # two module types, shared by three layers
    assert layer_pattern("encoder.layer.2.attention.self.query") == "encoder.layer.*.attention.self.query"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith("tied_lora.") or n.endswith((".u", ".v")) for n in trainable)
    # state_dict holds each shared matrix once
    assert sum(k.startswith("tied_lora.A.") for k in model.state_dict()) == 2


def test_gradients_reach_shared_and_per_layer_vectors():
    model = _tiny()
    names = [n for n, _ in model.named_modules() if n.endswith("value")]
    add_tied_lora(model, names, rank=4, seed=1)
    with torch.no_grad():
        for p in model.tied_lora.B.values():
            p.normal_()
    model(torch.randint(0, 50, (2, 5))).last_hidden_state.sum().backward()
    layers = [m for m in model.modules() if isinstance(m, TiedLoRALinear)]
    assert all(m.u.grad is not None and m.v.grad is not None for m in layers)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.tied_lora.parameters())
    # the update is v * (B @ (u * (A @ x))): check against the dense formula on one layer
    m = layers[0]
    x = torch.randn(3, 32)
    A, B = model.tied_lora.A[m.key], model.tied_lora.B[m.key]
    dense = m.base(x) + (x @ (torch.diag(m.v) @ B @ torch.diag(m.u) @ A).T)
    assert torch.allclose(m(x), dense, atol=1e-5)
