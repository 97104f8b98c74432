"""Adapter files: round trips, exact sizes, precision options, wrong base models, atomic saves, shared banks."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import vblora
from vblora.errors import AdapterFormatError
from vblora.storage import load_adapter, read_adapter, save_adapter, save_bank
from vblora.storage.encoding import index_bits, pack_bits, unpack_bits

try:  # tests/ may or may not be a package
    from _storage_models import FAMILIES, adapted, output
except ImportError:
    from tests._storage_models import FAMILIES, adapted, output


def tensor_bytes(path) -> int:
    return sum(t.numel() * t.element_size() for t in load_file(path).values())


@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_round_trip_matches_outputs_without_logits(tmp_path, family):
    model, base = adapted(family)
    ref = output(model)
    loaded = load_adapter(base, save_adapter(model, tmp_path))
    bank = vblora.get_bank(loaded)
    assert bank.frozen and bank.logits is None  # inference form: no (N, h) logits allocated
    assert bank.indices.shape == (bank.num_subvectors, 2)
    assert (output(loaded) - ref).abs().max() <= 1e-6 * ref.abs().max()
    assert not any(p.requires_grad for p in loaded.parameters())


def test_round_trip_of_frozen_form_is_identical_file(tmp_path):
    model, base = adapted("llama")
    first = save_adapter(model, tmp_path / "a")
    loaded = load_adapter(base, first)
    second = save_adapter(loaded, tmp_path / "b")
    assert load_file(first).keys() == load_file(second).keys()
    assert all(torch.equal(load_file(first)[k], load_file(second)[k]) for k in load_file(first))


def test_modules_to_save_round_trip(tmp_path):
    model, base = adapted("roberta", head=True, target_modules=["query", "value"], modules_to_save=["classifier"])
    ref = output(model)
    path = save_adapter(model, tmp_path)
    assert any(k.startswith("modules_to_save.classifier.") for k in load_file(path))
    count = vblora.count_parameters(model)
    assert tensor_bytes(path) == count["stored_bytes"]
    assert torch.allclose(output(load_adapter(base, path)), ref, atol=1e-6)


def test_roberta_base_fp32_bytes_equal_paper_count_and_header_small(tmp_path):
    with torch.device("meta"):
        base = transformers.RobertaModel(transformers.RobertaConfig())
    base.to_empty(device="cpu")
    cfg = vblora.VBLoRAConfig(
        target_modules=["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"],
        rank=4,
        num_vectors=90,
        vector_length=256,
        topk=2,
    )
    model = vblora.add_vblora(base, cfg)
    with torch.no_grad():
        vblora.get_bank(model).bank.uniform_(-0.02, 0.02)
    count = vblora.count_parameters(model)
    assert count["stored"] == 26928 and len(vblora.adapted_layers(model)) == 72
    path = save_adapter(model, tmp_path)
    assert tensor_bytes(path) == count["stored"] * 4 == 107712
    assert os.path.getsize(path) - tensor_bytes(path) <= 16 * 1024
    assert load_file(path)["indices"].dtype == torch.uint8
    # against PEFT's save_only_topk_weights layout of the same adapter (bench/storage_sizes.py uses PEFT's own file)
    from vblora.storage.peft_vblora import export_peft

    peft_topk = os.path.getsize(
        export_peft(model, tmp_path / "peft", save_only_topk_weights=True) / "adapter_model.safetensors"
    )
    assert os.path.getsize(save_adapter(model, tmp_path / "fp16", precision="fp16")) <= 0.6 * peft_topk
    assert (
        os.path.getsize(save_adapter(model, tmp_path / "int8", precision="int8", pack_indices=True)) <= 0.35 * peft_topk
    )


@pytest.mark.parametrize(
    "precision,pack,tol",
    [("fp16", False, 2e-3), ("bf16", False, 2e-2), ("int8", False, 3e-2), ("int8", True, 3e-2), ("fp32", True, 1e-6)],
)
def test_precision_options_shrink_file_with_small_output_change(tmp_path, precision, pack, tol):
    model, base = adapted("llama")
    ref = output(model)
    fp32 = os.path.getsize(save_adapter(model, tmp_path / "fp32"))
    path = save_adapter(model, tmp_path / precision, precision=precision, pack_indices=pack)
    assert os.path.getsize(path) < fp32
    got = output(load_adapter(base, path))
    assert (got - ref).abs().max() <= tol * ref.abs().max()
    assert read_adapter(path)[1]["header"]["precision"] == precision


def test_int8_weights_stay_a_probability_vector(tmp_path):
    model, _ = adapted("gpt2", topk=4)
    snap, _ = read_adapter(save_adapter(model, tmp_path, precision="int8"))
    assert (snap.weights >= 0).all() and torch.allclose(snap.weights.sum(1), torch.ones(len(snap.weights)))


@pytest.mark.parametrize("h", [1, 2, 3, 90, 255, 256, 257, 2048, 65536])
def test_pack_bits_round_trip(h):
    values = torch.randint(0, h, (37, 3))
    bits = index_bits(h)
    packed = pack_bits(values, bits)
    assert packed.numel() == -(-values.numel() * bits // 8)
    assert torch.equal(unpack_bits(packed, bits, values.numel()).view(37, 3), values)


def test_wrong_base_model_says_what_differs(tmp_path):
    model, _ = adapted("roberta")
    path = save_adapter(model, tmp_path)
    other = transformers.RobertaModel(
        transformers.RobertaConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            vocab_size=100,
            max_position_embeddings=40,
        )
    )
    with pytest.raises(
        AdapterFormatError,
        match=r"intermediate\.dense: adapter has linear 64->128, base model has "
        r"linear 64->256",
    ):
        load_adapter(other, path)
    _, gpt_base = adapted("gpt2")
    with pytest.raises(AdapterFormatError, match="architecture: adapter was saved from RobertaModel"):
        load_adapter(gpt_base, path)
    assert not hasattr(other, "vblora_bank")  # a failed load leaves the base untouched


def test_strict_false_accepts_another_class_with_same_modules(tmp_path):
    model, base = adapted("roberta")
    path = save_adapter(model, tmp_path)

    class Renamed(transformers.RobertaModel):
        pass

    other = Renamed(base.config).eval()
    other.load_state_dict(base.state_dict())
    with pytest.raises(AdapterFormatError, match="Renamed"):
        load_adapter(copy.deepcopy(other), path)
    assert torch.allclose(output(load_adapter(other, path, strict=False)), output(model), atol=1e-6)


def test_crash_mid_save_leaves_previous_adapter_loadable(tmp_path, monkeypatch):
    model, base = adapted("gpt2")
    path = save_adapter(model, tmp_path)
    before = path.read_bytes()
    ref = output(model)
    with torch.no_grad():
        vblora.get_bank(model).bank.mul_(2)

    def crash(fd):  # the temporary file holds a partial write when the "disk fills up"
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="No space"):
        save_adapter(model, tmp_path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["adapter.safetensors"]  # no temporary left behind
    assert torch.allclose(output(load_adapter(base, path)), ref, atol=1e-6)


def test_crash_after_partial_write(tmp_path, monkeypatch):
    import vblora.storage.files as sf

    model, base = adapted("llama")
    path = save_adapter(model, tmp_path)
    before = path.read_bytes()
    monkeypatch.setattr(sf, "CHUNK", 64)
    real_fdopen, written = os.fdopen, []

    class Exploding:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def write(self, data):
            if written:
                raise RuntimeError("killed mid-save")
            written.append(len(data))
            return self.f.write(data)

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Exploding(real_fdopen(fd, mode)))
    with pytest.raises(RuntimeError, match="killed"):
        save_adapter(model, tmp_path, precision="fp16")
    monkeypatch.undo()
    assert written and path.read_bytes() == before and os.listdir(tmp_path) == ["adapter.safetensors"]
    load_adapter(base, path)


def _rewrite(path, tensors=None, header=None):
    """Rewrite an adapter file by hand, keeping everything not given."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    old = load_file(path)
    h = json.loads(meta["vblora"])
    if header:
        h.update(header)
    save_file(tensors if tensors is not None else old, str(path), metadata={"format": "pt", "vblora": json.dumps(h)})


