"""Adapter files: the paper's stored triplet in ONE safetensors file, `path/adapter.safetensors`.

Tensors (h = num_vectors, b = vector_length, N = sub-vectors, k = config.stored_topk):
    bank        (h, b)   float32 / float16 / bfloat16, or int8 with `bank_scale (h,)` float32   [absent if shared]
    indices     (N, k)   smallest unsigned int holding h (uint8 h <= 256, uint16 <= 65536),
                         or (ceil(N*k*bits/8),) uint8 bit-packed at bits = ceil(log2 h)
    weights     (N, k-1) float, or uint8 steps of 1/255 for int8; the last weight is 1 - sum
    modules_to_save.<module>.<key>   state of each fully trained module
Metadata "vblora": a JSON header with format version, library version, the VBLoRAConfig, the modules with their
shapes and row offsets, the base model's fingerprint, and two sha256 digests (tensor payload, header fields) that
load verifies. Every defect of a file raises `AdapterFormatError` naming the file and the problem.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import nn

from vblora.config import VBLoRAConfig
from vblora.errors import AdapterFormatError, VBLoRAError
from vblora.inject import get_bank
from vblora.layout import KINDS, MODULE_FIELDS, Layout, ModuleEntry, index_dtype
from vblora.storage.encoding import (
    complete_weights,
    dequantize_bank,
    dequantize_weights,
    index_bits,
    narrow_indices,
    pack_bits,
    quantize_bank,
    quantize_weights,
    unpack_bits,
)
from vblora.storage.files import (
    canonical_json,
    json_sha256,
    parse_json_metadata,
    read_safetensors,
    tensors_sha256,
    write_safetensors,
)
from vblora.storage.snapshot import AdapterSnapshot, build_model, take_snapshot
from vblora.version import __version__

FORMAT, FORMAT_VERSION = "vblora-adapter", 1
BANK_FORMAT = "vblora-bank"
ADAPTER_FILE, BANK_FILE = "adapter.safetensors", "bank.safetensors"
FLOATS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
PRECISIONS = (*FLOATS, "int8")
HASH_FIELDS = ("tensors_sha256", "header_sha256")
WEIGHT_TOL = 1e-2  # stored weights may exceed [0, 1] / sum to 1 by half-precision rounding only
EXTRA_PREFIX = "modules_to_save."
MAX_BANK_VALUE = 1e4  # trained banks hold values of order 0.01-1 (initialised in U(-0.02, 0.02))


def adapter_file(path: str | os.PathLike, name: str = ADAPTER_FILE) -> Path:
    """`path` itself if it names a .safetensors file, else `path/<name>`."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return path
    if not (path / name).exists() and (path / "adapter_config.json").is_file():
        raise AdapterFormatError(
            f"{path} is an HF PEFT adapter directory, not a vblora adapter: load it with "
            f"vblora.import_peft(base_model, '{path}') (command line: vblora import-peft)"
        )
    return path / name


def bank_sha256(bank: torch.Tensor) -> str:
    """Content hash of a bank: its float32 values and shape (what a shared-bank reference points to)."""
    return tensors_sha256({"bank": bank.detach().float().cpu()})


# -- save -----------------------------------------------------------------------------------------------------------


def save_adapter(
    model: nn.Module, path: str | os.PathLike, precision: str = "fp32", pack_indices: bool = False, bank: str = "embed"
) -> Path:
    """Write the adapter of `model` to `path/adapter.safetensors` atomically (an earlier file is replaced only once
    the new one is complete).

    Args:
        model: an adapted model, in training or inference form, merged or not.
        path: a directory (the file is `adapter.safetensors` inside it) or a path ending in `.safetensors`.
        precision: "fp32" (exactly the paper's float32-equivalent count), "fp16" / "bf16" (bank, weights and
            modules_to_save in half precision) or "int8" (8-bit bank with a per-vector scale, 8-bit mixing weights).
        pack_indices: bit-pack indices to ceil(log2 h) bits instead of whole bytes.
        bank: "embed" stores the bank; "reference" stores only its sha256 (write it once with `save_bank`, load
            with `load_adapter(base, path, bank_path=...)`), for many adapters sharing one bank.

    Returns:
        The path of the written file.

    Raises:
        AdapterFormatError: an unknown `precision` or `bank` value, or `path` is an HF PEFT adapter directory.
        TargetError: the model has no adapter.
        NonFiniteError: the bank or the logits hold NaN or infinity (nothing is written).
    """
    if precision not in PRECISIONS:
        raise AdapterFormatError(f"precision={precision!r}; choose one of {PRECISIONS}")
    if bank not in ("embed", "reference"):
        raise AdapterFormatError(f"bank={bank!r}; choose 'embed' or 'reference'")
    return write_adapter(adapter_file(path), *encode(take_snapshot(model), precision, pack_indices, bank))


