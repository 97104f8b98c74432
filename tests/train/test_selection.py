"""Selection recording: shapes, dtypes, interval, the Trainer callback, and reading it back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from _selection_run import batches, recorded_run, tiny_classifier

import vblora
from vblora.train.selection import SelectionCallback, SelectionRecorder, load_selection, name_in_layer, record_selection


def test_name_in_layer_strips_the_layer_prefix():
    assert name_in_layer("roberta.encoder.layer.3.attention.self.query") == "attention.self.query"
    assert name_in_layer("transformer.h.11.mlp.c_fc") == "mlp.c_fc"
    assert name_in_layer("classifier") == "classifier"


def test_snapshot_is_compact_and_matches_the_bank():
    model = tiny_classifier()
    snap = record_selection(model, 7)
    bank = vblora.get_bank(model)
    assert snap["step"] == 7
    assert snap["indices"].dtype == np.uint8 and snap["weights"].dtype == np.float16
    assert snap["indices"].shape == snap["weights"].shape == (bank.num_subvectors, 2)
    idx, w = bank.topk_selection()
    np.testing.assert_array_equal(snap["indices"], idx.numpy())
    np.testing.assert_allclose(snap["weights"], w.numpy(), atol=1e-3)
    np.testing.assert_allclose(snap["weights"].astype(np.float32).sum(-1), 1.0, atol=2e-3)


def test_uint16_indices_for_banks_over_256():
    model = tiny_classifier()
    vblora.unload(model, merge=False)
    model = vblora.add_vblora(
        model, vblora.VBLoRAConfig(target_modules=["query"], rank=2, num_vectors=300, vector_length=32)
    )
    assert record_selection(model, 0)["indices"].dtype == np.uint16


def test_recorder_interval_files_and_metadata(tmp_path):
    model, _ = recorded_run(tmp_path, steps=10, every=3)
    sel = load_selection(tmp_path)
    n = vblora.get_bank(model).num_subvectors
    np.testing.assert_array_equal(sel.steps, [0, 3, 6, 9, 10])
    assert sel.indices.shape == sel.weights.shape == (5, n, 2)
    with np.load(tmp_path / "selection.npz") as z:  # stored compactly
        assert z["indices"].dtype == np.uint8 and z["weights"].dtype == np.float16
        assert z["bank_first"].shape == z["bank_last"].shape == (24, 32)
    meta = json.loads((tmp_path / "selection.json").read_text())
    assert meta["records"] == 5 and meta["every"] == 3 and meta["num_subvectors"] == n and meta["topk"] == 2
    # every sub-vector is described: layer, module, A/B, position in the matrix
    bank = vblora.get_bank(model)
    for i, entry in enumerate(bank.layout.entries):
        name, slot = entry.name, entry.slot
        a = slice(slot.a_start, slot.a_start + slot.a_count)
        b = slice(slot.b_start, slot.b_start + slot.b_count)
        assert (sel.module[a] == i).all() and (sel.matrix[a] == 0).all() and (sel.matrix[b] == 1).all()
        assert list(sel.position[b]) == list(range(slot.b_count))
        layer = int(name.split("layer.")[1].split(".")[0]) if "layer." in name else -1  # classifier.dense: -1
        assert (sel.layer[a] == layer).all()
    assert set(sel.module_types) >= {"attention.self.query", "attention.self.value", "intermediate.dense"}
    # the last record is the model's current selection; training changed some selections
    np.testing.assert_array_equal(sel.indices[-1], bank.topk_selection()[0].numpy())
    assert sel.churn().shape == (4,) and sel.churn().max() > 0
    assert sel.usage().sum() == n * 2
    np.testing.assert_allclose(sel.weight_sums().sum(), n, rtol=1e-3)
    assert sel.composed().shape == (n, 32)


def test_recorder_rejects_bad_interval_and_skips_repeats(tmp_path):
    with pytest.raises(ValueError):
        SelectionRecorder(tmp_path, every=0)
    model = tiny_classifier()
    rec = SelectionRecorder(tmp_path, every=2)
    assert rec.maybe_record(model, 0) and not rec.maybe_record(model, 0) and not rec.maybe_record(model, 1)
    rec.record(model, 0)
    assert len(rec.snapshots) == 1


def test_load_without_recording_says_how(tmp_path):
    with pytest.raises(FileNotFoundError, match="selection recording"):
        load_selection(tmp_path)


def test_trainer_callback_records_every_interval(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_classifier()
    data = [{"input_ids": ids[i], "labels": labels[i]} for ids, labels in batches(3) for i in range(len(ids))]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=5,
        learning_rate=0.1,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        use_cpu=True,
        disable_tqdm=True,
    )
    cb = SelectionCallback(every=2)
    Trainer(model=model, args=args, train_dataset=data, callbacks=[cb]).train()
    sel = load_selection(tmp_path)
    np.testing.assert_array_equal(sel.steps, [0, 2, 4, 5])
    assert sel.indices.shape[1:] == (vblora.get_bank(model).num_subvectors, 2)
    torch.testing.assert_close(torch.from_numpy(sel.indices[-1]), vblora.get_bank(model).topk_selection()[0])
