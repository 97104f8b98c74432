"""Every shipped recipe loads into a valid RunConfig; GLUE recipes apply Table 7's per-task settings."""

from __future__ import annotations

import pytest

from vblora.train.errors import SetupError
from vblora.train.options import METHODS, RunConfig, build_config, recipe_names


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_builds(name):
    ov = {"train_file": "t.jsonl", "validation_file": "v.jsonl"}
    if name.startswith("glue"):
        ov["glue_task"] = "rte"
    cfg = build_config(name, ov)
    assert isinstance(cfg, RunConfig) and cfg.method in METHODS and cfg.recipe == name
    assert isinstance(cfg.epochs, float) and isinstance(cfg.lr_bank, float)


def test_default_is_the_offline_minilm_recipe():
    cfg = build_config(None, {})
    assert (cfg.model, cfg.dataset, cfg.method, cfg.target_modules) == ("minilm", "vader-movie", "vblora", "all-linear")
    assert (cfg.max_length, cfg.batch_size, cfg.warmup_ratio) == (64, 32, 0.06)


def test_glue_per_task_settings_and_overrides():
    assert build_config("glue-roberta-base-qv", {"glue_task": "rte", "train_file": "x"}).epochs == 160
    cfg = build_config("glue-roberta-base-qv", {"glue_task": "stsb", "train_file": "x", "epochs": 3})
    assert cfg.epochs == 3 and cfg.task == "regression" and cfg.lr_head == 2e-2
    assert build_config("glue-roberta-large-all", {"glue_task": "sst2", "train_file": "x"}).max_length == 128
    with pytest.raises(SetupError, match="--glue-task"):
        build_config("glue-roberta-base-qv", {"train_file": "x"})


def test_bad_settings():
    with pytest.raises(SetupError, match="unknown recipe"):
        build_config("nope", {})
    with pytest.raises(SetupError, match="unknown method"):
        build_config(None, {"method": "dora"})
    with pytest.raises(SetupError, match="cannot read"):
        build_config(None, {"epochs": "many"})
    assert build_config(None, {"lr_bank": "1e-3"}).lr_bank == 1e-3  # YAML/CLI text -> float
