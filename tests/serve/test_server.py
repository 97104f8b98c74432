"""`vblora serve` end to end: the server on loopback (uvicorn in a thread, a free port) answered by the real `openai`
client, over a tiny LLaMA with a word-level tokenizer and three VB-LoRA adapters saved in the native format.

Every output is checked against the same request run alone: `vblora.load_adapter` on a fresh copy of the base and
`generate` (greedy), independent of the store and of the scheduler."""

from __future__ import annotations

import json
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

import vblora  # noqa: E402
from vblora.serve import AdapterStore  # noqa: E402
from vblora.serve.server import Engine, create_app, running  # noqa: E402

WORDS = ("the a cat dog sat ran on under mat rug big small red blue and then it was happy sad user system "
         "assistant : . hello world tell me story about").split()
SPECIAL = ["<pad>", "<unk>", "<s>", "</s>"]
TEMPLATE = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} . {% endfor %}"
            "{% if add_generation_prompt %}assistant :{% endif %}")
CONTEXT = 64  # max_position_embeddings: prompts longer than this are refused


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + list(WORDS))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = TEMPLATE
    return tok


def base_model():
    """The same random tiny LLaMA every call (seeded), so a fresh copy is the reference's base."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=64, intermediate_size=128,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=CONTEXT, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    return LlamaForCausalLM(cfg).eval()


def make_adapter(directory, seed: int):
    """A VB-LoRA adapter with a large random bank (its update changes the greedy output), saved natively."""
    model = base_model()
    cfg = vblora.VBLoRAConfig(target_modules=["q_proj", "v_proj", "down_proj"], rank=4, num_vectors=16,
                              vector_length=16, init_bank_bound=0.5, init_logits_std=1.0, seed=seed)
    vblora.add_vblora(model, cfg)
    return vblora.save_adapter(model, directory)


def solo(adapter_dir, prompt_ids: list[int], max_tokens: int) -> list[int]:
    """Greedy tokens of one request alone: the adapter loaded the ordinary way, transformers' generate."""
    model = base_model() if adapter_dir is None else vblora.load_adapter(base_model(), adapter_dir)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_tokens, do_sample=False,
                             eos_token_id=3, pad_token_id=0)
    return [t for t in out[0, len(prompt_ids):].tolist() if t != 3]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    d = tmp_path_factory.mktemp("adapters")
    for name, seed in (("alpha", 1), ("beta", 2)):
        make_adapter(d / name, seed)
    extra = tmp_path_factory.mktemp("extra")
    make_adapter(extra / "gamma", 3)
    return {"dir": d, "alpha": d / "alpha", "beta": d / "beta", "gamma": extra / "gamma", "base": None}


def build(adapters, **kw):
    model, tok = base_model(), tokenizer()
    store = AdapterStore(model, adapters["dir"])
    return Engine(model, tok, store, base_name="tiny", **kw)


@pytest.fixture(scope="module")
def server(adapters):
    engine = build(adapters, max_batch=8)
    with running(create_app(engine)) as url:
        yield {"url": url, "engine": engine,
               "client": openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)}


def expected_text(adapter_dir, prompt: str, max_tokens: int, chat: bool = False) -> tuple[str, int]:
    tok = tokenizer()
    if chat:
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                       tokenize=False)
        ids = tok(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    out = solo(adapter_dir, ids, max_tokens)
    return tok.decode(out, skip_special_tokens=True), len(out)


PROMPTS = ["the cat sat on the mat", "a big red dog ran", "hello world tell me a story about the rug"]


def test_models_lists_the_base_and_every_adapter(server):
    ids = [m.id for m in server["client"].models.list().data]
    assert ids == ["tiny", "alpha", "beta"]


def test_completions_two_adapters_and_the_base_equal_each_alone(server, adapters):
    client = server["client"]
    jobs = [(name, p) for name in ("alpha", "beta", "tiny") for p in PROMPTS]
    want = {(n, p): expected_text(adapters["base" if n == "tiny" else n], p, 12) for n, p in jobs}
    texts = {want[j][0] for j in jobs if j[1] == PROMPTS[0]}
    assert len(texts) == 3, "the adapters must change the greedy output, else a wrong adapter would go unseen"

    def ask(job):  # all at once: the scheduler batches them across adapters
        r = client.completions.create(model=job[0], prompt=job[1], max_tokens=12, temperature=0)
        return job, r

    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(ask, jobs))
    for job, r in results:
        text, n = want[job]
        assert r.choices[0].text == text, job
        assert r.model == job[0]
        assert r.usage.completion_tokens == n and r.usage.prompt_tokens == len(job[1].split())
        assert r.choices[0].finish_reason == ("length" if n == 12 else "stop")