@pytest.mark.parametrize(
    "edit,message",
    [
        (lambda t, h: (dict(t, indices=torch.full_like(t["indices"], 25)), None), r"index 25 >= num_vectors 20"),
        (lambda t, h: (dict(t, weights=torch.full_like(t["weights"], float("nan"))), None), "NaN"),
        (lambda t, h: (dict(t, weights=t["weights"][:-1]), None), r"tensor 'weights' is torch.float32 \("),
        (lambda t, h: (dict(t, weights=t["weights"].double()), None), "torch.float64"),
        (lambda t, h: ({k: v for k, v in t.items() if k != "bank"}, None), r"missing \['bank'\]"),
        (lambda t, h: (dict(t, bank=t["bank"] + 1), None), "sha256"),
        (lambda t, h: (t, {"format_version": 99}), "unknown format version 99"),
        (lambda t, h: (t, {"config": dict(h["config"], dropout=0.5)}), "header fields were edited"),
        (lambda t, h: (t, {"config": dict(h["config"], rank="four")}), "malformed header"),
        (lambda t, h: (t, {"modules": h["modules"][1:]}), "offsets"),
    ],
)
def test_hand_edited_files_raise_format_error(tmp_path, edit, message):
    model, base = adapted("roberta")
    path = save_adapter(model, tmp_path)
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        header = json.loads(f.metadata()["vblora"])
    tensors, header_changes = edit(load_file(path), header)
    _rewrite(path, tensors, header_changes)
    with pytest.raises(AdapterFormatError, match=message) as info:
        load_adapter(base, path)
    assert str(path) in str(info.value)


