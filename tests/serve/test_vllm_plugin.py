"""vLLM serves VB-LoRA adapters by name through the vblora resolver plugin (issue 18), proved on the CPU.

vLLM's OpenAI server, started by the documented command (`vblora serve`, which becomes vLLM's server), on the
offline SmolLM2-135M base, with the plugin reading an adapter directory that holds three adapters in three sources
(a native file, an HF PEFT VB-LoRA directory, a native file on a shared bank file), a damaged file and an adapter
made for another base. Queried with the `openai` client: each adapter's greedy completion equals transformers +
`vblora.load_adapter` (or `import_peft`) token for token (fp32 on both sides; the prompt is sent as token ids); an
unknown name is a 404, a damaged file and a wrong-base adapter are 400s naming the reason, and the server answers
the next request. Then issue 19's server cases 2, 3, 6 and 8 asked of vLLM's server (docs/serving.md, Security).

Needs vLLM in its own environment (docs/serving.md): the interpreter in VBLORA_VLLM_PYTHON, default
.venv-vllm/bin/python at the repository root, with `pip install --no-deps -e .` done there. Skipped, with that
reason, where it is absent. vLLM starts once for the module (about 1-2 minutes on 2 cores).
"""

from __future__ import annotations

import copy
import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import vblora

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = os.environ.get("VBLORA_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
NEW_TOKENS = 12
PROMPTS = ["The capital of France is", "def fibonacci(n):"]
CHAT = [{"role": "user", "content": "What is the capital of France?"}]

pytestmark = pytest.mark.skipif(
    not Path(VLLM_PYTHON).is_file(),
    reason=f"vLLM is not installed at {VLLM_PYTHON} (set VBLORA_VLLM_PYTHON; build it as docs/serving.md says)",
)


def greedy(model, ids: list[int]) -> list[int]:
    """NEW_TOKENS argmax tokens, never stopping at EOS (the server is asked with ignore_eos too)."""
    x = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(NEW_TOKENS):
            x = torch.cat([x, model(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return x[0, len(ids) :].tolist()


def adapted(base, seed: int, **cfg):
    defaults = dict(
        target_modules="all-linear", rank=4, num_vectors=64, vector_length=64, topk=2, init_bank_bound=0.3
    )  # a bank far from zero, so each adapter changes the greedy text
    return vblora.add_vblora(copy.deepcopy(base), vblora.VBLoRAConfig(**(defaults | cfg), seed=seed))


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """The adapter directory, the base's path and the expected tokens (transformers + vblora's loaders)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from vblora.train.models import load_model, resolve_model

    path, gguf = resolve_model("smollm2", None)
    base = load_model(path, gguf, "causal-lm").eval()
    path, _ = resolve_model("smollm2", None)  # the fp32 transformers copy the first load cached: what vLLM serves
    tok = AutoTokenizer.from_pretrained(path)
    prompts = [tok(p)["input_ids"] for p in PROMPTS]
    d = tmp_path_factory.mktemp("vllm") / "adapters"
    d.mkdir()
    vblora.save_adapter(adapted(base, 1), d / "native.safetensors")
    vblora.export_peft(
        adapted(base, 2, target_modules=["q_proj", "v_proj"], rank=8), d / "peftdir", save_only_topk_weights=True
    )
    shared = adapted(base, 3, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    vblora.save_adapter(shared, d / "shared.safetensors", bank="reference")
    vblora.save_bank(shared, d / "bank.safetensors")
    (d / "damaged.safetensors").write_bytes((d / "native.safetensors").read_bytes()[:-1000])  # truncated
    tiny = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=100,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    vblora.save_adapter(adapted(tiny, 4, vector_length=32), d / "otherbase.safetensors")

    def fresh():
        return load_model(path, None, "causal-lm").eval()

    expected = {"base": [greedy(base, p) for p in prompts]}
    for name, load in (
        ("native", lambda: vblora.load_adapter(fresh(), d / "native.safetensors")),
        ("peftdir", lambda: vblora.import_peft(fresh(), d / "peftdir")),
        ("shared", lambda: vblora.load_adapter(fresh(), d / "shared.safetensors", bank_path=d / "bank.safetensors")),
    ):
        model = load()
        expected[name] = [greedy(model, p) for p in prompts]
        if name == "native":  # the chat route: the tokenizer's chat template, then the same greedy tokens
            chat = tok(
                tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True), add_special_tokens=False
            )["input_ids"]
            expected["chat"] = tok.decode(greedy(model, chat), skip_special_tokens=True)
        del model
    return {"adapters": d, "model": path, "prompts": prompts, "expected": expected, "cache": d.parent / "lora-cache"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


API_KEY = "test-key-not-secret"


@pytest.fixture(scope="module")
def server(work):
    """vLLM's OpenAI server with the plugin, started by the documented command, `vblora serve` (which becomes vLLM's
    server), with an API key from a file; its log is printed on failure."""
    import httpx

    port = free_port()
    key_file = work["adapters"].parent / "api-key"
    key_file.write_text(API_KEY + "\n")
    argv = [
        sys.executable,
        "-m",
        "vblora",
        "serve",
        "--model",
        work["model"],
        "--adapters",
        str(work["adapters"]),
        "--vllm-python",
        VLLM_PYTHON,
        "--port",
        str(port),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--served-model-name",
        "base",
        "--lora-cache",
        str(work["cache"]),
        "--lora-cache-bytes",
        "64M",
        "--api-key-file",
        str(key_file),
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY", "VBLORA_API_KEY")}
    log = open(work["adapters"].parent / "vllm.log", "w+")  # noqa: SIM115  (closed in the finally below)
    proc = subprocess.Popen(argv, env=env | {"HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    try:
        while True:
            if proc.poll() is not None:
                log.seek(0)
                pytest.fail(f"vLLM exited with {proc.returncode}:\n{log.read()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("vLLM did not become healthy in 600 s")
            time.sleep(2)
        yield {"url": url, "proc": proc, "log": log}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server['url']}/v1", api_key=API_KEY, max_retries=0, timeout=300)


def complete(client, model: str, ids: list[int]) -> list[int]:
    out = client.completions.create(
        model=model,
        prompt=ids,
        max_tokens=NEW_TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True, "return_token_ids": True},
    )
    return list(out.choices[0].token_ids)


def assert_serves_base(client, work):
    assert complete(client, "base", work["prompts"][0]) == work["expected"]["base"][0]


@pytest.mark.parametrize("name", ["base", "native", "peftdir", "shared"])
def test_greedy_completions_equal_transformers_and_load_adapter(client, work, name):
    got = [complete(client, name, p) for p in work["prompts"]]
    assert got == work["expected"][name]
    if name != "base":  # the adapter does change the text, so an adapter ignored by the server would fail here
        assert got != work["expected"]["base"]


def test_chat_completion_through_an_adapter(client, work):
    r = client.chat.completions.create(
        model="native", messages=CHAT, max_tokens=NEW_TOKENS, temperature=0, extra_body={"ignore_eos": True}
    )
    assert r.choices[0].message.content == work["expected"]["chat"]


def test_installed_plugin_without_its_setting_leaves_vllm_alone(tmp_path):
    """vLLM loads every installed plugin when VLLM_PLUGINS is unset: without VBLORA_ADAPTERS ours registers nothing;
    a wrong VBLORA_ADAPTERS stops the start-up with the reason."""
    code = (
        "from vblora.serve.vllm_plugin import register; from vllm.lora.resolver import LoRAResolverRegistry as R;"
        " register(); print(sorted(R.get_supported_resolvers()))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("VBLORA_")} | {"VLLM_TARGET_DEVICE": "cpu"}
    unset = subprocess.run([VLLM_PYTHON, "-c", code], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert unset.returncode == 0 and unset.stdout.strip().splitlines()[-1] == "[]", unset.stderr[-2000:]
    wrong = subprocess.run(
        [VLLM_PYTHON, "-c", code],
        env=env | {"VBLORA_ADAPTERS": str(tmp_path / "none")},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert wrong.returncode != 0 and "does not exist" in wrong.stderr


def test_each_adapter_composed_once_into_the_bounded_cache(client, work):
    for name in ("native", "peftdir", "shared"):
        complete(client, name, work["prompts"][0])
    entries = [p for p in work["cache"].iterdir() if not p.name.startswith(".")]
    assert len(entries) == 3 and all((p / "adapter_config.json").is_file() for p in entries)
    assert sum(f.stat().st_size for p in entries for f in p.iterdir()) <= 64 << 20


def test_base_check_ready_before_the_first_adapter_request(server, client, work):
    """`vblora serve` names the served model (VBLORA_SERVED_MODEL), so the plugin builds the base it checks adapters
    against at start-up: no resolve spends time on it (building it takes 30-150 ms)."""
    complete(client, "native", work["prompts"][0])
    server["log"].seek(0)
    steps = re.findall(r"vblora: adapter .* composed in [0-9.]+ s: find [0-9.]+, base ([0-9.]+)", server["log"].read())
    assert steps and all(float(s) < 0.01 for s in steps), steps


def test_unknown_adapter_is_404_and_the_server_goes_on(client, work):
    from openai import NotFoundError

    with pytest.raises(NotFoundError, match="nosuch"):
        complete(client, "nosuch", work["prompts"][0])
    with pytest.raises(NotFoundError):
        complete(client, "../native", work["prompts"][0])  # no way out of the adapter directory
    assert_serves_base(client, work)


@pytest.mark.parametrize("name, reason", [("damaged", "corrupt"), ("otherbase", "does not fit")])
def test_bad_adapter_is_400_naming_why_and_the_server_goes_on(client, work, name, reason):
    from openai import BadRequestError

    with pytest.raises(BadRequestError, match=rf"adapter '{name}' cannot be served: .*({reason})"):
        complete(client, name, work["prompts"][0])
    with pytest.raises(BadRequestError):  # asked again: refused again (nothing half-registered)
        complete(client, name, work["prompts"][0])
    assert_serves_base(client, work)
    assert complete(client, "native", work["prompts"][0]) == work["expected"]["native"][0]
    assert server_alive(client)


def server_alive(client) -> bool:
    return bool(client.models.list().data)


# -- issue 19's server cases, asked of vLLM's server (our own HTTP server is gone): each a 4xx, the server goes on


def post(server, body: dict | bytes, key: str | None = API_KEY, path: str = "/v1/completions"):
    import httpx

    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, bytes):
        return httpx.post(
            server["url"] + path, content=body, timeout=120, headers=headers | {"content-type": "application/json"}
        )
    return httpx.post(server["url"] + path, json=body, headers=headers, timeout=120)


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1])
def test_out_of_range_seed_is_400(server, client, work, seed):  # case 2
    r = post(server, {"model": "native", "prompt": "Hi", "max_tokens": 4, "temperature": 1, "seed": seed})
    assert r.status_code == 400 and "seed" in r.text
    assert_serves_base(client, work)


def test_huge_prompt_is_refused_before_tokenizing(server, client, work):  # case 3
    t0 = time.monotonic()
    r = post(server, {"model": "native", "prompt": "hello world " * 900_000, "max_tokens": 2})  # 10.8 MB
    assert r.status_code == 400 and "maximum context length" in r.text
    assert time.monotonic() - t0 < 30  # refused by its character count, not after tokenizing 10 MB
    assert_serves_base(client, work)


@pytest.mark.parametrize("chunked", [False, True])
def test_body_over_the_bound_is_413_before_vllm_reads_it(server, client, work, chunked):  # case 3, 200 MB body
    """vLLM has no bound on request bodies; `vblora serve` adds `vblora.serve.http_guards.BodyLimit` through vLLM's
    `--middleware` (default bound 16 MiB): 20 MB in an ignored field, with a Content-Length or chunked, is a 413."""
    import httpx

    body = json.dumps({"model": "native", "prompt": "Hi", "max_tokens": 2, "ignored": "x" * 20_000_000}).encode()
    headers = {"Authorization": f"Bearer {API_KEY}", "content-type": "application/json"}
    content = iter([body[i : i + (1 << 20)] for i in range(0, len(body), 1 << 20)]) if chunked else body
    t0 = time.monotonic()
    r = httpx.post(server["url"] + "/v1/completions", content=content, headers=headers, timeout=120)
    assert r.status_code == 413 and "request body over 16777216 bytes" in r.json()["error"]["message"], r.text
    assert time.monotonic() - t0 < 30
    assert_serves_base(client, work)


def test_the_any_path_load_routes_and_unkeyed_routes_are_closed(server, client, work):  # case 8
    """Resolvers need VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, which also opens /v1/load_lora_adapter and its SageMaker
    twin POST /adapters (a LoRA directory from any path the server can read; the second outside vLLM's API key), and
    vLLM's key leaves /invocations open: `vblora serve` closes all three (`http_guards.RouteGuard`); unloading
    through /v1 stays open."""
    for path, body, key in (
        ("/v1/load_lora_adapter", {"lora_name": "x", "lora_path": "/etc"}, API_KEY),
        ("/adapters", {"name": "x", "src": "/etc"}, None),
        ("/invocations", {"model": "base", "prompt": "Hi", "max_tokens": 2}, None),
    ):
        r = post(server, body, key=key, path=path)
        assert r.status_code == 403 and f"{path} is closed" in r.json()["error"]["message"], (path, r.text)
    complete(client, "native", work["prompts"][0])  # resolved (if not already) through the plugin
    r = post(server, {"lora_name": "native"}, path="/v1/unload_lora_adapter")
    assert r.status_code == 200, r.text
    assert_serves_base(client, work)


@pytest.mark.parametrize("field", ["prompt", "model", "chat"])
def test_lone_surrogate_is_400(server, client, work, field):  # case 6
    body = {"model": "native", "prompt": "Hi", "max_tokens": 2}
    path = "/v1/completions"
    if field == "prompt":
        body["prompt"] = "Hi \ud800"
    elif field == "model":
        body["model"] = "nat\ud800ive"
    else:
        body = {"model": "native", "messages": [{"role": "user", "content": "Hi \ud800"}], "max_tokens": 2}
        path = "/v1/chat/completions"
    raw = json.dumps(body).encode()  # json.dumps writes the lone surrogate as the escape \ud800
    assert b"\\ud800" in raw
    r = post(server, raw, path=path)
    assert 400 <= r.status_code < 500, r.text
    assert_serves_base(client, work)


def test_api_key_from_a_file_guards_v1_and_the_docs_are_off(server, client, work):  # case 8
    import httpx

    assert post(server, {"model": "base", "prompt": "Hi", "max_tokens": 2}, key=None).status_code == 401
    assert post(server, {"model": "base", "prompt": "Hi", "max_tokens": 2}, key="wrong").status_code == 401
    for page in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(server["url"] + page, timeout=30).status_code == 404, page
    with open(f"/proc/{server['proc'].pid}/cmdline", "rb") as f:
        assert API_KEY.encode() not in f.read()  # not in the process list
    assert_serves_base(client, work)


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-x", "-q"]))
