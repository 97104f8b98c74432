"""Load test of `vblora serve` on loopback: many concurrent clients over many adapters, a fixed count of requests and
a time limit; throughput, p50 / p99 latency and time to first token, errors; then the same requests one at a time
(side by side in one run: the batching gain as a ratio), and a cross-check that every greedy request got the same
text batched as alone.

The server is the real command (`python -m vblora serve`, a subprocess on 127.0.0.1 and a free port); adapters are
made on the spot (`add_vblora` with different seeds and a wide bank, `save_adapter`, `unload`). Clients: asyncio +
httpx, a mix of /v1/completions and /v1/chat/completions, streamed and not, greedy and seeded sampling, every
adapter and the base. Writes JSON (machine, versions, settings, figures) to --out.

    flock /tmp/vblora-bench.lock python bench/serve_load.py                 # SmolLM2-135M on the CPU, ~3 min
    python bench/serve_load.py --tiny --requests 24 --sequential 6          # a tiny random LLaMA, seconds
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import math
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

PROMPTS = ["Write a short poem about the sea.", "What is the capital of France?",
           "Explain photosynthesis in one sentence.", "List three colours.", "Tell me a joke about cats.",
           "How do I boil an egg?", "Translate 'good morning' into Spanish.", "Name a famous painter.",
           "Why is the sky blue?", "Give me a tip for learning Python.", "What is 12 times 7?",
           "Describe a rainy day."]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    s = sorted(xs)
    return round(s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))], 4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model_dir(out: Path) -> str:
    """A random tiny LLaMA with a word-level tokenizer and a chat template, saved like a hub model."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = sorted({w for p in PROMPTS for w in p.split()} | {"user", "assistant", ":"})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "<s>", "</s>"] + words)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                  eos_token="</s>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant :{% endif %}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, eos_token_id=3,
                      pad_token_id=0, bos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def make_adapters(model_path: str, out: Path, n: int) -> tuple[list[str], int]:
    """n adapters on q/v/o/down of every layer, each its own seed; -> (names, bytes of one file)."""
    import vblora
    from vblora.train.models import load_model, resolve_model

    path, gguf = resolve_model(model_path, None)
    model = load_model(path, gguf, "causal-lm")
    names = []
    for i in range(n):
        cfg = vblora.VBLoRAConfig(target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], rank=4,
                                  num_vectors=64, vector_length=64, init_bank_bound=0.05, seed=i)
        vblora.add_vblora(model, cfg)
        name = f"user{i:03d}"
        vblora.save_adapter(model, out / name)
        vblora.unload(model, merge=False)
        names.append(name)
    return names, (out / names[0] / "adapter.safetensors").stat().st_size


def jobs(names: list[str], base: str, count: int, max_tokens: int) -> list[dict]:
    """Request i: adapter (the base every len(names)+1), endpoint, streaming, greedy or seeded sampling."""
    models = names + [base]
    out = []
    for i in range(count):
        job = {"i": i, "model": models[i % len(models)], "chat": i % 2 == 1, "stream": i % 3 == 0,
               "prompt": PROMPTS[(i * 7) % len(PROMPTS)], "max_tokens": max_tokens}
        job["sampling"] = {"temperature": 0.0} if i % 4 != 3 else {"temperature": 0.8, "top_p": 0.95, "seed": i}
        out.append(job)
    return out


async def one(client, url: str, job: dict, deadline: float) -> dict:
    body = {"model": job["model"], "max_tokens": job["max_tokens"], **job["sampling"]}
    if job["chat"]:
        body["messages"] = [{"role": "user", "content": job["prompt"]}]
    else:
        body["prompt"] = job["prompt"]
    path = "/v1/chat/completions" if job["chat"] else "/v1/completions"
    t0 = time.perf_counter()
    rec = {"i": job["i"], "model": job["model"], "greedy": job["sampling"]["temperature"] == 0.0}
    try:
        timeout = max(deadline - time.perf_counter(), 0.1)
        if job["stream"]:
            body.update(stream=True, stream_options={"include_usage": True})
            text, first, usage = [], None, None
            async with client.stream("POST", url + path, json=body, timeout=timeout) as r:
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    ev = json.loads(line[6:])
                    if "error" in ev:
                        raise RuntimeError(ev["error"]["message"])
                    if ev.get("usage"):
                        usage = ev["usage"]
                    for c in ev.get("choices", []):
                        piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                        if piece:
                            first = first or time.perf_counter()
                            text.append(piece)
            rec.update(text="".join(text), ttft_s=(first - t0) if first else None,
                       completion_tokens=usage["completion_tokens"] if usage else None)
        else:
            r = await client.post(url + path, json=body, timeout=timeout)
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
            d = r.json()
            c = d["choices"][0]
            rec.update(text=c["text"] if "text" in c else c["message"]["content"],
                       completion_tokens=d["usage"]["completion_tokens"])
        rec["ok"] = True
    except Exception as e:  # recorded, counted as an error
        rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
    rec["latency_s"] = time.perf_counter() - t0
    return rec


