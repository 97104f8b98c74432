"""bench/qlora_bench.py: its summary arithmetic (ratios to PEFT LoRA r=4, paired ratios over rounds, the issue's
bars), and one worker of each kind at tiny size on a 4-bit base (the GPU script's code path, run on the CPU)."""

from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load():
    spec = importlib.util.spec_from_file_location("bench_qlora_bench", BENCH / "qlora_bench.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _run(config, rnd, steps, peak, trainable=10):
    return {
        "config": config,
        "round": rnd,
        "step_ms": steps,
        "step_cpu_ms": steps,
        "peak_tensor_bytes": peak,
        "tensor_static_bytes": peak // 2,
        "step_peak_increase_bytes": peak // 2,
        "trainable_bytes": 4 * trainable,
        "peak_train_rss_bytes": 2 * peak,
        "peak_process_rss_bytes": peak + 1,
        "rss_setup_bytes": peak - 1,
        "trainable": trainable,
        "stored": 1.0,
        "optimizer_state_bytes": 8,
        "adapted_modules": 3,
        "quantized_linears": 3,
        "model_dtype": "torch.float32",
        "gradient_checkpointing": True,
        "optimizer": "torch AdamW",
    }


def test_summary_ratios_paired_and_bars():
    q = _load()
    runs = [
        _run("lora_r4-nf4", 0, [100, 110, 90], 1000),
        _run("vblora-nf4", 0, [105, 104, 106], 1010),
        _run("lora_r4-nf4", 1, [200, 200, 200], 1000),
        _run("vblora-nf4", 1, [300, 300, 300], 1030),
        _run("vblora-full", 0, [50, 50, 50], 2000),
    ]
    s = q.summarize(runs, ["lora_r4-nf4", "vblora-nf4", "vblora-full"], "cpu")
    r = s["ratios"]["vblora-nf4/lora_r4-nf4"]
    # medians over all six steps: lora (90,100,110,200,200,200) -> 155, VB-LoRA (104,105,106,300,300,300) -> 203
    assert r["step"] == round(203 / 155, 4)
    # paired: round 0 105/100, round 1 300/200 -> median of the two
    assert r["step_paired"]["median"] == round((1.05 + 1.5) / 2, 4) and r["step_paired"]["n"] == 2
    assert r["peak_memory"] == round(1020 / 1000, 4)  # median of 1010 and 1030 (tensor accounting on the CPU)
    assert r["peak_rss"] == round(2040 / 2000, 4)
    assert s["bars"] == {
        "peak_memory_le_1.02x_lora_r4": True,
        "step_le_1.10x_lora_r4": False,
        "step_paired_le_1.10x_lora_r4": False,
    }
    assert s["ratios"]["vblora-nf4/vblora-full"]["peak_memory"] == round(1020 / 2000, 4)
    section = {
        "summary": s,
        "environment": {
            "processor": "x",
            "cpu_count": 2,
            "date": "d",
            "versions": {"torch": "t", "transformers": "t", "peft": "p", "bitsandbytes": "b"},
        },
        "settings": {
            "device": "cpu",
            "model": "tiny",
            "batch": 2,
            "seq": 16,
            "compute_dtype": "float32",
            "rounds": 2,
            "steps": 3,
            "warmup": 1,
            "threads": 1,
        },
    }
    text = q.render(section, "k")
    assert "| VB-LoRA, 4-bit NF4 | 203 (104-300) | 1.310 (1.275) | 0 | 1.020 | 0 | 1.020 | 0.0 | 10 |" in text


@pytest.mark.slow
def test_workers_on_a_tiny_4bit_base(tmp_path):
    """VB-LoRA and PEFT LoRA r=4 adapt the same 4-bit modules of a tiny LLaMA and train (the loss falls)."""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("peft")
    q = _load()
    model_dir = q.random_model_dir("tiny", "cpu", "float32", tmp_path)
    out = {}
    for config in ("vblora-nf4", "lora_r4-nf4"):
        args = Namespace(
            config=config,
            device="cpu",
            model="tiny",
            model_dir=str(model_dir),
            batch=2,
            seq=16,
            steps=3,
            warmup=1,
            threads=1,
            compute_dtype="float32",
        )
        out[config] = q.worker(args)
    vb, lora = out["vblora-nf4"], out["lora_r4-nf4"]
    assert vb["adapted_modules"] == lora["adapted_modules"] == 14  # 7 linear modules x 2 layers
    assert vb["quantized_linears"] == lora["quantized_linears"] == 14  # every adapted base is Linear4bit
    assert vb["gradient_checkpointing"] and lora["gradient_checkpointing"]
    for r in (vb, lora):
        assert len(r["step_ms"]) == 3 and r["losses"][-1] < r["losses"][0]
        assert r["peak_train_rss_bytes"] > 0 and r["optimizer_state_bytes"] > 0
        # the deterministic accounting: the adapter's parameters and AdamW state are part of the static bytes
        assert r["step_peak_increase_bytes"] > 0 and r["tensor_static_bytes"] > 3 * r["trainable_bytes"]
