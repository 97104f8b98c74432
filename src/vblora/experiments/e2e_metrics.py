"""The E2E NLG Challenge metric set (BLEU, NIST, METEOR, ROUGE-L, CIDEr), offline, multi-reference.

Follows `tuetschek/e2e-metrics` (`measure_scores.py`) as run by the LoRA / VeRA / VB-LoRA E2E pipelines
(`measure_scores.py ref pred -p`, i.e. its Python port of mteval for BLEU and NIST):

- BLEU (corpus BLEU-4) and NIST (NIST-5) use mteval-v13a's tokenisation (lowercased, punctuation split off).
  BLEU: clipped n-gram counts against the max count over the references, the *closest* reference length per
  input (ties: the shorter), one corpus-level brevity penalty. NIST: n-gram information weights from all the
  references of the set, length penalty against the summed per-input mean reference length.
- METEOR 1.5 (`-l en -norm`), ROUGE-L (LCS F-measure, beta 1.2, best precision and recall over the references)
  and CIDEr (the MS-COCO "CIDEr" scorer, which is CIDEr-D: clipped tf-idf n-gram cosine, Gaussian length penalty
  sigma 6, x10, idf from the evaluated set's references) come from `pycocoevalcap`, on the Stanford PTB
  tokenisation (lowercased, punctuation tokens removed) that `COCOEvalCap` applies first.

Inputs are grouped by MR: `hyps[i]` is the output for input i and `refs[i]` its list of references. Scores are on
the scale `measure_scores.py` prints: BLEU, METEOR, ROUGE_L in [0, 1] (the paper's tables show them x100), NIST
and CIDEr unscaled. A metric that cannot be computed here (METEOR without a Java runtime) is returned as None
with the reason under "notes"; nothing is downloaded at run time. See docs/e2e.md for every deviation.
"""

from __future__ import annotations

import atexit
import itertools
import math
import os
import re
import shutil
import subprocess
import threading
from collections import Counter
from typing import IO, ClassVar

METRICS = ("BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr")
PAPER_SCALE = {"BLEU": 100.0, "NIST": 1.0, "METEOR": 100.0, "ROUGE_L": 100.0, "CIDEr": 1.0}

# The tokens COCOEvalCap's PTBTokenizer drops after tokenising (its PUNCTUATIONS list, verbatim: the upper-case
# bracket names never match the lower-cased output, so "-lrb-" survives there and here alike).
NO_COCO = "pycocoevalcap is not installed (pip install 'vblora[e2e]')"
COCO_PUNCTUATION = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)


# ----------------------------------------------------------------------------------------------- tokenisation
def mteval_tokenize(text: str, lowercase: bool = True) -> list[str]:
    """mteval-v13a's default tokenisation (also e2e-metrics' pymteval), returning the token list."""
    text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
    text = f" {text} "
    if lowercase:  # mteval lowercases unless -c (Perl's tr/[A-Z]/[a-z]/ is ASCII-only; pymteval's .lower() not)
        text = text.lower()
    text = re.sub(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])", r" \1 ", text)  # punctuation
    text = re.sub(r"([^0-9])([\.,])", r"\1 \2 ", text)  # period/comma unless preceded by a digit
    text = re.sub(r"([\.,])([^0-9])", r" \1 \2", text)  # period/comma unless followed by a digit
    text = re.sub(r"([0-9])(-)", r"\1 \2 ", text)  # dash after a digit
    return text.split()


