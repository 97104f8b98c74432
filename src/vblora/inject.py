"""Target matching, wrapping, freezing, parameter groups, counting, merge / unmerge / disable / unload."""

from __future__ import annotations

import contextlib
import difflib
import re
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from vblora.bank import VectorBank
from vblora.config import VBLoRAConfig
from vblora.errors import TargetError
from vblora.layers import TrainedCopy, VBLoRALayer, layer_class
from vblora.layout import Layout, parameter_count, stored_count, weight_of

BANK_ATTR = "vblora_bank"
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model under DDP / torch.compile wrappers."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def layer_index(name: str) -> int | None:
    """First integer component of a qualified name (`encoder.layer.3.attention...` -> 3), or None."""
    m = _LAYER_INDEX.search("." + name)
    return int(m.group(1)) if m else None


def _matches(name: str, target: str | Sequence[str]) -> bool:
    if isinstance(target, str):
        return re.fullmatch(target, name) is not None
    return any(name == t or name.endswith("." + t) for t in target)


def find_targets(model: nn.Module, config: VBLoRAConfig) -> list[tuple[str, nn.Module]]:
    """`(qualified name, module)` of every module to adapt, in model order; raises TargetError if none."""
    all_linear = config.target_modules == "all-linear"
    found = []
    for name, module in model.named_modules():
        if not name:
            continue
        if all_linear:
            cls = layer_class(module)
            # Linear / Conv1D inside the repeated blocks only: not embeddings, pooler or output head.
            if cls is None or isinstance(module, nn.Embedding) or layer_index(name) is None:
                continue
        elif not _matches(name, config.target_modules):
            continue
        if config.layers is not None and layer_index(name) not in config.layers:
            continue
        if layer_class(module) is None:
            raise TargetError(
                f"module '{name}' matched target_modules={config.target_modules!r} but its type "
                f"{type(module).__name__} cannot be adapted (supported: nn.Linear, nn.Embedding, "
                f"transformers Conv1D); name its Linear children instead"
            )
        found.append((name, module))
    if not found:
        raise TargetError(_no_match_message(model, config))
    return found


def _no_match_message(model: nn.Module, config: VBLoRAConfig) -> str:
    names = [n for n, _ in model.named_modules() if n]
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    wanted = [config.target_modules] if isinstance(config.target_modules, str) else list(config.target_modules)
    near = sorted({m for w in wanted for m in difflib.get_close_matches(str(w).rsplit(".", 1)[-1], leaves, n=5)})
    layers = f" in layers {list(config.layers)}" if config.layers is not None else ""
    return (
        f"no module of {type(model).__name__} matched target_modules={config.target_modules!r}{layers}. "
        f"Near misses: {near or 'none'}. Module names end in e.g. {leaves[:12]}"
    )


def add_vblora(model: nn.Module, config: VBLoRAConfig, *, with_logits: bool = True) -> nn.Module:
    """Wrap the targets of `model` in place with VB-LoRA layers sharing one bank; freeze the rest.

    The bank is registered once, at `model.vblora_bank`, and composes all sub-vectors once per forward pass
    (a forward pre-hook on the root opens each composition step).

    Args:
        model: the base model (a DDP / `torch.compile` wrapper is looked through). Modified in place.
        config: which modules to adapt and the bank's shape (`VBLoRAConfig`).
        with_logits: True builds the training form (trainable `(N, h)` logits); False the inference form
            (`indices` and `weights` buffers, no logits), which `load_adapter` then fills.

    Returns:
        The same `model`, adapted: only the bank, the logits and the `modules_to_save` copies are trainable.

    Raises:
        TargetError: the model already has an adapter, no module matched `config.target_modules`, a matched
            module's type cannot be adapted, or `modules_to_save` matched nothing.
    """
    model = unwrap(model)
    if hasattr(model, BANK_ATTR):
        raise TargetError(
            f"{type(model).__name__} already has a VB-LoRA adapter (model.{BANK_ATTR}). Remove it with "
            f"vblora.unload(model) first, or load another adapter with vblora.load_adapter(base, path) "
            f"on a fresh base model"
        )
    targets = find_targets(model, config)
    layout = Layout.build(targets, config.rank, config.vector_length)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    bank = VectorBank(config, layout, with_logits=with_logits).to(device)

    model.requires_grad_(False)
    for i, (name, module) in enumerate(targets):
        cls = layer_class(module)
        assert cls is not None  # find_targets returns adaptable layers only
        model.set_submodule(name, cls(module, bank, i, config.dropout))
    for name in _modules_to_save(model, config):
        model.set_submodule(name, TrainedCopy(model.get_submodule(name)))
    model.add_module(BANK_ATTR, bank)
    bank.attach(model)  # the root forward opens and closes one composition step
    return model


