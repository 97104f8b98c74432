"""Low-level file handling shared by adapters, banks, checkpoints and exports: atomic writes, hashing, and a
safetensors reader that turns every kind of damage into one `AdapterFormatError` naming the file.

No pickle anywhere: safetensors holds raw tensors plus a string->string metadata map.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import struct
import tempfile
from pathlib import Path
from typing import BinaryIO

import torch

from vblora.errors import AdapterFormatError, VBLoRAError

CHUNK = 1 << 20  # write in 1 MiB chunks, so a crash mid-write leaves a partial temporary file, never a partial target
TMP = ".tmp"


def atomic_write(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically: temporary file in the same directory, fsync, `os.replace`, fsync dir.

    A crash or a full disk at any point leaves the previous file at `path` untouched (the temporary is removed; one
    left by a killed process is removed by the next write). The file gets the usual permissions (0666 minus umask).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent, f".{path.name}.")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=TMP, dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp creates 0600; a shared adapter must stay readable
        with os.fdopen(fd, "wb") as f:
            view = memoryview(data)
            for start in range(0, len(view), CHUNK):
                f.write(view[start : start + CHUNK])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def remove_stale(directory: Path, prefix: str) -> None:
    """Remove temporaries `<prefix><pid>.*.tmp` (files or directories) whose writing process no longer runs."""
    if not directory.is_dir():
        return
    for p in directory.iterdir():
        if not (p.name.startswith(prefix) and p.name.endswith(TMP)):
            continue
        pid = p.name[len(prefix) :].split(".", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        pass
    return True


def replace_dir(out: str | os.PathLike, write, replaceable, *, durable: bool = True) -> Path:
    """Write a directory as a whole: `write(tmp_dir)` fills a temporary sibling, which then replaces `out`. A crash
    leaves the previous directory complete (under its own name, or, between the two renames, under a `.old`
    temporary name that the next call restores), never a mix of old and new files. An existing non-empty `out` is
    replaced only if `replaceable(out)` says it is a previous export of the same kind. `durable=False` skips the
    final fsync of the parent directory: for caches whose entries are checked before use, where a power cut may
    lose the entry (it is written again) but a process crash still leaves it whole or absent."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if not out.exists():  # a crash between the two renames below: the previous directory comes back first
        previous = next(out.parent.glob(f".{out.name}.*.old{TMP}"), None)
        if previous is not None:
            os.replace(previous, out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not replaceable(out))):
        raise VBLoRAError(
            f"{out} exists and holds other files than a previous export of this kind; export into a "
            f"new or empty directory (the export replaces its directory as a whole)"
        )
    remove_stale(out.parent, f".{out.name}.")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=TMP, dir=out.parent))
    try:
        mask = current_umask()  # read once: reading it sets the process-wide umask for a moment
        os.chmod(tmp, 0o777 & ~mask)
        write(tmp)
        for path in tmp.rglob("*"):  # writers such as transformers' save_pretrained create their files 0600
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)
        old = out.parent / f".{out.name}.{os.getpid()}.old{TMP}"  # the previous directory, until the new one is in
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    if durable:
        _fsync_dir(out.parent)
    return out


def _fsync_dir(directory: Path) -> None:
    # Persist the rename itself; not supported on every platform (e.g. Windows), where it is skipped.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
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
        h.update(f"{name}\0{t.dtype!s}\0{list(t.shape)}\0".encode())
        h.update(tensor_bytes(t))
    return h.hexdigest()


def json_sha256(obj) -> str:
    """sha256 of canonical JSON (sorted keys, no spaces)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


MAX_HEADER_BYTES = 64 << 20  # a safetensors JSON header larger than this is damage, not an adapter


# dtypes numpy holds: for these, safetensors' numpy writer gives the same bytes as its torch writer in a third of the
# time (the torch writer looks for shared storage tensor by tensor in Python: 9 ms against 3 ms for the 420 tensors
# of a SmolLM2 LoRA export, which the vLLM plugin writes on a cold start); bf16 and the rest take the torch writer
NUMPY_DTYPES = frozenset(
    {
        torch.float64,
        torch.float32,
        torch.float16,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint8,
        torch.bool,
    }
)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors file of `tensors` (made contiguous, on the CPU) with `metadata`, as bytes: the same bytes for
    the same input in every process (`sorted_metadata`)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    if all(t.dtype in NUMPY_DTYPES for t in tensors.values()):
        from safetensors.numpy import save as save_numpy

        return sorted_metadata(save_numpy({k: t.numpy() for k, t in tensors.items()}, metadata=metadata))
    from safetensors.torch import save

    return sorted_metadata(save(tensors, metadata=metadata))


def sorted_metadata(file: bytes) -> bytes:
    """`file` with its `__metadata__` keys in sorted order. safetensors writes them in hash-map order, which changes
    from one process to the next: the same adapter saved twice gave two different files (and digests). The header
    is written back compact, as safetensors writes it, padded with spaces to a multiple of 8 bytes; the tensor table
    and the data are unchanged."""
    (length,) = struct.unpack("<Q", file[:8])
    header = json.loads(file[8 : 8 + length])
    if len(header.get("__metadata__") or {}) < 2:
        return file
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + file[8 + length :]


def write_safetensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    return atomic_write(path, safetensors_bytes(tensors, metadata))


def read_header(stream: BinaryIO, path: Path, size: int) -> dict:
    """The JSON header (tensor table and `__metadata__`) of a safetensors file of `size` bytes, read from `stream` at
    offset 0 by its first 8 + n bytes only; any damage -> AdapterFormatError naming `path`."""
    head = stream.read(8)
    if len(head) < 8:
        raise AdapterFormatError(f"{path}: truncated file ({len(head)} bytes; not a safetensors file)")
    (n,) = struct.unpack("<Q", head)
    # Messages name no value read from the file (the length word, undecodable bytes): the file may be one the caller
    # could not read otherwise (a path given to a server), and its first bytes would be echoed back to them.
    if n > min(MAX_HEADER_BYTES, size - 8):
        raise AdapterFormatError(
            f"{path}: truncated or not a safetensors file (header length out of range; the file has {size} bytes)"
        )
    try:
        header = json.loads(stream.read(n).decode("utf-8"))
    except UnicodeDecodeError:
        raise AdapterFormatError(f"{path}: corrupt safetensors header (not UTF-8 text)") from None
    except json.JSONDecodeError as e:  # its message: what was expected and where, never the text itself
        raise AdapterFormatError(f"{path}: corrupt safetensors header (not JSON: {e.msg} at byte {e.pos})") from None
    except RecursionError:
        raise AdapterFormatError(f"{path}: corrupt safetensors header (JSON nested too deeply)") from None
    if not isinstance(header, dict):
        raise AdapterFormatError(f"{path}: corrupt safetensors header (not a JSON object)")
    return header


def header_metadata(header: dict, path: Path) -> dict[str, str]:
    """The `__metadata__` of a safetensors header (empty if absent); AdapterFormatError unless it maps strings to
    strings."""
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise AdapterFormatError(f"{path}: corrupt safetensors metadata (must map strings to strings)")
    return metadata


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], int]:
    """`(tensors, metadata, file size)` of a safetensors file; any damage -> AdapterFormatError naming the file."""
    from safetensors.torch import load

    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    data = path.read_bytes()
    # Parse the header ourselves first, for precise messages on truncated or damaged files.
    metadata = header_metadata(read_header(io.BytesIO(data), path, len(data)), path)
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
