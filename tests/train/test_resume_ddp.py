"""A run killed mid-epoch (SIGKILL) and resumed ends like an uninterrupted one; torchrun with 2 CPU processes
(gloo) at the same global batch matches one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _train_helpers import WORDS_NEU, make_rows, run_overrides, write_csv

from vblora.train.config import build_config
from vblora.train.pipeline import train

QUIET = {"log": lambda *a: None}


@pytest.fixture
def varied_files(tmp_path) -> dict:
    """Like the shared `cls_files`, but sentences of 4-12 words, so length-grouped batching (the default) matters."""
    import random

    def rows(n, seed):
        rng = random.Random(seed)
        return [
            {**r, "text": r["text"] + " " + " ".join(rng.choices(WORDS_NEU, k=rng.randint(0, 8)))}
            for r in make_rows(n, seed)
        ]

    return {
        "train_file": write_csv(tmp_path / "train.csv", rows(64, 0)),
        "validation_file": write_csv(tmp_path / "dev.csv", rows(16, 1)),
        "test_file": write_csv(tmp_path / "test.csv", rows(16, 2)),
    }


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _close(a: dict, b: dict, tol: float) -> None:
    for split in ("validation", "test"):
        for k, v in a["metrics"][split].items():
            assert b["metrics"][split][k] == pytest.approx(v, abs=tol), (split, k)


def test_resume_after_kill_matches_uninterrupted(tiny_bert, varied_files, tmp_path):
    ov = run_overrides(
        tiny_bert,
        varied_files,
        tmp_path / "full",
        method="vblora",
        save_steps=3,
        epochs=2,
        lr_head=5e-2,
        lr_bank=1e-2,
        lr_logits=5e-2,
    )
    ref = train(build_config(None, ov), **QUIET)  # 64 examples / bs 8 = 8 steps per epoch, 16 in all

    killed = tmp_path / "killed"
    script = tmp_path / "kill_run.py"
    script.write_text(
        textwrap.dedent(f"""
        import os, signal, json
        from transformers import TrainerCallback
        from vblora.train.config import build_config
        from vblora.train.pipeline import train

        class KillAt(TrainerCallback):
            def on_step_end(self, args, state, control, **kw):
                if state.global_step == 11:  # mid epoch 2, two steps after the step-9 checkpoint
                    os.kill(os.getpid(), signal.SIGKILL)

        ov = json.loads({json.dumps(json.dumps({**ov, "output": str(killed)}))})
        train(build_config(None, ov), callbacks=[KillAt()])
    """)
    )
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    ckpts = sorted(p.name for p in (killed / "checkpoints").glob("checkpoint-*"))
    assert ckpts == ["checkpoint-6", "checkpoint-9"] and not (killed / "results.json").exists()

    resumed = train(build_config(None, {**ov, "output": str(killed), "resume": True, "overwrite": False}), **QUIET)
    for key in ("metrics", "per_epoch", "train_loss", "best_epoch", "steps"):  # identical, not close
        assert resumed[key] == ref[key], key


def test_torchrun_two_processes_match_one(tiny_bert, varied_files, tmp_path):
    one = train(
        build_config(
            None,
            run_overrides(
                tiny_bert, varied_files, tmp_path / "one", batch_size=8, lr_head=5e-2, lr_bank=1e-2, lr_logits=5e-2
            ),
        ),
        **QUIET,
    )
    args = [
        "--model",
        tiny_bert,
        "--output",
        str(tmp_path / "two"),
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--batch-size",
        "4",
        "--eval-batch-size",
        "16",
        "--vector-length",
        "32",
        "--num-vectors",
        "16",
        "--max-length",
        "16",
        "--lr-head",
        "5e-2",
        "--lr-bank",
        "1e-2",
        "--lr-logits",
        "5e-2",
        "--logging-steps",
        "1000",
    ]
    for k, v in varied_files.items():
        args += [f"--{k.replace('_', '-')}", v]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(_free_port()),
            "-m",
            "vblora",
            "train",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    two = json.loads(Path(tmp_path / "two" / "results.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    _close(one, two, 2e-4)  # same global batch (2 x 4 = 8): same samples per step, gradients averaged by DDP
    assert two["stored_parameters"] == one["stored_parameters"]
    # epoch by epoch too; the weights moved between the epochs, so the match is not trivial
    one_losses = [e["validation"]["loss"] for e in one["per_epoch"]]
    assert [e["validation"]["loss"] for e in two["per_epoch"]] == pytest.approx(one_losses, abs=2e-4)
    assert abs(one_losses[1] - one_losses[0]) > 1e-3
