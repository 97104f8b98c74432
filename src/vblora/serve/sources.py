"""Where served adapters come from: a directory of native files / native directories / HF PEFT VB-LoRA directories,
and shared bank files. Registration reads only headers (the safetensors JSON header, `adapter_config.json`), so it
costs microseconds and no tensor bytes; the tensors are read, verified and decoded by `vblora.serve.loaded` on first
use.

Names: a native file `DIR/<name>.safetensors`, a native directory `DIR/<name>/adapter.safetensors`, a PEFT directory
`DIR/<name>/adapter_config.json` (peft_type VBLORA). Bank files (`vblora.save_bank`, format "vblora-bank") found in
DIR are not adapters: they are indexed by content hash for the adapters that reference a shared bank.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vblora.errors import AdapterFormatError
from vblora.storage.files import header_metadata, parse_json_metadata, read_header
from vblora.storage.native import ADAPTER_FILE, BANK_FILE, BANK_FORMAT, FORMAT
from vblora.storage.peft_vblora import CONFIG_FILE, LOGITS_A, PREFIX, TOPK_INDICES, WEIGHTS_FILE

NATIVE, PEFT = "native", "peft"


@dataclass(frozen=True)
class Source:
    """One registered adapter, as its headers describe it (no tensors).

    modules: qualified names of the adapted modules; heads: names of its `modules_to_save` (full names for native
    files, PEFT's names, possibly suffixes, for PEFT directories); stamp: (size, mtime_ns) of the file read, so a
    rescan notices a replaced file; error: why the adapter cannot be used (then modules and heads are empty).
    """

    name: str
    path: Path  # the native .safetensors file, or the PEFT directory
    kind: str  # NATIVE | PEFT
    modules: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    file_bytes: int = 0
    stamp: tuple[int, int] = (0, 0)
    bank_sha256: str | None = None  # the shared bank a native adapter references (None: bank embedded)
    summary: dict = field(default_factory=dict)  # small JSON-able facts for AdapterHandle.info
    error: str | None = None


_names: dict[tuple, tuple] = {}  # one tuple object per distinct module list: 1,000 adapters of one model share it


def shared_names(names) -> tuple[str, ...]:
    key = tuple(sys.intern(str(n)) for n in names)
    return _names.setdefault(key, key)


def stamp_of(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def read_json_header(file: Path) -> dict:
    """The JSON header of a safetensors file (tensor table and `__metadata__`), reading only its first bytes."""
    with open(file, "rb") as f:
        return read_header(f, file, os.fstat(f.fileno()).st_size)


def vblora_metadata(file: Path) -> dict:
    """The "vblora" JSON entry of a native adapter or bank file's metadata."""
    return parse_json_metadata(file, header_metadata(read_json_header(file), file), "vblora")


def describe_native(name: str, file: Path) -> Source:
    meta = vblora_metadata(file)
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(f"{file}: not a vblora adapter (format={meta.get('format')!r})")
    try:
        modules = [str(row[0]) for row in meta["modules"]]
        heads = [str(h) for h in dict(meta.get("modules_to_save") or {})]
        config, bank, base = dict(meta["config"]), dict(meta["bank"]), dict(meta.get("base") or {})
        labels = meta.get("labels")
        summary = {"format": NATIVE, "task_type": base.get("task_type"), "base_model": base.get("name_or_path"),
                   "architecture": base.get("architecture"), "rank": int(config["rank"]),
                   "num_vectors": int(config["num_vectors"]), "vector_length": int(config["vector_length"]),
                   "modules": len(modules), "heads": heads, "precision": meta.get("precision"),
                   "num_labels": len(labels) if isinstance(labels, dict) else None,
                   "labels": {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else None}
        shared = bank.get("sha256") if bank.get("mode") == "reference" else None
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise AdapterFormatError(f"{file}: malformed header ({type(e).__name__}: {e})") from None
    size, mtime = stamp_of(file)
    return Source(name, file, NATIVE, shared_names(modules), shared_names(heads), size, (size, mtime), shared,
                  summary)


def describe_peft(name: str, d: Path) -> Source:
    try:
        conf = json.loads((d / CONFIG_FILE).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterFormatError(f"{d / CONFIG_FILE}: unreadable ({e})") from None
    if not isinstance(conf, dict) or conf.get("peft_type") != "VBLORA":
        kind = conf.get("peft_type") if isinstance(conf, dict) else None
        raise AdapterFormatError(f"{d}: peft_type {kind!r} is not a VB-LoRA adapter (expected 'VBLORA'); export "
                                 f"VB-LoRA adapters with vblora.export_peft")
    weights = d / WEIGHTS_FILE
    if not weights.is_file():
        raise AdapterFormatError(f"{d}: missing {WEIGHTS_FILE}")
    suffix = LOGITS_A + (TOPK_INDICES if conf.get("save_only_topk_weights") else "")
    keys = [k for k in read_json_header(weights) if k != "__metadata__"]
    modules = [k[len(PREFIX):-len(suffix)] for k in keys if k.startswith(PREFIX) and k.endswith(suffix)]
    if not modules:
        raise AdapterFormatError(f"{d}: no '*{suffix}' tensors in {WEIGHTS_FILE}")
    heads = [h for h in conf.get("modules_to_save") or () if any(k.startswith(f"{PREFIX}{h}.") for k in keys)]
    size, mtime = stamp_of(weights)
    summary = {"format": PEFT, "task_type": conf.get("task_type"), "base_model": conf.get("base_model_name_or_path"),
               "rank": conf.get("r"), "num_vectors": conf.get("num_vectors"),
               "vector_length": conf.get("vector_length"), "modules": len(modules), "heads": heads,
               "num_labels": None, "labels": None}
    file_bytes = size + (d / CONFIG_FILE).stat().st_size
    return Source(name, d, PEFT, shared_names(modules), shared_names(heads), file_bytes, (size, mtime), None, summary)


def adapter_path(path: Path) -> tuple[str, Path] | None:
    """`(kind, path to read)` if `path` looks like an adapter (file or directory), else None."""
    if path.is_file() and path.suffix == ".safetensors":
        return NATIVE, path
    if path.is_dir():
        if (path / ADAPTER_FILE).is_file():
            return NATIVE, path / ADAPTER_FILE
        if (path / CONFIG_FILE).is_file():
            return PEFT, path
    return None


def describe(name: str, path: str | os.PathLike) -> Source:
    """Read the headers of the adapter at `path`. Raises FileNotFoundError / AdapterFormatError."""
    path = Path(path)
    found = adapter_path(path)
    if found is None:
        raise FileNotFoundError(f"no adapter at {path}: give a native .safetensors file, a directory holding "
                                f"{ADAPTER_FILE}, or an HF PEFT VB-LoRA directory ({CONFIG_FILE})")
    kind, target = found
    return describe_native(name, target) if kind == NATIVE else describe_peft(name, target)


def broken(name: str, path: Path, error: Exception) -> Source:
    """A registered name whose headers cannot be read: acquiring it raises `error` again, others are unaffected."""
    return Source(name, path, NATIVE, error=f"{type(error).__name__}: {error}" if not isinstance(
        error, AdapterFormatError) else str(error))


def bank_file_sha256(file: Path) -> str | None:
    """The content hash a bank file declares in its header (verified when read), or None if it is no bank file."""
    try:
        meta = vblora_metadata(file)
    except (OSError, AdapterFormatError):
        return None
    return str(meta.get("sha256")) if meta.get("format") == BANK_FORMAT else None


def discover(directory: str | os.PathLike) -> tuple[dict[str, Source], dict[str, Path]]:
    """Every adapter in `directory` by name (unreadable ones as `broken` sources) and every bank file by hash."""
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory {d} does not exist")
    sources: dict[str, Source] = {}
    banks: dict[str, Path] = {}
    for entry in sorted(d.iterdir()):
        if entry.name.startswith("."):
            continue  # temporaries of atomic writes, hidden files
        found = adapter_path(entry)
        if found is None:
            continue
        kind, target = found
        if kind == NATIVE and entry.is_file():
            sha = bank_file_sha256(entry)
            if sha is not None:
                banks[sha] = entry
                continue
        if entry.is_dir() and (entry / BANK_FILE).is_file():
            sha = bank_file_sha256(entry / BANK_FILE)
            if sha is not None:
                banks.setdefault(sha, entry / BANK_FILE)
        name = entry.stem if entry.is_file() else entry.name
        try:
            sources[name] = describe(name, entry)
        except (OSError, AdapterFormatError) as e:
            sources[name] = broken(name, target, e)
    return sources, banks


def bank_candidates(source: Source, banks: dict[str, Path]) -> list[Path]:
    """Where the shared bank of a native adapter may be: the store directory's bank of that hash, then
    `bank.safetensors` beside the adapter file, then one level up (a `vblora train --freeze-bank` run keeps
    `run/bank.safetensors` next to `run/adapter/`)."""
    out = [banks[source.bank_sha256]] if source.bank_sha256 in banks else []
    for d in (source.path.parent, source.path.parent.parent):
        if (d / BANK_FILE).is_file() and d / BANK_FILE not in out:
            out.append(d / BANK_FILE)
    return out
