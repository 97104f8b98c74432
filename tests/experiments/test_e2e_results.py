"""`vblora e2e` under torchrun: only rank 0 writes results.json, and it replaces the file whole (issue 20, item 5)."""

from __future__ import annotations

import json

import pytest

from vblora.experiments import e2e
from vblora.train import pipeline
from vblora.train.config import RunConfig


@pytest.fixture
def fake_train(monkeypatch):
    """The pipeline's own results (it writes results.json on rank 0 itself; here nothing is trained)."""
    monkeypatch.setattr(pipeline, "train", lambda cfg, log=print, task=None: {"data": {"test_mrs": 4}, "steps": 6})


@pytest.mark.parametrize("rank", ["1", "3"])
def test_other_ranks_do_not_write_results(fake_train, tmp_path, monkeypatch, rank):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "4")
    res = e2e.run_e2e(RunConfig(output=str(tmp_path)), e2e.E2EOptions(), log=lambda *a: None)
    assert res["test_mrs"] == 4 and res["e2e"]["num_beams"] == 10
    assert not (tmp_path / "results.json").exists()


def test_rank_0_replaces_results_atomically(fake_train, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "0")
    old = tmp_path / "results.json"
    old.write_text('{"from": "the pipeline"}')
    with open(old, "rb") as reader:  # a reader holding the old file keeps reading the old, complete bytes
        e2e.run_e2e(RunConfig(output=str(tmp_path)), e2e.E2EOptions(), log=lambda *a: None)
        assert reader.read() == b'{"from": "the pipeline"}'  # an in-place rewrite would have truncated it under us
    new = json.loads(old.read_text())
    assert new["test_mrs"] == 4 and new["e2e"]["length_penalty"] == 0.8
    assert not [p for p in tmp_path.iterdir() if p.name != "results.json"]  # no temporary left behind
