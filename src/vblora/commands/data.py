"""`vblora data fetch`: download and prepare the offline default data (VADER movie snippets) into the cache."""

from __future__ import annotations

from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="fetch / locate the built-in datasets")
    sub = p.add_subparsers(dest="data_command", metavar="ACTION")
    f = sub.add_parser("fetch", help="download VADER (pip sdist, sha256-checked) and write the fixed 80/10/10 split")
    f.add_argument(
        "--cache-dir", type=Path, default=None, help="cache root (default: $VBLORA_CACHE or ~/.cache/vblora)"
    )
    f.add_argument("--force", action="store_true", help="download and split again even if cached")
    f.set_defaults(func=run_fetch)
    w = sub.add_parser("where", help="print the cached split files")
    w.add_argument("--cache-dir", type=Path, default=None)
    w.set_defaults(func=run_where)
    p.set_defaults(func=lambda args: (p.print_help(), 0)[1])


def run_fetch(args) -> int:  # a DataError (download, checksum) is one line and exit 2, as in every command
    from vblora.train import vader

    paths = vader.fetch(args.cache_dir, force=args.force)
    info = vader.split_info(args.cache_dir)
    for split, path in paths.items():
        print(f"{split:10s} {info.get('sizes', {}).get(split, '?'):>6} examples  {path}")
    print(f"source {info.get('source')} sha256 {info.get('sdist_sha256')}")
    return 0


def run_where(args) -> int:
    from vblora.train import vader

    for split, path in vader.split_paths(args.cache_dir).items():
        print(f"{split:10s} {path}{'' if path.exists() else '  (missing: run vblora data fetch)'}")
    return 0
