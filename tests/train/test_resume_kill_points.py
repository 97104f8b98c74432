"""`--resume` is exact at every kill point (issue 19 item 9; docs/reliability.md).

Checkpoints every 4 steps of 8 per epoch: checkpoint-8 and checkpoint-16 are written at the end of an epoch's last
step, BEFORE that epoch's evaluation (the Trainer saves at the step's end and evaluates at the epoch's end). A kill
between the two, a kill right after `best/checkpoint.pt` is written, and `--resume` on a finished run all end with
the results.json rows and adapter bytes of the uninterrupted run. A `trainer_state.json` that is valid JSON but no
Trainer state is one clear error; an edited training file (same path, same row count) is refused.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from _train_helpers import make_rows, run_overrides, write_csv
from transformers import TrainerCallback

from vblora.train import pipeline as P
from vblora.train.config import build_config
from vblora.train.errors import ResumeError


class Killed(Exception):
    pass


class KillAt(TrainerCallback):
    """Raises at `event` ("epoch_end": after the step-8 checkpoint, before the evaluation; "evaluate": after the
    best-epoch tracker wrote best/checkpoint.pt) at step `step`."""

    def __init__(self, event: str, step: int):
        self.event, self.step = event, step

    def on_epoch_end(self, args, state, control, **kw):
        if self.event == "epoch_end" and state.global_step == self.step:
            raise Killed(self.step)

    def on_evaluate(self, args, state, control, **kw):
        if self.event == "evaluate" and state.global_step == self.step:
            raise Killed(self.step)


@pytest.fixture(scope="module")
def setup(tiny_bert, tmp_path_factory):
    d = tmp_path_factory.mktemp("kill-points")
    files = {
        "train_file": write_csv(d / "train.csv", make_rows(64, 0)),
        "validation_file": write_csv(d / "dev.csv", make_rows(16, 1)),
        "test_file": write_csv(d / "test.csv", make_rows(16, 2)),
    }
    ov = run_overrides(
        tiny_bert, files, d / "ref", save_steps=4, logging_steps=3, lr_head=5e-2, lr_bank=1e-2, lr_logits=5e-2
    )
    return {"ov": ov, "ref": _train(ov), "dir": d}


def _train(ov: dict, log=None, **kw) -> dict:
    return P.train(build_config(None, ov), log=log or (lambda *a: None), **kw)


def _resume(setup, out: Path, log=None, **kw) -> dict:
    return _train({**setup["ov"], "output": str(out), "resume": True, "overwrite": False, **kw}, log=log)


def _content(out: Path) -> dict:
    """Each adapter file's metadata and tensor bytes (safetensors orders its metadata keys at random: compared as
    a dict, the rest byte for byte)."""
    from vblora.storage.files import read_safetensors, tensor_bytes

    found = {}
    for p in sorted((out / "adapter").iterdir()):
        tensors, metadata, _ = read_safetensors(p)
        found[p.name] = (metadata, {k: (str(t.dtype), tuple(t.shape), tensor_bytes(t)) for k, t in tensors.items()})
    return found


def assert_same_run(ref: dict, resumed: dict) -> None:
    """Every results.json row that does not measure time, and the adapter's content: equal."""
    for key in ("metrics", "per_epoch", "train_loss", "best_epoch", "steps", "eval_topk", "stored_parameters"):
        assert ref[key] == resumed[key], key
    assert len(resumed["per_epoch"]) == 2
    assert _content(Path(ref["adapter_dir"]).parent) == _content(Path(resumed["adapter_dir"]).parent)


@pytest.mark.parametrize("event, step", [("epoch_end", 8), ("epoch_end", 16), ("evaluate", 8), ("evaluate", 16)])
def test_kill_between_a_checkpoint_and_its_evaluation_or_after_best_then_resume_is_exact(setup, tmp_path, event, step):
    out = tmp_path / "run"
    with pytest.raises(Killed):
        _train({**setup["ov"], "output": str(out)}, callbacks=[KillAt(event, step)])
    assert (out / "checkpoints" / f"checkpoint-{step}").is_dir()  # the kill came after that step's checkpoint
    assert_same_run(setup["ref"], _resume(setup, out))


def test_resume_of_a_finished_run_keeps_every_row(setup, tmp_path):
    out = Path(shutil.copytree(setup["dir"] / "ref", tmp_path / "ref"))
    assert_same_run(setup["ref"], _resume(setup, out))


@pytest.mark.parametrize("content", ["[]", "{}"])
def test_trainer_state_that_is_no_state_is_one_clear_error(setup, tmp_path, content):
    out = Path(shutil.copytree(setup["dir"] / "ref", tmp_path / "ref"))
    for d in (out / "checkpoints").glob("checkpoint-*"):
        (d / "trainer_state.json").write_text(content)
    with pytest.raises(
        ResumeError,
        match=r"no complete checkpoint in .*checkpoint-16 \(unreadable: "
        r"trainer_state.json is not a Trainer state",
    ) as e:
        _resume(setup, out)
    assert "\n" not in str(e.value)


def test_cli_trainer_state_error_is_one_line_exit_2(setup, tmp_path, capsys):
    from vblora.cli import main

    out = Path(shutil.copytree(setup["dir"] / "ref", tmp_path / "ref"))
    for d in (out / "checkpoints").glob("checkpoint-*"):
        (d / "trainer_state.json").write_text("[]")
    argv = ["train", "--resume", "--no-overwrite"]
    for k, v in {**setup["ov"], "output": str(out)}.items():
        if k != "overwrite":
            argv += [f"--{k.replace('_', '-')}", str(v)]
    assert main(argv) == 2
    cap = capsys.readouterr()
    err = [s for s in (cap.out + cap.err).splitlines() if "error" in s.lower()]
    assert len(err) == 1 and err[0].startswith("vblora train: error: --resume:") and "Traceback" not in cap.err


def test_edited_train_file_is_refused(setup, tmp_path):
    """The same path and row count, one label changed: resuming would train on other data than the checkpoint."""
    rows = make_rows(64, 0)
    ov = {**setup["ov"], "train_file": write_csv(tmp_path / "train.csv", rows), "output": str(tmp_path / "run")}
    with pytest.raises(Killed):
        _train(ov, callbacks=[KillAt("epoch_end", 8)])
    rows[5]["label"] = "negative" if rows[5]["label"] == "positive" else "positive"
    write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(
        ResumeError,
        match=r"the training file .*train.csv changed since .*checkpoint-8 was saved "
        r"\(sha256 [0-9a-f]{12}\.\.\. then, [0-9a-f]{12}\.\.\. now\)",
    ) as e:
        _train({**ov, "resume": True, "overwrite": False})
    assert "\n" not in str(e.value)


def test_checkpoint_of_an_older_vblora_is_refused_and_kept(setup, tmp_path):
    """Before this version checkpoint-N held checkpoint.pt instead of model.safetensors: one line, nothing removed."""
    out = Path(shutil.copytree(setup["dir"] / "ref", tmp_path / "ref"))
    for d in (out / "checkpoints").glob("checkpoint-*"):
        (d / "model.safetensors").rename(d / "checkpoint.pt")
    with pytest.raises(ResumeError, match=r"checkpoint-16 was written by an older vblora \(checkpoint.pt"):
        _resume(setup, out)
    assert sorted(p.name for p in (out / "checkpoints").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-16"]
