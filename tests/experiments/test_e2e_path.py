"""The whole E2E path on a tiny file written here: CSV -> examples -> the pipeline trains a VB-LoRA GPT-2 -> the saved
adapter decodes -> metrics."""

import csv

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

# below the importorskip lines on purpose: without transformers this file is skipped, not a collection error
import vblora  # noqa: E402
from vblora.experiments import e2e as ed  # noqa: E402
from vblora.experiments import e2e_metrics as em  # noqa: E402

ROWS = [
    ("name[The Eagle], eatType[coffee shop], near[Burger King]", "The Eagle is a coffee shop near Burger King."),
    ("name[The Eagle], eatType[coffee shop], near[Burger King]", "Near Burger King is The Eagle, a coffee shop."),
    ("name[Aromi], eatType[pub], area[riverside]", "Aromi is a pub in the riverside area."),
    ("name[Aromi], eatType[pub], area[riverside]", "There is a pub called Aromi by the riverside."),
    ("name[Aromi], eatType[pub], area[riverside]", "Aromi, a pub, is in the riverside area."),
    ("name[Zizzi], food[Italian], priceRange[cheap]", "Zizzi serves cheap Italian food."),
    (
        "name[Cotto], customer rating[5 out of 5], near[The Portland Arms]",
        "Cotto has a customer rating of 5 out of 5 and is near The Portland Arms.",
    ),
    (
        "name[Cotto], customer rating[5 out of 5], near[The Portland Arms]",
        "Cotto, near The Portland Arms, is rated 5 out of 5.",
    ),
]


@pytest.fixture(autouse=True)
def one_thread():
    # tiny matrices: intra-op threads only contend (30 steps take 1 s on one thread, 20 s+ on a busy 2-core box)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh, quoting=csv.QUOTE_ALL)  # the official files quote every field
        w.writerow(["mr", "ref"])
        w.writerows(rows)


def tiny_tokenizer(texts):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]", "<|endoftext|>"]))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="<|endoftext|>"
    )


def test_reading_grouping_and_examples(tmp_path):
    path = tmp_path / "dev.csv"
    write_csv(path, [*ROWS, ("name[Ł test]", "costs Â£20")])
    rows = ed.read_e2e_csv(path)
    assert len(rows) == len(ROWS) + 1 and rows[0] == ROWS[0]
    assert rows[-1] == ("name[£ test]", "costs £20")  # e2e-metrics' encoding repairs
    evs = ed.load_eval_set(path)
    assert [len(x.refs) for x in evs] == [2, 3, 1, 2, 1]
    assert evs[1].refs == tuple(r for m, r in ROWS if m == ROWS[2][0])
    assert ed.linearize_mr(ROWS[0][0]) == "name : The Eagle | eatType : coffee shop | near : Burger King"
    opts = ed.E2EOptions()
    tok = tiny_tokenizer([opts.prompt(m) + " " + r for m, r in rows])
    ex = ed.build_examples(rows, tok, max_length=64)
    assert len(ex) == len(rows)
    p = tok(opts.prompt(ROWS[0][0]), add_special_tokens=False)["input_ids"]
    assert ex[0]["labels"][: len(p)] == [-100] * len(p)  # loss on the target only
    assert ex[0]["labels"][len(p) :] == ex[0]["input_ids"][len(p) :]
    assert ex[0]["input_ids"][-1] == tok.eos_token_id
    from vblora.train.tasks import LMCollator

    batch = LMCollator(tok.pad_token_id)(ex[:3])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    # an unreferenced test file (header "mr" only) reads, with no references
    path2 = tmp_path / "test.csv"
    path2.write_text('mr\n"name[Zizzi]"\n', encoding="utf-8")
    assert ed.load_eval_set(path2) == [ed.E2EInstance("name[Zizzi]", ())]
    with pytest.raises(ValueError, match="mr"):
        (tmp_path / "bad.csv").write_text("x,y\n1,2\n")
        ed.read_e2e_csv(tmp_path / "bad.csv")


