"""Training runs that survive kills, divergence and bad checkpoints (issue 11; docs/reliability.md).

A run killed at a random step, or mid-save, resumes to results and adapter tensors IDENTICAL to an uninterrupted
run; damaged checkpoints are skipped with a note; a checkpoint from other settings or without optimizer state is
refused in one line; a crafted pickle on any load path runs no code even with TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1; a
diverging run stops within a few steps; an earlier adapter/ and results.json survive a run that fails.
"""

from __future__ import annotations

import errno
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from _train_helpers import make_rows, run_overrides, write_csv
from transformers import TrainerCallback

from vblora.train import methods
from vblora.train import pipeline as P
from vblora.train.config import build_config
from vblora.train.errors import DivergedError, ResumeError, SaveError

STEPS = 16  # 64 examples / batch 8 = 8 steps per epoch, 2 epochs; checkpoints every 3 steps, losses logged every 5


class Killed(Exception):
    pass


class KillAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kw):
        if state.global_step == self.step:
            raise Killed(self.step)


@pytest.fixture(scope="module")
def setup(tiny_bert, tmp_path_factory):
    d = tmp_path_factory.mktemp("reliability")
    files = {
        "train_file": write_csv(d / "train.csv", make_rows(64, 0)),
        "validation_file": write_csv(d / "dev.csv", make_rows(16, 1)),
        "test_file": write_csv(d / "test.csv", make_rows(16, 2)),
    }
    ov = run_overrides(
        tiny_bert, files, d / "ref", save_steps=3, logging_steps=5, lr_head=5e-2, lr_bank=1e-2, lr_logits=5e-2
    )
    ref = _train(ov)
    with pytest.raises(Killed):  # a run killed at step 11: checkpoints 6 and 9, best state of epoch 1 (step 8)
        _train({**ov, "output": str(d / "killed")}, callbacks=[KillAt(11)])
    return {"ov": ov, "ref": ref, "dir": d}


def _train(ov: dict, log=None, **kw) -> dict:
    return P.train(build_config(None, ov), log=log or (lambda *a: None), **kw)


def _resume(setup, out: Path, log=None, **kw) -> dict:
    return _train({**setup["ov"], "output": str(out), "resume": True, "overwrite": False, **kw}, log=log)


def _copy(setup, name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(setup["dir"] / name, tmp_path / name))


def _adapter(out: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(out, "adapter").glob("*.safetensors"))
    return {f"{f.name}:{k}": v for f in files for k, v in load_file(f).items()}


def assert_identical(a: dict, b: dict) -> None:
    """Every metric, per-epoch row, the whole run's train loss and the adapter tensors: equal, not close."""
    for key in ("metrics", "per_epoch", "train_loss", "best_epoch", "steps", "eval_topk"):
        assert a[key] == b[key], key
    ta, tb = _adapter(Path(a["adapter_dir"]).parent), _adapter(Path(b["adapter_dir"]).parent)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.mark.parametrize("draw", range(3))
def test_kill_at_a_random_step_then_resume_is_identical(setup, tmp_path, draw):
    step = random.Random(11).sample(range(1, STEPS), 3)[draw]  # three distinct steps, mid-epoch and at epoch ends
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _train({**setup["ov"], "output": str(out)}, callbacks=[KillAt(step)])
    lines = []
    resumed = _resume(setup, out, log=lines.append)
    assert resumed["steps"] == STEPS
    assert_identical(setup["ref"], resumed)
    if step > 3:  # the newest checkpoint before the kill is taken, and said
        assert any(f"resuming from {out / 'checkpoints' / f'checkpoint-{(step - 1) // 3 * 3}'}" in s for s in lines)