def test_truncated_and_flipped_files(tmp_path):
    model, base = adapted("gpt2")
    path = save_adapter(model, tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterFormatError, match=r"truncated|corrupt"):
        load_adapter(copy.deepcopy(base), path)
    flipped = bytearray(data)
    flipped[-10] ^= 0x40
    path.write_bytes(bytes(flipped))
    with pytest.raises(AdapterFormatError, match=r"sha256|NaN|probability|index"):
        load_adapter(copy.deepcopy(base), path)
    path.write_bytes(b"\x00" * 4)
    with pytest.raises(AdapterFormatError, match="truncated"):
        load_adapter(base, path)
    with pytest.raises(FileNotFoundError):
        load_adapter(base, tmp_path / "nowhere")


def test_shared_bank_reference(tmp_path):
    model, base = adapted("llama")
    ref = output(model)
    bank_file = save_bank(model, tmp_path / "shared")
    path = save_adapter(model, tmp_path / "task", bank="reference")
    assert "bank" not in load_file(path)
    assert os.path.getsize(path) < os.path.getsize(save_adapter(model, tmp_path / "embedded"))
    with pytest.raises(AdapterFormatError, match="bank_path"):
        load_adapter(copy.deepcopy(base), path)
    loaded = load_adapter(copy.deepcopy(base), path, bank_path=bank_file)
    assert torch.allclose(output(loaded), ref, atol=1e-6)
    other, _ = adapted("llama")
    with torch.no_grad():
        vblora.get_bank(other).bank.add_(1e-3)
    wrong = save_bank(other, tmp_path / "other.safetensors")
    with pytest.raises(AdapterFormatError, match="shared bank mismatch"):
        load_adapter(base, path, bank_path=wrong)


def test_save_rejects_bad_options(tmp_path):
    model, _ = adapted("llama")
    with pytest.raises(AdapterFormatError, match="precision"):
        save_adapter(model, tmp_path, precision="fp8")
    with pytest.raises(AdapterFormatError, match="bank"):
        save_adapter(model, tmp_path, bank="elsewhere")


def test_non_dividing_vector_length_and_embedding_round_trip(tmp_path):
    model, base = adapted("gpt2", target_modules=["wte", "c_attn", "c_fc"], vector_length=48)
    ref = output(model)
    kinds = {m.kind for m in read_adapter(save_adapter(model, tmp_path))[0].modules}
    assert kinds == {"embedding", "conv1d"}
    assert (output(load_adapter(base, tmp_path)) - ref).abs().max() <= 1e-6 * ref.abs().max()


def test_public_api():
    for name in (
        "save_adapter",
        "load_adapter",
        "export_peft",
        "import_peft",
        "export_lora",
        "merge_and_save",
        "AdapterFormatError",
        "save_bank",
        "save_checkpoint",
        "load_checkpoint",
    ):
        assert name in vblora.__all__ and hasattr(vblora, name)
    assert vblora.AdapterFormatError is AdapterFormatError and issubclass(AdapterFormatError, ValueError)


def test_loading_onto_an_adapted_model_is_refused(tmp_path):
    from vblora.errors import TargetError
    from vblora.storage.peft_vblora import export_peft, import_peft

    model, _ = adapted("llama")
    path = save_adapter(model, tmp_path / "a")
    with pytest.raises(TargetError, match="already has a VB-LoRA adapter"):
        load_adapter(model, path)
    with pytest.raises(TargetError, match="already has a VB-LoRA adapter"):
        import_peft(model, export_peft(model, tmp_path / "p"))
