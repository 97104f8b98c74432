"""Mixed-adapter batches: each row (token) of a batch served through `AdapterStore.rows(...)` / `.tokens(...)`
equals that row run alone on a base model carrying its adapter the normal way (`vblora.load_adapter`), at fp32 within
1e-5; rows without an adapter equal the base model; greedy generation is identical token for token."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vblora
from tiny_models import tiny_gpt2, tiny_llama, tokens
from vblora.serve import AdapterStore
from vblora.serve.mixed import GATHER, LOOP

STRATEGIES = [None, GATHER, LOOP]  # the default choice, and each grouping forced


def save_random(base: nn.Module, path, config: vblora.VBLoRAConfig, **save) -> None:
    """An adapter of `config` on a copy of `base`, with a bank large enough that every update is visible."""
    model = vblora.add_vblora(copy.deepcopy(base), config)
    with torch.no_grad():
        vblora.get_bank(model).bank.normal_(0, 0.3)
        for p in model.parameters():
            if p.requires_grad and p is not vblora.get_bank(model).bank and p.dim() > 1 and p.shape[0] < 50:
                p.normal_(0, 1.0)  # heads: distinct per adapter
    vblora.save_adapter(model, path, **save)


LLAMA_ADAPTERS = {  # different targets, ranks, vector lengths, bank sizes and k
    "qv": vblora.VBLoRAConfig(target_modules=["q_proj", "v_proj"], rank=4, num_vectors=32, vector_length=32, seed=1),
    "all": vblora.VBLoRAConfig(target_modules="all-linear", rank=2, num_vectors=16, vector_length=16, seed=2),
    "o3": vblora.VBLoRAConfig(
        target_modules=["o_proj", "down_proj"], rank=3, num_vectors=8, vector_length=48, topk=3, seed=3
    ),
    "qv2": vblora.VBLoRAConfig(target_modules=["q_proj", "v_proj"], rank=4, num_vectors=32, vector_length=32, seed=4),
}


@pytest.fixture(scope="module")
def llama_setup(tmp_path_factory):
    torch.manual_seed(0)
    base = tiny_llama()
    d = tmp_path_factory.mktemp("llama-adapters")
    for name, cfg in LLAMA_ADAPTERS.items():
        save_random(base, d / f"{name}.safetensors", cfg)
    return base, d


def alone(base: nn.Module, d, name: str | None) -> nn.Module:
    model = copy.deepcopy(base)
    return vblora.load_adapter(model, d / f"{name}.safetensors") if name else model


def logits(model, ids, **kw) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, **kw).logits


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_rows_equal_each_row_alone(llama_setup, strategy):
    base, d = llama_setup
    served = copy.deepcopy(base)
    store = AdapterStore(served, d)
    names = ["qv", None, "all", "o3", "qv", "qv2", None, "all"]
    ids = tokens(len(names), 9)
    with store.rows([store.acquire(n) if n else None for n in names], strategy=strategy):
        out = logits(served, ids)
    plain = logits(base, ids)
    for i, name in enumerate(names):
        ref = logits(alone(base, d, name), ids[i : i + 1])
        assert torch.allclose(out[i : i + 1], ref, atol=1e-5, rtol=0), (i, name, (out[i] - ref).abs().max())
        if name:  # the adapter really changes this row
            assert (ref - plain[i : i + 1]).abs().max() > 1e-3


def test_no_adapter_is_exactly_the_base(llama_setup):
    base, d = llama_setup
    served = copy.deepcopy(base)
    store = AdapterStore(served, d)
    ids = tokens(3, 7)
    plain = logits(base, ids)
    assert torch.equal(logits(served, ids), plain)  # wrapped, outside any plan
    with store.rows([None, None, None]):
        assert torch.equal(logits(served, ids), plain)
    handle = store.acquire("qv")
    with store.rows([None, handle, None]):
        out = logits(served, ids)
    # row 0 has no adapter: its layers get exactly the base output (other rows do not leak into it)
    with store.rows([None, None, None]):
        assert torch.equal(out[0], logits(served, ids)[0])


def test_rows_count_must_match(llama_setup):
    base, d = llama_setup
    served = copy.deepcopy(base)
    store = AdapterStore(served, d)
    with store.rows([store.acquire("qv"), None, None]), pytest.raises(vblora.VBLoRAError, match="3 adapter entries"):
        logits(served, tokens(2, 5))


def test_greedy_generate_identical_and_sampling_runs(llama_setup):
    base, d = llama_setup
    served = copy.deepcopy(base)
    store = AdapterStore(served, d)
    names = ["all", None, "qv", "o3"]
    ids = tokens(len(names), 6)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    handles = [store.acquire(n) if n else None for n in names]
    with torch.no_grad(), store.rows(handles):
        mixed = served.generate(ids, **kw)
    for i, name in enumerate(names):
        with torch.no_grad():
            ref = alone(base, d, name).generate(
                ids[i : i + 1], **{**kw, "attention_mask": torch.ones_like(ids[i : i + 1])}
            )
        assert torch.equal(mixed[i : i + 1], ref), (name, mixed[i], ref)
    sampled = []
    for _ in range(2):
        torch.manual_seed(7)
        with torch.no_grad(), store.rows(handles):
            sampled.append(served.generate(ids, **{**kw, "do_sample": True, "top_k": 20}))
    assert sampled[0].shape == (len(names), ids.shape[1] + 8)
    assert torch.equal(sampled[0], sampled[1])
    # num_return_sequences expands each row into consecutive rows, each with its request's adapter
    torch.manual_seed(7)
    with torch.no_grad(), store.rows(handles):
        many = served.generate(ids, **{**kw, "do_sample": True, "num_return_sequences": 2})
    assert many.shape[0] == 2 * len(names)


def test_tokens_mode_on_a_packed_pointwise_model(tmp_path):
    """Packed (1, T, d) input with one adapter per token: a per-token model, so each token equals itself alone."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(40, 64), nn.Tanh(), nn.Linear(64, 40)).eval()
    cfgs = {
        "a": vblora.VBLoRAConfig(target_modules=["0", "2"], rank=4, num_vectors=16, vector_length=16, seed=1),
        "b": vblora.VBLoRAConfig(target_modules=["2"], rank=2, num_vectors=8, vector_length=32, seed=2),
    }
    for name, cfg in cfgs.items():
        save_random(base, tmp_path / f"{name}.safetensors", cfg)
    served = copy.deepcopy(base)
    store = AdapterStore(served, tmp_path)
    a, b = store.acquire("a"), store.acquire("b")
    plan = [a, a, a, None, b, b, a, None, b, a, a, a, a, a, b]
    x = torch.randn(1, len(plan), 40)
    refs = {n: alone(base, tmp_path, n) for n in ("a", "b", None)}
    for strategy in STRATEGIES:
        with torch.no_grad(), store.tokens(plan, strategy=strategy):
            out = served(x)
        for t, h in enumerate(plan):
            with torch.no_grad():
                ref = refs[h.name if h else None](x[:, t : t + 1])
            assert torch.allclose(out[:, t : t + 1], ref, atol=1e-5, rtol=0), (strategy, t)
    with store.tokens(plan), pytest.raises(vblora.VBLoRAError, match="batch size 1"):
        served(torch.randn(2, len(plan), 40))


