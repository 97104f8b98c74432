"""Command-line flags of the run settings, made by `transformers.HfArgumentParser` from the settings' dataclass
(vblora.train.config.settings_class): one `--name` (and `--name_with_underscores`) per field with its help text and
shown default, `--x / --no-x` for bools, several values for lists, text read as the field's type.

Flags default to "not given" (absent from the namespace), so a recipe's value stands unless a flag overrides it;
`build_config` then reads recipe and flags through the same parser.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from vblora.train.config import settings_class
from vblora.train.errors import SetupError
from vblora.train.typed_settings import dataclass_parser


def flags_parent(*dtypes) -> argparse.ArgumentParser:
    """A parser to pass as `parents=[...]` to `add_parser`: every field of `dtypes` (flag dataclasses made with
    `shown`, whose defaults are "not given") as a flag."""
    return dataclass_parser(list(dtypes), add_help=False)


BUILD_ONLY: str | None = None
"""Set by `vblora.cli.build_parser`: the command being run (None: all). Other commands' run flags are not built:
HfArgumentParser imports transformers, 1.5 s that `vblora inspect` or `vblora --help` need not pay."""


def run_flags(command: str, recipe: str | None = None, skip: tuple = (), more=tuple) -> list[argparse.ArgumentParser]:
    """`parents=` for `command`'s parser: every RunConfig / VBLoRAConfig setting as a flag (less `skip`), with the
    flag dataclasses `more()` beside them; the help shows `recipe`'s values as the defaults (None: RunConfig's)."""
    if BUILD_ONLY is not None and command != BUILD_ONLY:
        return []
    return [flags_parent(settings_class(frozenset(skip), True, recipe), *more())]


def given(args: argparse.Namespace, fields=None) -> dict:
    """The settings given on the command line (typed by the parser; `build_config` layers them over a recipe)."""
    names = fields if fields is not None else [f.name for f in dataclasses.fields(settings_class())]  # every flag
    return {k: getattr(args, k) for k in names if hasattr(args, k)}


def assignments(items: list[str], scopes: tuple[str, ...] = ()) -> tuple[dict, dict[str, dict]]:
    """`--set` items, one syntax in every command: `KEY=VALUE` (every run) or, where the command has scopes (compare:
    its methods), `SCOPE:KEY=VALUE` (that scope's runs only). Values are read as YAML (1e-3, [query, value], none).
    -> ({key: value}, {scope: {key: value}})."""
    import yaml

    common: dict[str, Any] = {}
    scoped: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        scope, colon, key = key.rpartition(":")
        if not sep or not key.strip():
            raise SetupError(f"--set expects KEY=VALUE{' or SCOPE:KEY=VALUE' if scopes else ''}, got {item!r}")
        if colon and scope not in scopes:
            raise SetupError(
                f"--set {item!r}: '{scope}:' names no "
                + (f"method of this run (one of {', '.join(scopes)})" if scopes else "scope here; give KEY=VALUE")
            )
        (scoped.setdefault(scope, {}) if colon else common)[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return common, scoped


# ---- the flags every study command (compare, ablate) spells and means the same way -----------------------------
class OldSpelling(argparse.Action):
    """A deprecated spelling of a flag: stores into the same setting and says the current name on stderr."""

    def __call__(self, parser, namespace, values, option_string=None):
        print(
            f"{parser.prog}: warning: {option_string} is deprecated; use --{self.dest.replace('_', '-')}",
            file=sys.stderr,
        )
        setattr(namespace, self.dest, values)


def add_output_flag(p: argparse.ArgumentParser, default: str | None, what: str) -> None:
    """`--output DIR` (and `--out`, its old spelling in ablate and plot)."""
    p.add_argument(
        "--output", default=default, help=f"{what} (default: {default or 'none'}; --out is the deprecated spelling)"
    )
    p.add_argument("--out", dest="output", action=OldSpelling, help=argparse.SUPPRESS)


def add_study_flags(p: argparse.ArgumentParser, example: str, scoped_by: str | None = None) -> None:
    """`--seeds 0 1 2` (seed numbers, in every command) and `--set KEY=VALUE ...` (repeatable; `SCOPE:KEY=VALUE` too
    where the command has scopes, e.g. compare's methods)."""
    p.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0, 1, 2],
        metavar="SEED",
        help="seed numbers, one run each (default: 0 1 2; --seeds 5 is the one seed 5)",
    )
    form = f"KEY=VALUE or {scoped_by}:KEY=VALUE" if scoped_by else "KEY=VALUE"
    p.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        metavar="KEY=VALUE",
        help=f"any other `vblora train` setting as {form} (YAML values; repeatable), e.g. {example}",
    )
