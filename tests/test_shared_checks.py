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
    "roberta-head-trained": (
        lambda: tiny_roberta(classifier=True),
        dict(target_modules=["query", "value"], modules_to_save=["classifier"]),
    ),
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
    _, model, _ = case
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


# -- every selection rule, in training and in eval mode ----------------------------------------------------------
# merge / unmerge / disable / save use the stored rule (top-eval_topk softmax, full softmax for select-all) whatever
# the mode: a random training rule (noisy top-k, Gumbel) must not make merge and unmerge draw different updates.
RULES = {
    "topk": {},
    "topk-eval1": dict(eval_topk=1),
    "all": dict(selection="all"),
    "noisy_topk": dict(selection="noisy_topk"),
    "gumbel": dict(selection="gumbel", eval_topk=2),
    "st_gumbel": dict(selection="st_gumbel", eval_topk=1),
}
RULE_CASES = ["llama-all-linear", "gpt2-conv1d", "embedding+non-dividing", "roberta-head-trained"]


@pytest.fixture(
    params=[(c, r, m) for c in RULE_CASES for r in RULES for m in ("train", "eval")], ids=lambda p: "-".join(p)
)
def rule_case(request):
    name, rule, mode = request.param
    build, kwargs = CASES[name]
    base = build().train(mode == "train")
    cfg = vblora.VBLoRAConfig(rank=2, num_vectors=16, vector_length=32, init_logits_std=0.5, **kwargs, **RULES[rule])
    model = vblora.add_vblora(copy.deepcopy(base), cfg).train(mode == "train")
    return base, model, tokens(vocab=100)


def _weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_merge_then_unmerge_restores_base_under_every_rule(rule_case):
    _, model, _ = rule_case
    before = _weights(model)
    vblora.merge(model)
    merged = _weights(model)
    assert any(not torch.equal(p, before[n]) for n, p in merged.items())
    vblora.unmerge(model)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)
    vblora.merge(model)  # the same update again: deterministic, mode-independent
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, merged[n], rtol=0, atol=1e-6)


def test_disable_adapter_keeps_weights_bit_identical_under_every_rule(rule_case):
    base, model, ids = rule_case
    expected = _run(base, ids)
    for merged in (False, True):
        if merged:
            vblora.merge(model)
        before = _weights(model)
        for _ in range(3):  # repeated use must not drift
            with vblora.disable_adapter(model):
                torch.testing.assert_close(_run(model, ids), expected, rtol=0, atol=1e-5 if merged else 0)
        for n, p in model.named_parameters():
            assert torch.equal(p, before[n]), n


def test_save_load_reproduces_outputs_under_every_rule(rule_case, tmp_path):
    base, model, ids = rule_case
    vblora.save_adapter(model, tmp_path)  # saved in either mode: the stored rule
    loaded = vblora.load_adapter(copy.deepcopy(base), tmp_path)
    model.eval()
    torch.testing.assert_close(_run(loaded, ids), _run(model, ids), rtol=1e-5, atol=1e-5)
    vblora.merge(model.train())  # a merge made in training mode gives the same model as eval
    torch.testing.assert_close(_run(model.eval(), ids), _run(loaded, ids), rtol=1e-5, atol=1e-5)


# -- Tied-LoRA (the Table 1 baseline), where the checks apply ----------------------------------------------------
# It has no merge / disable of its own (a training baseline only); what applies: only its parameters train, its update
# is zero at init (B = 0, unlike VB-LoRA's), and saving the trained tensors then loading them reproduces the outputs.
def test_tied_lora_where_the_shared_checks_apply():
    from vblora.storage.checkpoint import trainable_state
    from vblora.train.tied_lora import add_tied_lora

    base, ids = tiny_llama().eval(), tokens(vocab=100)
    names = [n for n, m in base.named_modules() if n.endswith(("q_proj", "v_proj"))]
    model = add_tied_lora(copy.deepcopy(base), names, rank=4)
    torch.testing.assert_close(_run(model, ids), _run(base, ids), rtol=0, atol=0)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("tied_lora.") or n.endswith((".u", ".v")) for n in trainable), trainable
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    assert not torch.allclose(_run(model, ids), _run(base, ids))
    state = trainable_state(model)
    again = add_tied_lora(copy.deepcopy(base), names, rank=4)
    params = dict(again.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t)
    torch.testing.assert_close(_run(again, ids), _run(model, ids), rtol=0, atol=0)
