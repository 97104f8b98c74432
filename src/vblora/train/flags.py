"""CLI flags derived from dataclass fields: one `--name` per field, its help text and shown default from the field.

Flags default to "not given" (absent from the namespace), so a recipe's value stands unless a flag overrides it.
bool fields get `--x / --no-x`; list fields take several values; every value is read by `vblora.train.config.coerce`
(the same reader as recipe keys), so `--dataset none` and `--lr-bank 1e-3` mean what they mean in YAML.
"""

from __future__ import annotations

import argparse
import dataclasses

from vblora.train.config import HINTS, kind, recipe_defaults, settings
from vblora.train.errors import SetupError


def show(value) -> str:
    """A default as one would type it on the command line."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def add_flags(p: argparse.ArgumentParser, fields: dict[str, dataclasses.Field], hints: dict, shown: dict,
              skip: tuple = ()) -> None:
    for name, f in fields.items():
        typ, listy, _ = kind(hints[name])
        if name in skip or "help" not in f.metadata or typ is dict:
            continue
        help_ = f"{f.metadata['help']} (default: {show(shown[name])})".replace("%", "%%")
        flag = "--" + name.replace("_", "-")
        if typ is bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        else:
            p.add_argument(flag, nargs="*" if listy else None, default=argparse.SUPPRESS, help=help_,
                           metavar={int: "N", float: "X"}.get(typ, "TEXT"))


def add_run_flags(p: argparse.ArgumentParser, recipe: str | None = None, skip: tuple = ()) -> None:
    """Every RunConfig / VBLoRAConfig setting as a flag; shown defaults are those of `recipe` (None: the defaults)."""
    add_flags(p, settings(), HINTS, recipe_defaults(recipe), skip)


def given(args: argparse.Namespace, fields=None) -> dict:
    """The settings given on the command line (text; `build_config` / `coerce` read them into their types)."""
    return {k: getattr(args, k) for k in (fields if fields is not None else settings()) if hasattr(args, k)}


def assignments(items: list[str]) -> dict:
    """`KEY=VALUE` items (values read as YAML: 1e-3, [query, value], none) -> {key: value}."""
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SetupError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out