def write_adapter(file: Path, tensors: dict[str, torch.Tensor], header: dict) -> Path:
    """An adapter or bank file: the tensors, and `header` as the JSON metadata entry "vblora"."""
    return write_safetensors(file, tensors, {"format": "pt", "vblora": canonical_json(header)})


def encode(
    snap: AdapterSnapshot, precision: str = "fp32", pack_indices: bool = False, bank_mode: str = "embed"
) -> tuple[dict[str, torch.Tensor], dict]:
    """Snapshot -> (tensors, JSON header) of the adapter file."""
    h, b = snap.bank.shape
    n, k = snap.indices.shape
    int8 = precision == "int8"
    half = torch.float16 if int8 else FLOATS[precision]  # dtype of modules_to_save floats
    tensors: dict[str, torch.Tensor] = {}
    if bank_mode == "embed":
        if int8:
            tensors["bank"], tensors["bank_scale"] = quantize_bank(snap.bank)
        else:
            tensors["bank"] = snap.bank.to(FLOATS[precision])
    partial = snap.weights[:, : k - 1].float()  # (N, k-1)
    tensors["weights"] = quantize_weights(partial) if int8 else partial.to(FLOATS[precision])
    bits = index_bits(h)
    tensors["indices"] = pack_bits(snap.indices, bits) if pack_indices else narrow_indices(snap.indices, h)
    for name, state in snap.extras.items():
        for key, t in state.items():
            tensors[f"{EXTRA_PREFIX}{name}.{key}"] = t.to(half) if t.is_floating_point() else t
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "library_version": __version__,
        "config": snap.config.to_dict(),
        "precision": precision,
        "bank": {
            "mode": bank_mode,
            "shape": [h, b],
            "sha256": bank_sha256(snap.bank) if bank_mode == "reference" else None,
        },
        "indices": {"shape": [n, k], "packed": bool(pack_indices), "bits": bits},
        "module_fields": list(MODULE_FIELDS),
        "modules": [m.to_row() for m in snap.modules],
        "modules_to_save": {name: sorted(state) for name, state in snap.extras.items()},
        "base": snap.fingerprint(),
        "labels": snap.id2label,
    }
    header["tensors_sha256"] = tensors_sha256(tensors)
    header["header_sha256"] = json_sha256({k_: v for k_, v in header.items() if k_ not in HASH_FIELDS})
    return tensors, header


# -- load -----------------------------------------------------------------------------------------------------------


def load_adapter(
    base_model: nn.Module,
    path: str | os.PathLike,
    *,
    bank_path: str | os.PathLike | None = None,
    strict: bool = True,
    trainable: bool = False,
    verify_weights: bool = True,
) -> nn.Module:
    """Wrap `base_model` in place with the adapter at `path` (inference form: indices and weights, no `(N, h)`
    logits) and return it.

    Args:
        base_model: the plain model the adapter was trained on (not already adapted). Modified in place.
        path: the adapter directory or `.safetensors` file (`save_adapter`'s output).
        bank_path: the shared bank file, for an adapter saved with `bank="reference"`.
        strict: False tolerates a different model class with the same module names and shapes.
        trainable: False (default) freezes the adapter and puts the model in eval mode; True leaves the bank
            and the `modules_to_save` copies trainable (the selection stays fixed).
        verify_weights: False accepts another checkpoint of the same shapes (the adapter samples a few base
            weights and compares them by default).

    Returns:
        The same `base_model`, adapted.

    Raises:
        AdapterFormatError: the file is truncated, corrupt or edited, its shared bank is missing or differs, or
            the base model differs (class, module names, shapes or weights), saying what differs.
        TargetError: `base_model` already has an adapter.
        FileNotFoundError: nothing at `path`.
    """
    snap, info = read_adapter(path, bank_path=bank_path)
    return build_model(
        base_model, snap, str(info["file"]), strict=strict, trainable=trainable, verify_weights=verify_weights
    )


def read_adapter(path: str | os.PathLike, bank_path: str | os.PathLike | None = None) -> tuple[AdapterSnapshot, dict]:
    """Read and fully validate an adapter file -> (snapshot, {"file": the file read, "header": its JSON header})."""
    file = adapter_file(path)
    tensors, metadata, _ = read_safetensors(file)
    header = parse_json_metadata(file, metadata, "vblora")
    return decode(file, header, tensors, bank_path), {"file": file, "header": header}