def test_gpt2_conv1d_and_embedding_targets(tmp_path):
    torch.manual_seed(0)
    base = tiny_gpt2()
    cfgs = {
        "attn": vblora.VBLoRAConfig(
            target_modules=["c_attn", "c_proj"], rank=4, num_vectors=16, vector_length=32, seed=1
        ),
        "emb": vblora.VBLoRAConfig(target_modules=["wte", "c_fc"], rank=2, num_vectors=16, vector_length=20, seed=2),
    }
    for name, cfg in cfgs.items():
        save_random(base, tmp_path / f"{name}.safetensors", cfg)
    served = copy.deepcopy(base)
    store = AdapterStore(served, tmp_path)
    names = ["emb", "attn", None, "emb", "attn"]
    ids = tokens(len(names), 6)
    for strategy in STRATEGIES:
        with store.rows([store.acquire(n) if n else None for n in names], strategy=strategy):
            out = logits(served, ids)
        for i, name in enumerate(names):
            ref = logits(alone(base, tmp_path, name), ids[i : i + 1])
            assert torch.allclose(out[i : i + 1], ref, atol=1e-5, rtol=0), (strategy, i, name)


def tiny_llama_classifier(num_labels: int = 3):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    cfg = LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        num_labels=num_labels,
        pad_token_id=0,
    )
    return LlamaForSequenceClassification(cfg).eval()


