"""`vblora compare` on a tiny BERT: every method x seed runs, the table has mean/std/median, finished runs are
reused."""

from __future__ import annotations

import json

from _train_helpers import run_overrides

from vblora.experiments.compare import format_table, run_compare


def test_compare_table_and_reuse(tiny_bert, cls_files, tmp_path):
    base = run_overrides(tiny_bert, cls_files, tmp_path, epochs=1)
    for k in ("output", "overwrite"):
        base.pop(k)
    logs = []
    summary = run_compare(
        ["vblora", "lora"], [0, 1], tmp_path / "cmp", None, base, {"lora": {"lr": 1e-2}}, log=logs.append
    )
    rows = {r["method"]: r for r in summary["rows"]}
    assert rows["vblora"]["runs"] == rows["lora"]["runs"] == 2
    assert rows["vblora"]["stored_parameters"] < rows["lora"]["stored_parameters"]
    for r in rows.values():
        vals = r["test_values"]
        assert r["test_mean"] == sum(vals) / 2 and r["test_median"] == sum(vals) / 2
        assert r["test_std"] == abs(vals[0] - vals[1]) / 2**0.5
    lora_cfg = json.loads((tmp_path / "cmp" / "lora-seed1" / "results.json").read_text())["config"]
    assert (lora_cfg["seed"], lora_cfg["rank"], lora_cfg["lora_alpha"], lora_cfg["lr"]) == (1, 4, 8.0, 1e-2)
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| vblora |" in table and "| lora |" in table and "test mean" in table
    again = run_compare(
        ["vblora", "lora"], [0, 1], tmp_path / "cmp", None, base, {"lora": {"lr": 1e-2}}, log=logs.append
    )
    assert sum("reusing" in str(x) for x in logs) == 4
    assert format_table(again) == format_table(summary)
    # a finished run made with other settings is not reused: it runs again with the requested ones
    logs.clear()
    run_compare(["lora"], [0], tmp_path / "cmp", None, base, {"lora": {"lr": 2e-2}}, log=logs.append)
    assert any("other settings" in str(x) for x in logs) and not any("reusing" in str(x) for x in logs)
    assert json.loads((tmp_path / "cmp" / "lora-seed0" / "results.json").read_text())["config"]["lr"] == 2e-2
    # ...but a setting only VB-LoRA reads (the bank's learning rate) does not invalidate a LoRA run
    logs.clear()
    run_compare(
        ["lora"], [0], tmp_path / "cmp", None, {**base, "lr_bank": 7e-3}, {"lora": {"lr": 2e-2}}, log=logs.append
    )
    assert any("reusing" in str(x) for x in logs)
