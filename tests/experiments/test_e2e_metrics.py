"""The E2E metric set, each checked against a value worked out by hand here (not by the package computing it)."""

import math

import pytest

from vblora.experiments import e2e_metrics as em

NO_COCO = None if em._coco_jar_dir() else "pycocoevalcap is not installed (pip install 'vblora[e2e]')"
NO_JAVA = em.meteor_unavailable()
needs_coco = pytest.mark.skipif(NO_COCO is not None, reason=str(NO_COCO))
needs_java = pytest.mark.skipif(NO_JAVA is not None, reason=f"METEOR needs Java: {NO_JAVA}")


def toks(*sentences):
    return [s.split() for s in sentences]


# --------------------------------------------------------------------------------------------------- BLEU
@needs_coco
def test_bleu_two_inputs_by_hand():
    # input 1: hyp "the cat sat on the mat" (6 tokens), refs of 6 and 7 tokens -> closest ref length 6
    #   1-grams: the x2 (refs allow 2), cat, on, mat match, sat does not      -> 5/6
    #   2-grams: the cat, on the, the mat match; cat sat, sat on do not       -> 3/5
    #   3-grams: only "on the mat"                                             -> 1/4
    #   4-grams: none                                                          -> 0/3
    # input 2: hyp "a dog runs in the park" (6), refs of 7 and 4 tokens -> closest 7
    #   1-grams 6/6; 2-grams: all but "the park" 4/5; 3-grams: all but "in the park" 3/4;
    #   4-grams: "a dog runs in", "dog runs in the" 2/3
    hyps = toks("the cat sat on the mat", "a dog runs in the park")
    refs = [
        toks("the cat is on the mat", "there is a cat on the mat"),
        toks("a dog runs in the big park", "the dog is running"),
    ]
    p = [11 / 12, 7 / 10, 4 / 8, 2 / 6]
    c, r = 12, 6 + 7
    bp = math.exp(1 - r / c)
    expected = bp * math.exp(sum(math.log(x) for x in p) / 4)
    assert em.bleu(hyps, refs) == pytest.approx(expected, rel=1e-7)


@needs_coco
def test_bleu_closest_reference_length_ties_go_to_the_shorter():
    # hyp of 6 tokens, refs of 5 and 7: both 1 away; mteval-v13a takes 5 -> c > r, no brevity penalty
    hyps = toks("a b c d e f")
    refs = [toks("a b c d e", "a b c d e f g")]
    # clipped matches: 6/6, 5/5, 4/4, 3/3 against the 7-token ref
    assert em.bleu(hyps, refs) == pytest.approx(1.0, abs=1e-8)
    # with only the 7-token ref, BP = exp(1 - 7/6)
    assert em.bleu(hyps, [toks("a b c d e f g")]) == pytest.approx(math.exp(1 - 7 / 6), rel=1e-7)


@needs_coco
def test_bleu_agrees_with_sacrebleu_on_a_random_multi_reference_corpus():
    # an independent implementation of mteval-v13a BLEU (13a tokenisation, lowercased, closest ref length)
    sacrebleu = pytest.importorskip("sacrebleu")
    import random

    rng = random.Random(0)
    words = "the eagle is a cheap coffee shop near burger king , it has 5 out of 5 . aromi pub £20-25 isn't".split()

    def sent():
        return " ".join(rng.choice(words) for _ in range(rng.randint(5, 20))).capitalize()

    hyps = [sent() for _ in range(40)]
    refs = [[sent() for _ in range(rng.randint(1, 4))] + [h] * (rng.random() < 0.3) for h in hyps]
    ours = em.compute_e2e_metrics(hyps, refs, metrics=("BLEU",))["BLEU"]
    streams = [[r[i] if i < len(r) else None for r in refs] for i in range(max(map(len, refs)))]
    theirs = sacrebleu.corpus_bleu(hyps, streams, tokenize="13a", lowercase=True).score
    assert ours * 100 == pytest.approx(theirs, rel=1e-9)


def test_mteval_tokenisation():
    assert em.mteval_tokenize("The Eagle, a pub, costs £20-25. It's 4.5 stars!") == [
        "the",
        "eagle",
        ",",
        "a",
        "pub",
        ",",
        "costs",
        "£20",
        "-",
        "25",
        ".",
        "it's",
        "4.5",
        "stars",
        "!",
    ]


# --------------------------------------------------------------------------------------------------- NIST
def test_nist_two_inputs_by_hand():
    # reference words: "a b", "a c" | "c d e" -> 7 words; counts a:2 b:1 c:2 d:1 e:1, "a b":1 "a c":1 ...
    # info(a) = log2(7/2), info(b) = log2(7/1), info(c) = log2(7/2), info("a b") = log2(count(a)/1) = 1
    # hits: input 1 "a b": a, b and "a b"; input 2 "c": c. System 1-grams 3, 2-grams 1, higher 0 (-> /1, 0 hits)
    hyps = toks("a b", "c")
    refs = [toks("a b", "a c"), toks("c d e")]
    info = (2 * math.log2(3.5) + math.log2(7)) / 3 + 1 / 1
    # length: system 3 words against sum of per-input mean ref lengths 2 + 3 = 5 -> ratio 0.6
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = math.exp(-beta * math.log(0.6) ** 2)
    assert em.nist(hyps, refs) == pytest.approx(info * penalty, rel=1e-9)
    assert penalty == pytest.approx(0.33282, abs=1e-5)


