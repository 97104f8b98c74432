"""Low-level file handling shared by adapters, banks, checkpoints and exports: atomic writes, hashing, and a
safetensors reader that turns every kind of damage into one `AdapterFormatError` naming the file.

No pickle anywhere: safetensors holds raw tensors plus a string->string metadata map.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import torch

from vblora.errors import AdapterFormatError

CHUNK = 1 << 20  # write in 1 MiB chunks, so a crash mid-write leaves a partial temporary file, never a partial target


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically: temporary file in the same directory, fsync, `os.replace`, fsync dir.

    A crash or a full disk at any point leaves the previous file at `path` untouched (the temporary is removed).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            view = memoryview(data)
            for start in range(0, len(view), CHUNK):
                f.write(view[start:start + CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    # Persist the rename itself; not supported on every platform (e.g. Windows), where it is skipped.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def tensor_bytes(t: torch.Tensor) -> bytes:
    """Raw little-endian bytes of a CPU tensor (any dtype, including bf16 and 0-d)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor in name order: independent of the file layout."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(f"{name}\0{str(t.dtype)}\0{list(t.shape)}\0".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def json_sha256(obj) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, save(tensors, metadata=metadata))


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """`(tensors, metadata, file size)` of a safetensors file; any damage -> AdapterFormatError naming the file."""
    from safetensors.torch import load

    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    data = path.read_bytes()
    # Parse the header ourselves first, for precise messages on truncated or damaged files.
    if len(data) < 8:
        raise AdapterFormatError(f"{path}: truncated file ({len(data)} bytes; not a safetensors file)")
    (n,) = struct.unpack("<Q", data[:8])
    if n > len(data) - 8:
        raise AdapterFormatError(f"{path}: truncated or corrupt: header claims {n} bytes, file has {len(data)}")
    try:
        header = json.loads(data[8:8 + n].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise AdapterFormatError(f"{path}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(f"{path}: corrupt safetensors metadata (must map strings to strings)")
    try:
        tensors = load(data)
    except BaseException as e:  # SafetensorError, and pyo3 PanicException (a BaseException) on odd input
        if isinstance(e, (KeyboardInterrupt, SystemExit, MemoryError)):
            raise
        raise AdapterFormatError(f"{path}: corrupt safetensors data ({type(e).__name__}: {e})") from None
    return tensors, metadata, len(data)


def parse_json_metadata(path: Path, metadata: dict[str, str], key: str) -> dict:
    """The JSON object stored under metadata[key], or AdapterFormatError."""
    if key not in metadata:
        raise AdapterFormatError(f"{path}: not a vblora file (safetensors metadata has no '{key}' entry)")
    try:
        value = json.loads(metadata[key])
    except (json.JSONDecodeError, RecursionError) as e:
        raise AdapterFormatError(f"{path}: the '{key}' JSON header is corrupt ({e})") from None
    if not isinstance(value, dict):
        raise AdapterFormatError(f"{path}: the '{key}' JSON header is not an object")
    return value
