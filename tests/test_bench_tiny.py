"""bench/speed.py --tiny runs end to end on the CPU (so the benchmark script cannot rot), and its JSON renders."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_speed_tiny_runs_and_renders(tmp_path, capsys):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    speed, render = _load("speed"), _load("render_table")
    out = tmp_path / "speed.json"
    rc = speed.main(["--tiny", "--device", "cpu", "--cases", "smollm2_all", "--steps", "2", "--out", str(out)])
    assert rc == 0
    res = json.loads(out.read_text())
    case = res["cases"]["smollm2_all"]
    assert set(case["methods"]) == {"lora_r4", "lora_r64", "peft_vblora", "ours"} and not case["errors"]
    ours, peft_vb = case["methods"]["ours"], case["methods"]["peft_vblora"]
    for m in case["methods"].values():
        assert m["train_ms"]["n"] == 2 and m["fwd_ms"]["median"] > 0 and m["fwd_merged_ms"]["median"] > 0
    # same shapes and targets: ours and PEFT VB-LoRA train and store the same number of parameters
    assert ours["trainable"] == peft_vb["trainable"] and ours["stored"] == peft_vb["stored"]
    assert ours["logits_state_bytes"] > 0 and case["base"]["fwd_ms"]["n"] > 0
    assert res["env"]["versions"]["torch"] and case["ratios"]["train_ours_vs_lora_r4"] > 0
    capsys.readouterr()
    render.main([str(out), "--summary-only"])
    table = capsys.readouterr().out
    assert "| SmolLM2-135M shape" in table and "n/a" in table  # no peak memory on the CPU
