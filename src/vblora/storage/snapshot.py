"""`AdapterSnapshot`: an adapter in memory, independent of any file format. Every format reads and writes one.

`take_snapshot(model)` reads it from an adapted model (training or inference form); `build_model(base, snap)` is the
one loader: it checks that the base model is the one the adapter was made for, then rebuilds the adapter on it,
straight from indices and weights (inference form, no `(N, h)` logits) or from logits (training form, when the
snapshot carries them, e.g. a PEFT full-logits directory).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import torch
from torch import nn

from vblora.bank import compose_selected
from vblora.config import VBLoRAConfig
from vblora.errors import AdapterFormatError, TargetError, VBLoRAError
from vblora.inject import BANK_ATTR, adapted_layers, add_vblora, find_targets, get_bank, trained_copies, unwrap
from vblora.layout import Layout, ModuleEntry, is_quantized, kind_of, module_dims


@dataclass
class AdapterSnapshot:
    """The triplet plus what is needed to rebuild the model.

    bank `(h, b)` float32, indices `(N, k)` int64, weights `(N, k)` float32 (summing to 1 per row), modules in row
    order, extras {module name: state dict of its trained copy (`modules_to_save`)}, and, for a training-form
    source only, logits `(N, h)` float32.
    """

    config: VBLoRAConfig
    bank: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor
    modules: list[ModuleEntry]
    extras: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    architecture: str = ""
    model_type: str | None = None
    logits: torch.Tensor | None = None
    name_or_path: str | None = None  # the base model's name or local path, when known
    task_type: str | None = None  # PEFT's task type of the base model class (CAUSAL_LM, SEQ_CLS, ...)
    id2label: dict[str, str] | None = None  # label names of a classifier, by class id
    weight_sample: dict[str, list[float]] = field(default_factory=dict)  # base weights at fixed positions

    @property
    def layout(self) -> Layout:
        return Layout(self.modules, self.config.rank, self.config.vector_length)

    def subvectors(self) -> torch.Tensor:
        """`(N, b)` float32 composed by the stored rule."""
        return compose_selected(self.indices, self.weights, self.bank)

    def fingerprint(self) -> dict:
        """The base model's identity as the adapter sees it: class name, model_type, the sha256 of the adapted
        modules' names and weight shapes (`shapes_sha256`), a strided sample of a few adapted weights (tells two
        checkpoints of one architecture apart), its name."""
        shapes = json.dumps([[m.name, list(m.weight_shape)] for m in self.modules], separators=(",", ":"))
        return {
            "architecture": self.architecture,
            "model_type": self.model_type,
            SHAPES_SHA256: hashlib.sha256(shapes.encode()).hexdigest(),
            "name_or_path": self.name_or_path,
            "task_type": self.task_type,
            "weight_sample": self.weight_sample,
        }


# The fingerprint's digest of the adapted modules' names and weight shapes (not of their weights). Files written
# before it got this name (vblora 0.1.0) call it "weights_sha256"; `shapes_sha256` reads either.
SHAPES_SHA256, SHAPES_SHA256_BEFORE = "shapes_sha256", "weights_sha256"


def shapes_sha256(fingerprint: dict) -> str | None:
    """The names-and-shapes digest of a stored base fingerprint, under its current or its earlier key."""
    return fingerprint.get(SHAPES_SHA256, fingerprint.get(SHAPES_SHA256_BEFORE))


TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    ("ForSequenceClassification", "SEQ_CLS"),
    ("ForTokenClassification", "TOKEN_CLS"),
    ("ForQuestionAnswering", "QUESTION_ANS"),
    ("ForConditionalGeneration", "SEQ_2_SEQ_LM"),
    ("Model", "FEATURE_EXTRACTION"),
)
SAMPLED_MODULES, SAMPLES_PER_MODULE = 8, 4  # about 600 header bytes
SAMPLE_RTOL = 1e-2  # a bf16 / fp16 copy of the same checkpoint passes; another checkpoint does not


def task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    return next((task for suffix, task in TASK_TYPES if name.endswith(suffix)), None)


def sampled(module: nn.Module | None, n: int, merged_delta=None) -> torch.Tensor | None:
    """`(n,)` float32 values of the module's dense weight at the middles of n equal stretches (where the fingerprint
    samples it), minus `merged_delta()` there when given; None for a quantized or missing or too small weight
    (`is_quantized`: a quantized value differs from its checkpoint's by far more than SAMPLE_RTOL, so a sample taken
    on either side would refuse an adapter trained on a 4-bit base and loaded on its full-precision checkpoint, the
    usual QLoRA round trip)."""
    w = getattr(module, "weight", None)
    if module is None or not isinstance(w, torch.Tensor) or is_quantized(module) or w.numel() < n:
        return None
    positions = [(2 * i + 1) * w.numel() // (2 * n) for i in range(n)]
    values = w.detach().reshape(-1)[positions].float().cpu()
    return values if merged_delta is None else values - merged_delta().reshape(-1)[positions].cpu()


@torch.no_grad()
def weight_sample(model: nn.Module) -> dict[str, list[float]]:
    """Values (5 significant digits) of up to 8 adapted base weights (evenly spread over the model) at 4 fixed strided
    positions (`sampled`); merged layers are sampled as their unmerged weight; quantized layers are skipped."""
    layers = list(adapted_layers(model).items())
    out = {}
    for name, layer in layers[:: max(1, -(-len(layers) // SAMPLED_MODULES))]:
        values = sampled(layer.base, SAMPLES_PER_MODULE, layer.delta_weight if layer.merged else None)
        if values is not None:
            out[name] = [float(f"{float(v):.5g}") for v in values]
    return out


@torch.no_grad()
def take_snapshot(model: nn.Module, *, with_logits: bool = False) -> AdapterSnapshot:
    """Read the adapter of `model` (the stored top-k selection, on CPU, float32; its logits too if asked and the
    model is in training form)."""
    model = unwrap(model)
    bank = get_bank(model)
    bank.check_finite()
    indices, weights = bank.topk_selection()
    extras = {
        name: {k: v.detach().cpu().clone() for k, v in copy.trained.state_dict().items()}
        for name, copy in trained_copies(model).items()
    }
    logits = bank.logits.detach().float().cpu().clone() if with_logits and bank.logits is not None else None
    config = getattr(model, "config", None)
    task = task_type(model)
    id2label = getattr(config, "id2label", None) if task in ("SEQ_CLS", "TOKEN_CLS") else None
    return AdapterSnapshot(
        config=bank.config,
        bank=bank.bank.detach().float().cpu().clone(),
        indices=indices.cpu().long(),
        weights=weights.cpu().float(),
        modules=list(bank.layout.entries),
        extras=extras,
        architecture=type(model).__name__,
        model_type=getattr(config, "model_type", None),
        logits=logits,
        name_or_path=getattr(config, "_name_or_path", None) or None,
        task_type=task,
        id2label={str(k): str(v) for k, v in id2label.items()} if id2label else None,
        weight_sample=weight_sample(model),
    )


def refuse_adapted(base: nn.Module) -> None:
    """An adapter loads onto a plain base model only (TargetError, as `add_vblora` raises, before any comparison)."""
    if hasattr(unwrap(base), BANK_ATTR):
        raise TargetError(
            f"{type(unwrap(base)).__name__} already has a VB-LoRA adapter (model.{BANK_ATTR}); load "
            f"onto a fresh base model, or remove it first with vblora.unload(model)"
        )


def check_base(
    base: nn.Module, snap: AdapterSnapshot, source: str, strict: bool = True, verify_weights: bool = True
) -> None:
    """Raise AdapterFormatError saying what differs if `base` is not the model the adapter was saved from: other
    architecture (unless not strict), other modules or shapes, other weights (unless not verify_weights)."""
    refuse_adapted(base)
    base = unwrap(base)
    problems = []
    arch = type(base).__name__
    if strict and snap.architecture and arch != snap.architecture:
        problems.append(
            f"architecture: adapter was saved from {snap.architecture}, base model is {arch} "
            f"(pass strict=False to load across architectures with the same module names)"
        )
    try:
        found = find_targets(base, snap.config)
    except TargetError:
        found = []  # nothing matches: every adapted module is reported missing below
    have = {name: described(m) for name, m in found}
    names = [m.name for m in snap.modules]
    missing = [n for n in names if n not in have]
    extra = [n for n in have if n not in set(names)]
    if missing:
        problems.append(f"{len(missing)} adapted module(s) missing from the base model, e.g. {missing[:3]}")
    if extra:
        problems.append(
            f"{len(extra)} base module(s) match the adapter's targets but were not adapted, e.g. {extra[:3]}"
        )
    problems += shape_problems(snap, have)
    if not missing and not extra and list(have) != names:
        problems.append("adapted modules appear in a different order in the base model")
    if not problems and verify_weights and snap.weight_sample:
        problems += weight_problems(dict(found), snap)
    if problems:
        shown = "; ".join(problems[:6]) + (f"; ... ({len(problems) - 6} more)" if len(problems) > 6 else "")
        raise AdapterFormatError(f"{source}: adapter does not fit this base model: {shown}")


def described(module: nn.Module | None) -> str | None:
    """An adaptable module as an adapter's module table states it, e.g. "linear 64->128"; None if it is absent or
    cannot be adapted."""
    kind = kind_of(module) if module is not None else None
    return None if module is None or kind is None else "{} {}->{}".format(kind.name, *module_dims(module))


def shape_problems(snap: AdapterSnapshot, have: dict[str, str | None]) -> list[str]:
    """One line per adapted module whose base layer (`have`: module name -> `described`) differs in kind or shape."""
    want = {m.name: f"{m.kind} {m.in_features}->{m.out_features}" for m in snap.modules}
    return [
        f"module {name}: adapter has {w}, base model has {have[name]}"
        for name, w in want.items()
        if name in have and have[name] != w
    ]


@torch.no_grad()
def weight_problems(modules: dict[str, nn.Module], snap: AdapterSnapshot) -> list[str]:
    """The sampled base weights that differ beyond bf16 rounding (another checkpoint of the same architecture)."""
    bad = []
    for name, want in snap.weight_sample.items():
        have = sampled(modules.get(name), len(want))
        if have is not None and not torch.allclose(have, torch.tensor(want), rtol=SAMPLE_RTOL, atol=1e-6):
            bad.append(name)
    if not bad:
        return []
    return [
        f"the base model's weights differ from those the adapter was trained on ({len(bad)} of "
        f"{len(snap.weight_sample)} sampled modules, e.g. {bad[0]}; trained on "
        f"{snap.name_or_path or 'an unnamed model'}): load the right checkpoint, or pass verify_weights=False "
        f"(--ignore-base-weights) to load it anyway"
    ]


@torch.no_grad()
def build_model(
    base: nn.Module,
    snap: AdapterSnapshot,
    source: str = "adapter",
    *,
    strict: bool = True,
    trainable: bool = False,
    verify_weights: bool = True,
) -> nn.Module:
    """Wrap `base` in place with `snap` and return it: training form if the snapshot carries logits, else the
    inference form (buffers `indices (N, k)` and `weights (N, k)`, no `(N, h)` logits). With `trainable=False` the
    adapter is frozen and the model put in eval mode."""
    check_base(base, snap, source, strict, verify_weights)
    labels = getattr(getattr(unwrap(base), "config", None), "num_labels", None)
    if snap.id2label and labels is not None and labels != len(snap.id2label):
        raise AdapterFormatError(
            f"{source}: the adapter's classifier has {len(snap.id2label)} labels "
            f"({', '.join(list(snap.id2label.values())[:5])}), the base model {labels}: build the "
            f"base with num_labels={len(snap.id2label)} (e.g. AutoModelForSequenceClassification"
            f".from_pretrained(path, num_labels={len(snap.id2label)}))"
        )
    try:
        model = add_vblora(base, snap.config, with_logits=snap.logits is not None)
    except VBLoRAError as e:
        raise AdapterFormatError(f"{source}: {e}") from None
    bank = get_bank(model)
    if list(bank.layout.entries) != list(snap.modules):
        raise AdapterFormatError(f"{source}: module offsets in the adapter do not match the layout of the base model")
    bank.bank.copy_(snap.bank.to(bank.bank.dtype))
    if snap.logits is not None and bank.logits is not None:  # add_vblora made logits for a snapshot with logits
        bank.logits.copy_(snap.logits.to(bank.logits.dtype))
    else:
        bank.indices.copy_(snap.indices)
        bank.weights.copy_(snap.weights.to(bank.weights.dtype))
    copies = trained_copies(model)
    if set(copies) != set(snap.extras):
        raise AdapterFormatError(
            f"{source}: modules_to_save {sorted(snap.extras)} do not match the base model's {sorted(copies)}"
        )
    for name, state in snap.extras.items():
        try:
            copies[name].trained.load_state_dict(state, strict=True)
        except RuntimeError as e:
            raise AdapterFormatError(f"{source}: modules_to_save entry {name}: {e}") from None
    model_config = getattr(model, "config", None)
    if snap.id2label and model_config is not None:  # predictions then carry the label names
        model_config.id2label = {int(k): v for k, v in snap.id2label.items()}
        model_config.label2id = {v: int(k) for k, v in snap.id2label.items()}
    if not trainable:
        bank.requires_grad_(False)
        for c in copies.values():
            c.trained.requires_grad_(False)
        model.eval()
    return model
