"""The `vblora` command: a thin dispatcher over `vblora.commands.*` (one module per subcommand).

User errors never show a traceback: every `VBLoRAError` (bad config, data, adapter file, base model), a missing or
unreadable file, a missing optional dependency, all end as one line `vblora CMD: error: ...` and exit code 2.
`--debug` (or VBLORA_DEBUG=1) shows the traceback instead. A closed pipe (`vblora inspect ... | head`) ends quietly.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import sys

from vblora import commands
from vblora.errors import VBLoRAError
from vblora.train import flags

EXTRAS = {
    "transformers": "hf",
    "accelerate": "hf",
    "yaml": "hf",
    "peft": "peft",
    "bitsandbytes": "qlora",
    "sklearn": "train",
    "scipy": "train",
    "matplotlib": "plot",
    "pycocoevalcap": "e2e",
}


class Parser(argparse.ArgumentParser):
    """argparse with `exit_on_error=False` for every (sub)command parser: a value its flag's type cannot read
    (`--lr-bank abc`) raises, and `main` prints it as the one-line error every other user error is."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **{"exit_on_error": False, **kwargs})
        self.commands: set[str] = set()  # the subcommand names (build_parser fills them in)


def build_parser(command: str | None = None) -> Parser:
    """Every command's parser; with `command`, the others' run-setting flags are left out (see flags.BUILD_ONLY)."""
    flags.BUILD_ONLY = command
    parser = Parser(
        prog="vblora",
        description="VB-LoRA: fine-tune models with a global vector bank; store adapters in kilobytes. "
        "Add --debug anywhere to see the traceback of an error.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in sorted(m.name for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")):
        importlib.import_module(f"vblora.commands.{name}").register(sub)
    parser.commands = set(sub.choices)
    return parser


def user_error(e: BaseException) -> str | None:
    """The one line a user sees for an error of theirs, or None for a bug (which keeps its traceback)."""
    if isinstance(e, VBLoRAError):
        return str(e)
    if isinstance(e, ModuleNotFoundError) and e.name:
        extra = EXTRAS.get(e.name.split(".")[0], "all")
        return f"this needs the optional package '{e.name}': pip install 'vblora[{extra}]'"
    if isinstance(e, ImportError) and "pip install 'vblora[" in str(e):  # our own "needs the extra" messages
        return str(e)
    if isinstance(e, (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError)):
        return f"{e.strerror or e}: {e.filename}" if e.filename else str(e)
    if isinstance(e, OSError) and e.errno is not None:  # e.g. a full disk
        return f"{e.strerror}" + (f": {e.filename}" if e.filename else "")
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("VBLORA_DEBUG"))
    argv = [a for a in argv if a != "--debug"]
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command)
    try:
        args = parser.parse_args(argv)
    except argparse.ArgumentError as e:
        print(f"vblora{' ' + command if command in parser.commands else ''}: error: {e}", file=sys.stderr)
        return 2
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # the reader went away: stop quietly, and keep Python from complaining at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        print(f"vblora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        line = user_error(e)
        if line is None or debug:
            raise
        print(f"vblora {args.command}: error: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
