"""The adapter under torch.compile, gradient checkpointing, autocast, eval caching and DDP (all on the CPU)."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vblora
from tiny_models import tiny_llama, tokens


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    """Plain blocks with layer indices, so "all-linear" adapts `layers.i.up/down` and leaves the head alone."""

    def __init__(self, d: int = 64, n: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(d) for _ in range(n))
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def adapted_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = vblora.VBLoRAConfig(
        target_modules="all-linear", num_vectors=8, vector_length=32, init_logits_std=0.5, init_bank_bound=0.5
    )
    return vblora.add_vblora(Net(), cfg)


def grads(model) -> tuple[torch.Tensor, torch.Tensor]:
    bank = vblora.get_bank(model)
    return bank.bank.grad.clone(), bank.logits.grad.clone()


# -- torch.compile ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_no_graph_break(mode):
    model = adapted_net()
    x = torch.randn(4, 64)
    model.train(mode == "train")
    with torch.set_grad_enabled(mode == "train"):
        explained = torch._dynamo.explain(model)(x)
    assert not explained.break_reasons
    # The root pre-hook (one composition for the whole model) is traced as its own frame; the forward, with every
    # adapted layer, is one graph that takes the composition as an input: one top-k per forward, not one per layer.
    assert explained.graph_count <= 2
    assert sum(g.code.count(".topk(") for g in explained.graphs) == 1


def test_compiled_matches_eager():
    model = adapted_net()
    x = torch.randn(4, 64)
    model.train()
    y = model(x)
    y.square().mean().backward()
    ref = grads(model)
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    yc = compiled(x)
    yc.square().mean().backward()
    torch.testing.assert_close(yc, y)
    for a, b in zip(grads(model), ref, strict=True):
        torch.testing.assert_close(a, b)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with torch._dynamo.config.patch(error_on_recompile=True):  # later steps reuse the compiled graphs
        for _ in range(2):
            opt.step()
            opt.zero_grad()
            compiled(x).square().mean().backward()
    opt.step()
    torch.testing.assert_close(compiled(x), model(x))  # compiled still follows the updated parameters


# -- gradient checkpointing ------------------------------------------------------------------------------------------
def _llama_grads(checkpointing: str | None) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    base = tiny_llama()
    model = vblora.add_vblora(
        base, vblora.VBLoRAConfig(target_modules="all-linear", num_vectors=8, vector_length=32, init_logits_std=0.5)
    )
    if checkpointing is not None:
        model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"}
        )
        model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
    model.train()
    ids = tokens(2, 8)
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return (loss.detach(), *grads(model))


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_gradient_checkpointing_same_grads(mode):
    ref = _llama_grads(None)
    got = _llama_grads(mode)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert ref[2].abs().sum() > 0


# -- autocast --------------------------------------------------------------------------------------------------------
def test_autocast_bf16_cpu():
    model = adapted_net()
    model.train()
    x = torch.randn(4, 64)
    y32 = model(x).detach()
    seen = []
    layer = next(iter(vblora.adapted_layers(model).values()))
    handle = layer.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    handle.remove()
    assert seen == [torch.bfloat16]  # the adapter path runs in the activation dtype
    y.float().square().mean().backward()
    bank = vblora.get_bank(model)
    assert bank.bank.dtype == bank.logits.dtype == torch.float32  # fp32 master bank and logits
    assert bank.logits.grad.dtype == torch.float32 and torch.isfinite(bank.logits.grad).all()
    torch.testing.assert_close(y.float(), y32, rtol=5e-2, atol=5e-2)


# -- caches ----------------------------------------------------------------------------------------------------------
def test_eval_cache_invalidated_by_optimizer_step():
    model = adapted_net()
    x = torch.randn(4, 64)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.eval()
    with torch.no_grad():
        y1 = model(x)
        assert torch.equal(model(x), y1)  # served from the cache
    model.train()
    model(x).square().mean().backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        y2 = model(x)
        vblora.get_bank(model)._inference = None  # a fresh composition gives the same output
        y3 = model(x)
    assert not torch.allclose(y1, y2)
    torch.testing.assert_close(y2, y3, rtol=0, atol=0)


def test_train_step_cache_not_reused_across_steps():
    model = adapted_net()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    x = torch.randn(4, 64)
    model.train()
    losses = []
    for _ in range(2):
        loss = model(x).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[1] < losses[0]
    fresh = adapted_net()
    fresh.load_state_dict(model.state_dict())
    y = model(x)  # the third step composes from the updated parameters, not the cached ones
    torch.testing.assert_close(y, fresh(x))
    assert torch.isfinite(y).all()


# -- DDP -------------------------------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, path: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = DDP(adapted_net())
        x, y = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)), torch.arange(8) % 3
        shard = slice(rank * 4, rank * 4 + 4)
        F.cross_entropy(model(x[shard]), y[shard]).backward()
        if rank == 0:
            torch.save(grads(model), path)
    finally:
        dist.destroy_process_group()


def test_ddp_two_gloo_processes_match_one(tmp_path):
    import torch.multiprocessing as mp

    path = str(tmp_path / "grads.pt")
    mp.spawn(_ddp_worker, args=(2, _free_port(), path), nprocs=2, join=True)
    ddp_bank, ddp_logits = torch.load(path)
    model = adapted_net()
    x, y = torch.randn(8, 64, generator=torch.Generator().manual_seed(3)), torch.arange(8) % 3
    F.cross_entropy(model(x), y).backward()  # the same global batch in one process
    bank, logits = grads(model)
    torch.testing.assert_close(ddp_bank, bank, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ddp_logits, logits, rtol=1e-4, atol=1e-6)
