"""`vblora inspect PATH`: config, sizes, stored-parameter count, bytes per component and base fingerprint of an
adapter file, then a full verification (hashes, shapes, ranges)."""

from __future__ import annotations

import json


def summary(path: str, bank_path: str | None = None) -> dict:
    """What `inspect` prints, as a dict (also used by tests and `--json`)."""
    from vblora.errors import AdapterFormatError
    from vblora.layout import stored_count
    from vblora.storage import adapter_file, read_adapter
    from vblora.storage.files import parse_json_metadata, read_safetensors

    file = adapter_file(path)
    tensors, metadata, size = read_safetensors(file)
    header = parse_json_metadata(file, metadata, "vblora")
    cfg = header.get("config", {})
    h, b = cfg.get("num_vectors", 0), cfg.get("vector_length", 0)
    n, k = (header.get("indices", {}).get("shape") or [0, 0])[:2]
    extras = sum(t.numel() for key, t in tensors.items() if key.startswith("modules_to_save."))
    components = dict.fromkeys(("bank", "indices", "weights", "modules_to_save"), 0)
    for key, t in tensors.items():  # bank_scale counts with the bank, "modules_to_save.<module>.<key>" as one
        part = "bank" if key == "bank_scale" else key.split(".")[0]
        components[part] = components.get(part, 0) + t.numel() * t.element_size()
    components["header"] = size - sum(components.values())
    try:
        read_adapter(file, bank_path=bank_path)
        verified = "ok"
    except AdapterFormatError as e:
        verified = f"FAILED: {e}"
    return {
        "file": str(file),
        "file_bytes": size,
        "format_version": header.get("format_version"),
        "library_version": header.get("library_version"),
        "precision": header.get("precision"),
        "packed_indices": header.get("indices", {}).get("packed"),
        "bank_mode": header.get("bank", {}).get("mode"),
        "config": cfg,
        "modules": len(header.get("modules", [])),
        "subvectors": n,
        "k": k,
        "stored_parameters": stored_count(h, b, n, k) + extras if h else None,
        "bytes": components,
        "base": header.get("base"),
        "verified": verified,
    }


def bank_summary(path: str) -> dict:
    """What `inspect` prints for a shared bank file (`vblora.save_bank`)."""
    from vblora.errors import AdapterFormatError
    from vblora.storage.native import BANK_FILE, adapter_file, read_bank

    file = adapter_file(path, BANK_FILE)
    try:
        bank, digest = read_bank(file)
        return {
            "file": str(file),
            "file_bytes": file.stat().st_size,
            "shape": list(bank.shape),
            "sha256": digest,
            "verified": "ok",
        }
    except AdapterFormatError as e:
        return {"file": str(file), "verified": f"FAILED: {e}"}


def run(args) -> int:
    from pathlib import Path

    from vblora.storage.native import ADAPTER_FILE, BANK_FILE
    from vblora.storage.snapshot import shapes_sha256

    path = Path(args.path)
    bank = path.name.endswith(BANK_FILE) or (
        path.is_dir() and not (path / ADAPTER_FILE).exists() and (path / BANK_FILE).exists()
    )
    info = bank_summary(args.path) if bank else summary(args.path, args.bank)
    if args.json or bank:
        print(json.dumps(info, indent=2) if args.json else "\n".join(f"{k}: {v}" for k, v in info.items()))
        return 0 if info["verified"] == "ok" else 1
    cfg = info["config"]
    print(
        f"{info['file']}  ({info['file_bytes']:,} bytes, format v{info['format_version']}, "
        f"written by vblora {info['library_version']})"
    )
    print(f"  precision {info['precision']}, packed indices {info['packed_indices']}, bank {info['bank_mode']}")
    print(
        f"  rank {cfg.get('rank')}, bank h={cfg.get('num_vectors')} x b={cfg.get('vector_length')}, k={info['k']}, "
        f"{info['modules']} modules, {info['subvectors']:,} sub-vectors, targets {cfg.get('target_modules')!r}"
    )
    shared = ", including the shared bank stored separately" if info["bank_mode"] == "reference" else ""
    print(f"  stored parameters (float32-equivalent{shared}): {info['stored_parameters']:,.0f}")
    print("  bytes: " + ", ".join(f"{k} {v:,}" for k, v in info["bytes"].items()))
    base = info["base"] or {}
    print(
        f"  base model: {base.get('architecture')} (model_type {base.get('model_type')}), adapted module names "
        f"and shapes sha256 {str(shapes_sha256(base))[:16]}"
    )
    print(f"  verified: {info['verified']}")
    return 0 if info["verified"] == "ok" else 1


def register(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="show config, sizes and base fingerprint of an adapter file; verify it")
    p.add_argument("path", help="adapter directory or .safetensors file")
    p.add_argument("--bank", default=None, help="shared bank file, for adapters saved with bank='reference'")
    p.add_argument("--json", action="store_true", help="print a JSON object instead of text")
    p.set_defaults(func=run)
