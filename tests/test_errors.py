"""Every clear-error case raises the documented exception, naming the module and the fix."""

import pytest
import torch
from torch import nn

import vblora
from tiny_models import tiny_roberta
from vblora.errors import ConfigError, NonFiniteError, TargetError


def test_no_module_matched_lists_near_misses():
    with pytest.raises(TargetError, match=r"querry.*Near misses: \['query'\]"):
        vblora.add_vblora(tiny_roberta(), vblora.VBLoRAConfig(target_modules=["querry"], vector_length=32))


def test_unsupported_layer_type_names_module():
    with pytest.raises(TargetError, match=r"'embeddings\.LayerNorm'.*LayerNorm cannot be adapted"):
        vblora.add_vblora(
            tiny_roberta(), vblora.VBLoRAConfig(target_modules=["embeddings.LayerNorm"], vector_length=32)
        )


def test_topk_larger_than_bank():
    with pytest.raises(ConfigError, match="topk=5 > num_vectors=4"):
        vblora.VBLoRAConfig(num_vectors=4, topk=5)


@pytest.mark.parametrize("rank", [0, -1])
def test_rank_below_one(rank):
    with pytest.raises(ConfigError, match="rank must be an integer >= 1"):
        vblora.VBLoRAConfig(rank=rank)


def test_non_finite_bank_or_logits_name_the_module():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    model = vblora.add_vblora(model, vblora.VBLoRAConfig(target_modules=["0", "1"], num_vectors=8, vector_length=16))
    bank = vblora.get_bank(model)
    with torch.no_grad():
        bank.logits[model[1].slot.b_start + 1, 3] = float("nan")
    with pytest.raises(NonFiniteError, match=r"module 1 \(B\)"):
        vblora.parameter_groups(model)
    with torch.no_grad():
        bank.logits.nan_to_num_(0.0)
        bank.bank[2, 0] = float("inf")
    with pytest.raises(NonFiniteError, match="bank row 2"):
        vblora.merge(model)


def test_adding_twice_says_how_to_remove():
    model = vblora.add_vblora(tiny_roberta(), vblora.VBLoRAConfig(target_modules=["query"], vector_length=32))
    with pytest.raises(TargetError, match=r"already has a VB-LoRA adapter.*vblora\.unload.*load_adapter"):
        vblora.add_vblora(model, vblora.VBLoRAConfig(target_modules=["value"], vector_length=32))
    vblora.unload(model, merge=False)
    vblora.add_vblora(model, vblora.VBLoRAConfig(target_modules=["value"], vector_length=32))  # works after unload


def test_unknown_selection_and_empty_targets():
    with pytest.raises(ConfigError, match="selection"):
        vblora.VBLoRAConfig(selection="softmax")
    with pytest.raises(ConfigError, match="target_modules is empty"):
        vblora.VBLoRAConfig(target_modules=[])
