"""compose() against the paper's Algorithm 1, written out independently (float64), and the selection rules."""

import pytest
import torch

from vblora import VBLoRAConfig, compose
from vblora.bank import compose_eval, compose_training


def algorithm1_get_low_rank_matrix(logits, vector_bank, k):
    # Algorithm 1, with the missing unsqueeze(-1) on the top-k weights restored.
    topk_logits, topk_indices = logits.topk(k, dim=-1)
    topk_weights = torch.softmax(topk_logits, dim=-1)
    return (topk_weights.unsqueeze(-1) * vector_bank[topk_indices]).sum(-2)


def explicit_admixture(logits, bank, k):
    # Eq. 3.3 literally: w = softmax(TopK(sigma, k)) over all h entries (-inf outside the top-k), u = sum_s w_s a_s.
    out = torch.empty(logits.shape[0], bank.shape[1], dtype=logits.dtype)
    for n in range(logits.shape[0]):
        sigma = logits[n]
        kth = sigma.sort(descending=True).values[k - 1]
        masked = torch.where(sigma >= kth, sigma, torch.full_like(sigma, float("-inf")))
        w = torch.softmax(masked, dim=0)
        out[n] = sum(w[s] * bank[s] for s in range(bank.shape[0]))
    return out


@pytest.mark.parametrize("k", [1, 2, 3])
def test_compose_equals_algorithm1_float64(k):
    g = torch.Generator().manual_seed(k)
    logits = torch.randn(37, 11, generator=g, dtype=torch.float64)
    bank = torch.randn(11, 16, generator=g, dtype=torch.float64)
    ours = compose(logits, bank, k)
    assert ours.shape == (37, 16) and ours.dtype == torch.float64
    torch.testing.assert_close(ours, algorithm1_get_low_rank_matrix(logits, bank, k), rtol=0, atol=1e-12)
    torch.testing.assert_close(ours, explicit_admixture(logits, bank, k), rtol=0, atol=1e-12)


