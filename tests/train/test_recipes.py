"""Every shipped recipe loads into a valid RunConfig; GLUE recipes apply Table 7's per-task settings; one set of
defaults (the default task's), shown by `vblora train --help`; flags and recipe keys cover every VBLoRAConfig field."""

from __future__ import annotations

import dataclasses
import re

import pytest

import vblora
from vblora.train.config import METHODS, RunConfig, build_config, coerce, recipe_names, settings
from vblora.train.errors import SetupError


@pytest.mark.parametrize("name", recipe_names())
def test_recipe_builds(name):
    ov = {"train_file": "t.jsonl", "validation_file": "v.jsonl"}
    if name.startswith("glue"):
        ov["glue_task"] = "rte"
    cfg = build_config(name, ov)
    assert isinstance(cfg, RunConfig) and cfg.method in METHODS and cfg.recipe == name
    assert isinstance(cfg.epochs, float) and isinstance(cfg.lr_bank, float)
    assert isinstance(cfg.vblora, vblora.VBLoRAConfig) and cfg.vblora.seed == cfg.seed


def test_default_is_the_offline_minilm_recipe():
    cfg = build_config(None, {})
    assert (cfg.model, cfg.dataset, cfg.method, cfg.vblora.target_modules) == \
        ("minilm", "vader-movie", "vblora", "all-linear")
    assert (cfg.max_length, cfg.batch_size, cfg.warmup_ratio) == (64, 32, 0.06)
    # one set of defaults: no recipe == the minilm-vader recipe == RunConfig() (what --help shows)
    shipped = build_config("minilm-vader", {}).to_dict()
    assert {**shipped, "recipe": None} == cfg.to_dict() == RunConfig().to_dict()


def test_glue_per_task_settings_and_overrides():
    assert build_config("glue-roberta-base-qv", {"glue_task": "rte", "train_file": "x"}).epochs == 160
    cfg = build_config("glue-roberta-base-qv", {"glue_task": "stsb", "train_file": "x", "epochs": 3})
    assert cfg.epochs == 3 and cfg.task == "regression" and cfg.lr_head == 2e-2
    assert build_config("glue-roberta-large-all", {"glue_task": "sst2", "train_file": "x"}).max_length == 128
    with pytest.raises(SetupError, match="--glue-task"):
        build_config("glue-roberta-base-qv", {"train_file": "x"})


def test_bad_settings(tmp_path):
    with pytest.raises(SetupError, match="unknown recipe"):
        build_config("nope", {})
    with pytest.raises(SetupError, match="unknown method"):
        build_config(None, {"method": "dora"})
    with pytest.raises(SetupError, match="cannot read"):
        build_config(None, {"epochs": "many"})
    assert build_config(None, {"lr_bank": "1e-3"}).lr_bank == 1e-3  # YAML/CLI text -> float
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: 8\nbank_size: 90\n")
    with pytest.raises(SetupError, match=r"unknown setting\(s\) \[.bank_size.\].*Known: .*num_vectors"):
        build_config(str(bad), {"train_file": "x"})
    with pytest.raises(vblora.errors.ConfigError, match="topk"):  # the method's own validation
        build_config(None, {"topk": 100})


def test_keys_cover_every_vblora_field_and_reach_the_nested_config():
    names = set(settings())
    for f in dataclasses.fields(vblora.VBLoRAConfig):
        assert f.name in names, f"VBLoRAConfig.{f.name} has no flag / recipe key"
    values = {"selection": "gumbel", "noise_std": "0.5", "temperature": "0.25", "eval_topk": "1",
              "modules_to_save": ["classifier"], "layers": ["0"], "init_bank_bound": "0.1", "init_logits_std": "0.2",
              "dropout": "0.1", "rank": "2", "num_vectors": "16", "vector_length": "32", "topk": "3",
              "target_modules": ["query", "value"], "seed": "7"}
    cfg = build_config(None, values).vblora
    assert cfg == vblora.VBLoRAConfig(selection="gumbel", noise_std=0.5, temperature=0.25, eval_topk=1,
                                      modules_to_save=("classifier",), layers=(0,), init_bank_bound=0.1,
                                      init_logits_std=0.2, dropout=0.1, rank=2, num_vectors=16, vector_length=32,
                                      topk=3, target_modules=("query", "value"), seed=7)


def _help_defaults(text: str) -> dict[str, str]:
    """--flag -> the text of '(default: ...)' in its help, read from argparse's wrapped output."""
    out = {}
    for chunk in re.split(r"\n(?=  -)", text.split("options:", 1)[1]):
        chunk = " ".join(chunk.split())
        m = re.match(r"--([\w-]+)", chunk)
        d = re.search(r".*\(default: (.*)\)$", chunk)  # the last one: help texts may say "(default: ...)" too
        if m and d:
            out[m.group(1).replace("-", "_")] = d.group(1)
    return out


def test_train_help_shows_every_default(capsys, monkeypatch):
    from vblora.cli import main

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: argparse breaks lines at hyphens
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    shown = _help_defaults(capsys.readouterr().out)
    defaults = RunConfig().to_dict()
    assert set(shown) == {k for k in settings() if k != "extra"}
    for name, text in shown.items():
        value = coerce(name, text.split() if defaults[name] and isinstance(defaults[name], list) else text)
        if isinstance(defaults[name], float):
            assert value == pytest.approx(defaults[name], rel=1e-5), name
        else:
            assert value == defaults[name], (name, text)
