"""Every command turns a user error into one line on stderr and exit code 2; --debug shows the traceback; a closed
pipe ends quietly (issue 11, "CLI")."""

from __future__ import annotations

import subprocess
import sys

import pytest

from vblora.cli import main

try:  # tests/ may or may not be a package
    from _storage_models import adapted
except ImportError:
    from tests._storage_models import adapted


def bad_files(tmp_path):
    """A missing file, an empty one, a truncated adapter and a directory that holds no adapter."""
    model, _ = adapted("roberta")
    import vblora

    good = vblora.save_adapter(model, tmp_path / "good")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:200])
    (tmp_path / "nothing").mkdir()
    return {
        "missing": tmp_path / "missing.safetensors",
        "empty": tmp_path / "empty.safetensors",
        "truncated": tmp_path / "cut.safetensors",
        "empty-dir": tmp_path / "nothing",
    }


COMMANDS = {
    "inspect": lambda f, out: ["inspect", str(f)],
    "export-peft": lambda f, out: ["export", str(f), "--to", "peft", "-o", str(out)],
    "export-lora": lambda f, out: ["export", str(f), "--to", "lora", "-o", str(out)],
    "import-peft": lambda f, out: ["import-peft", str(f), "--base", str(out), "-o", str(out)],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_bad_files_give_one_line_and_exit_2(tmp_path, capsys, command):
    for what, f in bad_files(tmp_path).items():
        code = main(COMMANDS[command](f, tmp_path / "out"))
        err = capsys.readouterr().err
        if command == "inspect" and code == 1:  # inspect reports a damaged file as FAILED verification
            continue
        assert code == 2, (command, what, code, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"vblora {COMMANDS[command](f, '')[0]}: error: "), (what, err)
        assert "Traceback" not in err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError):
        main(["inspect", str(tmp_path / "missing.safetensors"), "--debug"])


def test_closed_pipe_ends_quietly(tmp_path):
    model, _ = adapted("roberta")
    import vblora

    vblora.save_adapter(model, tmp_path)
    # the reader closes its end before the command writes anything (importing torch takes a while)
    proc = subprocess.Popen(
        [sys.executable, "-m", "vblora", "inspect", str(tmp_path), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0
    assert "Traceback" not in err and "BrokenPipe" not in err, err


SETTINGS_ERRORS = [  # every command, a bad setting of each kind: each fails before any training or download
    ["train", "--rank", "0"],
    ["train", "--method", "bogus"],
    ["train", "--recipe", "nope"],
    ["train", "--lr-bank", "abc"],
    ["train", "--topk", "500"],
    ["train", "--model", "/nonexistent"],
    ["train", "--train-file", "/nonexistent.csv", "--validation-file", "/nonexistent.csv"],
    ["compare", "--methods", "bogus"],
    ["compare", "--set", "rank=x"],
    ["ablate", "selection", "--set", "foo=1"],
    ["ablate", "vector-length", "--recipe", "nope"],
    ["ablate", "shared-bank", "--bank", "/nonexistent"],
    ["e2e", "--model", "/nonexistent", "--train-file", "/nonexistent.csv", "--test-file", "/nonexistent.csv"],
    ["plot", "/nonexistent"],
    ["predict", "/nonexistent"],
]


@pytest.mark.parametrize("argv", SETTINGS_ERRORS, ids=lambda a: " ".join(a))
def test_bad_settings_give_one_line_and_exit_2(argv, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # anything a command would write lands here
    assert main(argv) == 2
    cap = capsys.readouterr()
    lines = cap.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vblora {argv[0]}: error: "), cap.err
    assert "Traceback" not in cap.out + cap.err


def test_missing_extra_is_one_line(monkeypatch, capsys):
    """A missing optional package (here bitsandbytes for --quantize) names the extra that installs it."""
    import vblora.train.models as models

    def missing(*a, **k):
        from vblora.layout import QLORA_EXTRA

        raise ImportError(f"quantized base layers need bitsandbytes: {QLORA_EXTRA}")

    monkeypatch.setattr(models, "quantization", missing)
    assert main(["train", "--quantize", "4bit", "--max-train-samples", "8"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["vblora train: error: quantized base layers need bitsandbytes: pip install 'vblora[qlora]'"]


def test_info_lists_every_optional_part(capsys):
    """`vblora info` names each optional library a command or guide relies on (bitsandbytes was missing)."""
    from vblora.cli import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for part in ("transformers", "peft", "accelerate", "bitsandbytes", "trl", "vllm", "safetensors"):
        assert f"  {part} " in out, part
