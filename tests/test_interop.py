"""Interop checked by outputs: HF PEFT VB-LoRA both ways (both variants), plain-LoRA export, merged model."""

from __future__ import annotations

import copy

import pytest
import torch

import vblora
from vblora.errors import AdapterFormatError
from vblora.storage import export_lora, load_adapter, merge_and_save, save_adapter
from vblora.storage.peft_vblora import export_peft, import_peft
from vblora.storage.snapshot import take_snapshot

try:  # tests/ may or may not be a package
    from _storage_models import FAMILIES, adapted, inputs, output, tiny_base
except ImportError:
    from tests._storage_models import FAMILIES, adapted, inputs, output, tiny_base

peft = pytest.importorskip("peft")
TOL = 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("topk_only", [False, True])
def test_export_to_peft_and_back(tmp_path, family, topk_only):
    model, base = adapted(family)
    ref = output(model)
    out = export_peft(model, tmp_path, save_only_topk_weights=topk_only)
    in_peft = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert (output(in_peft) - ref).abs().max() <= TOL
    back = import_peft(copy.deepcopy(base), out)
    assert vblora.get_bank(back).frozen == topk_only  # top-k variant: inference form, no (N, h) logits
    assert (output(back) - ref).abs().max() <= TOL


@pytest.mark.parametrize("family", ["roberta", "gpt2"])
@pytest.mark.parametrize("topk_only", [False, True])
def test_import_adapter_trained_in_peft(tmp_path, family, topk_only):
    base = tiny_base(family)
    cfg = peft.VBLoRAConfig(
        target_modules=["query", "value", "dense"] if family == "roberta" else ["c_attn", "c_fc"],
        r=2,
        num_vectors=24,
        vector_length=32,
        topk=2,
        init_logits_std=1.0,
        fan_in_fan_out=family == "gpt2",
        save_only_topk_weights=topk_only,
    )
    theirs = peft.get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        theirs.base_model.vblora_vector_bank["default"].normal_(0, 0.1)
    ref = output(theirs)
    theirs.save_pretrained(tmp_path)
    ours = import_peft(copy.deepcopy(base), tmp_path)
    assert (output(ours) - ref).abs().max() <= TOL
    # and on through our own file format
    again = load_adapter(copy.deepcopy(base), save_adapter(ours, tmp_path / "ours"))
    assert (output(again) - ref).abs().max() <= TOL


def test_full_logits_import_can_keep_training(tmp_path):
    model, base = adapted("llama")
    out = export_peft(model, tmp_path)
    ours = import_peft(copy.deepcopy(base), out, trainable=True)
    bank = vblora.get_bank(ours)
    assert torch.equal(bank.logits, vblora.get_bank(model).logits)
    assert bank.logits.requires_grad


def test_int8_adapter_is_dequantised_on_export(tmp_path):
    model, base = adapted("gpt2")
    path = save_adapter(model, tmp_path / "a", precision="int8", pack_indices=True)
    ref = output(load_adapter(copy.deepcopy(base), path))
    out = export_peft(path, tmp_path / "peft", save_only_topk_weights=True)
    assert (output(peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()) - ref).abs().max() <= TOL


def test_peft_cannot_represent_non_dividing_or_embedding(tmp_path):
    model, _ = adapted("roberta", vector_length=48)
    with pytest.raises(AdapterFormatError, match=r"encoder\.layer\.0\.attention\.self\.query: vector_length 48"):
        export_peft(model, tmp_path)
    model, _ = adapted("gpt2", target_modules=["wte", "c_attn"])
    with pytest.raises(AdapterFormatError, match="module wte: Embedding"):
        export_peft(model, tmp_path)


def test_import_onto_wrong_base_names_the_module(tmp_path):
    model, _ = adapted("roberta")
    out = export_peft(model, tmp_path, save_only_topk_weights=True)
    with pytest.raises(AdapterFormatError, match="missing from the base model"):
        import_peft(tiny_base("llama"), out)


@pytest.mark.parametrize(
    "family,targets",
    [("roberta", "all-linear"), ("gpt2", "all-linear"), ("llama", "all-linear"), ("gpt2", ["wte", "c_attn"])],
)
def test_export_lora_loads_in_peft_with_same_outputs(tmp_path, family, targets):
    model, base = adapted(family, target_modules=targets)
    ref = output(model)
    out = export_lora(model, tmp_path)
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert isinstance(lora.peft_config["default"], peft.LoraConfig)
    assert (output(lora) - ref).abs().max() <= TOL


def test_lora_factors_match_layers():
    model, _ = adapted("gpt2", vector_length=48)  # non-dividing: excess entries dropped the same way
    snap = take_snapshot(model)
    sub = snap.subvectors()
    for entry in snap.modules:
        layer = vblora.adapted_layers(model)[entry.name]
        A, B = snap.layout.factors(sub, entry)
        with torch.no_grad():
            assert torch.allclose(A, layer.lora_A(), atol=1e-7) and torch.allclose(B, layer.lora_B(), atol=1e-7)


@pytest.mark.parametrize("family", ["roberta", "gpt2"])
def test_merge_and_save_loads_as_plain_model(tmp_path, family):
    model, base = adapted(family, head=True, modules_to_save=["classifier"] if family == "roberta" else ())
    ref = output(model)
    merge_and_save(model, tmp_path)
    plain = type(base).from_pretrained(tmp_path).eval()
    assert (output(plain) - ref).abs().max() <= TOL
    assert torch.equal(output(model), ref)  # the adapted model itself is unchanged
    assert not any(layer.merged for layer in vblora.adapted_layers(model).values())


def test_export_from_file_equals_export_from_model(tmp_path):
    model, base = adapted("llama")
    path = save_adapter(model, tmp_path / "a")
    export_lora(path, tmp_path / "from_file")
    lora = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "from_file").eval()
    assert (output(lora, inputs(3)) - output(model, inputs(3))).abs().max() <= TOL


@pytest.mark.parametrize("topk_only", [False, True])
def test_modules_to_save_travel_through_peft(tmp_path, topk_only):
    model, base = adapted("roberta", head=True, target_modules=["query", "value"], modules_to_save=["classifier"])
    ref = output(model)
    out = export_peft(model, tmp_path / "ours", save_only_topk_weights=topk_only)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), out).eval()
    assert (output(theirs) - ref).abs().max() <= TOL
    theirs.save_pretrained(tmp_path / "theirs")  # PEFT's own file, with its modules_to_save keys
    assert (output(import_peft(copy.deepcopy(base), tmp_path / "theirs")) - ref).abs().max() <= TOL


def test_reinflated_peft_logits_import_as_inference_form(tmp_path):
    model, base = adapted("gpt2")
    ref = output(model)
    theirs = peft.PeftModel.from_pretrained(
        copy.deepcopy(base), export_peft(model, tmp_path / "a", save_only_topk_weights=True)
    )
    theirs.peft_config["default"].save_only_topk_weights = False
    theirs.save_pretrained(tmp_path / "b")  # dense logits, -inf outside the top-k
    ours = import_peft(copy.deepcopy(base), tmp_path / "b")
    assert vblora.get_bank(ours).frozen
    assert (output(ours) - ref).abs().max() <= TOL
