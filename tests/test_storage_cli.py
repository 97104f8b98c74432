"""`vblora inspect`, `vblora export`, `vblora import-peft` on tiny models saved to local directories."""

from __future__ import annotations

import copy
import json

import pytest

from vblora.cli import main
from vblora.storage import load_adapter, save_adapter

try:  # tests/ may or may not be a package
    from _storage_models import adapted, output
except ImportError:
    from tests._storage_models import adapted, output

peft = pytest.importorskip("peft")


def test_inspect_reports_sizes_and_verification(tmp_path, capsys):
    model, _ = adapted("roberta")
    path = save_adapter(model, tmp_path, precision="fp16", pack_indices=True)
    assert main(["inspect", str(tmp_path), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["verified"] == "ok" and info["precision"] == "fp16" and info["modules"] == 12
    assert sum(info["bytes"].values()) == path.stat().st_size
    assert info["base"]["architecture"] == "RobertaModel"
    assert main(["inspect", str(tmp_path)]) == 0
    assert "stored parameters" in capsys.readouterr().out
    data = bytearray(path.read_bytes())
    data[-3] ^= 0xFF
    path.write_bytes(bytes(data))
    assert main(["inspect", str(path)]) == 1
    assert "FAILED" in capsys.readouterr().out


def test_export_and_import_peft_via_cli(tmp_path):
    model, base = adapted("gpt2")
    ref = output(model)
    base.save_pretrained(tmp_path / "base")
    save_adapter(model, tmp_path / "ours")
    assert main(["export", str(tmp_path / "ours"), "--to", "peft", "--topk-only", "-o", str(tmp_path / "peft")]) == 0
    assert (
        main(["import-peft", str(tmp_path / "peft"), "--base", str(tmp_path / "base"), "-o", str(tmp_path / "back")])
        == 0
    )
    assert (output(load_adapter(copy.deepcopy(base), tmp_path / "back")) - ref).abs().max() <= 1e-5
    assert main(["export", str(tmp_path / "ours"), "--to", "lora", "-o", str(tmp_path / "lora")]) == 0
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora").eval()
    assert (output(lora) - ref).abs().max() <= 1e-5
    assert (
        main(
            [
                "export",
                str(tmp_path / "ours"),
                "--to",
                "merged",
                "--base",
                str(tmp_path / "base"),
                "-o",
                str(tmp_path / "merged"),
            ]
        )
        == 0
    )
    merged = type(base).from_pretrained(tmp_path / "merged").eval()
    assert (output(merged) - ref).abs().max() <= 1e-5


def test_inspect_shared_bank_and_reference_adapter(tmp_path, capsys):
    from vblora.storage import save_bank

    model, _ = adapted("llama")
    save_bank(model, tmp_path / "bank")
    save_adapter(model, tmp_path / "task", bank="reference")
    assert main(["inspect", str(tmp_path / "bank"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["shape"] == [20, 32]
    assert main(["inspect", str(tmp_path / "task")]) == 1  # the bank is needed to verify
    assert "--bank" in capsys.readouterr().out
    assert main(["inspect", str(tmp_path / "task"), "--bank", str(tmp_path / "bank")]) == 0