def test_kill_mid_save_leaves_no_checkpoint_and_resume_is_identical(setup, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = P._Trainer._save_rng_state

    def full_disk(self, output_dir):  # the model, optimizer and scheduler are written; the RNG state is not
        if self.state.global_step == 9:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(self, output_dir)

    monkeypatch.setattr(P._Trainer, "_save_rng_state", full_disk)
    with pytest.raises(
        SaveError,
        match=r"could not write checkpoint-9 \(OSError: \[Errno 28\] No space left on "
        r"device; is the disk full\?\); the checkpoints before it are intact",
    ):
        _train({**setup["ov"], "output": str(out)})
    ck = out / "checkpoints"
    assert sorted(p.name for p in ck.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    assert (ck / ".saving" / "checkpoint-9" / "optimizer.pt").exists()  # the half-written one, under its temp name
    monkeypatch.undo()
    lines = []
    assert_identical(setup["ref"], _resume(setup, out, log=lines.append))
    assert not (ck / ".saving" / "checkpoint-9").exists()
    assert f"resuming from {ck / 'checkpoint-6'} (step 6)" in lines[0]


def test_damaged_checkpoints_are_skipped_with_a_note(setup, tmp_path):
    out = _copy(setup, "killed", tmp_path)
    ck = out / "checkpoints"
    shutil.copytree(ck / "checkpoint-9", ck / "checkpoint-12")  # what an in-place save killed mid-way leaves
    (ck / "checkpoint-12" / "trainer_state.json").unlink()
    shutil.copytree(ck / "checkpoint-9", ck / "checkpoint-15")
    data = (ck / "checkpoint-15" / "model.safetensors").read_bytes()
    (ck / "checkpoint-15" / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    lines = []
    assert_identical(setup["ref"], _resume(setup, out, log=lines.append))
    note = next(s for s in lines if "resuming from" in s)
    assert f"{ck / 'checkpoint-9'} (step 9)" in note and "checkpoint-12 (incomplete: no trainer_state.json)" in note
    assert "checkpoint-15 (unreadable: " in note and "model.safetensors" in note


def test_no_complete_checkpoint_is_one_clear_error(setup, tmp_path):
    out = _copy(setup, "killed", tmp_path)
    for d in (out / "checkpoints").glob("checkpoint-*"):
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(ResumeError, match=r"no complete checkpoint in .*checkpoint-9 \(unreadable: .*--overwrite"):
        _resume(setup, out)


@pytest.mark.parametrize(
    "change, shown",
    [
        ({"num_vectors": 24}, "num_vectors 16 -> 24"),
        ({"rank": 8}, "rank 4 -> 8"),
        ({"method": "lora"}, "method 'vblora' -> 'lora'"),
        ({"batch_size": 4}, "batch_size 8 -> 4"),
        ({"max_train_samples": 48}, "train_examples 64 -> 48"),
    ],
)
def test_checkpoint_of_other_settings_is_refused(setup, tmp_path, change, shown):
    out = _copy(setup, "killed", tmp_path)
    with pytest.raises(ResumeError, match="was saved with other settings: .*" + shown) as e:
        _resume(setup, out, **change)
    assert "\n" not in str(e.value) and "--resume-partial" in str(e.value)


def test_checkpoint_without_optimizer_state_is_refused_unless_partial(setup, tmp_path):
    out = _copy(setup, "killed", tmp_path)
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (out / "checkpoints" / "checkpoint-9" / name).unlink()
    with pytest.raises(ResumeError, match=re.escape("checkpoint-9 lacks optimizer.pt, scheduler.pt, rng_state.pth")):
        _resume(setup, out)
    lines = []
    r = _resume(setup, out, log=lines.append, resume_partial=True)
    assert r["steps"] == STEPS and any("warning:" in s and "lacks optimizer.pt" in s for s in lines)


def test_partial_resume_with_other_shapes_is_one_clear_error(setup, tmp_path):
    out = _copy(setup, "killed", tmp_path)
    for part in ("best epoch's state", "trainable tensors"):
        with pytest.raises(ResumeError, match=f"cannot restore the {part} .*other VB-LoRA settings: .*num_vectors"):
            _resume(setup, out, num_vectors=24, resume_partial=True)
        shutil.rmtree(out / "checkpoints" / "best", ignore_errors=True)


class Evil:
    """A pickle that, loaded without weights_only, creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize(
    "target",
    ["checkpoint-9/optimizer.pt", "checkpoint-9/scheduler.pt", "checkpoint-9/rng_state.pth", "best/checkpoint.pt"],
)
def test_crafted_pickle_runs_no_code_on_any_load_path(setup, tmp_path, monkeypatch, target):
    out = _copy(setup, "killed", tmp_path)
    marker = tmp_path / "pwned"
    files = list((out / "checkpoints").glob(target))
    for f in files:
        torch.save(Evil(marker), f)
    torch.load(files[0], weights_only=False)  # the file is a real exploit ...
    assert marker.exists()
    marker.unlink()
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # ... and forcing unsafe loads does not reach ours
    with pytest.raises(ResumeError, match="UnpicklingError") as e:
        _resume(setup, out)
    assert not marker.exists() and "\n" not in str(e.value)


def test_crafted_bank_pt_runs_no_code(setup, tmp_path, monkeypatch):
    """`--bank DIR/bank.pt` (train/methods.py) loads with weights_only=True too."""
    marker, bank = tmp_path / "pwned", tmp_path / "bank"
    bank.mkdir()
    torch.save(Evil(marker), bank / "bank.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(Exception, match="Weights only load failed"):
        _train({**setup["ov"], "output": str(tmp_path / "run"), "bank": str(bank)})
    assert not marker.exists()


def test_divergence_stops_within_a_few_steps_and_keeps_the_earlier_results(setup, tmp_path):
    out = _copy(setup, "ref", tmp_path)
    before = {p: p.read_bytes() for p in [out / "results.json", *sorted((out / "adapter").iterdir())]}
    huge = {"lr_bank": 1e4, "lr_logits": 1e4, "lr_head": 1e4, "output": str(out), "overwrite": True}
    with pytest.raises(
        DivergedError,
        match=r"diverged at step (\d) of 16: .* Lower the learning rates \(now "
        r"--lr-bank 10000, --lr-logits 10000, --lr-head 10000\)",
    ) as e:
        _train({**setup["ov"], **huge})
    assert int(re.search(r"step (\d+)", str(e.value)).group(1)) <= 6 and "\n" not in str(e.value)
    assert before == {p: p.read_bytes() for p in before}  # --overwrite took only the earlier checkpoints


def test_full_disk_at_the_final_save_keeps_the_earlier_adapter_and_results(setup, tmp_path, monkeypatch):
    out = _copy(setup, "ref", tmp_path)
    shutil.rmtree(out / "checkpoints")
    before = {p: p.read_bytes() for p in [out / "results.json", *sorted((out / "adapter").iterdir())]}
    real = methods.apply_method

    def apply(model, cfg):
        adapted = real(model, cfg)

        def save(d):
            adapted_save(d)
            raise OSError(errno.ENOSPC, "No space left on device")

        adapted_save, adapted.save = adapted.save, save
        return adapted

    monkeypatch.setattr(P.methods, "apply_method", apply)
    with pytest.raises(OSError, match="No space left"):
        _train({**setup["ov"], "output": str(out), "epochs": 0.25})
    assert before == {p: p.read_bytes() for p in before}
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "results.json"]  # no temporaries


def test_cli_prints_one_line_and_exits_2(setup, tmp_path, capsys):
    from vblora.cli import main

    out = _copy(setup, "killed", tmp_path)
    ov = {**setup["ov"], "num_vectors": 24, "output": str(out)}
    argv = ["train", "--resume", "--no-overwrite"]
    for k, v in ov.items():
        if k not in ("overwrite",):
            argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main(argv) == 2
    cap = capsys.readouterr()
    err = [s for s in (cap.out + cap.err).splitlines() if "error" in s]
    assert len(err) == 1 and err[0].startswith("vblora train: error: --resume:") and "num_vectors 16 -> 24" in err[0]
