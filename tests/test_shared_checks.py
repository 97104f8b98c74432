"""The shared checks table of DESIGN.md, run over several model families and target sets."""

import copy

import pytest
import torch
from torch import nn

import vblora
from tiny_models import output_of, tiny_gpt2, tiny_llama, tiny_roberta, tokens


def _mlp():
    return nn.Sequential(nn.Embedding(100, 48), nn.Linear(48, 80), nn.GELU(), nn.Linear(80, 48))


CASES = {
    "roberta-qv": (tiny_roberta, dict(target_modules=["query", "value"])),
    "roberta-all-linear": (tiny_roberta, dict(target_modules="all-linear")),
    "gpt2-conv1d": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"])),
    "llama-all-linear": (tiny_llama, dict(target_modules="all-linear")),
    "llama-regex-layer1": (tiny_llama, dict(target_modules=r".*\.(q_proj|v_proj)", layers=[1])),
    "embedding+non-dividing": (_mlp, dict(target_modules=["0", "1", "3"])),
    "roberta-head-trained": (lambda: tiny_roberta(classifier=True),
                             dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
}


def _run(model, ids):
    with torch.no_grad():
        return output_of(model, ids) if not isinstance(model, nn.Sequential) else model(ids)


@pytest.fixture(params=list(CASES), ids=list(CASES))
def case(request):
    build, kwargs = CASES[request.param]
    base = build().eval()
    cfg = vblora.VBLoRAConfig(rank=2, num_vectors=16, vector_length=32, init_logits_std=0.5, **kwargs)
    model = vblora.add_vblora(copy.deepcopy(base), cfg).eval()
    if cfg.modules_to_save:  # make the trained head differ from the original
        with torch.no_grad():
            for p in vblora.inject.trained_copies(model)["classifier"].trained.parameters():
                p.add_(0.1)
    return base, model, tokens(vocab=100)


def test_disabled_equals_base(case):
    base, model, ids = case
    with vblora.disable_adapter(model):
        torch.testing.assert_close(_run(model, ids), _run(base, ids), rtol=0, atol=0)
    assert not torch.allclose(_run(model, ids), _run(base, ids))  # the adapter is not zero at init


def test_merged_equals_unmerged_and_merge_is_idempotent(case):
    _, model, ids = case
    unmerged = _run(model, ids)
    vblora.merge(model)
    merged = _run(model, ids)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    weights = {n: p.clone() for n, p in model.named_parameters()}
    vblora.merge(model)  # second merge changes nothing
    for n, p in model.named_parameters():
        assert torch.equal(p, weights[n]), n
    with vblora.disable_adapter(model):  # disabling a merged model still gives the base
        pass
    torch.testing.assert_close(_run(model, ids), merged, rtol=1e-6, atol=1e-6)


def test_unmerge_restores_base_weights(case):
    base, model, _ = case
    before = {n: p.clone() for n, p in model.named_parameters()}
    vblora.merge(model)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    vblora.unmerge(model)
    vblora.unmerge(model)  # idempotent
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def test_only_adapter_parameters_train(case):
    _, model, _ = case
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    allowed = {"vblora_bank.bank", "vblora_bank.logits"}
    extra = {n for n in trainable - allowed if ".trained." not in n}
    assert extra == set(), extra
    assert allowed <= trainable
    counts = vblora.count_parameters(model)
    assert counts["trainable"] == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_unload_returns_merged_base(case):
    base, model, ids = case
    expected = _run(model, ids)
    plain = vblora.unload(model, merge=True)
    assert not hasattr(plain, "vblora_bank") and not vblora.adapted_layers(plain)
    assert type(plain) is type(base)
    torch.testing.assert_close(_run(plain, ids), expected, rtol=1e-5, atol=1e-5)
