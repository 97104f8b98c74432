"""Where served adapters come from: a directory of native files / native directories / HF PEFT VB-LoRA directories,
and shared bank files. Registration reads only headers (the safetensors JSON header, `adapter_config.json`), so it
costs microseconds and no tensor bytes; the tensors are read, verified and decoded by `vblora.serve.loaded` on first
use.

Names: a native file `DIR/<name>.safetensors`, a native directory `DIR/<name>/adapter.safetensors`, a PEFT directory
`DIR/<name>/adapter_config.json` (peft_type VBLORA). Bank files (`vblora.save_bank`, format "vblora-bank") found in
DIR are not adapters: they are indexed by content hash for the adapters that reference a shared bank.

Confinement (hostile names and files): a source found in or added to a directory with `root` set is read only if
every file it reads resolves (symlinks followed) inside that root; an entry of the directory that leaves it (a
symlink to /etc/passwd, a native directory whose `adapter.safetensors` links elsewhere) is not listed at all, and a
path given to `describe(..., root=...)` outside it is refused with `PathNotAllowedError` before anything is opened
(so a refusal says nothing about the file). `find(directory, name)` is the one way to look a name up in a directory
(with `bank_index(directory)` for the bank files a shared-bank adapter may reference); then
`vblora.serve.loaded.verified` reads and verifies it.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from vblora.errors import AdapterFormatError, VBLoRAError
from vblora.storage.files import header_metadata, parse_json_metadata, read_header
from vblora.storage.native import ADAPTER_FILE, BANK_FILE, BANK_FORMAT, FORMAT
from vblora.storage.peft_vblora import CONFIG_FILE, LOGITS_A, PREFIX, TOPK_INDICES, WEIGHTS_FILE

NATIVE, PEFT = "native", "peft"


@dataclass(frozen=True)
class Source:
    """One registered adapter, as its headers describe it (no tensors).

    modules: qualified names of the adapted modules; heads: names of its `modules_to_save` (full names for native
    files, PEFT's names, possibly suffixes, for PEFT directories); stamp: `stamp_of` the files read (size, mtime,
    inode, ctime of each), so a rescan and the first load notice a replaced file; error: why the adapter cannot be
    used (then modules and heads are empty); root: the directory every file read must stay inside (None: anywhere).
    """

    name: str
    path: Path  # the native .safetensors file, or the PEFT directory
    format: str  # NATIVE | PEFT
    modules: tuple[str, ...] = ()
    heads: tuple[str, ...] = ()
    file_bytes: int = 0
    stamp: tuple[int, ...] = (0, 0)
    bank_sha256: str | None = None  # the shared bank a native adapter references (None: bank embedded)
    summary: dict = field(default_factory=dict)  # small JSON-able facts for AdapterHandle.info
    error: str | None = None
    root: Path | None = None


class PathNotAllowedError(VBLoRAError, PermissionError):
    """An adapter path outside the directory it must stay in (its name, or a symlink, leads out of it)."""


_names: dict[tuple, tuple] = {}  # one tuple object per distinct module list: 1,000 adapters of one model share it


def shared_names(names) -> tuple[str, ...]:
    key = tuple(sys.intern(str(n)) for n in names)
    return _names.setdefault(key, key)


def stamp_of(*paths: Path) -> tuple[int, ...]:
    """(size, mtime_ns, inode, ctime_ns) of each file: any replacement changes it, even one of the same size that
    keeps the old modification time (`cp -p`, an atomic rename), since the inode or the ctime changes."""
    out: tuple[int, ...] = ()
    for path in paths:
        st = path.stat()
        out += (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)
    return out


def source_stamp(source: Source) -> tuple[int, ...] | None:
    """The stamp of the files `source` was described from, as they are now; None if one is gone."""
    try:
        return stamp_of(*stamped_files(source))
    except OSError:
        return None


def stamped_files(source: Source) -> tuple[Path, ...]:
    return (source.path / WEIGHTS_FILE, source.path / CONFIG_FILE) if source.format == PEFT else (source.path,)


def inside(path: Path, root: Path) -> bool:
    """Whether `path`, every symlink followed, lies in `root` (itself resolved). Fast path, for the common case of
    thousands of plain files: a path written below `root` without '..' and with no symlink below `root` is in it."""
    p, r = os.fspath(path), os.fspath(root).rstrip(os.sep) or os.sep
    if p.startswith(r + os.sep) or (r == os.sep and p.startswith(os.sep)):
        parts = p[len(r) :].strip(os.sep).split(os.sep)
        if ".." not in parts:
            step = r
            for part in parts:
                step = os.path.join(step, part)
                if os.path.islink(step):
                    break
            else:
                return True
    try:
        return path.resolve().is_relative_to(root.resolve())
    except (OSError, RuntimeError):  # a symlink loop
        return False


def confine(path: Path, root: Path | None) -> Path:
    """`path`, or PathNotAllowedError if it leaves `root` (no root: anywhere)."""
    if root is not None and not inside(path, root):
        raise PathNotAllowedError(
            f"adapter path {path} is outside the adapter directory {root}: put the adapter "
            f"in that directory (the operator may allow other paths: "
            f"AdapterStore(..., allow_outside_paths=True))"
        )
    return path


def read_json_header(file: Path) -> dict:
    """The JSON header of a safetensors file (tensor table and `__metadata__`), reading only its first bytes."""
    with open(file, "rb") as f:
        return read_header(f, file, os.fstat(f.fileno()).st_size)


def vblora_metadata(file: Path) -> dict:
    """The "vblora" JSON entry of a native adapter or bank file's metadata."""
    return parse_json_metadata(file, header_metadata(read_json_header(file), file), "vblora")