def test_nist_matches_nltk_on_single_references():
    # nltk's corpus_nist picks one best reference per input (not mteval's multi-reference rule), so it can only
    # agree with mteval on single-reference data; there both follow Doddington (2002)
    corpus_nist = pytest.importorskip("nltk.translate.nist_score").corpus_nist

    hyps = toks("the eagle is a cheap coffee shop near burger king", "aromi is a pub in the city centre today")
    refs = [toks("the eagle is a coffee shop near burger king"), toks("aromi is a family pub in the riverside area")]
    assert em.nist(hyps, refs) == pytest.approx(corpus_nist(refs, hyps, n=5), rel=1e-9)


# ------------------------------------------------------------------------------------------------- ROUGE-L
@needs_coco
def test_rouge_l_by_hand():
    # input 1: hyp "a b c d e"; LCS with "a c e f" = 3 (a c e): P 3/5, R 3/4; with "b d" = 2: P 2/5, R 2/2.
    #   COCO's ROUGE-L takes max P (3/5) and max R (1) over the refs, F_beta with beta = 1.2
    # input 2: hyp "x y" vs "y x": LCS 1, P = R = 1/2 -> F = 1/2
    def f(p, r, beta=1.2):
        return (1 + beta**2) * p * r / (r + beta**2 * p)

    hyps = toks("a b c d e", "x y")
    refs = [toks("a c e f", "b d"), toks("y x")]
    expected = (f(3 / 5, 1.0) + f(0.5, 0.5)) / 2
    assert expected == pytest.approx((1.464 / 1.864 + 0.5) / 2)
    assert em.rouge_l(hyps, refs) == pytest.approx(expected, rel=1e-9)


# --------------------------------------------------------------------------------------------------- CIDEr
@needs_coco
def test_cider_d_by_hand():
    # two inputs with disjoint single refs, so every reference n-gram has document frequency 1 and
    # idf = log(2 inputs) - log(1) = L for all n-grams (n-grams absent from the refs get the same weight L).
    # input 1 exact match: cosine 1 for n = 1..4, no length penalty -> 10 * mean(1,1,1,1) = 10
    # input 2 hyp "e f x" vs ref "e f g h":
    #   n=1: hyp {e,f,x}, ref {e,f,g,h}: dot 2L^2 / (sqrt3 L * 2L) = 1/sqrt3
    #   n=2: hyp {ef, fx}, ref {ef, fg, gh}: L^2 / (sqrt2 L * sqrt3 L) = 1/sqrt6;  n=3, 4: 0
    #   Gaussian length penalty exp(-(3-4)^2 / (2 * 6^2))
    hyps = toks("a b c d", "e f x")
    refs = [toks("a b c d"), toks("e f g h")]
    second = 10 * (1 / math.sqrt(3) + 1 / math.sqrt(6)) / 4 * math.exp(-1 / 72)
    assert em.cider(hyps, refs) == pytest.approx((10 + second) / 2, rel=1e-9)
    # a disjoint hypothesis scores 0, so the corpus score halves
    assert em.cider(toks("a b c d", "p q r s"), refs) == pytest.approx(5.0, rel=1e-9)


# ------------------------------------------------------------------------------------ PTB tokenisation
E2E_LIKE = [
    "The Eagle is a family-friendly coffee shop near Burger King. It has a price range of £20-25 and isn't rated"
    " 5 out of 5; it's in the city centre (riverside).",
    'Aromi, "a pub" with 3.5 stars... children\'s menu - yes!',
    "It's called 'The Mill' and it is not kid friendly: moderate prices, high rating.",
    "Zizzi is a coffee shop that is not kid friendly.  It's located in the city centre, rated 3/5.",
]


def test_python_ptb_tokenizer_by_hand():
    assert em.ptb_tokenize_python(E2E_LIKE[1]) == [
        "aromi",
        "a",
        "pub",
        "with",
        "3.5",
        "stars",
        "children",
        "'s",
        "menu",
        "yes",
    ]
    assert em.ptb_tokenize_python("Prices start at £30.") == ["prices", "start", "at", "#", "30"]