async def phase(url: str, work: list[dict], concurrency: int, time_limit: float) -> dict:
    import httpx

    queue: asyncio.Queue = asyncio.Queue()
    for j in work:
        queue.put_nowait(j)
    deadline = time.perf_counter() + time_limit
    records = []
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(limits=limits) as client:
        async def worker():
            while not queue.empty() and time.perf_counter() < deadline:
                records.append(await one(client, url, queue.get_nowait(), deadline))

        t0 = time.perf_counter()
        await asyncio.gather(*[worker() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    ok = [r for r in records if r["ok"]]
    tokens = sum(r.get("completion_tokens") or 0 for r in ok)
    return {"concurrency": concurrency, "requests": len(work), "answered": len(records), "ok": len(ok),
            "errors": len(work) - len(ok), "error_examples": [r["error"] for r in records if not r["ok"]][:5],
            "wall_s": round(wall, 2), "requests_per_s": round(len(ok) / wall, 3),
            "completion_tokens": tokens, "tokens_per_s": round(tokens / wall, 2),
            "latency_s": {"p50": percentile([r["latency_s"] for r in ok], 0.5),
                          "p99": percentile([r["latency_s"] for r in ok], 0.99),
                          "max": percentile([r["latency_s"] for r in ok], 1.0)},
            "ttft_s": {"p50": percentile([r["ttft_s"] for r in ok if r.get("ttft_s")], 0.5),
                       "p99": percentile([r["ttft_s"] for r in ok if r.get("ttft_s")], 0.99)},
            "records": records}


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> None:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not healthy within {timeout} s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tiny", action="store_true", help="a tiny random LLaMA instead of --model (a quick dry run)")
    ap.add_argument("--adapters", type=int, default=16)
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--sequential", type=int, default=16, help="the first N requests again, one at a time")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="the server's torch CPU threads (1: this machine is "
                                                          "shared, and contended OpenMP threads spin)")
    ap.add_argument("--time-limit", type=float, default=240.0, help="seconds for each phase")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "serve-load-cpu.json"))
    args = ap.parse_args()

    import httpx
    import torch
    import transformers

    work_dir = Path(tempfile.mkdtemp(prefix="vblora-serve-load-"))
    model = tiny_model_dir(work_dir / "model") if args.tiny else args.model
    t0 = time.perf_counter()
    names, adapter_bytes = make_adapters(model, work_dir / "adapters", args.adapters)
    print(f"{len(names)} adapters of {adapter_bytes} bytes in {time.perf_counter() - t0:.1f} s", flush=True)

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "vblora", "serve", "--model", model, "--adapters", str(work_dir / "adapters"),
           "--port", str(port), "--max-batch", str(args.max_batch), "--max-queue", str(args.requests),
           "--threads", str(args.threads), "--log-level", "warning"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    server = subprocess.Popen(cmd, env=env)
    try:
        t0 = time.perf_counter()
        wait_healthy(url, server, 300)
        startup = time.perf_counter() - t0
        listed = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert listed == [model] + names, listed
        work = jobs(names, model, args.requests, args.max_tokens)
        asyncio.run(phase(url, work[:2], 2, 60))  # warm-up: first forwards, lazy loads of two adapters
        concurrent = asyncio.run(phase(url, work, args.concurrency, args.time_limit))
        print(json.dumps({k: v for k, v in concurrent.items() if k != "records"}), flush=True)
        sequential = asyncio.run(phase(url, work[:args.sequential], 1, args.time_limit))
        print(json.dumps({k: v for k, v in sequential.items() if k != "records"}), flush=True)
        metrics = httpx.get(url + "/metrics").json()
    finally:
        server.terminate()
        server.wait(30)

    # greedy requests answered batched (concurrent phase) and alone (sequential phase): the same text
    alone = {r["i"]: r for r in sequential["records"] if r["ok"]}
    pairs = [(r, alone[r["i"]]) for r in concurrent["records"] if r["ok"] and r["greedy"] and r["i"] in alone]
    mismatches = [r["i"] for r, s in pairs if r["text"] != s["text"]]
    result = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared), {platform.platform()}",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "settings": {"model": "tiny random LLaMA" if args.tiny else args.model, "adapters": len(names),
                     "adapter_file_bytes": adapter_bytes, "requests": args.requests,
                     "concurrency": args.concurrency, "max_tokens": args.max_tokens, "max_batch": args.max_batch,
                     "time_limit_s": args.time_limit, "threads": args.threads, "device": "cpu", "dtype": "float32",
                     "mix": "completions/chat alternating, 1 in 3 streamed, 1 in 4 sampled (seeded), "
                            "adapters round-robin with the base"},
        "server_startup_s": round(startup, 1),
        "concurrent": {k: v for k, v in concurrent.items() if k != "records"},
        "sequential": {k: v for k, v in sequential.items() if k != "records"},
        "throughput_ratio_concurrent_vs_sequential": round(concurrent["tokens_per_s"] /
                                                           max(sequential["tokens_per_s"], 1e-9), 2),
        "greedy_checked_batched_vs_alone": len(pairs), "greedy_mismatches": mismatches,
        "server_metrics_at_end": metrics,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}: {concurrent['ok']}/{args.requests} ok, {concurrent['tokens_per_s']} tok/s "
          f"(x{result['throughput_ratio_concurrent_vs_sequential']} one at a time), p50 "
          f"{concurrent['latency_s']['p50']} s, p99 {concurrent['latency_s']['p99']} s, "
          f"greedy mismatches {len(mismatches)}/{len(pairs)}")
    return 0 if concurrent["errors"] == 0 and sequential["errors"] == 0 and not mismatches else 1


if __name__ == "__main__":
    sys.exit(main())