def short(value, limit: int = 40) -> str:
    """repr of a value read from a file, cut to `limit` characters (a message is one line, not the file)."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def describe_native(name: str, file: Path, root: Path | None = None) -> Source:
    meta = vblora_metadata(confine(file, root))
    if meta.get("format") != FORMAT:
        raise AdapterFormatError(f"{file}: not a vblora adapter (format={short(meta.get('format'))})")
    try:
        modules = [str(row[0]) for row in meta["modules"]]
        heads = [str(h) for h in dict(meta.get("modules_to_save") or {})]
        if "" in modules or "" in heads:
            raise ValueError("a module name is empty (the model itself is no adapted module or head)")
        config, bank, base = dict(meta["config"]), dict(meta["bank"]), dict(meta.get("base") or {})
        labels = meta.get("labels")
        summary = {
            "format": NATIVE,
            "task_type": base.get("task_type"),
            "base_model": base.get("name_or_path"),
            "architecture": base.get("architecture"),
            "rank": int(config["rank"]),
            "num_vectors": int(config["num_vectors"]),
            "vector_length": int(config["vector_length"]),
            "modules": len(modules),
            "heads": heads,
            "precision": meta.get("precision"),
            "num_labels": len(labels) if isinstance(labels, dict) else None,
            "labels": {str(k): str(v) for k, v in labels.items()} if isinstance(labels, dict) else None,
        }
        shared = bank.get("sha256") if bank.get("mode") == "reference" else None
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise AdapterFormatError(f"{file}: malformed header ({type(e).__name__}: {str(e)[:120]})") from None
    stamp = stamp_of(file)
    return Source(
        name, file, NATIVE, shared_names(modules), shared_names(heads), stamp[0], stamp, shared, summary, root=root
    )


def describe_peft(name: str, d: Path, root: Path | None = None) -> Source:
    config, weights = confine(d / CONFIG_FILE, root), d / WEIGHTS_FILE
    try:
        conf = json.loads(config.read_text())
    except OSError as e:
        raise AdapterFormatError(f"{config}: unreadable ({e.strerror})") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise AdapterFormatError(f"{config}: not a JSON file") from None
    if not isinstance(conf, dict) or conf.get("peft_type") != "VBLORA":
        peft_type = conf.get("peft_type") if isinstance(conf, dict) else None
        raise AdapterFormatError(
            f"{d}: peft_type {short(peft_type)} is not a VB-LoRA adapter (expected 'VBLORA'); export "
            f"VB-LoRA adapters with vblora.export_peft"
        )
    if not weights.is_file():
        raise AdapterFormatError(f"{d}: missing {WEIGHTS_FILE}")
    suffix = LOGITS_A + (TOPK_INDICES if conf.get("save_only_topk_weights") else "")
    keys = [k for k in read_json_header(confine(weights, root)) if k != "__metadata__"]
    modules = [k[len(PREFIX) : -len(suffix)] for k in keys if k.startswith(PREFIX) and k.endswith(suffix)]
    if not modules:
        raise AdapterFormatError(f"{d}: no '*{suffix}' tensors in {WEIGHTS_FILE}")
    saved = conf.get("modules_to_save") or ()
    if not isinstance(saved, (list, tuple)) or not all(isinstance(h, str) and h for h in saved):
        raise AdapterFormatError(f"{config}: modules_to_save must be a list of module names")
    heads = [h for h in saved if any(k.startswith(f"{PREFIX}{h}.") for k in keys)]
    size = weights.stat().st_size
    summary = {
        "format": PEFT,
        "task_type": conf.get("task_type"),
        "base_model": conf.get("base_model_name_or_path"),
        "rank": conf.get("r"),
        "num_vectors": conf.get("num_vectors"),
        "vector_length": conf.get("vector_length"),
        "modules": len(modules),
        "heads": heads,
        "num_labels": None,
        "labels": None,
    }
    file_bytes = size + config.stat().st_size
    return Source(
        name,
        d,
        PEFT,
        shared_names(modules),
        shared_names(heads),
        file_bytes,
        stamp_of(weights, config),
        None,
        summary,
        root=root,
    )


def adapter_path(path: Path) -> tuple[str, Path] | None:
    """`(format, path to read)` if `path` looks like an adapter (file or directory), else None."""
    if path.is_file() and path.suffix == ".safetensors":
        return NATIVE, path
    if path.is_dir():
        if (path / ADAPTER_FILE).is_file():
            return NATIVE, path / ADAPTER_FILE
        if (path / CONFIG_FILE).is_file():
            return PEFT, path
    return None


def describe(name: str, path: str | os.PathLike, root: str | os.PathLike | None = None) -> Source:
    """Read the headers of the adapter at `path`. Raises FileNotFoundError / AdapterFormatError, or
    PathNotAllowedError (before looking at the path) if `root` is given and the path leads out of it."""
    path = Path(path)
    root = Path(root) if root is not None else None
    confine(path, root)
    found = adapter_path(path)
    if found is None:
        raise FileNotFoundError(
            f"no adapter at {path}: give a native .safetensors file, a directory holding "
            f"{ADAPTER_FILE}, or an HF PEFT VB-LoRA directory ({CONFIG_FILE})"
        )
    adapter_format, target = found
    return describe_native(name, target, root) if adapter_format == NATIVE else describe_peft(name, target, root)


def valid_name(name: str) -> bool:
    """A name that can only mean one entry of a directory: one path component, not hidden, no separators."""
    return (
        isinstance(name, str)
        and bool(name)
        and not name.startswith(".")
        and "/" not in name
        and "\\" not in name
        and "\0" not in name
        and name == name.strip()
    )


def find(directory: str | os.PathLike, name: str) -> Source:
    """The adapter `name` of `directory`, as `discover` would list it (`<name>.safetensors`, or a directory `<name>`
    holding a native or PEFT adapter), confined to the directory. FileNotFoundError if there is none (also for a
    name that is not one plain directory entry, e.g. '../x'), AdapterFormatError if its headers are bad,
    PathNotAllowedError if it leads out of the directory."""
    d = Path(directory)
    if valid_name(name):
        for entry in (d / f"{name}.safetensors", d / name):
            listed = listing(d, entry)
            if listed is not None and listed[0] == name and not (entry.is_file() and entry_bank(d, entry)):
                return describe(name, entry, d)
    raise FileNotFoundError(f"no adapter named {name!r} in {d}")


def listing(d: Path, entry: Path) -> tuple[str, str, Path] | None:
    """`(name, format, path to read)` of an entry of directory `d` that is an adapter (or bank) whose every file lies
    inside `d`, else None: hidden entries, other files, and entries leading out of `d` (symlinks) are not listed."""
    if entry.name.startswith("."):
        return None  # temporaries of atomic writes, hidden files
    try:
        found = adapter_path(entry)
        if found is None:
            return None
        adapter_format, target = found
        files = [entry, target] + ([target / CONFIG_FILE, target / WEIGHTS_FILE] if adapter_format == PEFT else [])
        if not all(inside(f, d) for f in files if f == entry or f.exists()):
            return None  # a symlink out of the directory: not an adapter of this directory
        return (entry.stem if entry.is_file() else entry.name), adapter_format, target
    except OSError:  # a symlink loop, a name too long
        return None


def broken(name: str, path: Path, error: Exception, root: Path | None = None) -> Source:
    """A registered name whose headers cannot be read: acquiring it raises `error` again (until the file at `path`
    changes: its stamp is kept), others are unaffected."""
    try:
        stamp = stamp_of(path)
    except OSError:
        stamp = (0, 0)
    return Source(
        name,
        path,
        NATIVE,
        stamp=stamp,
        root=root,
        error=f"{type(error).__name__}: {error}" if not isinstance(error, AdapterFormatError) else str(error),
    )


def bank_file_sha256(file: Path) -> str | None:
    """The content hash a bank file declares in its header (verified when read), or None if it is no bank file."""
    try:
        meta = vblora_metadata(file)
    except (OSError, AdapterFormatError):
        return None
    return str(meta.get("sha256")) if meta.get("format") == BANK_FORMAT else None


def discover(directory: str | os.PathLike) -> tuple[dict[str, Source], dict[str, Path]]:
    """Every adapter in `directory` by name (unreadable ones as `broken` sources) and every bank file by hash.
    Entries leading out of the directory (symlinks) are left out; no single entry makes the scan fail."""
    d = existing(directory)
    sources: dict[str, Source] = {}
    banks: dict[str, Path] = {}
    for entry in sorted(d.iterdir()):
        listed = listing(d, entry)
        if listed is None:
            continue
        name, _, target = listed
        found = entry_bank(d, entry)
        if found is not None:
            sha, bank, alone = found
            banks[sha] = bank if alone else banks.get(sha, bank)
            if alone:
                continue  # a bank file is no adapter
        try:
            sources[name] = describe(name, entry, d)
        except Exception as e:  # any defect of one file is that file's problem, listed with it
            sources[name] = broken(name, target, e, d)
    return sources, banks


def bank_index(directory: str | os.PathLike) -> dict[str, Path]:
    """Every bank file of `directory` by content hash, as `discover` finds them, reading bank headers only (for a
    shared-bank adapter found with `find`; its `bank_candidates` also look beside it)."""
    d = existing(directory)
    banks: dict[str, Path] = {}
    for entry in sorted(d.iterdir()):
        found = entry_bank(d, entry) if listing(d, entry) is not None else None
        if found is not None:
            banks[found[0]] = found[1] if found[2] else banks.get(found[0], found[1])
    return banks


def existing(directory: str | os.PathLike) -> Path:
    d = Path(directory)
    if not d.is_dir():
        raise FileNotFoundError(f"adapter directory {d} does not exist")
    return d


def entry_bank(d: Path, entry: Path) -> tuple[str, Path, bool] | None:
    """(sha256, bank file, whether the entry is that bank file itself) for a listed entry that is a bank file or a
    directory holding `bank.safetensors` inside `d`; None otherwise."""
    if entry.is_file():
        sha = bank_file_sha256(entry)
        return (sha, entry, True) if sha is not None else None
    bank = entry / BANK_FILE
    if entry.is_dir() and bank.is_file() and inside(bank, d):
        sha = bank_file_sha256(bank)
        return (sha, bank, False) if sha is not None else None
    return None


def bank_candidates(source: Source, banks: dict[str, Path]) -> list[Path]:
    """Where the shared bank of a native adapter may be: the store directory's bank of that hash, then
    `bank.safetensors` beside the adapter file, then one level up (a `vblora train --freeze-bank` run keeps
    `run/bank.safetensors` next to `run/adapter/`)."""
    out = [banks[source.bank_sha256]] if source.bank_sha256 in banks else []
    for d in (source.path.parent, source.path.parent.parent):
        if (d / BANK_FILE).is_file() and d / BANK_FILE not in out:
            out.append(d / BANK_FILE)
    return [p for p in out if source.root is None or inside(p, source.root)]
