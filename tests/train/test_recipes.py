"""Every shipped recipe loads into a valid RunConfig; GLUE recipes apply Table 7's per-task settings; one set of
defaults (the default task's), shown by `vblora train --help`; flags and recipe keys cover every VBLoRAConfig field."""

from __future__ import annotations

import dataclasses
import re

import pytest

import vblora
from vblora.train.config import METHODS, RunConfig, build_config, recipe_names, setting_fields
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
    assert (cfg.model, cfg.dataset, cfg.method, cfg.vblora.target_modules) == (
        "minilm",
        "vader-movie",
        "vblora",
        "all-linear",
    )
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
    with pytest.raises(SetupError, match="setting 'epochs': invalid float value: 'many'"):
        build_config(None, {"epochs": "many"})
    assert build_config(None, {"lr_bank": "1e-3"}).lr_bank == 1e-3  # YAML/CLI text -> float
    bad = tmp_path / "bad.yaml"
    bad.write_text("rank: 8\nbank_size: 90\n")
    with pytest.raises(SetupError, match=r"unknown setting\(s\) \[.bank_size.\].*Known: .*num_vectors"):
        build_config(str(bad), {"train_file": "x"})
    with pytest.raises(vblora.errors.ConfigError, match="topk"):  # the method's own validation
        build_config(None, {"topk": 100})


def test_keys_cover_every_vblora_field_and_reach_the_nested_config():
    names = set(setting_fields())
    for f in dataclasses.fields(vblora.VBLoRAConfig):
        assert f.name in names, f"VBLoRAConfig.{f.name} has no flag / recipe key"
    values = {
        "selection": "gumbel",
        "noise_std": "0.5",
        "temperature": "0.25",
        "eval_topk": "1",
        "modules_to_save": ["classifier"],
        "layers": ["0"],
        "init_bank_bound": "0.1",
        "init_logits_std": "0.2",
        "dropout": "0.1",
        "rank": "2",
        "num_vectors": "16",
        "vector_length": "32",
        "topk": "3",
        "target_modules": ["query", "value"],
        "seed": "7",
    }
    cfg = build_config(None, values).vblora
    assert cfg == vblora.VBLoRAConfig(
        selection="gumbel",
        noise_std=0.5,
        temperature=0.25,
        eval_topk=1,
        modules_to_save=("classifier",),
        layers=(0,),
        init_bank_bound=0.1,
        init_logits_std=0.2,
        dropout=0.1,
        rank=2,
        num_vectors=16,
        vector_length=32,
        topk=3,
        target_modules=("query", "value"),
        seed=7,
    )


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


def _help(argv, capsys, monkeypatch) -> str:
    from vblora.cli import main

    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping: argparse breaks lines at hyphens
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return capsys.readouterr().out


@pytest.mark.parametrize("recipe", [None, "e2e-gpt2-medium"])
def test_help_shows_every_default(recipe, capsys, monkeypatch):
    """`vblora train --help` shows RunConfig's defaults, `vblora e2e --help` its recipe's; each shown text, read
    back as its flag would be, is that value."""
    shown = _help(["e2e" if recipe else "train"], capsys, monkeypatch)
    shown = _help_defaults(shown)
    defaults = (
        build_config(recipe, {}).to_dict()
        if recipe is None
        else build_config(recipe, {"model": "m", "train_file": "t", "test_file": "t"}).to_dict()
    )
    assert {k for k in setting_fields() if k != "extra"} <= set(shown)
    for name in (k for k in setting_fields() if k != "extra"):
        text = shown[name]
        if name in ("recipe", "train_file", "model", "test_file", "dataset"):
            continue
        again = build_config(
            None,
            {
                name: text.split() if isinstance(defaults[name], list) else text,
                "train_file": "t",
                "dataset": "vader-movie",
            },
        ).to_dict()
        if isinstance(defaults[name], float):
            assert again[name] == pytest.approx(defaults[name], rel=1e-5), name
        else:
            assert again[name] == defaults[name], (name, text)


# Flag spellings of the hand-written parser this one replaced (dashes, --x/--no-x for every bool, several values
# for lists, the word none): each still parses to the same settings.
OLD_SPELLINGS = [
    (
        ["--max-train-samples", "100", "--lr-bank", "1e-3", "--epochs", "3"],
        {"max_train_samples": 100, "lr_bank": 1e-3, "epochs": 3.0},
    ),
    (
        ["--target-modules", "query", "value", "--modules-to-save", "classifier"],
        {"target_modules": ["query", "value"], "modules_to_save": ["classifier"]},
    ),
    (["--target-modules", "all-linear"], {"target_modules": "all-linear"}),
    (["--target-modules", ".*\\.(q|v)_proj"], {"target_modules": ".*\\.(q|v)_proj"}),
    (
        ["--bf16", "--no-group-by-length", "--fsdp", "--no-fsdp", "--no-double-quant"],
        {"bf16": True, "group_by_length": False, "fsdp": False, "double_quant": False},
    ),
    (
        ["--group-by-length", "--freeze-bank", "--no-bf16"],
        {"group_by_length": True, "freeze_bank": True, "bf16": False},
    ),
    (["--dataset", "none", "--train-file", "a.csv", "--quantize", "none"], {"dataset": None, "quantize": None}),
    (
        ["--extra-eval-topk", "1", "2", "--eval-topk", "1", "--layers", "0", "1"],
        {"extra_eval_topk": [1, 2], "eval_topk": 1, "layers": [0, 1]},
    ),
    (
        ["--recipe", "glue-roberta-base-qv", "--glue-task", "stsb", "--train-file", "x", "--epochs", "3"],
        {"epochs": 3.0, "task": "regression", "lr_head": 2e-2, "recipe": "glue-roberta-base-qv"},
    ),
    (["--max_train_samples", "7"], {"max_train_samples": 7}),  # HfArgumentParser's own spelling too
]


@pytest.mark.parametrize("argv,expected", OLD_SPELLINGS, ids=lambda a: " ".join(a) if isinstance(a, list) else "")
def test_flag_spellings_keep_working(argv, expected):
    from vblora.cli import build_parser
    from vblora.train.flags import given

    args = build_parser().parse_args(["train", *argv])
    cfg = build_config(None, given(args)).to_dict()
    assert {k: cfg[k] for k in expected} == expected


@pytest.mark.parametrize("name", recipe_names())
@pytest.mark.parametrize("command", ["train", "compare", "e2e"])
def test_every_recipe_parses_in_every_command(name, command, tmp_path):
    """Each command's parser with --recipe NAME (plus the files a recipe needs) gives the recipe's settings, and a
    flag after it overrides the recipe; the help of each command builds too (test_help_shows_every_default)."""
    from vblora.cli import build_parser
    from vblora.train.flags import given

    argv = [
        command,
        "--recipe",
        name,
        "--train-file",
        "t.jsonl",
        "--validation-file",
        "v.jsonl",
        "--model",
        "m",
        "--test-file",
        "t.jsonl",
    ] + (["--glue-task", "rte"] if name.startswith("glue") else [])
    args = build_parser().parse_args(argv)
    cfg = build_config(None, given(args))
    assert cfg.recipe == name and cfg.vblora.rank == build_config(name, given(args)).vblora.rank
    again = build_config(None, given(build_parser().parse_args([*argv, "--rank", "3", "--lr-bank", "2e-3"])))
    assert (again.vblora.rank, again.lr_bank) == (3, 2e-3)
