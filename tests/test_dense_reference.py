"""What PEFT lacks (Embedding targets, non-dividing vector lengths) against a dense float64 reference."""

import torch
from torch import nn

import vblora
from vblora.bank import compose


def dense_reference(layer, bank, x):
    """base(x) + x @ (B A)^T computed in float64 from the composed sub-vectors, dW formed explicitly."""
    b, r = bank.config.vector_length, layer.rank
    sub = compose(bank.logits.double(), bank.bank.double(), bank.config.topk)
    s = layer.slot
    A = sub[s.a_start : s.a_start + s.a_count].reshape(r, -1)[:, : layer.in_features]  # (r, in)
    rows = sub[s.b_start : s.b_start + s.b_count]
    B = rows.view(-1, r, b).transpose(1, 2).reshape(-1, r)[: layer.out_features]  # (out, r)
    dW = B @ A  # (out, in)
    if isinstance(layer.base, nn.Embedding):
        return layer.base.weight.double()[x] + dW.T[x]
    return x.double() @ (layer.base.weight.double() + dW).T + layer.base.bias.double()


def test_non_dividing_vector_length_matches_dense_reference():
    # hidden 48 and 80 with b = 32: ceil(48/32) = 2 and ceil(80/32) = 3 sub-vectors, excess dropped
    model = nn.Sequential(nn.Linear(48, 80), nn.GELU(), nn.Linear(80, 48))
    model = vblora.add_vblora(
        model,
        vblora.VBLoRAConfig(target_modules=["0", "2"], rank=3, num_vectors=10, vector_length=32, init_logits_std=0.3),
    )
    layer, bank = model[0], vblora.get_bank(model)
    assert layer.slot.a_count == 3 * 2 and layer.slot.b_count == 3 * 3
    assert layer.lora_A().shape == (3, 48) and layer.lora_B().shape == (80, 3)
    x = torch.randn(5, 48)
    torch.testing.assert_close(layer(x).double(), dense_reference(layer, bank, x), rtol=1e-5, atol=1e-6)


def test_minilm_shape_with_b256_works():
    # 384 is not divisible by 256 (HF PEFT raises); we pad the last sub-vector.
    model = nn.Sequential(nn.Linear(384, 1536))
    model = vblora.add_vblora(model, vblora.VBLoRAConfig(target_modules=["0"], num_vectors=16, vector_length=256))
    assert model(torch.randn(2, 384)).shape == (2, 1536)
    assert vblora.get_bank(model).num_subvectors == 4 * 2 + 6 * 4


def test_embedding_matches_dense_reference_and_looks_up_columns():
    model = nn.Sequential(nn.Embedding(50, 24))
    model = vblora.add_vblora(
        model, vblora.VBLoRAConfig(target_modules=["0"], rank=2, num_vectors=6, vector_length=8, init_logits_std=0.3)
    )
    layer, bank = model[0], vblora.get_bank(model)
    assert layer.lora_A().shape == (2, 50) and layer.lora_B().shape == (24, 2)  # A (r, num_embeddings)
    x = torch.randint(0, 50, (3, 7))
    out = layer(x)
    assert out.shape == (3, 7, 24)
    torch.testing.assert_close(out.double(), dense_reference(layer, bank, x), rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert bank.bank.grad is not None and bank.logits.grad.abs().sum() > 0
