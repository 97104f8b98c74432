"""Dataclasses of settings read through `transformers.HfArgumentParser`, for the run settings (`train/config.py`), the
CLI flags (`train/flags.py`) and the E2E options: `flag_dataclass` builds one (for recipes, or for the command line
with each help text naming its default), `typed` reads values into one as their flags' text would be read,
`dataclass_parser` is HfArgumentParser plus `--no-x` for every bool, `show` writes a value as one would type it."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import typing
from dataclasses import field

from vblora.train.errors import SetupError


def flag_dataclass(
    name: str, fields: dict[str, dataclasses.Field], hints: dict, defaults: dict, shown: dict | None = None
) -> type:
    """A dataclass of `fields` (annotations `hints`, values `defaults`) for HfArgumentParser. With `shown`: for the
    command line, every default is argparse.SUPPRESS (a flag not given is absent, so the recipe's value stands) and
    each help text ends in '(default: X)', X being shown[name] as one would type it."""
    out = []
    for key, f in fields.items():
        value = argparse.SUPPRESS if shown is not None else defaults[key]
        # HfArgumentParser takes a list field's default from its factory only
        listy = typing.get_origin(hints[key]) is list or isinstance(value, (list, tuple))
        text = f.metadata["help"] + (f" (default: {show(shown[key])})" if shown is not None else "")
        metadata = {"help": text.replace("%", "%%")}
        spec = (
            field(default_factory=functools.partial(_copied, value), metadata=metadata)
            if listy
            else field(default=value, metadata=metadata)
        )
        out.append((key, hints[key], spec))
    return dataclasses.make_dataclass(name, out)


def _copied(value):
    """A fresh list for a list or tuple default (each parsed namespace gets its own), else the value."""
    return list(value) if isinstance(value, (list, tuple)) else value


def show(value) -> str:
    """A value as one would type it on the command line."""
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value)) if value else "none"
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, float) else str(value)


def typed(dtype: type, values: dict, what: str = "setting"):
    """`dtype(**values)` with every value read by HfArgumentParser as its flag's text would be: a recipe's YAML
    numbers, lists and words go through the same per-type reading as the command line ('1e-3' -> 0.001, 2 -> 2.0
    for a float, [0, '1'] -> [0, 1], 'yes' -> True), so a recipe key and its flag cannot read differently."""
    parser = dataclass_parser(dtype, exit_on_error=False)
    args = []
    for name, value in values.items():
        if value is None or value == []:  # no text form: the value itself
            parser.set_defaults(**{name: value})
        elif isinstance(value, (list, tuple)):
            args += [f"--{name}", *map(str, value)]
        else:
            args.append(f"--{name}={value}")
    try:
        (out,) = parser.parse_args_into_dataclasses(args=args, look_for_args_file=False)
    except argparse.ArgumentError as e:
        raise SetupError(f"{what} '{(e.argument_name or '?').split('/')[0].lstrip('-')}': {e.message}") from None
    return out


def dataclass_parser(dtypes, **kwargs):
    """`HfArgumentParser(dtypes)`, plus `--no-x` for every bool (HfArgumentParser adds it where the default is True;
    the earlier flags had it for all, and scripts use both)."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(dtypes, **kwargs)
    for dtype in parser.dataclass_types:
        for f in dataclasses.fields(dtype):
            if f.type is bool and f.default is not True:
                parser.add_argument(
                    f"--no-{f.name.replace('_', '-')}",
                    f"--no_{f.name}",
                    action="store_false",
                    dest=f.name,
                    default=f.default,
                    help=argparse.SUPPRESS,
                )
    return parser