def test_chat_and_streaming(server, adapters):
    client = server["client"]
    text, n = expected_text(adapters["alpha"], "tell me a story", 10, chat=True)
    r = client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "tell me a story"}],
                                       max_tokens=10, temperature=0)
    assert r.choices[0].message.content == text and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == n
    chunks = list(client.chat.completions.create(
        model="alpha", messages=[{"role": "user", "content": "tell me a story"}], max_tokens=10, temperature=0,
        stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # token by token
    assert chunks[-1].usage.completion_tokens == n
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")

    want, _ = expected_text(adapters["beta"], PROMPTS[1], 8)
    stream = client.completions.create(model="beta", prompt=PROMPTS[1], max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == want


def test_raw_stream_ends_with_done(server):
    body = {"model": "tiny", "prompt": "the cat", "max_tokens": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server["url"] + "/v1/completions", json=body, timeout=30) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"
    assert all(json.loads(e[6:])["object"] == "text_completion" for e in events[:-1])


def test_unknown_adapter_is_404_in_openai_shape(server):
    with pytest.raises(openai.NotFoundError) as e:
        server["client"].completions.create(model="nope", prompt="the cat", max_tokens=2)
    err = e.value.body
    assert err["code"] == "model_not_found" and err["param"] == "model" and "nope" in err["message"]
    r = httpx.post(server["url"] + "/v1/chat/completions", json={"model": "nope", "messages": [
        {"role": "user", "content": "hi"}]})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("body, param", [
    ({"temperature": 5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"logprobs": 2}, "logprobs"),
    ({"prompt": [10 ** 6]}, "prompt"),
    ({"prompt": ""}, "prompt"),
])
def test_bad_parameters_are_400_naming_the_parameter(server, body, param):
    r = httpx.post(server["url"] + "/v1/completions", json={"model": "alpha", "prompt": "the cat", **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param and r.json()["error"]["type"] == "invalid_request_error"


def test_malformed_json_and_unknown_route_answer_in_openai_shape(server):
    r = httpx.post(server["url"] + "/v1/completions", content=b"{not json", headers={"content-type":
                                                                                      "application/json"})
    assert r.status_code == 400 and "message" in r.json()["error"]
    r = httpx.get(server["url"] + "/v1/nothing-here")
    assert r.status_code == 404 and "message" in r.json()["error"]


def test_over_long_prompt_is_400(server):
    long_prompt = " ".join(["cat"] * (CONTEXT + 5))
    with pytest.raises(openai.BadRequestError) as e:
        server["client"].completions.create(model="alpha", prompt=long_prompt, max_tokens=4)
    assert e.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):  # fits alone, not with the completion asked for
        server["client"].completions.create(model="alpha", prompt=" ".join(["cat"] * 40), max_tokens=40)


def test_stop_strings_and_seeded_sampling(server, adapters):
    client = server["client"]
    full, _ = expected_text(adapters["alpha"], PROMPTS[0], 12)
    words = full.split()
    assert len(words) >= 3
    stop = words[2]
    r = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == full[:full.find(stop)] and r.choices[0].finish_reason == "stop"

    def sample(_):
        return client.completions.create(model="beta", prompt=PROMPTS[2], max_tokens=10, temperature=1.0,
                                         top_p=0.9, seed=1234).choices[0].text

    with ThreadPoolExecutor(4) as pool:  # alone and in batches of varying company: the same draws
        outs = list(pool.map(sample, range(4)))
    assert len(set(outs)) == 1


def test_health_and_metrics(server):
    assert httpx.get(server["url"] + "/health").json() == {"status": "ok"}
    m = httpx.get(server["url"] + "/metrics").json()
    assert m["waiting"] == 0 and m["running"] == 0 and m["generated_tokens"] > 0
    assert m["store"]["registered"] == 2 and "tokens_per_s" in m and m["requests"]["failed"] == 0


def hold_when(engine, condition):
    """Pause the scheduler thread after a step where `condition(scheduler)` holds, until the returned event is
    set; `held` is set once it paused."""
    sched, release, held = engine.scheduler, threading.Event(), threading.Event()
    step = sched.step

    def paused_step():
        step()
        if not release.is_set() and condition(sched):
            held.set()
            release.wait(30)

    sched.step = paused_step
    return release, held


def test_full_queue_answers_429(adapters):
    engine = build(adapters, max_batch=1, max_waiting=1)
    release, held = hold_when(engine, lambda s: len(s.batch) == 1)
    with running(create_app(engine)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        with ThreadPoolExecutor(2) as pool:
            first = pool.submit(client.completions.create, model="alpha", prompt="the cat", max_tokens=30,
                                temperature=0)
            assert held.wait(30)  # the first request runs, the scheduler is paused
            second = pool.submit(client.completions.create, model="beta", prompt="the dog", max_tokens=3,
                                 temperature=0)
            deadline = time.time() + 30
            while httpx.get(url + "/metrics").json()["waiting"] < 1 and time.time() < deadline:
                time.sleep(0.01)
            with pytest.raises(openai.RateLimitError) as e:  # the queue (1) is full
                client.completions.create(model="tiny", prompt="the rug", max_tokens=3)
            assert e.value.body["code"] == "queue_full"
            release.set()
            assert first.result().usage.completion_tokens >= 1 and second.result().choices
        assert httpx.get(url + "/metrics").json()["requests"]["rejected"] == 1
        assert httpx.get(url + "/health").status_code == 200


def test_client_gone_cancels_a_non_streamed_request(adapters):
    """A non-streamed request whose client disconnects mid-generation is cancelled, not generated to the end: its
    row leaves the batch and the server counts it as cancelled."""
    engine = build(adapters, max_batch=1)
    release, held = hold_when(engine, lambda s: len(s.batch) == 1)
    with running(create_app(engine)) as url:
        with ThreadPoolExecutor(1) as pool:
            gone = pool.submit(httpx.post, url + "/v1/completions", timeout=5.0,
                               json={"model": "alpha", "prompt": "the cat", "max_tokens": 40, "temperature": 0})
            assert held.wait(30)  # the request is decoding; the scheduler is paused
            with pytest.raises(httpx.ReadTimeout):
                gone.result()  # the client gives up and closes its connection
        row = engine.scheduler.batch.rows[0]
        deadline = time.time() + 30  # the server notices while the row is still there (scheduler paused)
        while row.cancelled is None and time.time() < deadline:
            time.sleep(0.05)
        assert row.cancelled == "cancelled" and not row.finished
        release.set()
        deadline = time.time() + 30
        while time.time() < deadline:
            m = httpx.get(url + "/metrics").json()
            if m["requests"]["cancelled"] == 1:
                break
            time.sleep(0.05)
        assert m["requests"] == {"completed": 0, "cancelled": 1, "failed": 0, "rejected": 0}
        assert m["running"] == 0 and m["generated_tokens"] < 40
        r = httpx.post(url + "/v1/completions", json={"model": "alpha", "prompt": "the cat", "max_tokens": 3})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1  # the server goes on


def test_adapter_added_and_removed_while_requests_are_in_flight(adapters):
    engine = build(adapters, max_batch=8)
    jobs = [("alpha", PROMPTS[0]), ("beta", PROMPTS[1]), ("tiny", PROMPTS[2]), ("beta", PROMPTS[0])]
    release, held = hold_when(engine, lambda s: len(s.batch) == len(jobs))
    want = {j: expected_text(adapters["base" if j[0] == "tiny" else j[0]], j[1], 16) for j in jobs}
    want[("gamma", PROMPTS[0])] = expected_text(adapters["gamma"], PROMPTS[0], 16)
    with running(create_app(engine)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)

        def ask(job):
            return job, client.completions.create(model=job[0], prompt=job[1], max_tokens=16, temperature=0)

        with ThreadPoolExecutor(len(jobs) + 1) as pool:
            running_jobs = [pool.submit(ask, j) for j in jobs]
            assert held.wait(30), "all requests should be decoding together"
            # while every request is mid-generation: add gamma, remove beta
            r = httpx.post(url + "/v1/adapters", json={"name": "gamma", "path": str(adapters["gamma"])})
            assert r.status_code == 200, r.text
            assert httpx.delete(url + "/v1/adapters/beta").status_code == 200
            assert [m.id for m in client.models.list().data] == ["tiny", "alpha", "gamma"]
            with pytest.raises(openai.NotFoundError):
                client.completions.create(model="beta", prompt="the cat", max_tokens=2)
            late = pool.submit(ask, ("gamma", PROMPTS[0]))
            release.set()
            results = [f.result() for f in running_jobs] + [late.result()]
    for job, r in results:  # none dropped, each answered by its own adapter (beta's kept its handle)
        assert (r.choices[0].text, r.usage.completion_tokens) == want[job], job


def test_adapter_endpoints_refuse_bad_input(server, tmp_path):
    url = server["url"]
    r = httpx.post(url + "/v1/adapters", json={"name": "x", "path": str(tmp_path / "missing")})
    assert r.status_code == 400 and "missing" in r.json()["error"]["message"]
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "adapter.safetensors").write_bytes(b"not a safetensors file")
    r = httpx.post(url + "/v1/adapters", json={"name": "junk", "path": str(tmp_path / "junk")})
    assert r.status_code == 400
    assert "junk" not in [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
    assert httpx.post(url + "/v1/adapters", json={"name": "tiny", "path": str(tmp_path)}).status_code == 400
    assert httpx.delete(url + "/v1/adapters/never-added").status_code == 404
    assert httpx.post(url + "/v1/adapters", json={"name": "x"}).status_code == 400


def test_vllm_style_load_and_unload(adapters):
    engine = build(adapters)
    with running(create_app(engine, api_key="sekret")) as url:
        auth = {"Authorization": "Bearer sekret"}
        assert httpx.get(url + "/v1/models").status_code == 401
        assert httpx.get(url + "/health").status_code == 200  # health stays open for probes
        r = httpx.post(url + "/v1/load_lora_adapter", headers=auth,
                       json={"lora_name": "g", "lora_path": str(adapters["gamma"])})
        assert r.status_code == 200, r.text
        client = openai.OpenAI(base_url=url + "/v1", api_key="sekret", max_retries=0, timeout=60)
        want, _ = expected_text(adapters["gamma"], PROMPTS[1], 6)
        assert client.completions.create(model="g", prompt=PROMPTS[1], max_tokens=6,
                                         temperature=0).choices[0].text == want
        assert httpx.post(url + "/v1/unload_lora_adapter", headers=auth, json={"lora_name": "g"}).status_code == 200
        assert "g" not in [m.id for m in client.models.list().data]


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_cli_serves_a_model_directory(adapters, tmp_path, monkeypatch, capsys):
    """`vblora serve` wiring (load, store, engine, app) with uvicorn.run swapped for the background runner."""
    from vblora.cli import main

    base_model().save_pretrained(tmp_path / "model")
    tokenizer().save_pretrained(tmp_path / "model")
    seen = {}

    def serve_once(app, host, port, log_level):
        with running(app, host, port) as url:
            client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=60)
            seen["models"] = [m.id for m in client.models.list().data]
            seen["text"] = client.completions.create(model="alpha", prompt=PROMPTS[0], max_tokens=5,
                                                     temperature=0).choices[0].text

    monkeypatch.setattr("vblora.serve.server.serve", serve_once)
    port = free_port()
    assert main(["serve", "--model", str(tmp_path / "model"), "--adapters", str(adapters["dir"]),
                 "--port", str(port), "--api-key", "k"]) == 0
    assert seen["models"] == [str(tmp_path / "model"), "alpha", "beta"]
    assert seen["text"] == expected_text(adapters["alpha"], PROMPTS[0], 5)[0]
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def test_cli_errors_are_one_line(tmp_path, capsys):
    import socket

    from vblora.cli import main

    port = free_port()
    cases = [(["--model", str(tmp_path / "none"), "--port", str(port)], "does not exist"),
             (["--model", "x", "--adapters", str(tmp_path / "none")], "--adapters"),
             (["--model", "x", "--max-batch", "0"], "--max-batch")]
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        cases.append((["--model", "x", "--port", str(busy.getsockname()[1])], "cannot listen"))
        cases.append((["--model", "x", "--port", "70000"], "not a port number"))
        for argv, words in cases:
            assert main(["serve", *argv]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and err[0].startswith("vblora serve: error:") and words in err[0], err


def test_cli_without_the_serve_extra_names_it(monkeypatch, capsys):
    from vblora.cli import main

    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if not installed
    assert main(["serve", "--model", "x"]) == 2
    assert "pip install 'vblora[serve]'" in capsys.readouterr().err