PIECES = [
    "The",
    "Eagle",
    "is",
    "a",
    "pub",
    "near",
    "Café",
    "Rouge",
    "£20-25",
    "5/5",
    "3.5",
    "it's",
    "isn't",
    "children's",
    "'The Mill'",
    '"The Mill"',
    "(near Burger King)",
    "non-family-friendly",
    "&",
    "...",
    "!",
    "?",
    ";",
    ":",
    "-",
    "--",
    "more than £30.",
    "city centre.",
    "riverside,",
    "rated 5 out of 5.",
    "They're",
    "don't",
    "can't",
    "won't",
    "Zizzi's",
    "high-priced",
    "1-star",
    "no!",
    "You'll",
    "we'd",
    "I'm",
    "£££",
    "costs £20.",
    "Fitzbillies'",
    "the pubs'",
    "5.0",
    "30-plus",
    "English/Chinese",
    "cheap,",
]


@needs_java
def test_python_ptb_tokenizer_matches_the_java_one():
    import random

    rng = random.Random(1)
    fuzz = [" ".join(rng.choice(PIECES) for _ in range(rng.randint(5, 25))) for _ in range(300)]
    texts = E2E_LIKE + fuzz
    assert [em.ptb_tokenize_python(s) for s in texts] == em.ptb_tokenize_java(texts)


# -------------------------------------------------------------------------------------------------- METEOR
FAST_METEOR = ("exact", "stem", "synonym")  # no 60 MB paraphrase table: ~1 s JVM start instead of 10-25 s


def _meteor_structure(modules):
    # METEOR 1.5 (en, task "rank": alpha .85, beta .2, gamma .6): score = Fmean * (1 - gamma * (chunks/m)^beta),
    # with the fragmentation set to 0 when hypothesis and reference are identical.
    ref = "the eagle is a coffee shop near burger king".split()
    same = em.meteor([ref], [[ref]], modules=modules)
    assert same == pytest.approx(1.0, abs=1e-6)
    # every word matched exactly (P = R = Fmean = 1) but in 2 chunks out of m = 9 matches
    moved = "near burger king the eagle is a coffee shop".split()
    assert em.meteor([moved], [[ref]], modules=modules) == pytest.approx(1 - 0.6 * (2 / 9) ** 0.2, abs=1e-6)
    assert em.meteor([["xx", "yy"]], [[["aa", "bb"]]], modules=modules) == 0.0
    # corpus level over both inputs: matches and chunks are pooled before the formula (Fmean = 1 with all-exact
    # matches). METEOR implements the identical-sentence rule by storing 0 chunks for that input, so the pooled
    # fragmentation is (0 + 2 chunks) / (9 + 9 matches), not (1 + 2) / 18
    pooled = em.meteor([ref, moved], [[ref], [ref]], modules=modules)
    assert pooled == pytest.approx(1 - 0.6 * (2 / 18) ** 0.2, abs=1e-6)


@needs_java
def test_meteor_structure():
    _meteor_structure(FAST_METEOR)


@needs_java
@pytest.mark.slow
def test_meteor_structure_official_configuration():
    _meteor_structure(None)


# ---------------------------------------------------------------------------------------- the whole set
@needs_coco
def test_compute_e2e_metrics_keys_scale_and_unavailable_metrics(monkeypatch):
    hyps = ["The cat sat on the mat.", "A dog runs in the park."]
    refs = [["The cat is on the mat.", "There is a cat on the mat."], ["A dog runs in the big park."]]
    out = em.compute_e2e_metrics(hyps, refs, metrics=("BLEU", "NIST", "ROUGE_L", "CIDEr"), tokenizer="python")
    assert set(out) == {"BLEU", "NIST", "ROUGE_L", "CIDEr", "notes", "tokenizer", "num_inputs"}
    assert 0 < out["BLEU"] < 1 and 0 < out["ROUGE_L"] < 1 and out["NIST"] > 0 and out["CIDEr"] > 0
    assert out["tokenizer"] == "ptb-python" and out["num_inputs"] == 2
    perfect = em.compute_e2e_metrics([r[0] for r in refs], refs, metrics=("BLEU", "ROUGE_L"), tokenizer="python")
    assert perfect["BLEU"] == pytest.approx(1.0) and perfect["ROUGE_L"] == pytest.approx(1.0)
    # no Java: METEOR is None with the reason, the others still come back
    monkeypatch.setattr(em.shutil, "which", lambda name: None)
    out = em.compute_e2e_metrics(hyps, refs)
    assert out["METEOR"] is None and "java" in out["notes"]["METEOR"]
    assert out["tokenizer"] == "ptb-python" and out["BLEU"] is not None and out["CIDEr"] is not None
    assert "METEOR n/a" in em.format_scores(out)
    # no pycocoevalcap either: only NIST (own code) is left, the rest say why
    monkeypatch.setattr(em, "_coco_jar_dir", lambda: None)
    out = em.compute_e2e_metrics(hyps, refs)
    assert out["NIST"] > 0 and all(out[m] is None for m in ("BLEU", "METEOR", "ROUGE_L", "CIDEr"))
    assert "pycocoevalcap" in out["notes"]["BLEU"] and out["tokenizer"] == "ptb-python"
    with pytest.raises(ValueError):
        em.compute_e2e_metrics(["one output"], refs)
