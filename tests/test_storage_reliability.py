"""Issue 11 for files and exports: permissions, stale temporaries, whole-directory exports, exports PEFT's Auto
classes can load, tied embeddings in merged exports, the wrong base checkpoint, absurd banks, PEFT directories given
to load_adapter, and classifier adapters that carry their label names."""

from __future__ import annotations

import copy
import os
import stat
import subprocess
import sys

import pytest
import torch
import transformers

import vblora
from vblora.errors import AdapterFormatError, VBLoRAError
from vblora.storage import native
from vblora.storage.snapshot import take_snapshot

try:  # tests/ may or may not be a package
    from _storage_models import adapted, output, tiny_base, tiny_config
except ImportError:
    from tests._storage_models import adapted, output, tiny_base, tiny_config


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_get_the_usual_permissions(tmp_path):
    model, _ = adapted("llama")
    old = os.umask(0o022)
    try:
        f = vblora.save_adapter(model, tmp_path / "a")
        d = vblora.export_lora(model, tmp_path / "lora")
        merged = vblora.merge_and_save(model, tmp_path / "merged")  # transformers' save_pretrained writes 0600
    finally:
        os.umask(old)
    assert mode(f) == 0o644
    for directory in (d, merged):
        assert mode(directory) == 0o755 and {mode(p) for p in directory.iterdir()} == {0o644}, directory


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_temporaries_of_a_killed_save_are_removed(tmp_path):
    model, _ = adapted("llama")
    stale = tmp_path / f".adapter.safetensors.{dead_pid()}.abc.tmp"
    live = tmp_path / f".adapter.safetensors.{os.getpid()}.xyz.tmp"  # a save in progress in a live process
    tmp_path.mkdir(exist_ok=True)
    stale.write_bytes(b"partial")
    live.write_bytes(b"partial")
    vblora.save_adapter(model, tmp_path)
    assert not stale.exists() and live.exists()