def _modules_to_save(model: nn.Module, config: VBLoRAConfig) -> list[str]:
    if not config.modules_to_save:
        return []
    names = [
        n
        for n, m in model.named_modules()
        if n and _matches(n, tuple(config.modules_to_save)) and not isinstance(m, VBLoRALayer) and ".base" not in n
    ]
    # keep outermost matches only (e.g. "classifier", not also "classifier.dense")
    names = [n for n in names if not any(n.startswith(o + ".") for o in names)]
    if not names:
        raise TargetError(f"modules_to_save={list(config.modules_to_save)} matched no module of {type(model).__name__}")
    return names


def get_bank(model: nn.Module) -> VectorBank:
    """The model's vector bank (the module at `model.vblora_bank`).

    Args:
        model: an adapted model (a DDP / `torch.compile` wrapper is looked through).

    Returns:
        Its `VectorBank`, which holds the bank, the logits or frozen selection, and the layout.

    Raises:
        TargetError: the model has no VB-LoRA adapter.
    """
    bank = getattr(unwrap(model), BANK_ATTR, None)
    if not isinstance(bank, VectorBank):
        raise TargetError(
            f"{type(model).__name__} has no VB-LoRA adapter; call vblora.add_vblora(model, config) "
            f"or vblora.load_adapter(model, path) first"
        )
    return bank


def adapted_layers(model: nn.Module) -> dict[str, VBLoRALayer]:
    """The model's VB-LoRA layers by qualified module name, in model order.

    Args:
        model: any module (a DDP / `torch.compile` wrapper is looked through).

    Returns:
        `{name: layer}`; empty for a model without an adapter (never raises).
    """
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, VBLoRALayer)}


def trained_copies(model: nn.Module) -> dict[str, TrainedCopy]:
    return {n: m for n, m in unwrap(model).named_modules() if isinstance(m, TrainedCopy)}


def parameter_groups(
    model: nn.Module, lr_bank: float = 1e-3, lr_logits: float = 1e-2, lr_other: float = 4e-3, weight_decay: float = 0.0
) -> list[dict]:
    """Optimizer groups with the paper's three learning rates: bank, logits, everything else trainable (heads).

    Args:
        model: an adapted model.
        lr_bank: learning rate of the vector bank.
        lr_logits: learning rate of the logits (absent from a frozen adapter).
        lr_other: learning rate of every other trainable parameter (`modules_to_save` heads).
        weight_decay: AdamW weight decay of every group.

    Returns:
        A list of `{"name", "params", "lr", "weight_decay"}` dicts for `torch.optim.AdamW(groups)`; groups
        with nothing trainable are left out.

    Raises:
        TargetError: the model has no adapter.
        NonFiniteError: the bank or the logits hold NaN or infinity (checked first, so a broken adapter fails
            before training starts).
    """
    bank = get_bank(model)
    bank.check_finite()
    special = {id(bank.bank)} | ({id(bank.logits)} if not bank.frozen else set())
    groups: list[dict[str, Any]] = [
        {"name": "vblora_bank", "params": [bank.bank], "lr": lr_bank, "weight_decay": weight_decay}
    ]
    if not bank.frozen:
        groups.append({"name": "vblora_logits", "params": [bank.logits], "lr": lr_logits, "weight_decay": weight_decay})
    other = [p for p in unwrap(model).parameters() if p.requires_grad and id(p) not in special]
    if other:
        groups.append({"name": "other", "params": other, "lr": lr_other, "weight_decay": weight_decay})
    return [g for g in groups if g["params"][0].requires_grad]


