"""One meaning per flag name across commands (issue 20, item 5): `--seeds` lists seed numbers, `--output` is the
output directory (`--out` its deprecated spelling), `--set` takes KEY=VALUE items (and METHOD:KEY=VALUE in compare);
`vblora compare` never replaces a recipe's or a flag's setting."""

from __future__ import annotations

import pytest

from vblora.cli import build_parser, main
from vblora.experiments import compare as comparison
from vblora.train.flags import assignments


def test_seeds_lists_seed_numbers_in_every_command():
    parser = build_parser()
    for argv in (
        ["compare"],
        ["ablate", "selection"],
        ["ablate", "vector-length"],
        ["ablate", "shared-bank", "--bank", "b"],
    ):
        assert parser.parse_args([*argv, "--seeds", "3"]).seeds == [3], argv  # seed number 3, not three seeds
        assert parser.parse_args([*argv, "--seeds", "0", "1", "2"]).seeds == [0, 1, 2], argv
        assert parser.parse_args(argv).seeds == [0, 1, 2], argv


def test_output_is_one_spelling_and_out_still_works(capsys):
    parser = build_parser()
    for argv in (["compare"], ["ablate", "selection"], ["ablate", "shared-bank", "--bank", "b"], ["plot", "run"]):
        assert parser.parse_args([*argv, "--output", "D"]).output == "D", argv
        capsys.readouterr()
        assert parser.parse_args([*argv, "--out", "D"]).output == "D", argv
        assert "--out is deprecated; use --output" in capsys.readouterr().err
    assert build_parser().parse_args(["compare"]).output == "runs/compare"
    assert build_parser().parse_args(["ablate", "selection"]).output == "runs/ablate-selection"


def test_set_has_one_syntax():
    parser = build_parser()
    for argv in (["compare"], ["ablate", "selection"]):  # several items after one --set, and --set repeated
        args = parser.parse_args([*argv, "--set", "epochs=1", "lr_bank=0.002", "--set", "target-modules=[query]"])
        assert assignments(args.set) == ({"epochs": 1, "lr_bank": 0.002, "target_modules": ["query"]}, {}), argv
    args = parser.parse_args(["compare", "--set", "epochs=1", "lora:lr=0.001", "--set", "vblora:topk=3"])
    common, scoped = assignments(args.set, scopes=("vblora", "lora"))
    assert common == {"epochs": 1} and scoped == {"lora": {"lr": 0.001}, "vblora": {"topk": 3}}
    with pytest.raises(Exception, match="names no method"):
        assignments(["vera:lr=1"], scopes=("vblora", "lora"))
    with pytest.raises(Exception, match="give KEY=VALUE"):
        assignments(["lora:lr=1"])  # ablate has no scopes
    with pytest.raises(Exception, match="KEY=VALUE"):
        assignments(["lr"])


@pytest.fixture
def compare_runs(monkeypatch):
    """`vblora compare` through the CLI with training replaced by a recorder of each run's RunConfig."""
    seen = []

    def record(cfg, log=print):
        seen.append(cfg)
        raise RuntimeError("not trained in this test")

    real = comparison.run_compare
    monkeypatch.setattr(comparison, "run_compare", lambda *a, **k: real(*a, **k, train_fn=record, log=lambda *x: None))
    return seen


def test_compare_keeps_the_recipes_and_the_flags_rank(compare_runs, tmp_path, capsys):
    out, data = tmp_path / "cmp", ["--train-file", "train.json", "--validation-file", "dev.json"]  # never read here
    assert (
        main(
            [
                "compare",
                "--recipe",
                "llama2-13b-alpaca",
                *data,
                "--methods",
                "vblora,lora",
                "--seeds",
                "0",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert {(c.method, c.vblora.rank) for c in compare_runs} == {("vblora", 6), ("lora", 6)}  # the recipe's rank 6
    compare_runs.clear()
    assert (
        main(
            [
                "compare",
                "--recipe",
                "llama2-13b-alpaca",
                *data,
                "--rank",
                "8",
                "--methods",
                "vblora,lora",
                "--seeds",
                "0",
                "1",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert {(c.method, c.seed, c.vblora.rank) for c in compare_runs} == {
        ("vblora", 0, 8),
        ("lora", 0, 8),
        ("vblora", 1, 8),
        ("lora", 1, 8),
    }  # was rank 4
    compare_runs.clear()
    assert (
        main(
            [
                "compare",
                "--rank",
                "8",
                "--methods",
                "vblora,lora",
                "--seeds",
                "0",
                "--set",
                "lora:rank=2",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert {(c.method, c.vblora.rank) for c in compare_runs} == {("vblora", 8), ("lora", 2)}
    assert all(c.output.startswith(str(out)) for c in compare_runs)


def test_compare_checks_every_setting_before_training(compare_runs, tmp_path, capsys):
    assert main(["compare", "--methods", "vblora,bogus", "--output", str(tmp_path / "c")]) == 2
    assert "unknown method 'bogus'" in capsys.readouterr().err and not compare_runs
    assert not (tmp_path / "c").exists()