def test_directory_exports_are_replaced_as_a_whole(tmp_path, monkeypatch):
    model, _ = adapted("gpt2")
    out = vblora.export_peft(model, tmp_path / "peft")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with torch.no_grad():
        vblora.get_bank(model).bank.add_(1.0)
    from vblora.storage import files

    real = files.atomic_write

    def fail_on_config(path, data):  # weights written, then the disk fills before the config
        if path.name == "adapter_config.json":
            raise OSError(28, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(files, "atomic_write", fail_on_config)
    monkeypatch.setattr("vblora.storage.peft_vblora.atomic_write", fail_on_config)
    with pytest.raises(OSError):
        vblora.export_peft(model, out)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the old export, complete and unmixed
    assert [p.name for p in tmp_path.iterdir()] == ["peft"]  # no temporary left behind
    vblora.export_peft(model, out)  # a later export replaces it
    assert {p.name: p.read_bytes() for p in out.iterdir()} != before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(VBLoRAError, match="holds other files"):
        vblora.export_lora(model, tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_exports_load_with_peft_auto_classes(tmp_path):
    peft = pytest.importorskip("peft")
    tiny_base("llama", head=True).save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    model = vblora.add_vblora(copy.deepcopy(base), tiny_config())
    with torch.no_grad():
        vblora.get_bank(model).bank.normal_(0, 0.1)
    ref = output(model.eval())
    for export in (vblora.export_peft, vblora.export_lora):
        d = export(model, tmp_path / export.__name__)
        loaded = peft.AutoPeftModelForCausalLM.from_pretrained(d).eval()  # base found by its recorded path
        torch.testing.assert_close(output(loaded), ref, rtol=1e-4, atol=1e-4)


def test_merged_export_of_tied_embeddings_stays_consistent(tmp_path):
    model, _ = adapted("gpt2", head=True, target_modules=["wte", "c_attn"])
    assert model.config.tie_word_embeddings
    ref = output(model)
    out = vblora.merge_and_save(model, tmp_path / "merged")
    plain = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert not plain.config.tie_word_embeddings
    torch.testing.assert_close(output(plain), ref, rtol=1e-4, atol=1e-4)


def test_another_checkpoint_of_the_same_shapes_is_refused(tmp_path):
    model, base = adapted("llama", head=True)
    vblora.save_adapter(model, tmp_path)
    other = copy.deepcopy(base)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    with pytest.raises(AdapterFormatError, match=r"weights differ.*verify_weights=False"):
        vblora.load_adapter(copy.deepcopy(other), tmp_path)
    vblora.load_adapter(other, tmp_path, verify_weights=False)  # the explicit override
    same_bf16 = copy.deepcopy(base).to(torch.bfloat16)  # the same checkpoint in another dtype loads
    vblora.load_adapter(same_bf16, tmp_path)


def test_a_finite_but_absurd_bank_is_refused(tmp_path):
    model, base = adapted("llama")
    snap = take_snapshot(model)
    snap.bank[3, 5] = 1e30  # valid digests: the file is written by the encoder itself
    tensors, header = native.encode(snap)
    native.write_adapter(tmp_path / "adapter.safetensors", tensors, header)
    with pytest.raises(AdapterFormatError, match="not a trained bank"):
        vblora.load_adapter(base, tmp_path)


def test_peft_directory_given_to_load_adapter_points_to_import_peft(tmp_path):
    model, base = adapted("llama")
    d = vblora.export_peft(model, tmp_path / "peft")
    with pytest.raises(AdapterFormatError, match=r"import_peft"):
        vblora.load_adapter(base, d)


def test_classifier_adapter_carries_its_label_names(tmp_path):
    base = tiny_base("roberta", head=True)
    base.config.id2label, base.config.label2id = {0: "negative", 1: "positive"}, {"negative": 0, "positive": 1}
    model = vblora.add_vblora(copy.deepcopy(base), tiny_config(modules_to_save=["classifier"]))
    vblora.save_adapter(model, tmp_path)
    fresh = copy.deepcopy(base)
    fresh.config.id2label, fresh.config.label2id = {0: "LABEL_0", 1: "LABEL_1"}, {"LABEL_0": 0, "LABEL_1": 1}
    loaded = vblora.load_adapter(fresh, tmp_path)
    assert loaded.config.id2label == {0: "negative", 1: "positive"}
    three = transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(**{**base.config.to_dict(), "num_labels": 3, "id2label": None, "label2id": None})
    )
    with pytest.raises(AdapterFormatError, match=r"2 labels \(negative, positive\).*num_labels=2"):
        vblora.load_adapter(three, tmp_path, verify_weights=False)


SAVE_ONE = """
import hashlib, sys, torch, vblora
sys.path.insert(0, sys.argv[2])
from tiny_models import tiny_llama
torch.manual_seed(0)
cfg = vblora.VBLoRAConfig(target_modules=["q_proj", "v_proj"], rank=4, num_vectors=32, vector_length=32, seed=0)
path = vblora.save_adapter(vblora.add_vblora(tiny_llama(), cfg), sys.argv[1])
print(hashlib.sha256(path.read_bytes()).hexdigest())
"""


def test_the_same_adapter_gives_the_same_bytes_in_every_process(tmp_path):
    """safetensors writes its metadata map in hash order, which changes per process: five processes saving the same
    adapter got two different files before the keys were sorted (each had a 1 in 2 chance of either order)."""
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", SAVE_ONE, str(tmp_path / f"a{i}.safetensors"), tests_dir],
            stdout=subprocess.PIPE,
            text=True,
        )
        for i in range(5)
    ]
    digests = {p.communicate(timeout=300)[0].strip() for p in procs}
    assert len(digests) == 1 and all(len(d) == 64 for d in digests), digests


def test_sorted_metadata_keeps_tensors_and_metadata():
    """A header whose metadata came out unsorted is rewritten sorted; tensors, metadata and alignment are kept."""
    import json
    import struct

    from safetensors.torch import load

    from vblora.storage.files import sorted_metadata

    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    header = {
        "__metadata__": {"z": "1", "a": 'q"\\\n2'},
        "t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    shuffled = struct.pack("<Q", len(text)) + text + data
    fixed = sorted_metadata(shuffled)
    (n,) = struct.unpack("<Q", fixed[:8])
    assert n % 8 == 0 and list(json.loads(fixed[8 : 8 + n])["__metadata__"]) == ["a", "z"]
    assert torch.equal(load(fixed)["t"], torch.arange(6, dtype=torch.float32).reshape(2, 3))
    assert fixed[8 + n :] == data and sorted_metadata(fixed) == fixed