def count_parameters(model: nn.Module) -> dict:
    """Trainable and stored parameters.

    Args:
        model: an adapted model.

    Returns:
        A dict: `trainable` (parameters with gradients), `stored` (the paper's float32-equivalent count of the
        saved triplet, `vblora.layout.stored_count`, plus the `modules_to_save` parameters; a float, since index
        widths are fractions), its parts `stored_adapter` and `stored_other`, `bank` (h * b), `subvectors` (N),
        `stored_bytes`, `lora_equivalent` (what LoRA of the same rank on the same modules stores,
        sum of r * (in + out)) and `base` (the base model's own parameters).

    Raises:
        TargetError: the model has no adapter.
    """
    model = unwrap(model)
    bank = get_bank(model)
    h, b = bank.bank.shape
    adapter = stored_count(h, b, bank.num_subvectors, bank.config.stored_topk)
    other = sum(p.numel() for c in trained_copies(model).values() for p in c.trained.parameters())
    return {
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "stored": adapter + other,
        "stored_adapter": adapter,
        "stored_other": other,
        "bank": h * b,
        "subvectors": bank.num_subvectors,
        "stored_bytes": round(4 * adapter) + 4 * other,
        "lora_equivalent": bank.layout.lora_equivalent(),
        "base": sum(
            parameter_count(p)
            for n_, p in model.named_parameters()
            if not n_.startswith(BANK_ATTR) and ".trained." not in n_
        ),
    }


def merge(model: nn.Module) -> nn.Module:
    """Add dW = B A into every adapted base weight, in place (idempotent: merged layers are skipped).

    Args:
        model: an adapted model.

    Returns:
        The same `model`, whose adapted layers now run their merged base weight alone.

    Raises:
        TargetError: the model has no adapter.
        NonFiniteError: the bank or the logits hold NaN or infinity.
        QuantizedBaseError: a base layer is quantized (raised before any layer is touched).
    """
    get_bank(model).check_finite()
    layers = adapted_layers(model)
    for name, layer in layers.items():
        layer.refuse_merge(name)
    for layer in layers.values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Subtract dW from every merged base weight, in place (idempotent: unmerged layers are skipped).

    Args:
        model: an adapted model, merged or not.

    Returns:
        The same `model`.
    """
    for layer in adapted_layers(model).values():
        layer.unmerge()
    return model


@contextlib.contextmanager
def disable_adapter(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: run the base model. Adapter layers pass through and heads use their originals.

    Merged layers are unmerged meanwhile and their merged weights restored afterwards bit for bit (a copy, not a
    re-merge, so nothing drifts).

    Args:
        model: an adapted model.

    Yields:
        The same `model`, behaving as its base until the `with` block ends.
    """
    layers, copies = adapted_layers(model).values(), trained_copies(model).values()
    was_merged = [(layer, weight_of(layer.base).detach().clone()) for layer in layers if layer.merged]
    for layer, _ in was_merged:
        layer.unmerge()
    switched: list[VBLoRALayer | TrainedCopy] = [*layers, *copies]
    for m in switched:
        m.disabled = True
    try:
        yield model
    finally:
        for m in switched:
            m.disabled = False
        with torch.no_grad():
            for layer, weight in was_merged:
                weight_of(layer.base).copy_(weight)
                layer.merged = True


def unload(model: nn.Module, merge: bool = True) -> nn.Module:
    """Remove the adapter: put the base layers back, and the trained heads in place of their originals.

    Args:
        model: an adapted model. Modified in place.
        merge: True adds dW into the base weights first (the model keeps its adapted outputs); False restores the
            original base weights and heads (the model is the base again).

    Returns:
        The plain model, with no `vblora_bank`.

    Raises:
        TargetError: the model has no adapter.
        QuantizedBaseError: `merge=True` and a base layer is quantized (raised before anything changes).
    """
    model = unwrap(model)
    bank = get_bank(model)
    layers = adapted_layers(model)
    for name, layer in layers.items() if merge else ():
        layer.refuse_merge(name)  # before anything changes
    for name, layer in layers.items():
        if merge:
            layer.merge()
        elif layer.merged:
            layer.unmerge()
        model.set_submodule(name, layer.base)
    for name, wrapper in trained_copies(model).items():
        model.set_submodule(name, wrapper.trained if merge else wrapper.original)
    bank.detach()
    delattr(model, BANK_ATTR)
    return model
