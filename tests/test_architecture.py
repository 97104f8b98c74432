"""docs/ARCHITECTURE.md's import rules, enforced: parts import only downwards, no cycles, no private names across
modules. Reads the source with `ast` (function-level imports included), so it runs without importing anything."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "vblora"

CORE = {
    "vblora.config",
    "vblora.errors",
    "vblora.layout",
    "vblora.bank",
    "vblora.layers",
    "vblora.inject",
    "vblora.version",
}
# part -> the parts it may import (docs/ARCHITECTURE.md); "api" is the package root `vblora` (the public facade)
ALLOWED = {
    "core": {"core"},
    "storage": {"core", "storage"},
    "api": {"core", "storage", "integrations"},
    "integrations": {"core", "storage"},
    "train": {"core", "storage", "api", "integrations", "train"},
    "experiments": {"core", "storage", "api", "train", "experiments"},
    "plots": {"core", "train", "plots"},
    "serve": {"core", "storage", "api", "train", "serve"},
    "commands": {"core", "storage", "api", "train", "experiments", "plots", "serve", "commands"},
}


def part_of(module: str) -> str:
    if module in CORE:
        return "core"
    if module == "vblora":
        return "api"
    if module in ("vblora.cli", "vblora.__main__") or module.startswith("vblora.commands"):
        return "commands"
    if module.startswith("vblora.recipes"):
        return "train"
    name = module.split(".")[1]
    assert name in ALLOWED, f"{module} belongs to no part of docs/ARCHITECTURE.md: add it there and here"
    return name


def module_name(path: Path) -> str:
    parts = ["vblora", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """`(imported vblora module, names taken from it, line)` for every import in the file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names if a.name.split(".")[0] == "vblora"]
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vblora":
            out.append((node.module, [a.name for a in node.names], node.lineno))
    return out


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in SRC.rglob("*.py")}


def resolve(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """`from vblora.storage import native` imports the submodule; otherwise the module itself."""
    subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
    return subs or [target]


def test_parts_import_only_downwards():
    known = modules()
    bad = []
    for mod, path in known.items():
        for target, names, line in imports(path):
            for t in resolve(target, names, known):
                if part_of(t) not in ALLOWED[part_of(mod)]:
                    bad.append(f"{path.relative_to(SRC.parent)}:{line}: {part_of(mod)} imports {t} ({part_of(t)})")
    assert not bad, "\n".join(bad)


def test_no_private_names_across_modules():
    bad = []
    for mod, path in modules().items():
        tree = ast.parse(path.read_text())
        aliases = {}
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("vblora"):
                bad += [
                    f"{mod}:{node.lineno}: {node.module}.{a.name}"
                    for a in node.names
                    if a.name.startswith("_") and not a.name.startswith("__")
                ]
            if isinstance(node, ast.Import):
                aliases.update({(a.asname or a.name): a.name for a in node.names if a.name.startswith("vblora")})
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Attribute)
                and node.attr.startswith("_")
                and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name)
                and node.value.id in aliases
            ):
                bad.append(f"{mod}:{node.lineno}: {aliases[node.value.id]}.{node.attr}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_no_import_cycles():
    known = modules()
    graph = {
        m: {t for target, names, _ in imports(p) for t in resolve(target, names, known) if t in known and t != m}
        for m, p in known.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "\n".join(cycles)
