"""count_parameters: h*b + N*(k*w + (k-1)) from module shapes alone, and the paper's Table 1 figures."""

import math

import pytest
import torch
from torch import nn

import vblora

ALL6 = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]


def _roberta(hidden, layers, intermediate, heads):
    from transformers import RobertaConfig, RobertaModel

    with torch.device("meta"):  # shapes only: no memory, no init time
        return RobertaModel(
            RobertaConfig(
                hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=intermediate
            ),
            add_pooling_layer=False,
        )


def _expected(shapes, h, b, r, k):
    # shapes: (in, out) per adapted module; N = sum r*ceil(in/b) + r*ceil(out/b)
    n = sum(r * math.ceil(i / b) + r * math.ceil(o / b) for i, o in shapes)
    w = 0.25 if h <= 256 else 0.5 if h <= 65536 else 1.0
    return h * b + n * (k * w + (k - 1)), n


@pytest.mark.parametrize(
    "size,expected",
    [((768, 12, 3072, 12), 26_928), ((1024, 24, 4096, 16), 33_408)],
    ids=["roberta-base", "roberta-large"],
)
def test_table1_all_linear_counts(size, expected):
    hidden, layers, inter, _ = size
    model = vblora.add_vblora(
        _roberta(*size), vblora.VBLoRAConfig(target_modules=ALL6, num_vectors=90, vector_length=256, rank=4, topk=2)
    )
    counts = vblora.count_parameters(model)
    shapes = layers * ([(hidden, hidden)] * 4 + [(hidden, inter), (inter, hidden)])
    assert counts["stored"] == _expected(shapes, 90, 256, 4, 2)[0] == expected
    # the paper's closed form h*b + 3*L*M*r*(d/b) holds for square modules (q/v only):
    qv = vblora.add_vblora(
        _roberta(*size), vblora.VBLoRAConfig(target_modules=["query", "value"], num_vectors=90, vector_length=256)
    )
    assert vblora.count_parameters(qv)["stored"] == 90 * 256 + 3 * layers * 2 * 4 * (hidden // 256)
    assert counts["stored_bytes"] == expected * 4


@pytest.mark.parametrize("h,k", [(16, 2), (256, 3), (300, 2), (70_000, 2)])
def test_general_formula_from_shapes(h, k):
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(48, 80), nn.Linear(80, 20), nn.Embedding(30, 8))
    cfg = vblora.VBLoRAConfig(target_modules=["0", "1", "2"], num_vectors=h, vector_length=16, rank=3, topk=k)
    model = vblora.add_vblora(model, cfg)
    counts = vblora.count_parameters(model)
    stored, n = _expected([(48, 80), (80, 20), (30, 8)], h, 16, 3, k)
    assert counts["subvectors"] == n
    assert counts["stored"] == pytest.approx(stored, abs=1e-9)
    assert counts["trainable"] == h * 16 + n * h
    assert counts["lora_equivalent"] == 3 * (48 + 80) + 3 * (80 + 20) + 3 * (30 + 8)


def test_uint8_up_to_256_vectors():
    # h = 256 fits uint8 (PEFT uses int16 there): w = 1/4
    from vblora.layout import stored_count

    assert stored_count(256, 1, 1, 1) == 256 + 0.25 and stored_count(257, 1, 1, 1) == 257 + 0.5  # index widths


def test_modules_to_save_are_counted():
    from tiny_models import tiny_roberta

    model = vblora.add_vblora(
        tiny_roberta(classifier=True),
        vblora.VBLoRAConfig(
            target_modules=["query", "value"], num_vectors=16, vector_length=32, modules_to_save=["classifier"]
        ),
    )
    counts = vblora.count_parameters(model)
    head = sum(p.numel() for p in model.classifier.trained.parameters())
    assert counts["stored_other"] == head and counts["stored"] == counts["stored_adapter"] + head
