"""`AdapterSnapshot`: the stored triplet of a model in memory, independent of any file format.

`take_snapshot(model)` reads it from an adapted model (training or inference form); `build_model(base, snap)`
rebuilds the inference form on a fresh base model, straight from indices and weights (no `(N, h)` logits), after
checking that the base model is the one the adapter was trained on. Storage and interop both go through here.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from vblora.config import VBLoRAConfig
from vblora.errors import AdapterFormatError, TargetError, VBLoRAError
from vblora.inject import BANK_ATTR, _unwrap, adapted_layers, add_vblora, find_targets, get_bank, trained_copies
from vblora.layers import Slot, VBLoRAConv1D, VBLoRAEmbedding, base_dims, layer_class, slot_sizes

MODULE_FIELDS = ("name", "kind", "in", "out", "a_start", "a_count", "b_start", "b_count")
KINDS = ("linear", "conv1d", "embedding")


@dataclass(frozen=True)
class ModuleEntry:
    """One adapted module: its qualified name, base layer kind, `(in, out)` dims and rows in the `(N, ...)` tensors."""

    name: str
    kind: str  # "linear" | "conv1d" | "embedding"
    in_features: int
    out_features: int
    slot: Slot

    def to_row(self) -> list:
        s = self.slot
        return [self.name, self.kind, self.in_features, self.out_features, s.a_start, s.a_count, s.b_start, s.b_count]

    @classmethod
    def from_row(cls, row: list) -> "ModuleEntry":
        name, kind, i, o, a0, an, b0, bn = row
        return cls(str(name), str(kind), int(i), int(o), Slot(int(a0), int(an), int(b0), int(bn)))

    @property
    def weight_shape(self) -> tuple[int, int]:
        """Shape of the base weight: `(out, in)` for Linear, transposed for Conv1D and Embedding."""
        return (self.out_features, self.in_features) if self.kind == "linear" else (self.in_features,
                                                                                     self.out_features)


@dataclass
class AdapterSnapshot:
    """The triplet plus what is needed to rebuild the model.

    bank `(h, b)` float32, indices `(N, k)` int64, weights `(N, k)` float32 (summing to 1 per row),
    modules in row order, extras {module name: state dict of its trained copy (`modules_to_save`)}.
    """

    config: VBLoRAConfig
    bank: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    modules: list[ModuleEntry]
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    architecture: str = ""
    model_type: str | None = None

    @property
    def num_subvectors(self) -> int:
        return int(self.indices.shape[0])

    def fingerprint(self) -> dict:
        """The base model's identity as the adapter sees it: class name, model_type and adapted weight shapes."""
        return base_fingerprint(self.architecture, self.model_type, self.modules)


def base_fingerprint(architecture: str, model_type: str | None, modules: list[ModuleEntry]) -> dict:
    shapes = json.dumps([[m.name, list(m.weight_shape)] for m in modules], separators=(",", ":"))
    return {"architecture": architecture, "model_type": model_type,
            "weights_sha256": hashlib.sha256(shapes.encode()).hexdigest()}


def _kind(cls: type | None) -> str:
    """File name of an adapter layer class: "conv1d" (GPT-2 Conv1D), "embedding", else "linear"."""
    if cls is not None and issubclass(cls, VBLoRAConv1D):
        return "conv1d"
    if cls is not None and issubclass(cls, VBLoRAEmbedding):
        return "embedding"
    return "linear"


def module_entries(model: nn.Module) -> list[ModuleEntry]:
    """Adapted modules of `model` in bank row order."""
    layers = adapted_layers(model)
    return [ModuleEntry(name, _kind(type(layers[name])), layers[name].in_features, layers[name].out_features, slot)
            for name, slot in get_bank(model).layout]


@torch.no_grad()
def take_snapshot(model: nn.Module) -> AdapterSnapshot:
    """Read the stored triplet from an adapted model (the eval-time top-k selection, on CPU, float32)."""
    model = _unwrap(model)
    bank = get_bank(model)
    bank.check_finite()
    indices, weights = bank.topk_selection()
    extras = {name: {k: v.detach().cpu().clone() for k, v in copy.trained.state_dict().items()}
              for name, copy in trained_copies(model).items()}
    return AdapterSnapshot(
        config=bank.config, bank=bank.bank.detach().float().cpu().clone(), indices=indices.cpu().long(),
        weights=weights.cpu().float(), modules=module_entries(model), extras=extras,
        architecture=type(model).__name__, model_type=getattr(getattr(model, "config", None), "model_type", None))


def subvectors(snap: AdapterSnapshot) -> torch.Tensor:
    """`(N, b)` composed sub-vectors of a snapshot (float32)."""
    from vblora.bank import compose_selected

    return compose_selected(snap.indices, snap.weights, snap.bank)