def test_classification_heads_per_row(tmp_path):
    torch.manual_seed(0)
    base = tiny_llama_classifier()
    for name, seed in (("h1", 1), ("h2", 2)):
        cfg = vblora.VBLoRAConfig(
            target_modules=["q_proj", "v_proj"],
            rank=4,
            num_vectors=16,
            vector_length=32,
            modules_to_save=["score"],
            seed=seed,
        )
        save_random(base, tmp_path / f"{name}.safetensors", cfg)
    served = copy.deepcopy(base)
    store = AdapterStore(served, tmp_path)
    h1, h2 = store.acquire("h1"), store.acquire("h2")
    assert h1.info["num_labels"] == 3 and h1.info["task_type"] == "SEQ_CLS"
    names = ["h1", None, "h2", "h1"]
    ids = tokens(len(names), 7).clamp(min=1)  # no pad token: the last position is pooled
    with store.rows([h1, None, h2, h1]):
        out = logits(served, ids)
    assert out.shape == (4, 3)
    plain = logits(base, ids)
    for i, name in enumerate(names):
        ref = logits(alone(base, tmp_path, name), ids[i : i + 1])
        assert torch.allclose(out[i : i + 1], ref, atol=1e-5, rtol=0), (i, name)
        if name:
            assert (ref - plain[i : i + 1]).abs().max() > 1e-2
    assert not torch.allclose(out[0], out[2], atol=1e-3)  # the two heads differ


def test_plan_reused_for_the_same_adapters_and_copies_are_inert(llama_setup):
    """Decode steps with the same rows reuse one plan (its grouping); a new order gets a new one; outputs agree
    with a fresh store. A deep copy of the served model is a plain base model (no plan reaches it)."""
    base, d = llama_setup
    served = copy.deepcopy(base)
    store = AdapterStore(served, d)
    handles = [store.acquire(n) for n in ("qv", "all", "qv2")]
    ids = tokens(3, 5)
    with store.rows(handles) as first:
        out1 = logits(served, ids)
    with store.rows(list(handles)) as again:
        out2 = logits(served, ids)
    assert again is first and torch.equal(out1, out2)
    with store.rows(handles[::-1]) as other:
        out3 = logits(served, ids.flip(0))
    assert other is not first and torch.allclose(out3.flip(0), out1, atol=1e-5, rtol=0)
    twin = copy.deepcopy(served)
    with store.rows(handles):
        assert torch.equal(logits(twin, ids), logits(base, ids))


def test_head_called_by_keyword_passes_through():
    """A wrapped head is called as the module it wraps is called: by keyword too. Units without a trained copy of
    it get the base output; a batch that needs its copies, which cannot tell units apart without a positional
    tensor, fails alone with a clear error (before: TypeError for every batch, adapters or not)."""
    from vblora.serve.mixed import MixedHead, Plan, Router

    class Unit:  # what a plan reads of a loaded adapter here: its heads
        def __init__(self, heads: dict) -> None:
            self.heads = heads

    class ByKeyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 2)

        def forward(self, *, hidden: torch.Tensor) -> torch.Tensor:
            return self.proj(hidden)

    router = Router()
    head = MixedHead(ByKeyword(), "head", router)
    x = torch.randn(3, 4)
    want = head.base(hidden=x)
    assert torch.equal(head(hidden=x), want)  # no plan
    other = Unit({})  # an adapter without this head
    with router.use(Plan([other, None, other], {other: {}})):
        assert torch.equal(head(hidden=x), want)
    carrier = Unit({"head": {k: v + 1 for k, v in head.base.state_dict().items()}})
    with (
        router.use(Plan([carrier, None, other], {carrier: {}, other: {}})),
        pytest.raises(vblora.VBLoRAError, match="head head was called without a tensor input"),
    ):
        head(hidden=x)