def tiny_gpt2(tmp_path, texts):
    """A 2-layer GPT-2 and its word-level tokenizer, saved like a hub model; returns the directory."""
    tok = tiny_tokenizer(texts)
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(
        vocab_size=len(tok),
        n_embd=64,
        n_layer=2,
        n_head=2,
        n_positions=128,
        bos_token_id=tok.eos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    d = tmp_path / "gpt2-tiny"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_e2e_path_on_a_tiny_gpt2(tmp_path):
    from vblora.train.config import build_config
    from vblora.train.pipeline import train

    path = tmp_path / "train.csv"
    write_csv(path, ROWS)
    rows = ed.read_e2e_csv(path)
    model_dir = tiny_gpt2(tmp_path, [ed.E2EOptions().prompt(m) + " " + r for m, r in rows])
    losses = []

    class Losses(transformers.TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kw):
            losses.extend([logs["loss"]] if "loss" in (logs or {}) else [])

    cfg = build_config(
        "e2e-gpt2-medium",
        {
            "model": str(model_dir),
            "train_file": str(path),
            "test_file": str(path),
            "output": str(tmp_path / "run"),
            "device": "cpu",
            "max_steps": 30,
            "warmup_steps": 3,
            "batch_size": 4,
            "num_vectors": 16,
            "vector_length": 32,
            "rank": 2,
            "lr_bank": 1e-2,
            "lr_logits": 5e-2,
            "logging_steps": 5,
            "max_new_tokens": 12,
        },
    )
    res = train(cfg, callbacks=[Losses()], log=lambda *_: None, task=ed.task(ed.E2EOptions(num_beams=1)))
    assert res["steps"] == 30 and res["best_epoch"] is None and res["metrics"]["validation"] == {}  # no dev file
    assert res["adapted_modules"] == 2 * 4  # c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj per block
    assert len(losses) == 6 and losses[-1] < losses[0]  # the adapter learns on its own data
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = vblora.load_adapter(
        transformers.AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "run" / "adapter"
    )
    evs = ed.load_eval_set(path)
    greedy = ed.generate_e2e(model, tok, [x.mr for x in evs], ed.E2EOptions(num_beams=1), max_new_tokens=12)
    assert len(greedy) == len(evs) and all(isinstance(g, str) for g in greedy)
    assert greedy == (tmp_path / "run" / "predictions.txt").read_text(encoding="utf-8").split("\n")[:-1]
    fast = ("exact", "stem", "synonym") if em.meteor_unavailable() is None else None
    opts = ed.E2EOptions(num_beams=2, no_repeat_ngram_size=4, length_penalty=0.8, meteor_modules=fast)
    out = ed.evaluate_e2e(model, tok, evs, opts, max_new_tokens=12, predictions_path=tmp_path / "pred.txt")
    assert set(em.METRICS) <= set(out) and len(out["predictions"]) == len(evs)
    assert (tmp_path / "pred.txt").read_text(encoding="utf-8").count("\n") == len(evs)
    assert out["NIST"] >= 0.0
    if em._coco_jar_dir() is None:  # without pycocoevalcap only NIST is computed; the rest say why
        assert all(out[m] is None and m in out["notes"] for m in ("BLEU", "METEOR", "ROUGE_L", "CIDEr"))
        return
    for m in ("BLEU", "ROUGE_L"):
        assert 0.0 <= out[m] <= 1.0
    assert out["CIDEr"] >= 0.0
    if fast is None:
        assert out["METEOR"] is None and "METEOR" in out["notes"]
    else:
        assert 0.0 <= out["METEOR"] <= 1.0
    # the same outputs scored from the files, as `measure_scores.py REFS PRED` would
    again = ed.score_files(path, tmp_path / "pred.txt", metrics=("BLEU", "NIST", "ROUGE_L", "CIDEr"))
    for m in ("BLEU", "NIST", "ROUGE_L", "CIDEr"):
        assert again[m] == pytest.approx(out[m])
    ed.write_references(tmp_path / "refs.txt", evs)
    blocks = (tmp_path / "refs.txt").read_text(encoding="utf-8").strip().split("\n\n")
    assert [len(b.split("\n")) for b in blocks] == [len(x.refs) for x in evs]


def test_recipes_hold_table_8():
    pytest.importorskip("yaml")
    from vblora.train.config import build_config

    for name, epochs, bank in (("e2e-gpt2-medium", 4, 256), ("e2e-gpt2-large", 5, 350)):
        cfg = build_config(name, {"model": "/local/gpt2", "train_file": "trainset.csv"})
        vb = cfg.vblora
        assert (cfg.epochs, vb.num_vectors, vb.vector_length, vb.rank) == (epochs, bank, 256, 4)
        assert (cfg.batch_size, cfg.weight_decay, cfg.lr_bank, cfg.lr_logits) == (8, 0.01, 1e-3, 1e-2)
        assert cfg.lr_scheduler == "linear" and set(vb.target_modules) == {"c_attn", "c_proj", "c_fc"}
        assert (cfg.warmup_steps, cfg.label_smoothing, cfg.max_new_tokens) == (500, 0.1, 64)
        assert ed.E2EOptions.from_recipe(cfg.extra).generate_kwargs()["num_beams"] == 10
    with pytest.raises(ValueError, match="unknown"):
        ed.E2EOptions.from_recipe({"e2e": {"beams": 4}})
    # an older recipe that kept the run settings under extra.e2e still works
    old = build_config(None, {"train_file": "x", "extra": {"e2e": {"warmup_steps": 7, "label_smoothing": 0.2}}})
    assert (old.warmup_steps, old.label_smoothing) == (7, 0.2)
