"""The documentation site: `mkdocs build --strict` passes (any warning fails it, so a renamed function or argument
that a page or a docstring still names fails here and in CI), the strict build really does fail on such staleness,
every public name has an API reference entry, and every public name's docstring documents its arguments, what it
returns and what it raises.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vblora

ROOT = Path(__file__).resolve().parent.parent
DOCS_PACKAGES = ("mkdocs", "material", "mkdocstrings_handlers.python", "markdown_exec")
# Public functions that raise nothing of their own: they accept any module (no adapter: nothing to do or report).
RAISE_NOTHING = {"adapted_layers", "unmerge", "disable_adapter"}


def docs_tools_missing() -> str | None:
    missing = [
        m
        for m in DOCS_PACKAGES
        if importlib.util.find_spec(m.split(".")[0]) is None or (m.count(".") and importlib.util.find_spec(m) is None)
    ]
    return f"docs tools not installed ({', '.join(missing)}): pip install -e '.[docs]'" if missing else None


def mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # mkdocs-material's notice about MkDocs 2, not a warning
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def test_site_builds_strict(tmp_path):
    if reason := docs_tools_missing():
        pytest.skip(reason)
    done = mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "api" / "storage" / "index.html").is_file()


def one_page_site(tmp_path: Path, page: str) -> subprocess.CompletedProcess:
    """Build a site of one page, `page`, with mkdocs.yml's settings (plugins, hooks, validation), in strict mode;
    `tmp_path/pkg` is on the API reference's path too."""
    import yaml

    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "index.md").write_text(page)
    config.update(
        docs_dir="docs",
        nav=["index.md"],
        site_name="one page",
        hooks=[str(ROOT / hook) for hook in config.get("hooks", [])],
    )
    config["plugins"] = [p for p in config["plugins"] if p != "search"]
    for p in config["plugins"]:
        if isinstance(p, dict) and "mkdocstrings" in p:
            p["mkdocstrings"]["handlers"]["python"]["paths"] = [str(tmp_path / "pkg"), str(ROOT / "src")]
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    return mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")


def test_strict_build_fails_on_a_stale_argument_and_a_stale_reference(tmp_path):
    """A docstring documenting an argument its function no longer has, and a page naming a function that does not
    exist: both are reported and the build fails."""
    if reason := docs_tools_missing():
        pytest.skip(reason)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "renamed.py").write_text(
        'def scale(x: float, factor: float) -> float:\n    """Scale x.\n\n    Args:\n        x: a number.\n'
        '        times: how many times.\n    """\n    return x * factor\n'
    )
    done = one_page_site(tmp_path, "# API\n\n::: renamed.scale\n\n::: vblora.no_such_function\n")
    out = done.stdout + done.stderr
    assert done.returncode != 0, out
    assert "'times' does not appear in the function signature" in out, out
    assert "vblora.no_such_function" in out, out


def test_strict_build_publishes_repository_files_and_fails_on_a_missing_one(tmp_path):
    """A link out of docs/ to an existing file is published with the site (docs/_hooks/repo_links.py); a link to
    a missing file fails the build."""
    if reason := docs_tools_missing():
        pytest.skip(reason)
    found, missing = tmp_path / "found", tmp_path / "missing"
    for repo in (found, missing):
        repo.mkdir()
        (repo / "data.json").write_text("{}")
    done = one_page_site(found, "# Links\n\n[data](../data.json)\n")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (found / "site" / "repo" / "data.json").is_file()
    done = one_page_site(missing, "# Links\n\n[data](../data.json), [gone](../gone.json)\n")
    out = done.stdout + done.stderr
    assert done.returncode != 0 and "'../gone.json'" in out and "'../data.json'" not in out, out


def public_names() -> list[str]:
    return list(vblora.__all__)


def test_every_public_name_has_an_api_reference_entry():
    pages = "\n".join(p.read_text() for p in (ROOT / "docs" / "api").glob("*.md"))
    documented = set(re.findall(r"^::: ([\w.]+)", pages, flags=re.M))
    missing = [
        name
        for name in public_names()
        if f"vblora.{name}" not in documented and f"{getattr(vblora, name).__module__}.{name}" not in documented
    ]
    assert not missing, f"public names with no '::: vblora.NAME' in docs/api/*.md: {missing}"


def section(doc: str, title: str) -> str | None:
    """The text of a Google-style docstring section (`Args:`, `Returns:`, ...), None if absent."""
    m = re.search(rf"^{title}:\n(.*?)(?=^\S|\Z)", doc, flags=re.M | re.S)
    return m.group(1) if m else None


def problems_of(name: str) -> list[str]:
    obj = getattr(vblora, name)
    doc = inspect.getdoc(obj) or ""
    if not doc.strip():
        return ["no docstring"]
    if isinstance(obj, type) and issubclass(obj, Exception):
        return []  # an exception's docstring says when it is raised
    problems = []
    if dataclasses.is_dataclass(obj):  # fields are documented by their help metadata (one place)
        problems += [f"field {f.name} has no help" for f in dataclasses.fields(obj) if not f.metadata.get("help")]
        return problems + ([] if section(doc, "Raises") else ["no Raises: section"])
    signature = inspect.signature(obj)
    params = [
        p for p in signature.parameters.values() if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    args = section(doc, "Args")
    if params and args is None:
        problems.append("no Args: section")
    for p in params:
        if args is not None and not re.search(rf"^\s+{p.name}\b[^\n]*:", args, flags=re.M):
            problems.append(f"argument {p.name} not in Args:")
    if not isinstance(obj, type):
        returns_nothing = signature.return_annotation in (None, "None")
        if not returns_nothing and section(doc, "Returns") is None and section(doc, "Yields") is None:
            problems.append("no Returns: (or Yields:) section")
        if name not in RAISE_NOTHING and section(doc, "Raises") is None:
            problems.append("no Raises: section")
    return problems


def test_every_public_name_documents_args_returns_and_raises():
    problems = {name: p for name in public_names() if (p := problems_of(name))}
    assert not problems, f"public names whose docstrings miss sections: {problems}"
