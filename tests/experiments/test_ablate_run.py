"""Ablation settings and the recorder end to end through the pipeline on a tiny saved BERT: selection rules, extra
eval top-k, a frozen given bank with a referenced adapter, `SelectionCallback`, and `vblora ablate` ==
`vblora train`."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch

WORDS = ["good", "great", "nice", "bad", "awful", "poor", "the", "movie", "was", "very", "plot", "it"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny")
    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tok = BertTokenizerFast(
        tokenizer_object=tk,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    BertForSequenceClassification(cfg).save_pretrained(str(d / "model"))
    tok.save_pretrained(str(d / "model"))
    rng = random.Random(0)
    files = {}
    for split, n in (("train", 48), ("validation", 16), ("test", 16)):
        rows = []
        for i in range(n):
            words = [*rng.sample(WORDS[6:], 3), rng.choice(WORDS[:3] if i % 2 else WORDS[3:6])]
            rows.append(json.dumps({"text": " ".join(words), "label": i % 2}))
        (d / f"{split}.jsonl").write_text("\n".join(rows) + "\n")
        files[f"{split}_file"] = str(d / f"{split}.jsonl")
    overrides = {
        "model": str(d / "model"),
        **files,
        "dataset": "none",
        "device": "cpu",
        "epochs": 1,
        "batch_size": 8,
        "eval_batch_size": 16,
        "vector_length": 32,
        "num_vectors": 16,
        "max_length": 16,
        "lr_head": 1e-2,
    }
    return d, overrides


def test_gumbel_eval_topk_and_recording(setup, tmp_path):
    from vblora.train.config import build_config
    from vblora.train.pipeline import train
    from vblora.train.selection import load_selection

    _, ov = setup
    r = train(
        build_config(
            None,
            {
                **ov,
                "selection": "gumbel",
                "temperature": 1 / 3,
                "extra_eval_topk": [1, 2],
                "record_selection_every": 2,
                "output": str(tmp_path),
            },
        ),
        log=lambda *_: None,
    )
    assert set(r["eval_topk"]) == {"1", "2"} and 0 <= r["eval_topk"]["1"]["test"]["accuracy"] <= 1
    assert r["eval_topk"]["1"]["stored_parameters"] < r["eval_topk"]["2"]["stored_parameters"]
    assert r["config"]["selection"] == "gumbel" and r["details"]["config"]["eval_topk"] is None
    sel = load_selection(tmp_path)
    np.testing.assert_array_equal(sel.steps, [0, 2, 4, 6])  # 48 examples / batch 8 = 6 steps
    assert json.loads((tmp_path / "results.json").read_text())["seed"] == 0


def test_frozen_given_bank_trains_only_logits_and_references_the_bank(setup, tmp_path):
    from safetensors import safe_open

    from vblora import storage
    from vblora.train.config import build_config
    from vblora.train.pipeline import train

    _, ov = setup
    bank = torch.randn(16, 32) * 0.1
    torch.save(bank, tmp_path / "bank.pt")
    r = train(
        build_config(
            None, {**ov, "bank": str(tmp_path / "bank.pt"), "freeze_bank": True, "output": str(tmp_path / "run")}
        ),
        log=lambda *_: None,
    )
    assert r["trainable_parameters"] == r["details"]["subvectors"] * 16 + 64 * 2 + 2  # logits + head
    with safe_open(str(tmp_path / "run" / "adapter" / "adapter.safetensors"), "pt") as f:
        assert "bank" not in set(
            f.keys()
        )  # a safetensors handle, not a dict; the bank is referenced, not copied: it sits beside the adapter once
    torch.testing.assert_close(storage.read_bank(tmp_path / "run" / "bank.safetensors")[0], bank)  # not trained


def test_selection_callback_through_the_train_pipeline(setup, tmp_path):
    from vblora.train import pipeline
    from vblora.train.config import build_config
    from vblora.train.selection import SelectionCallback, load_selection

    _, ov = setup
    cfg = build_config(None, {**ov, "output": str(tmp_path), "overwrite": True})
    pipeline.train(cfg, log=lambda *_: None, callbacks=[SelectionCallback(every=3, run_dir=tmp_path)])
    sel = load_selection(tmp_path)
    np.testing.assert_array_equal(sel.steps, [0, 3, 6])


def test_ablate_and_train_give_the_same_test_metric(setup, tmp_path, capsys):
    """One variant, one seed of `vblora ablate` is exactly the `vblora train` run with the same settings."""
    from vblora.cli import main

    _, ov = setup
    settings = {k: v for k, v in ov.items() if k not in ("epochs", "batch_size")}
    assert (
        main(
            [
                "ablate",
                "selection",
                "--variants",
                "top-2",
                "--seeds",
                "0",
                "--out",
                str(tmp_path / "ab"),
                "--max-train-samples",
                "40",
                "--max-eval-samples",
                "12",
                "--epochs",
                "2",
                "--batch-size",
                "8",
                "--set",
                *[f"{k}={v}" for k, v in settings.items()],
            ]
        )
        == 0
    )
    argv = [
        "train",
        "--output",
        str(tmp_path / "tr"),
        "--max-train-samples",
        "40",
        "--max-eval-samples",
        "12",
        "--max-test-samples",
        "12",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--selection",
        "topk",
        "--topk",
        "2",
    ]
    for k, v in settings.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main(argv) == 0
    ablated = json.loads((tmp_path / "ab" / "top-2-seed0" / "results.json").read_text())
    trained = json.loads((tmp_path / "tr" / "results.json").read_text())
    assert ablated["metrics"]["test"]["accuracy"] == trained["metrics"]["test"]["accuracy"]
    assert ablated["metrics"] == trained["metrics"] and ablated["best_epoch"] == trained["best_epoch"]
    assert ablated["data"]["train"] == 40 and ablated["data"]["test"] == 12
    row = json.loads((tmp_path / "ab" / "ablation.json").read_text())["rows"][0]
    assert row["values"] == [trained["metrics"]["test"]["accuracy"]]
