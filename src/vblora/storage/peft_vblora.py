"""HF PEFT's VB-LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`), both directions.

PEFT keeps per-module logits `vblora_logits_A (r, in/b, h)` and `vblora_logits_B (out/b, r, h)` (our bank rows of
that module viewed in those shapes) and the bank under `base_model.vblora_vector_bank`. With
`save_only_topk_weights` it writes `<...>.vblora_logits_A_topk_indices (r, in/b, k)` (uint8 for h < 256, int16 below
2**15, else int32) and `<...>_topk_weights (r, in/b, k-1)` float32 instead. Both directions go through an
`AdapterSnapshot`: export encodes one, import decodes one and loads it with `build_model`, like the native file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from vblora.config import VBLoRAConfig
from vblora.errors import AdapterFormatError, VBLoRAError
from vblora.inject import unwrap
from vblora.layout import Layout
from vblora.storage.encoding import complete_weights
from vblora.storage.files import atomic_write, read_safetensors, replace_dir, write_safetensors
from vblora.storage.snapshot import AdapterSnapshot, build_model, refuse_adapted, take_snapshot

PREFIX = "base_model.model."
BANK_KEY = "base_model.vblora_vector_bank"
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
PT_METADATA = {"format": "pt"}  # the safetensors metadata of a PEFT adapter file (what transformers writes)
LOGITS_A, LOGITS_B = ".vblora_logits_A", ".vblora_logits_B"
TOPK_INDICES, TOPK_WEIGHTS = "_topk_indices", "_topk_weights"
# The heads PEFT's task model classes add to `modules_to_save` by themselves (peft_model.py: the `__init__` of
# PeftModelForSequenceClassification / ForTokenClassification / ForQuestionAnswering). Loading a file of that
# task type, PEFT wraps every module whose name ends with one of these and reads its weights from the file (a
# KeyError when they are absent), and never adapts a module inside one.
PEFT_HEADS = {"SEQ_CLS": ("classifier", "score"), "TOKEN_CLS": ("classifier", "score"), "QUESTION_ANS": ("qa_outputs",)}


def snapshot_of(model_or_path, *, with_logits: bool = False) -> AdapterSnapshot:
    """A snapshot from an adapted model, an AdapterSnapshot, or a native adapter file."""
    if isinstance(model_or_path, AdapterSnapshot):
        return model_or_path
    if isinstance(model_or_path, nn.Module):
        return take_snapshot(model_or_path, with_logits=with_logits)
    from vblora.storage.native import read_adapter

    return read_adapter(model_or_path)[0]


def is_peft_head(name: str, task_type: str | None) -> bool:
    """Whether PEFT's model class for `task_type` wraps module `name` as its head (PEFT's rule, `_set_trainable` in
    peft/utils/other.py: the name ends with one of the head names)."""
    return any(name.endswith(head) for head in PEFT_HEADS.get(task_type or "", ()))


def inside_peft_head(name: str, task_type: str | None) -> bool:
    """Whether PEFT's model class for `task_type` leaves module `name` unadapted because it lies in a head (PEFT's
    rule, `check_target_module_exists` in peft/tuners/tuners_utils.py: a dotted component equals a head name)."""
    return any(head in name.split(".") for head in PEFT_HEADS.get(task_type or "", ()))


def untrained_heads(model: nn.Module, snap: AdapterSnapshot) -> dict[str, dict[str, torch.Tensor]]:
    """`{name: state dict}` (on CPU) of the heads PEFT's task class will wrap that the adapter did not train: their
    base weights, which PEFT reads from the file like a trained head's."""
    model = unwrap(model)
    trained = tuple(snap.extras)
    return {
        name: {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
        for name, module in model.named_modules()
        if name
        and is_peft_head(name, snap.task_type)
        and not any(name == t or name.startswith(t + ".") for t in trained)
    }


def peft_task_type(snap: AdapterSnapshot, from_model: bool) -> str | None:
    """The `task_type` to write: the base model's when PEFT's class for it reproduces the model from the file as
    written, else None (PEFT's plain `PeftModel`, which wraps no head and loads any such file).

    A task with a head (PEFT_HEADS) needs the head's weights in the file, trained (`modules_to_save`) or, exporting
    from a model, its base weights; and no adapted module inside the head (PEFT would not adapt it)."""
    task = snap.task_type
    if task not in PEFT_HEADS:
        return task
    if any(inside_peft_head(m.name, task) for m in snap.modules):
        return None
    return task if from_model or any(is_peft_head(name, task) for name in snap.extras) else None


def parent_library(architecture: str) -> str | None:
    """ "transformers" when `architecture` is one of its model classes (so PEFT's AutoPeftModel can build the base
    of a file without a task type), else None."""
    if not architecture:
        return None
    try:
        import transformers
    except ImportError:
        return None
    return "transformers" if isinstance(getattr(transformers, architecture, None), type) else None


def peft_dir_contents(
    snap: AdapterSnapshot,
    config: dict,
    tensors: dict[str, torch.Tensor],
    heads: dict[str, dict[str, torch.Tensor]] | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """The tensors and the adapter_config.json of a PEFT adapter directory: `tensors` plus the snapshot's trained
    heads and the untrained `heads` PEFT's task class needs, and `config` plus the adapter_config.json fields that
    every PEFT format written here shares."""
    task = peft_task_type(snap, from_model=heads is not None)
    saved = snap.extras | ((heads or {}) if task in PEFT_HEADS else {})
    tensors = tensors | {f"{PREFIX}{name}.{key}": t for name, state in saved.items() for key, t in state.items()}
    config = {
        "task_type": task,
        "base_model_name_or_path": snap.name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": snap.config.rank,
        "target_modules": [m.name for m in snap.modules],
        "exclude_modules": None,
        "fan_in_fan_out": any(m.kind == "conv1d" for m in snap.modules),
        "bias": "none",
        "modules_to_save": sorted(saved) or None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "auto_mapping": {"base_model_class": snap.architecture, "parent_library": parent_library(snap.architecture)}
        if snap.architecture
        else None,
    } | config
    return tensors, config


def config_bytes(config: dict) -> bytes:
    """adapter_config.json's text: indented, keys sorted."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def write_peft_dir(
    out_dir: str | os.PathLike,
    snap: AdapterSnapshot,
    config: dict,
    tensors: dict[str, torch.Tensor],
    heads: dict[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a PEFT adapter directory (`peft_dir_contents`) as a whole: an earlier export there is replaced only once
    this one is complete; a directory holding anything else is refused."""
    tensors, config = peft_dir_contents(snap, config, tensors, heads)

    def write(d: Path) -> None:
        write_safetensors(d / WEIGHTS_FILE, tensors, PT_METADATA)
        atomic_write(d / CONFIG_FILE, config_bytes(config))

    return replace_dir(out_dir, write, replaceable=is_peft_dir)


def is_peft_dir(d: Path) -> bool:
    return (d / CONFIG_FILE).is_file()


def peft_parts(layout: Layout, b: int):
    """Per module and part: `(name, suffix, rows slice, PEFT shape without the last axis)`."""
    for m in layout.entries:
        s, r = m.slot, layout.rank
        yield m.name, LOGITS_A, slice(s.a_start, s.a_start + s.a_count), (r, m.in_features // b)
        yield m.name, LOGITS_B, slice(s.b_start, s.stop), (m.out_features // b, r)


# -- export ---------------------------------------------------------------------------------------------------------


def export_peft(model_or_path, out_dir: str | os.PathLike, *, save_only_topk_weights: bool = False) -> Path:
    """Write an adapted model (or an adapter file) as an HF PEFT VB-LoRA adapter directory.

    Full-logits variant: a model still in training form exports its real logits (PEFT can resume training);
    otherwise logits are rebuilt from the selection (log-weights at the chosen indices, a finite floor elsewhere),
    which PEFT's top-k turns back into the same sub-vectors. PEFT's `topk` is our `stored_topk`. An int8 adapter is
    dequantised.

    `task_type` is the base model's (SEQ_CLS, CAUSAL_LM, ...) when PEFT's class for it rebuilds this model: a
    classifier's or QA model's head (`classifier`, `score`, `qa_outputs`), which that class reads from the file,
    is written too, trained (`modules_to_save`) or, exported from a model, with its base weights. Exported from a
    file whose head was not trained, or with an adapted module inside the head, the task type is left out (PEFT's
    plain `PeftModel`, also built by `AutoPeftModel`).

    Args:
        model_or_path (nn.Module | AdapterSnapshot | str | os.PathLike): an adapted model, an
            `AdapterSnapshot`, or a native adapter file or directory.
        out_dir: the output directory: empty, absent, or a previous PEFT export.
        save_only_topk_weights: write PEFT's compact variant (top-k indices and k-1 weights per sub-vector)
            instead of `(…, h)` logits.

    Returns:
        `out_dir` as a Path, holding `adapter_config.json` and `adapter_model.safetensors`.

    Raises:
        AdapterFormatError: a module PEFT cannot represent (an Embedding target, or a vector_length that does not
            divide a dimension), or a damaged adapter file.
        TargetError: a model without an adapter.
        VBLoRAError: `out_dir` holds other files than a previous export (nothing is replaced).
    """
    snap = snapshot_of(model_or_path, with_logits=not save_only_topk_weights)
    heads = untrained_heads(model_or_path, snap) if isinstance(model_or_path, nn.Module) else None
    cfg = snap.config
    h, b = snap.bank.shape
    k = cfg.stored_topk
    for m in snap.modules:
        if m.kind == "embedding":
            raise AdapterFormatError(
                f"PEFT's VB-LoRA cannot represent module {m.name}: Embedding targets are not "
                f"supported there; use vblora.export_lora for a plain LoRA adapter"
            )
        if m.in_features % b or m.out_features % b:
            raise AdapterFormatError(
                f"PEFT's VB-LoRA cannot represent module {m.name}: vector_length {b} does not "
                f"divide its dimensions in={m.in_features}, out={m.out_features} (train with "
                f"a vector_length that divides them, or use vblora.export_lora)"
            )
    logits = None
    if not save_only_topk_weights:
        logits = snap.logits if snap.logits is not None else logits_from_selection(snap.indices, snap.weights, h)
    tensors = {BANK_KEY: snap.bank.float().contiguous()}
    # PEFT's choice of index dtype (model.py `_get_adapter_state_dict`), so its loader sees what it writes
    index_dtype = torch.uint8 if h < 2**8 else torch.int16 if h < 2**15 else torch.int32
    for name, suffix, rows, shape in peft_parts(snap.layout, b):
        key = f"{PREFIX}{name}{suffix}"
        if logits is not None:
            tensors[key] = logits[rows].reshape(*shape, h).contiguous()
        else:
            tensors[key + TOPK_INDICES] = snap.indices[rows].reshape(*shape, k).to(index_dtype).contiguous()
            tensors[key + TOPK_WEIGHTS] = snap.weights[rows, : k - 1].reshape(*shape, k - 1).float().contiguous()
    peft_config = {
        "peft_type": "VBLORA",
        "num_vectors": h,
        "vector_length": b,
        "topk": k,
        "save_only_topk_weights": bool(save_only_topk_weights),
        "vblora_dropout": cfg.dropout,
        "init_vector_bank_bound": cfg.init_bank_bound,
        "init_logits_std": cfg.init_logits_std,
    }
    return write_peft_dir(out_dir, snap, peft_config, tensors, heads)


def logits_from_selection(indices: torch.Tensor, weights: torch.Tensor, num_vectors: int) -> torch.Tensor:
    """`(N, k)` indices and weights -> `(N, h)` logits whose top-k softmax gives back the weights.

    Selected entries hold log(weight); the rest a finite floor 30 below the smallest selected logit (finite, so
    PEFT's training-time inf check passes and the selection is unambiguous).
    """
    chosen = weights.float().clamp_min(1e-30).log()  # (N, k)
    floor = float(chosen.min()) - 30.0
    return torch.full((indices.shape[0], num_vectors), floor).scatter_(1, indices.long(), chosen)


# -- import ---------------------------------------------------------------------------------------------------------


def read_peft_dir(in_dir: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], Path]:
    """`(adapter_config, tensors, directory)` of a PEFT VB-LoRA adapter; refuses pickle (`adapter_model.bin`)."""
    d = Path(in_dir)
    if not (d / CONFIG_FILE).is_file():
        raise FileNotFoundError(f"no PEFT adapter at {d} (missing {CONFIG_FILE})")
    try:
        conf = json.loads((d / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterFormatError(f"{d / CONFIG_FILE}: corrupt JSON ({e})") from None
    if not isinstance(conf, dict) or conf.get("peft_type") != "VBLORA":
        raise AdapterFormatError(
            f"{d}: peft_type {conf.get('peft_type') if isinstance(conf, dict) else None!r} "
            f"is not a VB-LoRA adapter (expected 'VBLORA')"
        )
    if not (d / WEIGHTS_FILE).is_file():
        extra = (
            " (adapter_model.bin is a pickle; re-save it with safe_serialization=True)"
            if (d / "adapter_model.bin").exists()
            else ""
        )
        raise AdapterFormatError(f"{d}: missing {WEIGHTS_FILE}{extra}")
    if conf.get("bias", "none") != "none":
        raise AdapterFormatError(f"{d}: bias={conf['bias']!r} is not supported (only 'none')")
    tensors, _, _ = read_safetensors(d / WEIGHTS_FILE)
    return conf, tensors, d


def read_peft(in_dir: str | os.PathLike, module_order: list[str] | None = None) -> AdapterSnapshot:
    """Decode a PEFT VB-LoRA directory into a snapshot: indices and weights for the top-k variant (never
    allocating `(N, h)` logits), logits for the full variant (so training can continue). PEFT's file is keyed by
    name; `module_order` (the base model's module names) gives our row order, else the file's."""
    conf, tensors, d = read_peft_dir(in_dir)
    topk_only = bool(conf.get("save_only_topk_weights"))
    key = next((k for k in tensors if k == BANK_KEY or k.startswith(BANK_KEY + ".")), None)
    bank = tensors.pop(key) if key is not None else None
    if bank is None or bank.dim() != 2:
        raise AdapterFormatError(f"{d}: missing the vector bank '{BANK_KEY}'")
    h, b = bank.shape
    suffix = LOGITS_A + (TOPK_INDICES if topk_only else "")
    names = [key[len(PREFIX) : -len(suffix)] for key in tensors if key.startswith(PREFIX) and key.endswith(suffix)]
    if not names:
        raise AdapterFormatError(
            f"{d}: no '*{suffix}' tensors; adapter_config save_only_topk_weights="
            f"{topk_only} does not match the weights file"
        )
    position = {name: i for i, name in enumerate(module_order or [])}
    names.sort(key=lambda name: position.get(name, len(position)))
    kind = "conv1d" if conf.get("fan_in_fan_out") else "linear"
    try:
        cfg = VBLoRAConfig(
            target_modules=tuple(names),
            rank=int(conf["r"]),
            num_vectors=h,
            vector_length=b,
            topk=int(conf["topk"]),
            dropout=float(conf.get("vblora_dropout", 0.0)),
            init_bank_bound=float(conf.get("init_vector_bank_bound", 0.02)),
            init_logits_std=float(conf.get("init_logits_std", 0.1)),
            modules_to_save=tuple(conf.get("modules_to_save") or ()),
        )
        specs = []
        for name in names:  # module dims from the tensor shapes: A (r, in/b, .), B (out/b, r, .)
            a, bb = tensors[PREFIX + name + suffix], tensors[PREFIX + name + LOGITS_B + suffix[len(LOGITS_A) :]]
            specs.append((name, kind, a.shape[1] * b, bb.shape[0] * b))
    except (VBLoRAError, KeyError, TypeError, ValueError, IndexError) as e:
        raise AdapterFormatError(f"{d}: cannot read the adapter: {type(e).__name__}: {e}") from None
    layout = Layout.from_specs(specs, cfg.rank, b)
    n, k = layout.num_subvectors, cfg.stored_topk

    def take(key: str, shape: tuple) -> torch.Tensor:
        t = tensors.pop(key, None)
        if t is None or tuple(t.shape) != shape:
            got = None if t is None else tuple(t.shape)
            raise AdapterFormatError(f"{d}: tensor '{key}' is {got}, expected {shape}")
        return t

    indices, weights = torch.zeros(n, k, dtype=torch.long), torch.full((n, k), 1.0 / k)
    logits = None if topk_only else torch.empty(n, h)
    for name, part, rows, shape in peft_parts(layout, b):
        key = PREFIX + name + part
        if logits is None:  # top-k only
            idx = take(key + TOPK_INDICES, (*shape, k)).long().reshape(-1, k)
            w = take(key + TOPK_WEIGHTS, (*shape, k - 1)).float().reshape(-1, k - 1)
            if (idx < 0).any() or (idx >= h).any() or not torch.isfinite(w).all():
                raise AdapterFormatError(f"{d}: {key}: indices out of [0, {h}) or non-finite weights")
            indices[rows], weights[rows] = idx, complete_weights(w)
        else:
            logits[rows] = take(key, (*shape, h)).float().reshape(-1, h)
    if logits is not None:
        top, idx = logits.topk(k, dim=-1)
        indices, weights = idx, top.softmax(dim=-1)
        if not torch.isfinite(logits).all():
            logits = None  # -inf logits (a re-inflated top-k adapter saved in full): inference form only
    extras: dict[str, dict[str, torch.Tensor]] = {}
    for name in cfg.modules_to_save:  # PEFT lists every head name its task type may have ("classifier", "score")
        prefix = f"{PREFIX}{name}."
        state = {key[len(prefix) :]: tensors.pop(key) for key in list(tensors) if key.startswith(prefix)}
        if state:
            extras[name] = state
    cfg = cfg.replace(modules_to_save=tuple(extras))
    if tensors:
        raise AdapterFormatError(f"{d}: unexpected tensors {sorted(tensors)[:5]}")
    arch = (conf.get("auto_mapping") or {}).get("base_model_class") or ""
    return AdapterSnapshot(
        cfg,
        bank.float(),
        indices,
        weights,
        list(layout.entries),
        extras,
        architecture=arch,
        logits=logits,
        name_or_path=conf.get("base_model_name_or_path"),
        task_type=conf.get("task_type"),
    )


def import_peft(
    base_model: nn.Module, in_dir: str | os.PathLike, *, strict: bool = True, trainable: bool = False
) -> nn.Module:
    """Wrap `base_model` in place with an HF PEFT VB-LoRA adapter directory and return it.

    Args:
        base_model: the plain model the adapter was trained on (not already adapted). Modified in place.
        in_dir: the PEFT adapter directory (`adapter_config.json` and `adapter_model.safetensors`).
        strict: False tolerates a different model class with the same module names and shapes.
        trainable: False (default) freezes the adapter and puts the model in eval mode; True leaves it
            trainable (training form for the full-logits variant, inference form for `save_only_topk_weights`).

    Returns:
        The same `base_model`, adapted.

    Raises:
        FileNotFoundError: no `adapter_config.json` in `in_dir`.
        AdapterFormatError: not a VB-LoRA adapter, a pickle-only (`adapter_model.bin`) or damaged directory, or
            a base model that does not fit it.
        TargetError: `base_model` already has an adapter.
    """
    refuse_adapted(base_model)
    snap = read_peft(in_dir, [name for name, _ in unwrap(base_model).named_modules()])
    return build_model(base_model, snap, str(in_dir), strict=strict, trainable=trainable)
