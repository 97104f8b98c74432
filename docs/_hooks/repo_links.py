"""mkdocs hook: the guides may link to repository files outside docs/ (e.g. `../bench/results/x.json`, the raw
figures behind a table), which work as written when the guides are read in the repository. The site publishes
each such file that exists under `repo/<its path>` and points the link there. A link to a file that does not exist
is left as it is, so `mkdocs build --strict` still fails on it, as on any other broken link."""

from __future__ import annotations

import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

LINK = re.compile(r"\]\((\.\./[^)\s#]+)(#[^)\s]*)?\)")  # ](../path) or ](../path#anchor)
PUBLISHED = "repo"


def published_uri(docs: Path, page_uri: str, link: str) -> tuple[str, Path] | None:
    """(site URI, file) of a link that leaves docs/ for an existing file of the repository, else None."""
    target = (docs / posixpath.dirname(page_uri) / link).resolve()
    root = docs.parent
    if root not in target.parents or docs in target.parents or not target.is_file():
        return None
    return f"{PUBLISHED}/{target.relative_to(root).as_posix()}", target


def on_files(files, config):
    docs = Path(config["docs_dir"]).resolve()
    for page in list(files.documentation_pages()):
        for link, _anchor in LINK.findall(Path(page.abs_src_path).read_text(encoding="utf-8")):
            found = published_uri(docs, page.src_uri, link)
            if found and files.get_file_from_path(found[0]) is None:
                files.append(File.generated(config, found[0], abs_src_path=str(found[1])))
    return files


def on_page_markdown(markdown, page, config, files):
    docs = Path(config["docs_dir"]).resolve()

    def relink(m: re.Match) -> str:
        found = published_uri(docs, page.file.src_uri, m.group(1))
        if not found:
            return m.group(0)
        return f"]({posixpath.relpath(found[0], posixpath.dirname(page.file.src_uri) or '.')}{m.group(2) or ''})"

    return LINK.sub(relink, markdown)