def lora_factors(sub: torch.Tensor, entry: ModuleEntry, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`(r, in)` A and `(out, r)` B of one module from the `(N, b)` sub-vectors; same slicing as
    `VBLoRALayer.lora_A / lora_B` (tests pin the two together), usable without a base model."""
    s = entry.slot
    A = sub[s.a_start:s.a_start + s.a_count].reshape(rank, -1)[:, :entry.in_features]
    rows = sub[s.b_start:s.b_start + s.b_count]
    nb, b = rows.shape[0] // rank, rows.shape[1]
    B = rows.view(nb, rank, b).transpose(1, 2).reshape(nb * b, rank)[:entry.out_features]
    return A, B


# -- rebuilding on a base model -----------------------------------------------------------------------------------

def refuse_adapted(base: nn.Module) -> None:
    """An adapter loads onto a plain base model only (TargetError, as `add_vblora` raises, before any comparison)."""
    if hasattr(_unwrap(base), BANK_ATTR):
        raise TargetError(f"{type(_unwrap(base)).__name__} already has a VB-LoRA adapter (model.{BANK_ATTR}); load "
                          f"onto a fresh base model, or remove it first with vblora.unload(model)")


def check_base(base: nn.Module, snap: AdapterSnapshot, source: str, strict: bool = True) -> None:
    """Raise AdapterFormatError saying what differs if `base` is not the model the adapter was saved from."""
    refuse_adapted(base)
    base = _unwrap(base)
    problems = []
    arch = type(base).__name__
    if strict and snap.architecture and arch != snap.architecture:
        problems.append(f"architecture: adapter was saved from {snap.architecture}, base model is {arch} "
                        f"(pass strict=False to load across architectures with the same module names)")
    try:
        found = find_targets(base, snap.config)
    except TargetError as e:
        raise AdapterFormatError(f"{source}: base model does not fit the adapter: {e}") from None
    have = {name: (_kind(layer_class(m)), *base_dims(m)) for name, m in found}
    want = {m.name: (m.kind, m.in_features, m.out_features) for m in snap.modules}
    missing = [n for n in want if n not in have]
    extra = [n for n in have if n not in want]
    if missing:
        problems.append(f"{len(missing)} adapted module(s) missing from the base model, e.g. {missing[:3]}")
    if extra:
        problems.append(f"{len(extra)} base module(s) match the adapter's targets but were not adapted, "
                        f"e.g. {extra[:3]}")
    for name in want:
        if name in have and have[name] != want[name]:
            k0, i0, o0 = want[name]
            k1, i1, o1 = have[name]
            problems.append(f"module {name}: adapter has {k0} {i0}->{o0}, base model has {k1} {i1}->{o1}")
    if not missing and not extra and [n for n, _ in found] != [m.name for m in snap.modules]:
        problems.append("adapted modules appear in a different order in the base model")
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems) - 6} more)" if len(problems) > 6 else "")
        raise AdapterFormatError(f"{source}: adapter does not fit this base model: {shown}")


@torch.no_grad()
def build_model(base: nn.Module, snap: AdapterSnapshot, source: str = "adapter", *, strict: bool = True,
                trainable: bool = False) -> nn.Module:
    """Wrap `base` in place with the inference form of `snap` and return it.

    The bank gets buffers `indices (N, k)` and `weights (N, k)` filled from the snapshot; no `(N, h)` logits are
    allocated. With `trainable=False` the adapter is frozen and the model put in eval mode.
    """
    check_base(base, snap, source, strict)
    try:
        model = add_vblora(base, snap.config, with_logits=False)
    except VBLoRAError as e:
        raise AdapterFormatError(f"{source}: {e}") from None
    bank = get_bank(model)
    if [(m.name, m.slot) for m in snap.modules] != list(bank.layout):
        raise AdapterFormatError(f"{source}: module offsets in the adapter do not match the layout of the base model")
    bank.bank.copy_(snap.bank.to(bank.bank.dtype))
    bank.indices.copy_(snap.indices)
    bank.weights.copy_(snap.weights.to(bank.weights.dtype))
    copies = trained_copies(model)
    if set(copies) != set(snap.extras):
        raise AdapterFormatError(f"{source}: modules_to_save {sorted(snap.extras)} do not match the base model's "
                                 f"{sorted(copies)}")
    for name, state in snap.extras.items():
        try:
            copies[name].trained.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise AdapterFormatError(f"{source}: modules_to_save entry {name}: {e}") from None
    if not trainable:
        bank.requires_grad_(False)
        for c in copies.values():
            c.trained.requires_grad_(False)
        model.eval()
    return model


def expected_slots(entries: list[ModuleEntry], rank: int, vector_length: int) -> list[Slot]:
    """The contiguous row layout `add_vblora` gives these modules (to validate a file's offsets)."""
    slots, offset = [], 0
    for e in entries:
        a, b = slot_sizes(e.in_features, e.out_features, rank, vector_length)
        slots.append(Slot(offset, a, offset + a, b))
        offset += a + b
    return slots
