"""`vblora e2e` end to end on tiny files: E2E CSVs + a 2-layer GPT-2 saved to disk -> results.json, predictions,
an adapter that reproduces the greedy outputs on a fresh base."""

import json
import math

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")
pytest.importorskip("yaml")

# below the importorskip lines on purpose: without transformers or yaml this file is skipped, not a collection error
from test_e2e_path import ROWS, tiny_tokenizer, write_csv  # noqa: E402  (tests/analysis is on sys.path)

import vblora  # noqa: E402
from vblora.cli import main  # noqa: E402
from vblora.experiments import e2e as ed  # noqa: E402
from vblora.experiments import e2e_metrics as em  # noqa: E402


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: more threads only contend on a busy machine
    yield
    torch.set_num_threads(n)


@pytest.fixture
def e2e_files(tmp_path):
    for name, rows in (("train", ROWS), ("dev", ROWS[:3]), ("test", ROWS)):
        write_csv(tmp_path / f"{name}.csv", rows)
    tok = tiny_tokenizer([ed.E2EOptions().prompt(m) + " " + r for m, r in ROWS])
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
    model_dir = tmp_path / "gpt2-tiny"
    transformers.GPT2LMHeadModel(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return tmp_path, model_dir


def _args(d, model_dir, out, **over):
    a = {
        "--model": model_dir,
        "--train-file": d / "train.csv",
        "--validation-file": d / "dev.csv",
        "--test-file": d / "test.csv",
        "--output": out,
        "--device": "cpu",
        "--epochs": 1,
        "--max-steps": 6,
        "--batch-size": 4,
        "--num-vectors": 16,
        "--vector-length": 32,
        "--rank": 2,
        "--warmup-steps": 2,
        "--lr-bank": 1e-2,
        "--lr-logits": 5e-2,
        "--num-beams": 1,
        "--max-new-tokens": 10,
        "--logging-steps": 0,
        "--metric-tokenizer": "python",
        **over,
    }
    argv = ["e2e"]
    for k, v in a.items():
        argv += [k, str(v)]
    return [*argv, "--meteor-modules", "exact", "stem", "synonym"]  # fast METEOR (no paraphrase table)


def test_e2e_command_end_to_end(e2e_files):
    d, model_dir = e2e_files
    out = d / "run"
    assert main(_args(d, model_dir, out)) == 0
    res = json.loads((out / "results.json").read_text())
    test = res["metrics"]["test"]
    assert {"bleu", "nist", "meteor", "rouge_l", "cider", "notes", "num_inputs"} <= set(test)
    n_mrs = len(ed.load_eval_set(d / "test.csv"))
    assert test["num_inputs"] == res["test_mrs"] == n_mrs == 4
    assert test["nist"] >= 0.0
    if em._coco_jar_dir() is not None:
        assert 0.0 <= test["bleu"] <= 1.0 and 0.0 <= test["rouge_l"] <= 1.0 and test["cider"] >= 0.0
        if em.meteor_unavailable() is None:
            assert 0.0 <= test["meteor"] <= 1.0
    for m in ("bleu", "meteor", "rouge_l", "cider"):  # a metric that could not run says why
        assert test[m] is not None or m.upper() in {k.upper() for k in test["notes"]}
    assert math.isfinite(res["metrics"]["validation"]["loss"]) and res["metrics"]["validation"]["examples"] == 3
    assert res["steps"] == 6 and res["config"]["num_vectors"] == 16 and res["config"]["warmup_steps"] == 2
    assert res["config"]["recipe"] == "e2e-gpt2-medium" and res["config"]["label_smoothing"] == 0.1  # the recipe's
    assert res["stored_parameters"] > 0 and res["wall_time_s"] > 0
    assert res["adapter_bytes"] == (out / "adapter" / "adapter.safetensors").stat().st_size
    text = (out / "predictions.txt").read_text(encoding="utf-8")
    preds = text.split("\n")[:-1]
    assert len(preds) == n_mrs

    # the saved adapter on a fresh base reproduces the run's greedy outputs
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    fresh = vblora.load_adapter(transformers.AutoModelForCausalLM.from_pretrained(model_dir), out / "adapter")
    opts = ed.E2EOptions(**res["e2e"])  # greedy, with the recipe's no-repeat 4-gram rule
    assert opts.num_beams == 1 and opts.no_repeat_ngram_size == 4
    again = ed.generate_e2e(
        fresh, tok, [x.mr for x in ed.load_eval_set(d / "test.csv")], opts, res["config"]["max_new_tokens"]
    )
    assert again == preds


def test_e2e_command_errors(e2e_files, capsys):
    d, model_dir = e2e_files
    assert main(_args(d, model_dir, d / "r1", **{"--train-file": d / "missing.csv"})) == 2
    assert "--train-file" in capsys.readouterr().err
    assert main(_args(d, d / "no-model", d / "r2")) == 2
    assert "model path" in capsys.readouterr().err
    assert main(_args(d, model_dir, d / "r3", **{"--recipe": "no-such-recipe"})) == 2
    assert "unknown recipe" in capsys.readouterr().err
    assert not (d / "r1").exists() and not (d / "r2").exists()
