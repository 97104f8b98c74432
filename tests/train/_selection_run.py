"""A tiny recorded run for the selection and plot tests: a 3-layer RoBERTa-like classifier, trained a few steps."""

from __future__ import annotations

import torch

import vblora
from vblora.train.selection import SelectionRecorder


def tiny_classifier(layers: int = 3):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    cfg = RobertaConfig(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=64,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    torch.manual_seed(0)
    model = RobertaForSequenceClassification(cfg)
    config = vblora.VBLoRAConfig(
        target_modules=["query", "value", "dense"],
        rank=2,
        num_vectors=24,
        vector_length=32,
        topk=2,
        modules_to_save=["classifier"],
    )
    return vblora.add_vblora(model, config)


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        ids = torch.randint(0, 100, (8, 12), generator=g)
        yield ids, (ids[:, 0] % 2)


def recorded_run(run_dir, steps: int = 12, every: int = 3):
    """Train `steps` steps with a plain loop, recording every `every` steps; returns (model, recorder)."""
    model = tiny_classifier()
    opt = torch.optim.AdamW(vblora.parameter_groups(model, lr_bank=1e-2, lr_logits=0.5, lr_other=1e-2))
    rec = SelectionRecorder(run_dir, every=every)
    model.train()
    rec.record(model, 0)
    for step, (ids, labels) in enumerate(batches(steps), start=1):
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        rec.maybe_record(model, step)
    rec.record(model, steps)
    rec.save()
    return model, rec
