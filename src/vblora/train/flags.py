"""CLI flags derived from dataclass fields: one `--name` per field, its help text and shown default from the field.

Flags default to "not given" (absent from the namespace), so a recipe's value stands unless a flag overrides it.
bool fields get `--x / --no-x`; list fields take several values; every value is read by `vblora.train.config.coerce`
(the same reader as recipe keys), so `--dataset none` and `--lr-bank 1e-3` mean what they mean in YAML.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

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


def assignments(items: list[str], scopes: tuple[str, ...] = ()) -> tuple[dict, dict[str, dict]]:
    """`--set` items, one syntax in every command: `KEY=VALUE` (every run) or, where the command has scopes (compare:
    its methods), `SCOPE:KEY=VALUE` (that scope's runs only). Values are read as YAML (1e-3, [query, value], none).
    -> ({key: value}, {scope: {key: value}})."""
    import yaml

    common, scoped = {}, {}
    for item in items:
        key, sep, value = item.partition("=")
        scope, colon, key = key.rpartition(":")
        if not sep or not key.strip():
            raise SetupError(f"--set expects KEY=VALUE{' or SCOPE:KEY=VALUE' if scopes else ''}, got {item!r}")
        if colon and scope not in scopes:
            raise SetupError(f"--set {item!r}: '{scope}:' names no " + (f"method of this run (one of {', '.join(scopes)})"
                             if scopes else "scope here; give KEY=VALUE"))
        (scoped.setdefault(scope, {}) if colon else common)[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return common, scoped


# ---- the flags every study command (compare, ablate) spells and means the same way -----------------------------
class OldSpelling(argparse.Action):
    """A deprecated spelling of a flag: stores into the same setting and says the current name on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"{parser.prog}: warning: {option_string} is deprecated; use --{self.dest.replace('_', '-')}",
              file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_output_flag(p: argparse.ArgumentParser, default: str | None, what: str) -> None:
    """`--output DIR` (and `--out`, its old spelling in ablate and plot)."""
    p.add_argument("--output", default=default, help=f"{what} (default: {show(default)}; --out is the deprecated "
                                                     f"spelling)")
    p.add_argument("--out", dest="output", action=OldSpelling, help=argparse.SUPPRESS)


def add_study_flags(p: argparse.ArgumentParser, example: str, scoped_by: str | None = None) -> None:
    """`--seeds 0 1 2` (seed numbers, in every command) and `--set KEY=VALUE ...` (repeatable; `SCOPE:KEY=VALUE` too
    where the command has scopes, e.g. compare's methods)."""
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], metavar="SEED",
                   help="seed numbers, one run each (default: 0 1 2; --seeds 5 is the one seed 5)")
    form = f"KEY=VALUE or {scoped_by}:KEY=VALUE" if scoped_by else "KEY=VALUE"
    p.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help=f"any other `vblora train` setting as {form} (YAML values; repeatable), e.g. {example}")
