"""A few steps of training lower the loss; the bank gets gradient only through selected rows."""

import torch
from torch import nn

import vblora
from tiny_models import tiny_roberta


def test_few_steps_lower_loss_on_tiny_task():
    torch.manual_seed(0)
    model = tiny_roberta(classifier=True)
    model = vblora.add_vblora(
        model,
        vblora.VBLoRAConfig(
            target_modules="all-linear", num_vectors=16, vector_length=32, modules_to_save=["classifier"]
        ),
    )
    ids = torch.randint(0, 100, (16, 8))
    labels = (ids[:, 0] > 50).long()  # learnable from the first token
    opt = torch.optim.AdamW(vblora.parameter_groups(model, lr_bank=1e-2, lr_logits=1e-1, lr_other=1e-2))
    model.train()
    losses = []
    for _ in range(30):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_bank_gradient_only_through_selected_rows():
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    model = vblora.add_vblora(
        model,
        vblora.VBLoRAConfig(target_modules=["0", "1"], num_vectors=64, vector_length=16, topk=2, init_logits_std=1.0),
    )
    bank = vblora.get_bank(model)
    model.train()
    model(torch.randn(4, 32)).pow(2).sum().backward()
    selected = torch.zeros(64, dtype=torch.bool)
    selected[bank.logits.topk(2, dim=-1).indices.flatten()] = True
    has_grad = bank.bank.grad.abs().sum(dim=1) > 0
    assert torch.equal(has_grad, selected)
    assert (~selected).any()  # some rows were not selected, so the check is not vacuous
    # logits get gradient only at their top-k entries
    mask = torch.zeros_like(bank.logits, dtype=torch.bool).scatter_(1, bank.logits.topk(2, dim=-1).indices, True)
    assert bank.logits.grad[~mask].abs().max() == 0 and bank.logits.grad[mask].abs().sum() > 0


def test_composed_once_per_forward():
    from vblora import bank as bank_module

    model = tiny_roberta()
    model = vblora.add_vblora(model, vblora.VBLoRAConfig(target_modules="all-linear", num_vectors=16, vector_length=32))
    calls = []
    real = bank_module.compose_training
    bank_module.compose_training = lambda *a: calls.append(1) or real(*a)
    try:
        model.train()
        model(input_ids=torch.randint(0, 100, (2, 8))).last_hidden_state.sum().backward()
    finally:
        bank_module.compose_training = real
    assert len(vblora.adapted_layers(model)) == 12 and len(calls) == 1


def test_eval_cache_reused_and_invalidated_by_update():
    model = nn.Sequential(nn.Linear(32, 32))
    model = vblora.add_vblora(model, vblora.VBLoRAConfig(target_modules=["0"], num_vectors=8, vector_length=16))
    bank = vblora.get_bank(model)
    model.eval()
    x = torch.randn(2, 32)
    with torch.no_grad():
        y1 = model(x)
        cached = bank._inference[1]
        model(x)
        assert bank._inference[1] is cached  # reused
        bank.bank.add_(0.5)  # an optimizer step bumps the version
        y2 = model(x)
    assert bank._inference[1] is not cached and not torch.allclose(y1, y2)


def test_composition_state_is_bounded_and_needs_no_manual_reset():
    """A submodule called directly in training keeps nothing; a config change is seen by the inference cache."""
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))
    model = vblora.add_vblora(
        model,
        vblora.VBLoRAConfig(target_modules=["0", "1"], num_vectors=8, vector_length=16, topk=2, init_logits_std=1.0),
    )
    bank = vblora.get_bank(model)
    x = torch.randn(2, 32)
    model.train()
    model(x).sum().backward()  # a root forward: one step, one composition
    for _ in range(20):  # direct calls of a submodule, outside any root forward
        model[0](x).sum().backward()
    assert len(bank._step.pieces) <= 1 and len(bank._step.fp32) <= 1
    model.eval()
    with torch.no_grad():
        y2 = model(x)
        bank.config = bank.config.replace(eval_topk=1)  # e.g. Table 5's "evaluate with top-1": no reset by hand
        y1 = model(x)
    assert not torch.allclose(y1, y2)
    with torch.no_grad():
        expected = model[1].base(model[0].base(x) + x @ model[0].lora_A().T @ model[0].lora_B().T)
        expected = expected + (model[0](x)) @ model[1].lora_A().T @ model[1].lora_B().T
    torch.testing.assert_close(y1, expected, rtol=1e-5, atol=1e-5)