def decode(
    file: Path, header: dict, tensors: dict[str, torch.Tensor], bank_path: str | os.PathLike | None = None
) -> AdapterSnapshot:
    """Validate header and tensors against each other and rebuild the snapshot (float32 bank and weights)."""

    def fail(msg: str):
        raise AdapterFormatError(f"{file}: {msg}")

    if header.get("format") != FORMAT:
        fail(f"not a vblora adapter (format={header.get('format')!r}, expected {FORMAT!r})")
    version = header.get("format_version")
    if version != FORMAT_VERSION:
        fail(
            f"unknown format version {version!r} (library {header.get('library_version')!r}); this vblora reads "
            f"version {FORMAT_VERSION}: upgrade vblora to load it"
        )
    try:
        cfg = VBLoRAConfig.from_dict(dict(header["config"]))
        precision = header["precision"]
        bank_meta, idx_meta = dict(header["bank"]), dict(header["indices"])
        modules = [ModuleEntry.from_row(row) for row in header["modules"]]
        extra_keys = {str(n): [str(k) for k in keys] for n, keys in dict(header["modules_to_save"]).items()}
        fingerprint = dict(header["base"])
        packed = idx_meta["packed"]
        sample = {str(n): [float(v) for v in vals] for n, vals in dict(fingerprint.get("weight_sample") or {}).items()}
        labels = header.get("labels")
        labels = {str(k): str(v) for k, v in dict(labels).items()} if labels is not None else None
    except (KeyError, TypeError, ValueError, VBLoRAError) as e:
        fail(f"malformed header ({type(e).__name__}: {e})")
    h, b, k = cfg.num_vectors, cfg.vector_length, cfg.stored_topk
    if precision not in PRECISIONS:
        fail(f"unknown precision {precision!r}")
    if bank_meta.get("mode") not in ("embed", "reference") or bank_meta.get("shape") != [h, b]:
        fail(f"bank entry {bank_meta} does not match the config (h={h}, b={b})")
    if not modules or any(m.kind not in KINDS for m in modules):
        fail("module table is empty or names an unknown layer kind")
    layout = Layout.from_specs([(m.name, m.kind, m.in_features, m.out_features) for m in modules], cfg.rank, b)
    if list(layout.entries) != modules:
        fail("module offsets are inconsistent with their shapes (rank, vector_length)")
    n, bits = layout.num_subvectors, index_bits(h)
    if idx_meta.get("shape") != [n, k] or idx_meta.get("bits") != bits or not isinstance(packed, bool):
        fail(f"indices entry {idx_meta} does not match {n} sub-vectors, k={k}, h={h}")

    # -- keys, dtypes, shapes: the (dtype, shape) of every tensor the header implies, in the order they are checked
    reference, int8 = bank_meta["mode"] == "reference", precision == "int8"
    float_dtype = FLOATS.get(precision)
    spec: dict[str, tuple[torch.dtype | None, tuple[int, ...]]] = {}  # float_dtype is None only for int8 (unused)
    if not reference:
        spec["bank"] = (torch.int8 if int8 else float_dtype, (h, b))
        if int8:
            spec["bank_scale"] = (torch.float32, (h,))
    spec["weights"] = (torch.uint8 if int8 else float_dtype, (n, k - 1))
    spec["indices"] = (torch.uint8, (math.ceil(n * k * bits / 8),)) if packed else (index_dtype(h), (n, k))
    want = set(spec) | {f"{EXTRA_PREFIX}{name}.{key}" for name, keys in extra_keys.items() for key in keys}
    missing, unexpected = sorted(want - set(tensors)), sorted(set(tensors) - want)
    if missing or unexpected:
        fail(f"tensor keys differ from the header: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, (dtype, shape) in spec.items():
        t = tensors[key]
        if t.dtype != dtype or tuple(t.shape) != shape:
            fail(f"tensor '{key}' is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
    indices = unpack_bits(tensors["indices"], bits, n * k).view(n, k) if packed else tensors["indices"].long()

    # -- values
    bad = (indices >= h).nonzero()
    if len(bad):
        row = int(bad[0, 0])
        fail(
            f"index {int(indices[row, bad[0, 1]])} >= num_vectors {h} (sub-vector {row}, module {layout.owner_of(row)})"
        )
    partial = dequantize_weights(tensors["weights"]) if int8 else tensors["weights"].float()
    if not torch.isfinite(partial).all():
        fail("mixing weights hold NaN/inf")
    if (partial < -WEIGHT_TOL).any() or (partial.sum(dim=1) > 1 + WEIGHT_TOL).any():
        fail("mixing weights are not a probability vector (negative, or summing to more than 1)")
    if reference:
        bank = _resolve_bank(file, bank_meta.get("sha256"), bank_path)
    else:
        bank = dequantize_bank(tensors["bank"], tensors["bank_scale"]) if int8 else tensors["bank"].float()
        if int8 and not (torch.isfinite(tensors["bank_scale"]).all() and (tensors["bank_scale"] > 0).all()):
            fail("bank_scale holds non-finite or non-positive values")
        if not torch.isfinite(bank).all():
            fail("bank holds NaN/inf values")
        if bank.abs().max() > MAX_BANK_VALUE:
            fail(
                f"bank values reach {float(bank.abs().max()):.3g}: not a trained bank (|value| <= {MAX_BANK_VALUE:g});"
                f" the file was made by a diverged run or edited"
            )
    for key, t in tensors.items():
        if key.startswith(EXTRA_PREFIX) and t.is_floating_point() and not torch.isfinite(t).all():
            fail(f"tensor '{key}' holds NaN/inf values")

    # -- digests last: structural problems above get specific messages, anything else is caught here
    if header.get("tensors_sha256") != tensors_sha256(tensors):
        fail("tensor payload does not match its sha256 (corrupt or edited bytes)")
    if header.get("header_sha256") != json_sha256({k_: v for k_, v in header.items() if k_ not in HASH_FIELDS}):
        fail("header fields were edited (header sha256 mismatch)")

    extras = {name: {key: tensors[f"{EXTRA_PREFIX}{name}.{key}"] for key in keys} for name, keys in extra_keys.items()}
    return AdapterSnapshot(
        config=cfg,
        bank=bank,
        indices=indices,
        weights=complete_weights(partial).clamp_(min=0),
        modules=modules,
        extras=extras,
        architecture=str(fingerprint.get("architecture", "")),
        model_type=fingerprint.get("model_type"),
        name_or_path=fingerprint.get("name_or_path"),
        task_type=fingerprint.get("task_type"),
        id2label=labels,
        weight_sample=sample,
    )


# -- shared bank ----------------------------------------------------------------------------------------------------


def save_bank(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the model's bank alone, float32, with its content sha256, for adapters saved with `bank="reference"`.

    Args:
        model: an adapted model.
        path: a directory (the file is `bank.safetensors` inside it) or a path ending in `.safetensors`.

    Returns:
        The path of the written file.

    Raises:
        TargetError: the model has no adapter.
    """
    bank = get_bank(model).bank.detach().float().cpu()
    meta = {
        "format": BANK_FORMAT,
        "format_version": FORMAT_VERSION,
        "shape": list(bank.shape),
        "sha256": bank_sha256(bank),
    }
    return write_adapter(adapter_file(path, BANK_FILE), {"bank": bank}, meta)


def read_bank(path: str | os.PathLike) -> tuple[torch.Tensor, str]:
    """`(bank (h, b) float32, sha256)` of a bank file, verified."""
    file = adapter_file(path, BANK_FILE)
    tensors, metadata, _ = read_safetensors(file)
    meta = parse_json_metadata(file, metadata, "vblora")
    if meta.get("format") != BANK_FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise AdapterFormatError(f"{file}: not a vblora bank file of format version {FORMAT_VERSION}")
    bank = tensors.get("bank")
    if bank is None or set(tensors) != {"bank"} or bank.dtype != torch.float32 or bank.dim() != 2:
        raise AdapterFormatError(f"{file}: a bank file holds exactly one float32 (h, b) tensor 'bank'")
    digest = bank_sha256(bank)
    if digest != meta.get("sha256"):
        raise AdapterFormatError(f"{file}: bank does not match its sha256 (corrupt or edited bytes)")
    return bank, digest


def _resolve_bank(file: Path, want: str | None, bank_path: str | os.PathLike | None) -> torch.Tensor:
    if bank_path is None:
        raise AdapterFormatError(
            f"{file}: this adapter references a shared bank (sha256 {want}) instead of storing "
            f"it; pass bank_path= (--bank on the command line) the bank file written by "
            f"vblora.save_bank"
        )
    bank, digest = read_bank(bank_path)
    if digest != want:
        raise AdapterFormatError(
            f"{file}: shared bank mismatch: the adapter needs bank sha256 {want}, but "
            f"{adapter_file(bank_path, BANK_FILE)} holds {digest}"
        )
    return bank
