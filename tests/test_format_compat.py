"""Adapter files written by earlier vblora keep reading.

`tests/data/adapter-v1-weights_sha256.safetensors` was written by vblora 0.1.0 at commit b4671de (before the
fingerprint's names-and-shapes digest was renamed from `weights_sha256` to `shapes_sha256`), with
`_storage_models.adapted("roberta", target_modules=["query", "value"])` and `save_adapter(model, dir,
precision="fp32")`; it is committed as written, 4,736 bytes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from vblora.cli import main
from vblora.storage import load_adapter, read_adapter, save_adapter
from vblora.storage.files import parse_json_metadata, read_safetensors
from vblora.storage.snapshot import shapes_sha256

try:  # tests/ may or may not be a package
    from _storage_models import adapted, inputs, tiny_base
except ImportError:
    from tests._storage_models import adapted, inputs, tiny_base

OLD_FILE = Path(__file__).parent / "data" / "adapter-v1-weights_sha256.safetensors"
OLD_DIGEST = "ac90d3680993cb752be78a809d50c47325cac11002c77f8d9b35e0b7ba08d487"  # as stored in that file


def header_of(file: Path) -> dict:
    _, metadata, _ = read_safetensors(file)
    return parse_json_metadata(file, metadata, "vblora")


def test_file_of_vblora_0_1_0_loads_and_computes_as_written():
    assert header_of(OLD_FILE)["base"]["weights_sha256"] == OLD_DIGEST  # the fixture still holds the old key
    model, _ = adapted("roberta", target_modules=["query", "value"])  # the model that file was saved from
    loaded = load_adapter(tiny_base("roberta"), OLD_FILE)
    ids = inputs()
    with torch.no_grad():
        want, got = model(input_ids=ids).last_hidden_state, loaded(input_ids=ids).last_hidden_state
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_inspect_shows_the_names_and_shapes_digest_of_old_and_new_files(tmp_path, capsys):
    assert main(["inspect", str(OLD_FILE)]) == 0
    assert f"and shapes sha256 {OLD_DIGEST[:16]}" in capsys.readouterr().out
    model, _ = adapted("roberta", target_modules=["query", "value"])
    new = save_adapter(model, tmp_path, precision="fp32")
    base = header_of(new)["base"]
    assert "weights_sha256" not in base and shapes_sha256(base) == base["shapes_sha256"] == OLD_DIGEST
    assert main(["inspect", str(new)]) == 0
    assert f"and shapes sha256 {OLD_DIGEST[:16]}" in capsys.readouterr().out


def test_shapes_digest_hashes_module_names_and_shapes_not_weights():
    snap = read_adapter(OLD_FILE)[0]
    rows = [[m.name, list(m.weight_shape)] for m in snap.modules]
    assert (
        snap.fingerprint()["shapes_sha256"]
        == hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()
        == OLD_DIGEST
    )
    snap.bank.mul_(2)  # other weights, same names and shapes: same digest
    assert snap.fingerprint()["shapes_sha256"] == OLD_DIGEST
