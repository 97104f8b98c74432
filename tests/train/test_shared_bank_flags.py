"""`vblora train --bank PATH --freeze-bank --record-selection-every N` and the selection-rule flags."""

import json

import torch
from _train_helpers import run_overrides

import vblora
from vblora.storage import read_bank
from vblora.train.config import build_config
from vblora.train.pipeline import train


def test_frozen_shared_bank_task_stores_only_indices_and_weights(tiny_bert, cls_files, tmp_path):
    task1 = tmp_path / "task1"
    train(build_config(None, run_overrides(tiny_bert, cls_files, task1, method="vblora")), log=lambda *a: None)
    bank1 = vblora.load_adapter(_base(tiny_bert), task1 / "adapter").vblora_bank.bank.detach().clone()

    task2 = tmp_path / "task2"
    res = train(
        build_config(
            None,
            run_overrides(
                tiny_bert,
                cls_files,
                task2,
                method="vblora",
                bank=str(task1),
                freeze_bank=True,
                record_selection_every=2,
            ),
        ),
        log=lambda *a: None,
    )
    # the bank did not train, the adapter references it by hash and the bank file sits in the run directory
    shared, _ = read_bank(task2 / "bank.safetensors")
    assert torch.equal(shared, bank1)
    assert res["details"]["freeze_bank"] and res["details"]["bank_source"].endswith("adapter.safetensors")
    assert (
        res["trainable_parameters"] == res["details"]["trainable"]
        and res["trainable_parameters"] < json.loads((task1 / "results.json").read_text())["trainable_parameters"]
    )
    # the adapter holds no bank tensor: its bytes are task 1's less the bank's, give or take header bytes (the sha256
    # it references, safetensors' 8-byte alignment)
    from safetensors import safe_open

    with safe_open(str(task2 / "adapter" / "adapter.safetensors"), "pt") as f:
        assert "bank" not in set(f.keys())  # a safetensors handle, not a dict
    task1_bytes = json.loads((task1 / "results.json").read_text())["adapter_bytes"]
    assert res["adapter_bytes"] <= task1_bytes - 4 * bank1.numel() + 128
    loaded = vblora.load_adapter(_base(tiny_bert), task2 / "adapter", bank_path=task2)
    assert torch.equal(loaded.vblora_bank.bank, bank1)
    # selection recorded for `vblora plot`
    assert (task2 / "selection.npz").is_file() and (task2 / "selection.json").is_file()


def test_selection_rule_flags_reach_the_config(tiny_bert, cls_files, tmp_path):
    res = train(
        build_config(
            None,
            run_overrides(
                tiny_bert,
                cls_files,
                tmp_path / "gs",
                method="vblora",
                selection="gumbel",
                topk=1,
                eval_topk=2,
                epochs=1,
            ),
        ),
        log=lambda *a: None,
    )
    cfg = res["details"]["config"]
    assert cfg["selection"] == "gumbel" and cfg["eval_topk"] == 2
    # stored with k = eval_topk = 2: 2 uint8 indices (0.5 float) + 1 free weight per sub-vector
    assert res["stored_parameters"] == 16 * 32 + 224 * 1.5 + 64 * 2 + 2


def _base(path):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
