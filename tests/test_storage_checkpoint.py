"""Training checkpoints: save, resume and get the same trajectory; loaded with weights_only=True."""

from __future__ import annotations

import copy

import pytest
import torch

import vblora
from vblora.errors import AdapterFormatError
from vblora.storage.checkpoint import load_checkpoint, save_checkpoint

try:  # tests/ may or may not be a package
    from _storage_models import inputs, tiny_base, tiny_config
except ImportError:
    from tests._storage_models import inputs, tiny_base, tiny_config


def make(base):
    model = vblora.add_vblora(copy.deepcopy(base), tiny_config(modules_to_save=["score"]))
    opt = torch.optim.AdamW(vblora.parameter_groups(model))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.9)
    return model.train(), opt, sched


def step(model, opt, sched, seed):
    loss = model(input_ids=inputs(seed)).logits.square().mean()
    loss.backward()
    opt.step()
    sched.step()
    opt.zero_grad()


def test_resume_reproduces_training(tmp_path):
    import transformers

    base = transformers.LlamaForSequenceClassification(tiny_base("llama").config)
    base.config.pad_token_id = 0
    a, opt_a, sched_a = make(base)
    for s in range(2):
        step(a, opt_a, sched_a, s)
    path = save_checkpoint(a, tmp_path, opt_a, sched_a, step=2, extra={"note": "mid-run"})
    torch.load(path, weights_only=True)  # plain tensors and containers only
    for s in range(2, 4):
        step(a, opt_a, sched_a, s)

    b, opt_b, sched_b = make(base)
    state = load_checkpoint(b, tmp_path, opt_b, sched_b)
    assert state == {"step": 2, "extra": {"note": "mid-run"}}
    for s in range(2, 4):
        step(b, opt_b, sched_b, s)
    bank_a, bank_b = vblora.get_bank(a), vblora.get_bank(b)
    assert torch.allclose(bank_a.logits, bank_b.logits, atol=1e-6)
    assert torch.allclose(bank_a.bank, bank_b.bank, atol=1e-6)
    assert torch.allclose(a.score.trained.weight, b.score.trained.weight, atol=1e-6)


def test_bad_checkpoints_raise_format_error(tmp_path):
    model = vblora.add_vblora(tiny_base("llama"), tiny_config())
    path = save_checkpoint(model, tmp_path)
    other = vblora.add_vblora(tiny_base("llama"), tiny_config(rank=3))
    with pytest.raises(AdapterFormatError, match="rank"):
        load_checkpoint(other, path)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(AdapterFormatError, match="not a loadable checkpoint"):
        load_checkpoint(model, path)

    class Evil:
        def __reduce__(self):
            return (print, ("ran code",))

    torch.save({"format": "vblora-checkpoint", "evil": Evil()}, path)
    with pytest.raises(AdapterFormatError, match="not a loadable checkpoint"):
        load_checkpoint(model, path)
