"""Loading a base model for training or prediction (train/models.py)."""

from __future__ import annotations

import transformers

from vblora.train.models import load_model


def test_a_classifier_with_a_new_head_loads_without_the_missing_keys_table(tmp_path, capfd):
    """The head is new on purpose (the adapter trains or brings it): transformers' LOAD REPORT table of MISSING
    classifier keys is not printed; the caller's logging verbosity is unchanged afterwards."""
    config = transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64
    )
    transformers.BertModel(config).save_pretrained(tmp_path)  # no classifier in the checkpoint
    before = transformers.logging.get_verbosity()
    model = load_model(str(tmp_path), None, "classification", num_labels=3)
    assert model.config.num_labels == 3
    captured = capfd.readouterr()
    assert "MISSING" not in captured.err + captured.out
    assert transformers.logging.get_verbosity() == before