def test_algorithm1_matrix_layout_matches_layers():
    """Algorithm 1's A (r, d) and B (d, r) from per-module logits equal the layer's views of the flat composition."""
    from torch import nn

    from vblora import add_vblora, get_bank

    d, b, r, h = 64, 16, 3, 7
    model = nn.Sequential(nn.Linear(d, d))
    model = add_vblora(model, VBLoRAConfig(target_modules=["0"], rank=r, num_vectors=h, vector_length=b))
    bank = get_bank(model)
    layer = model[0]
    with torch.no_grad():
        logits, vb = bank.logits.double(), bank.bank.double()
        sub = compose(logits, vb, 2)  # (N, b), float64
    s = layer.slot
    # Algorithm 1: logits_A of shape (d/b, r, h); ours are stored (r, d/b, h) like HF PEFT.
    logits_A = logits[s.a_start : s.a_start + s.a_count].view(r, d // b, h).transpose(0, 1)
    logits_B = logits[s.b_start : s.b_start + s.b_count].view(d // b, r, h)
    A = algorithm1_get_low_rank_matrix(logits_A, vb, 2).transpose(0, 1).reshape(r, -1)
    B = algorithm1_get_low_rank_matrix(logits_B, vb, 2).transpose(1, 2).reshape(-1, r)
    A_ours, B_ours = bank.layout.factors(sub, layer.entry)
    torch.testing.assert_close(A_ours, A, rtol=0, atol=1e-12)
    torch.testing.assert_close(B_ours, B, rtol=0, atol=1e-12)


def test_selection_rules_shapes_and_semantics():
    g = torch.Generator().manual_seed(0)
    logits, bank = torch.randn(20, 8, generator=g), torch.randn(8, 4, generator=g)
    # select-all is the full softmax mixture
    cfg_all = VBLoRAConfig(num_vectors=8, vector_length=4, selection="all")
    torch.testing.assert_close(compose_training(logits, bank, cfg_all), logits.softmax(-1) @ bank)
    torch.testing.assert_close(compose_eval(logits, bank, cfg_all), compose(logits, bank, 8))
    assert cfg_all.stored_topk == 8
    # noisy top-k differs in training, evaluates as plain top-k
    cfg_noisy = VBLoRAConfig(num_vectors=8, vector_length=4, selection="noisy_topk", topk=2, noise_std=1.0)
    assert not torch.allclose(compose_training(logits, bank, cfg_noisy), compose(logits, bank, 2))
    torch.testing.assert_close(compose_eval(logits, bank, cfg_noisy), compose(logits, bank, 2))
    # straight-through Gumbel: forward is exactly one bank row per sub-vector
    cfg_st = VBLoRAConfig(num_vectors=8, vector_length=4, selection="st_gumbel", topk=1)
    out = compose_training(logits, bank, cfg_st)
    dist = torch.cdist(out, bank)
    assert torch.all(dist.min(dim=1).values < 1e-5)
    # Gumbel evaluated with top-1 / top-2 softmax (Table 5)
    cfg_gs = VBLoRAConfig(num_vectors=8, vector_length=4, selection="gumbel", topk=1, eval_topk=2)
    torch.testing.assert_close(compose_eval(logits, bank, cfg_gs), compose(logits, bank, 2))
    soft = compose_training(logits, bank, cfg_gs)
    assert soft.shape == (20, 4) and torch.isfinite(soft).all()


def test_compose_selected_gradients_and_what_it_keeps():
    """The composition's own backward equals plain autograd's (gradcheck in float64), and what it keeps for the
    backward pass is its inputs only: no `(N, k, b)` gathered rows."""
    import torch.nn.functional as F

    from vblora.bank import compose_selected

    g = torch.Generator().manual_seed(0)
    n, k, h, b = 40, 3, 12, 8
    indices = torch.randint(0, h, (n, k), generator=g)
    weights = torch.randn(n, k, dtype=torch.float64, generator=g, requires_grad=True)
    bank = torch.randn(h, b, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, v: compose_selected(indices, w, v), (weights, bank))
    plain = (weights.unsqueeze(-1) * F.embedding(indices, bank)).sum(dim=1)
    ours = compose_selected(indices, weights, bank)
    grad = torch.randn(n, b, dtype=torch.float64, generator=g)
    for a, c in zip(
        torch.autograd.grad(plain, (weights, bank), grad), torch.autograd.grad(ours, (weights, bank), grad), strict=True
    ):
        torch.testing.assert_close(a, c, rtol=0, atol=1e-12)

    def kept_elements(fn) -> int:
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t.numel()) or t, lambda t: t):
            fn()
        return sum(kept)

    ours_kept = kept_elements(lambda: compose_selected(indices, weights, bank))
    plain_kept = kept_elements(lambda: (weights.unsqueeze(-1) * F.embedding(indices, bank)).sum(dim=1))
    assert ours_kept == 2 * n * k + h * b  # indices, weights, bank
    assert plain_kept >= n * k * b  # what plain autograd keeps: the gathered rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_compose_selected_without_gradients_gives_the_same_bits(dtype, k):
    """Without gradients (export, merge, serving), top-2 takes a row gather per choice: the same bits as the
    gathered block's sum, across mixed dtypes and with -0.0; training keeps the autograd function."""
    import torch.nn.functional as F

    from vblora.bank import compose_selected

    g = torch.Generator().manual_seed(k)
    n, h, b = 3000, 256, 48
    indices = torch.randint(0, h, (n, k), generator=g)
    weights = torch.rand(n, k, generator=g).softmax(dim=1)
    bank = torch.randn(h, b, generator=g).to(dtype)
    bank[0] = -0.0
    indices[:16] = 0  # rows made of -0.0 only: -0.0 + -0.0 is +0.0 in the block's sum, which starts from +0.0
    weights[:8, 0] = 0.0  # and zero weights
    block = (weights.unsqueeze(-1) * F.embedding(indices, bank)).sum(dim=1)
    with torch.no_grad():
        rows = compose_selected(indices, weights, bank)
    assert rows.dtype == block.dtype and torch.equal(rows.view(torch.uint8), block.view(torch.uint8))
    bank.requires_grad_(True)
    assert compose_selected(indices, weights, bank).grad_fn is not None  # training keeps the autograd function