_CLITICS = re.compile(r"(?i)(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_PTB_BRACKETS = {"(": "-lrb-", ")": "-rrb-", "[": "-lsb-", "]": "-rsb-", "{": "-lcb-", "}": "-rcb-"}


def ptb_tokenize_python(text: str) -> list[str]:
    """A pure-Python approximation of `PTBTokenizer -preserveLines -lowerCase` plus COCO's punctuation removal.

    Matches the Java tokenizer on E2E-style English (checked in tests when Java is present): sentence and clause
    punctuation split off, clitics split (is n't, it 's), "£" escaped to "#" as PTB3 does, hyphenated words and
    decimals kept whole. Abbreviation handling ("st.") and rare PTB normalisations are not reproduced.
    """
    text = text.lower().replace("\n", " ").replace("£", " # ")
    text = re.sub(r'(^|[\s(\[{])"', r"\1 `` ", text)  # opening double quote
    text = text.replace('"', " '' ")
    text = re.sub(r"\.\.\.+", " ... ", text)
    text = re.sub(r"([(){}\[\]])", lambda m: f" {_PTB_BRACKETS[m.group(1)]} ", text)
    text = re.sub(r"([,;:!?])(?=\s|$)", r" \1 ", text)
    text = re.sub(r"([,;!?])", r" \1 ", text)  # these split even inside a word
    text = re.sub(r"(?<![.\d])\.(?=\s|$|['`])", " . ", text)  # sentence-final period, not in 3.5 or ...
    text = re.sub(r"(\d)\.(?=\s|$)", r"\1 . ", text)  # "costs 20." -> 20 .
    text = _CLITICS.sub(r"\1 \2", text)
    text = re.sub(r"(^|\s)'(?!(?:s|re|ve|ll|d|m)\b)(?=\w)", r"\1` ", text)  # opening single quote
    text = re.sub(r"(?<=\w)'(?=\s|$)", " '", text)  # closing single quote
    return [t for t in text.split() if t not in COCO_PUNCTUATION]


def _coco_jar_dir() -> str | None:
    try:
        import pycocoevalcap.tokenizer.ptbtokenizer as ptb
    except ImportError:
        return None
    return os.path.dirname(os.path.abspath(ptb.__file__))


def java_available() -> str | None:
    """None when a Java runtime can be run, else the reason it cannot."""
    java = shutil.which("java")
    if java is None:
        return "no `java` on PATH (METEOR 1.5 is a Java program; Debian: apt-get install default-jre-headless)"
    try:
        subprocess.run([java, "-version"], capture_output=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"`java -version` failed: {exc}"
    return None


def ptb_tokenize_java(texts: list[str]) -> list[list[str]]:
    """COCOEvalCap's tokenisation: Stanford PTBTokenizer 3.4.1 (bundled jar), then its punctuation removal.

    Reads from stdin instead of a temporary file in site-packages, so it runs on a read-only install.
    """
    jar_dir = _coco_jar_dir()
    if jar_dir is None:
        raise RuntimeError(NO_COCO)
    lines = [" ".join(t.replace("\n", " ").split()) for t in texts]
    todo = [i for i, line in enumerate(lines) if line]  # -preserveLines cannot keep an empty line apart
    out: list[list[str]] = [[] for _ in texts]
    if not todo:
        return out
    cmd = [
        "java",
        "-cp",
        "stanford-corenlp-3.4.1.jar",
        "edu.stanford.nlp.process.PTBTokenizer",
        "-preserveLines",
        "-lowerCase",
    ]
    proc = subprocess.run(
        cmd,
        cwd=jar_dir,
        input="\n".join(lines[i] for i in todo) + "\n",
        capture_output=True,
        text=True,
        encoding="utf-8",
        check=True,
    )
    got = proc.stdout.rstrip("\n").split("\n")
    if len(got) != len(todo):
        raise RuntimeError(f"PTBTokenizer returned {len(got)} lines for {len(todo)} inputs")
    for i, line in zip(todo, got, strict=True):
        out[i] = [t for t in line.split() if t not in COCO_PUNCTUATION]
    return out


# ---------------------------------------------------------------------------------------------- the metrics
def _check(hyps: list[str], refs: list[list[str]]) -> None:
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} outputs for {len(refs)} inputs: give one output per unique MR")
    if not hyps:
        raise ValueError("nothing to score")
    for i, r in enumerate(refs):
        if isinstance(r, str) or len(r) == 0:
            raise ValueError(f"input {i}: references must be a non-empty list of strings")


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def bleu(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    """Corpus BLEU-4 of mteval-tokenised sentences, by pycocoevalcap's BleuScorer ("closest" reference length).

    pycocoevalcap with option "closest" is exactly e2e-metrics' pymteval BLEUScore: clipped counts against the
    max over references, closest reference length (ties: shorter), +1e-15 on zero matches.
    """
    from pycocoevalcap.bleu.bleu_scorer import BleuScorer

    scorer = BleuScorer(n=4)
    for h, r in zip(hyps, refs, strict=True):
        scorer += (" ".join(h), [" ".join(x) for x in r])
    score, _ = scorer.compute_score(option="closest", verbose=0)
    return float(score[3])


def nist(hyps: list[list[str]], refs: list[list[list[str]]], n: int = 5) -> float:
    """NIST-5 as mteval-v13a / e2e-metrics' pymteval NISTScore compute it (multi-reference, corpus level).

    info(w1..wk) = log2(count(w1..wk-1) / count(w1..wk)) over all reference n-grams (count of the empty prefix =
    total reference words); score = sum_k sum(info * clipped matches of k-grams) / (k-grams in the outputs),
    times exp(-beta log^2 min(1, L_sys / L_ref)) with beta making the factor 0.5 at ratio 2/3 and L_ref the sum
    over inputs of the mean reference length.
    """
    counts: Counter = Counter()
    for r in refs:
        for ref in r:
            counts[()] += len(ref)
            for k in range(1, n + 1):
                counts.update(_ngrams(ref, k))

    def info(g: tuple) -> float:
        return math.log2(counts[g[:-1]] / counts[g])

    hit_info = [0.0] * n
    sys_ngrams = [0] * n
    ref_len = 0.0
    for h, r in zip(hyps, refs, strict=True):
        for k in range(1, n + 1):
            sys_ngrams[k - 1] += max(0, len(h) - k + 1)
            best: Counter = Counter()
            for ref in r:
                best |= _ngrams(ref, k)  # max count over the references
            for g, c in _ngrams(h, k).items():
                if g in best:
                    hit_info[k - 1] += info(g) * min(c, best[g])
        ref_len += sum(len(x) for x in r) / len(r)
    score = sum(hi / max(s, 1) for hi, s in zip(hit_info, sys_ngrams, strict=True))
    ratio = sys_ngrams[0] / ref_len if ref_len else 0.0
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = 1.0 if ratio >= 1 else 0.0 if ratio <= 0 else math.exp(-beta * math.log(ratio) ** 2)
    return float(score * penalty)


def _coco(scorer, hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    """The corpus score of a pycocoevalcap scorer, inputs keyed by position as COCOEvalCap passes them."""
    gts = {i: [" ".join(x) for x in r] for i, r in enumerate(refs)}
    res = {i: [" ".join(h)] for i, h in enumerate(hyps)}
    return float(scorer.compute_score(gts, res)[0])


def rouge_l(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    """Mean over inputs of ROUGE-L (pycocoevalcap Rouge: LCS F-measure, beta 1.2, max P and max R over refs)."""
    from pycocoevalcap.rouge.rouge import Rouge

    return _coco(Rouge(), hyps, refs)


def cider(hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
    """CIDEr-D as the COCO scorer (labelled "CIDEr" there and in e2e-metrics) computes it; idf from these refs."""
    from pycocoevalcap.cider.cider import Cider

    return _coco(Cider(), hyps, refs)


class MeteorServer:
    """A METEOR 1.5 JVM speaking its `-stdio` protocol, as pycocoevalcap's `Meteor` does (`-l en -norm`).

    `modules=None` is the official configuration (exact, stem, synonym, paraphrase; loading the 60 MB paraphrase
    table takes 10-25 s on 2 cores). A smaller set, e.g. ("exact", "stem", "synonym"), starts in ~1 s and scores
    identically when every match is exact; tests use it. One server per configuration is kept per process.
    """

    _lock = threading.Lock()
    _servers: ClassVar[dict] = {}

    def __init__(self, modules: tuple[str, ...] | None = None):
        import pycocoevalcap.meteor.meteor as m

        cmd = ["java", "-jar", "-Xmx2G", "meteor-1.5.jar", "-", "-", "-stdio", "-l", "en", "-norm"]
        if modules:
            cmd += ["-m", " ".join(modules)]
        self.proc = subprocess.Popen(
            cmd,
            cwd=os.path.dirname(os.path.abspath(m.__file__)),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None  # both piped above
        self.stdin: IO[str] = self.proc.stdin
        self.stdout: IO[str] = self.proc.stdout
        self.lock = threading.Lock()
        atexit.register(self.close)

    @classmethod
    def get(cls, modules: tuple[str, ...] | None = None) -> MeteorServer:
        key = tuple(modules) if modules else None
        with cls._lock:
            server = cls._servers.get(key)
            if server is None or server.proc.poll() is not None:
                server = cls._servers[key] = cls(key)
            return server

    def _ask(self, line: str) -> str:
        self.stdin.write(line + "\n")
        self.stdin.flush()
        answer = self.stdout.readline()
        if not answer:
            raise RuntimeError("the METEOR process ended (Java out of memory, or a broken jar?)")
        return answer.strip()

    def score(self, hyps: list[list[str]], refs: list[list[list[str]]]) -> float:
        """Corpus METEOR of token lists: per-input statistics ("SCORE" lines), then one "EVAL" over all of them."""

        def clean(tokens):  # one line of single-spaced words, without the protocol's field separator
            return " ".join(" ".join(tokens).replace("|||", " ").split())

        with self.lock:
            stats = [
                self._ask(" ||| ".join(["SCORE", *map(clean, r), clean(h)])) for h, r in zip(hyps, refs, strict=True)
            ]
            self._ask(" ||| ".join(["EVAL", *stats]))  # first answer line: the first input's score
            for _ in range(len(hyps) - 1):
                self.stdout.readline()
            return float(self.stdout.readline().strip())  # last line: the corpus score

    def close(self) -> None:
        if self.proc.poll() is None:
            self.stdin.close()
            self.proc.kill()
            self.proc.wait()


def meteor(hyps: list[list[str]], refs: list[list[list[str]]], modules: tuple[str, ...] | None = None) -> float:
    """Corpus METEOR 1.5 (`-l en -norm`, pycocoevalcap's bundled jar). Needs Java; raises if it cannot run."""
    return MeteorServer.get(modules).score(hyps, refs)


def meteor_unavailable() -> str | None:
    """None when METEOR can be computed here, else why not."""
    try:
        import pycocoevalcap.meteor.meteor as m
    except ImportError:
        return NO_COCO
    if not os.path.exists(os.path.join(os.path.dirname(m.__file__), "meteor-1.5.jar")):
        return "pycocoevalcap's meteor-1.5.jar is missing"
    return java_available()


def compute_e2e_metrics(
    hyps: list[str],
    refs: list[list[str]],
    metrics: tuple[str, ...] = METRICS,
    tokenizer: str = "auto",
    meteor_modules: tuple[str, ...] | None = None,
) -> dict:
    """Score outputs `hyps[i]` against references `refs[i]` (one entry per unique MR) with the E2E metric set.

    `tokenizer` is the tokenisation before METEOR / ROUGE-L / CIDEr: "java" (Stanford PTBTokenizer, as
    COCOEvalCap), "python" (`ptb_tokenize_python`), or "auto" (Java when it runs, else Python).
    `meteor_modules=None` runs METEOR's official configuration (see `MeteorServer`). Returns
    {"BLEU": float, ..., "notes": {metric: why it is None, or a caveat}, "tokenizer": used, "num_inputs": n}.
    """
    _check(hyps, refs)
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; known: {METRICS}")
    out: dict = {m: None for m in metrics}
    notes: dict[str, str] = {}
    no_coco = None if _coco_jar_dir() else NO_COCO

    def score(name, fn, h, r, needs_coco=True):
        if name in metrics:
            if needs_coco and no_coco:
                notes[name] = no_coco
            else:
                out[name] = fn(h, r)

    if "BLEU" in metrics or "NIST" in metrics:
        mt_h, mt_r = [mteval_tokenize(h) for h in hyps], [[mteval_tokenize(x) for x in r] for r in refs]
        score("BLEU", bleu, mt_h, mt_r)
        score("NIST", nist, mt_h, mt_r, needs_coco=False)
    used = None
    if {"METEOR", "ROUGE_L", "CIDEr"} & set(metrics):
        no_java = java_available()
        if tokenizer == "auto":
            tokenizer = "python" if (no_java or no_coco) else "java"
        if tokenizer not in ("java", "python"):
            raise ValueError(f"tokenizer must be 'auto', 'java' or 'python', not {tokenizer!r}")
        if tokenizer == "java" and (no_java or no_coco):
            raise RuntimeError(f"tokenizer='java' but {no_java or no_coco}")
        flat = list(hyps) + [x for r in refs for x in r]
        toks = ptb_tokenize_java(flat) if tokenizer == "java" else [ptb_tokenize_python(t) for t in flat]
        used = f"ptb-{tokenizer}"
        rest = iter(toks[len(hyps) :])
        c_h, c_r = toks[: len(hyps)], [list(itertools.islice(rest, len(r))) for r in refs]
        score("ROUGE_L", rouge_l, c_h, c_r)
        score("CIDEr", cider, c_h, c_r)
        if "METEOR" in metrics:
            reason = meteor_unavailable()
            if reason is None:
                try:
                    out["METEOR"] = meteor(c_h, c_r, modules=meteor_modules)
                    if meteor_modules:
                        notes["METEOR"] = f"modules {' '.join(meteor_modules)} only: not the official configuration"
                except Exception as exc:  # a JVM that starts but dies (memory, broken jar) is reported, not raised
                    reason = f"METEOR 1.5 failed: {type(exc).__name__}: {exc}"
            if reason is not None:
                notes["METEOR"] = reason
    return {**out, "notes": notes, "tokenizer": used, "num_inputs": len(hyps)}


def format_scores(scores: dict, paper_scale: bool = True) -> str:
    """One line, e.g. "BLEU 68.20  NIST 8.62  METEOR 46.20  ROUGE_L 71.00  CIDEr 2.47" (x100 as in the paper)."""
    scale = PAPER_SCALE if paper_scale else dict.fromkeys(METRICS, 1.0)
    return "  ".join(
        f"{m} n/a" if scores[m] is None else f"{m} {scores[m] * scale[m]:.2f}" for m in METRICS if m in scores
    )
