"""`LoRAFileLayout` (the vLLM plugin's cold-start writer) against `export_lora`: the same bytes, file for file, for
every module kind and layout, including a vector length that does not divide a dimension (A trimmed) and an
embedding; one layout serves every adapter of that layout; anything else is refused."""

from __future__ import annotations

import pytest
import torch

from vblora.errors import VBLoRAError
from vblora.storage import export_lora
from vblora.storage.lora import LoRAFileLayout
from vblora.storage.snapshot import take_snapshot

try:  # tests/ may or may not be a package
    from _storage_models import adapted
except ImportError:
    from tests._storage_models import adapted


def exported(snap, d) -> dict[str, bytes]:
    out = export_lora(snap, d)
    return {p.name: p.read_bytes() for p in out.iterdir()}


def other_adapter(snap, seed: int):
    """The same layout with another bank and selection (what a second adapter on the same base looks like)."""
    g = torch.Generator().manual_seed(seed)
    h = snap.bank.shape[0]
    snap.bank = torch.randn(snap.bank.shape, generator=g)
    snap.indices = torch.randint(0, h, snap.indices.shape, generator=g).to(snap.indices.dtype)
    snap.weights = torch.rand(snap.weights.shape, generator=g).softmax(dim=1)
    return snap


@pytest.mark.parametrize(
    "family,changes",
    [
        ("llama", {"target_modules": "all-linear"}),
        ("gpt2", {"target_modules": ["wte", "c_attn", "c_fc"]}),  # Conv1D (fan_in_fan_out) and an embedding
        ("roberta", {"target_modules": "all-linear", "vector_length": 48}),  # 48 divides no width: trimmed factors
    ],
)
def test_bytes_equal_export_lora_for_every_adapter_of_the_layout(tmp_path, family, changes):
    model, _ = adapted(family, **changes)
    snap = take_snapshot(model)
    file_layout = LoRAFileLayout(snap)
    for seed in range(3):  # the layout made once, used for adapters with other banks and selections
        snap = other_adapter(snap, seed) if seed else snap
        got = {name: bytes(data) for name, data in file_layout.files(snap, snap.subvectors()).items()}
        assert got == exported(snap, tmp_path / str(seed))


def test_another_layout_or_trained_heads_are_refused():
    llama = take_snapshot(adapted("llama")[0])
    file_layout = LoRAFileLayout(llama)
    gpt2 = take_snapshot(adapted("gpt2")[0])
    with pytest.raises(VBLoRAError, match="another module layout"):
        file_layout.files(gpt2, gpt2.subvectors())
    llama.extras = {"lm_head": {"weight": torch.zeros(2, 2)}}
    with pytest.raises(VBLoRAError, match="trained heads"):
        file_layout.files(llama, llama.subvectors())
