"""Serving VB-LoRA adapters (issue 18), side by side in one run on SmolLM2-135M fp32, CPU:

(a) vLLM + the vblora resolver plugin: adapters requested by name, resolved from native files on first use;
(b) vLLM + the same adapters exported beforehand to plain LoRA (`vblora.export_lora`), given with --lora-modules
    (a) and (b) run in ONE vLLM server (the same engine, so the engine's settings are equal by construction);
(c) `vblora serve`'s former HF-model server on the same native files (measured at commit bebe2a5, results in
    bench/results/vllm-serving-cpu.json; skipped since that server was removed for vLLM, docs/serving.md).

Per arm: tokens/s with 8 and with 64 distinct adapters in flight (each request a different adapter, 32 new tokens,
ignore EOS where the server offers it, tokens counted from the responses), p50 / p99 request latency, after a
warm-up request per adapter; cold start of an adapter never seen, file to first token (a: the first request for
its name; b: /v1/load_lora_adapter + the first request; c: the first request for a name in its directory), median
of --cold fresh adapters (3), (a) and (b) in alternating order; bytes on disk for 1,000 adapters (1,000 native
files written; the LoRA directories' size is the same for every adapter of one layout, measured on the exported
ones and multiplied).

Usage: flock /tmp/vblora-bench.lock python bench/vllm_serving.py [--out bench/results/vllm-serving-cpu.json]
Cold start only (one vLLM server, a few minutes): flock /tmp/vblora-bench.lock python bench/vllm_serving.py
--only cold --cold 11 --out bench/results/vllm-serving-cold-cpu.json
(VBLORA_VLLM_PYTHON: vLLM's interpreter, default .venv-vllm/bin/python.)
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_adapters import base_model, write_variants

import vblora
from vblora.serve.vllm_launch import vllm_command
from vblora.train.models import resolve_model

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "def fibonacci(n):",
    "List three colours:",
    "Once upon a time",
    "The best way to learn is",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, max(0, round(q * (len(xs) - 1))))], 3)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> float:
    import httpx

    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return time.time() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the server was not healthy within {timeout} s")


async def request(client, url: str, model: str, prompt: str, max_tokens: int, vllm: bool) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0}
    if vllm:
        body["ignore_eos"] = True
    t0 = time.perf_counter()
    r = await client.post(url + "/v1/completions", json=body, timeout=900)
    if r.status_code != 200:
        raise RuntimeError(f"{model}: HTTP {r.status_code}: {r.text[:200]}")
    return {"latency_s": time.perf_counter() - t0, "tokens": r.json()["usage"]["completion_tokens"]}


async def phase(url: str, names: list[str], requests: int, max_tokens: int, vllm: bool) -> dict:
    """`requests` requests over `names` (request i asks adapter i mod len), all in flight together."""
    import httpx

    limits = httpx.Limits(max_connections=len(names), max_keepalive_connections=len(names))
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()
        recs = await asyncio.gather(
            *[
                request(client, url, names[i % len(names)], PROMPTS[i % len(PROMPTS)], max_tokens, vllm)
                for i in range(requests)
            ]
        )
        wall = time.perf_counter() - t0
    tokens = sum(r["tokens"] for r in recs)
    lat = [r["latency_s"] for r in recs]
    return {
        "adapters_in_flight": len(names),
        "requests": requests,
        "completion_tokens": tokens,
        "wall_s": round(wall, 2),
        "tokens_per_s": round(tokens / wall, 2),
        "latency_s": {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)},
    }


async def warm(url: str, names: list[str], vllm: bool) -> None:
    import httpx

    async with httpx.AsyncClient() as client:
        for n in names:
            await request(client, url, n, PROMPTS[0], 1, vllm)


async def cold(url: str, name: str, load_path: str | None, vllm: bool) -> tuple[float, float]:
    """File to first token: (load through the API if `load_path`), then a 1-token request; `(total, load)` seconds
    (load 0 without `load_path`)."""
    import httpx

    async with httpx.AsyncClient() as client:
        t0 = time.perf_counter()
        if load_path is not None:
            r = await client.post(
                url + "/v1/load_lora_adapter", json={"lora_name": name, "lora_path": load_path}, timeout=600
            )
            if r.status_code != 200:
                raise RuntimeError(f"load {name}: HTTP {r.status_code}: {r.text[:200]}")
        loaded = time.perf_counter() - t0
        await request(client, url, name, PROMPTS[0], 1, vllm)
        return time.perf_counter() - t0, loaded if load_path is not None else 0.0


def plugin_times(log: Path) -> list[dict]:
    """The plugin's own time per resolved adapter, in total and per step (find, base, read, check, compose, write), from
    its log lines `vblora: adapter 'NAME' -> PATH (rank R, composed in S s: find S, read S, ...)`."""
    import re

    out = []
    for total, steps in re.findall(r"vblora: adapter .* composed in ([0-9.]+) s: (.*)\)", log.read_text()):
        out.append({"total": float(total)} | {k: float(v) for k, v in (p.rsplit(" ", 1) for p in steps.split(", "))})
    return out


def plugin_cache(args, work: Path) -> Path:
    """The plugin's cache for this run: --lora-cache (emptied by `main` before the run), else `work/plugin-cache`."""
    return work / "plugin-cache" if args.lora_cache is None else Path(args.lora_cache)


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def vllm_arms(args, work: Path, model_dir: str, names: list[str], cold_names: list[str]) -> dict:
    """(a) plugin names and (b) the exported copies ("L-" + name) in one vLLM server; phases repeated `--reps`
    times in alternating order (a, b then b, a), so drift on a shared machine falls on both."""
    small, big = names[:8], names[: args.adapters]
    lora_dir = work / "lora"
    out: dict = {}
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    static = [f"L-{n}={lora_dir / n}" for n in big]
    argv, env = vllm_command(
        args.vllm_python,
        model_dir,
        work / "adapters",
        port=port,
        rank=4,
        cache=plugin_cache(args, work),
        dtype="float32",
        allow_load_endpoint=True,  # arm (b) loads its never-seen adapters through /v1/load_lora_adapter
        extra=[
            "--max-model-len",
            "512",
            "--max-loras",
            str(args.adapters),
            "--max-cpu-loras",
            str(2 * args.adapters + 2 * len(cold_names) + 2),
            "--lora-modules",
            *static,
        ],
    )
    with open(work / "vllm.log", "w") as log:
        proc = subprocess.Popen(argv, env=env | {"HF_HUB_OFFLINE": "1"}, stdout=log, stderr=subprocess.STDOUT)
        try:
            out["vllm_startup_s"] = round(wait_healthy(url, proc, 900), 1)
            arms = {"a_vllm_plugin": "", "b_vllm_plain_lora": "L-"}
            res = {arm: {"cold_file_to_first_token_s": [], "8": [], str(args.adapters): []} for arm in arms}
            res["b_vllm_plain_lora"]["load_lora_adapter_s"] = []  # (b)'s /v1/load_lora_adapter call alone
            for i, n in enumerate(cold_names):  # first: nothing of these was touched before; order alternating
                for arm in ("a_vllm_plugin", "b_vllm_plain_lora")[:: 1 if i % 2 == 0 else -1]:
                    if arm == "a_vllm_plugin":
                        t, _ = asyncio.run(cold(url, n, None, True))
                    else:
                        t, load = asyncio.run(cold(url, f"L-cold{i}", str(work / "lora" / n), True))
                        res[arm]["load_lora_adapter_s"].append(round(load, 3))
                    res[arm]["cold_file_to_first_token_s"].append(round(t, 3))
            res["a_vllm_plugin"]["plugin_resolve_s"] = plugin_times(work / "vllm.log")
            if args.only == "cold":
                return out | res
            asyncio.run(warm(url, big, True))
            asyncio.run(warm(url, [f"L-{n}" for n in big], True))
            for rep in range(args.reps):
                order = list(arms) if rep % 2 == 0 else list(arms)[::-1]
                for group in (small, big):
                    for arm in order:
                        res[arm][str(len(group))].append(
                            asyncio.run(
                                phase(
                                    url,
                                    [arms[arm] + n for n in group],
                                    args.requests_8 if group is small else args.requests_big,
                                    args.tokens,
                                    True,
                                )
                            )
                        )
            out.update(res)
        finally:
            stop(proc)
    return out


def ours_arm(args, work: Path, model_dir: str, names: list[str], cold_names: list[str]) -> dict | None:
    """(c) `vblora serve`'s own HF-model server on the native files (skipped once that server is gone)."""
    import importlib.util

    if importlib.util.find_spec("vblora.serve.server") is None:
        return None
    small, big = names[:8], names[: args.adapters]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    argv = [
        sys.executable,
        "-m",
        "vblora",
        "serve",
        "--model",
        model_dir,
        "--adapters",
        str(work / "adapters"),
        "--port",
        str(port),
        "--max-batch",
        str(args.adapters),
        "--log-level",
        "warning",
    ]
    with open(work / "vblora.log", "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        try:
            startup = round(wait_healthy(url, proc, 600), 1)
            ours = {
                "startup_s": startup,
                "cold_file_to_first_token_s": [round(asyncio.run(cold(url, n, None, False))[0], 3) for n in cold_names],
            }
            asyncio.run(warm(url, big, False))
            ours["8"] = [asyncio.run(phase(url, small, args.requests_8, args.tokens, False))]
            ours[str(args.adapters)] = [asyncio.run(phase(url, big, args.requests_big, args.tokens, False))]
            return ours
        finally:
            stop(proc)


def summarise(arm: dict, big: str) -> None:
    arm["cold_median_s"] = statistics.median(arm["cold_file_to_first_token_s"])
    for key in ("8", big):
        runs = arm[key]
        arm[f"tokens_per_s_{key}"] = {
            "median": statistics.median(r["tokens_per_s"] for r in runs),
            "min": min(r["tokens_per_s"] for r in runs),
            "max": max(r["tokens_per_s"] for r in runs),
            "runs": len(runs),
        }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/vllm-serving-cpu.json")
    ap.add_argument(
        "--vllm-python", default=os.environ.get("VBLORA_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
    )
    ap.add_argument("--adapters", type=int, default=64, help="distinct adapters in flight, big phase")
    ap.add_argument("--requests-8", type=int, default=16)
    ap.add_argument("--requests-big", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    ap.add_argument("--disk-adapters", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=2, help="vLLM phases repeated, order alternating")
    ap.add_argument("--cold", type=int, default=3, help="adapters never seen, for the cold start of (a) and (b)")
    ap.add_argument(
        "--lora-cache",
        default=None,
        help="the plugin's cache directory (VBLORA_LORA_CACHE; default: a fresh one in the run's temporary "
        "directory), e.g. on a tmpfs: /dev/shm/vblora-bench (emptied first)",
    )
    ap.add_argument(
        "--only",
        choices=["all", "cold"],
        default="all",
        help="cold: only the cold start of (a) and (b) (one vLLM server, no throughput, no disk part)",
    )
    args = ap.parse_args()
    if args.lora_cache is not None:
        shutil.rmtree(args.lora_cache, ignore_errors=True)  # a fresh cache: every adapter of the run composed anew
    if args.only == "cold":
        return cold_only(args)

    base = base_model()
    model_dir, _ = resolve_model("smollm2", None)  # the fp32 copy (cached by the first load): what vLLM serves
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = write_variants(base, work / "adapters", args.adapters + args.cold, shared_bank=False)
        names = [f.stem for f in files]
        names, cold_names = names[: args.adapters], names[args.adapters :]
        t0 = time.perf_counter()
        for n in names + cold_names:
            vblora.export_lora(work / "adapters" / f"{n}.safetensors", work / "lora" / n)
        export_s = (time.perf_counter() - t0) / len(files)
        lora_sizes = {dir_size(work / "lora" / n) for n in names + cold_names}
        many = write_variants(base, work / "disk", args.disk_adapters, shared_bank=False, start=10_000)
        native_bytes = sum(f.stat().st_size for f in many)
        del base
        ours = ours_arm(args, work, model_dir, names, cold_names)  # first: it needs no vLLM
        result = vllm_arms(args, work, model_dir, names, cold_names)
        if ours is not None:
            result["c_vblora_serve"] = ours
        for arm in ("a_vllm_plugin", "b_vllm_plain_lora", "c_vblora_serve"):
            if arm in result:
                summarise(result[arm], str(args.adapters))
        result["disk_bytes_for_1000"] = {
            "native_files": native_bytes * 1000 // args.disk_adapters,
            "plain_lora_dirs": max(lora_sizes) * 1000,
            "lora_dir_sizes_seen": sorted(lora_sizes),
            "plugin_cache_after_run": dir_size(plugin_cache(args, work)),
        }
        result["export_lora_s_per_adapter"] = round(export_s, 3)
    result.update(metadata(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(table(result))
    return 0


def cold_only(args) -> int:
    """(a) and (b) cold starts in one vLLM server started with the full run's settings (the same 64 static plain
    LoRA directories and --max-loras), without the throughput phases."""
    base = base_model()
    model_dir, _ = resolve_model("smollm2", None)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        files = write_variants(base, work / "adapters", args.adapters + args.cold, shared_bank=False)
        del base
        names = [f.stem for f in files]
        for n in names:
            vblora.export_lora(work / "adapters" / f"{n}.safetensors", work / "lora" / n)
        result = vllm_arms(args, work, model_dir, names[: args.adapters], names[args.adapters :])
    for arm in ("a_vllm_plugin", "b_vllm_plain_lora"):
        xs = result[arm]["cold_file_to_first_token_s"]
        result[arm]["cold_s"] = {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": len(xs)}
    p = result["a_vllm_plugin"]["plugin_resolve_s"]
    if p:
        result["a_vllm_plugin"]["plugin_resolve_median_s"] = {k: statistics.median(x[k] for x in p) for k in p[0]}
    result.update(metadata(args))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({arm: result[arm]["cold_s"] for arm in ("a_vllm_plugin", "b_vllm_plain_lora")}, indent=1))
    print("plugin's own time per resolve (s):", [x["total"] for x in p])
    print("median per step (s):", result["a_vllm_plugin"].get("plugin_resolve_median_s"))
    return 0


def metadata(args) -> dict:
    vllm_version = subprocess.run(
        [args.vllm_python, "-c", "import vllm; print(vllm.__version__)"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return dict(
        date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        machine=platform.node(),
        cpus=os.cpu_count(),
        load_average=os.getloadavg(),
        torch=torch.__version__,
        vllm=vllm_version,
        vblora=vblora.__version__,
        base="SmolLM2-135M-Instruct fp32 (dequantised GGUF)",
        adapters="all-linear, rank 4, h=256, b=64, top-2, own bank each",
        settings=vars(args),
    )


def table(r: dict) -> str:
    big = str(r["settings"]["adapters"])
    rows = [
        f"| arm | tok/s, 8 in flight | p50 / p99 s | tok/s, {big} in flight | p50 / p99 s | cold start s (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for arm, label in (
        ("a_vllm_plugin", "(a) vLLM + vblora plugin"),
        ("b_vllm_plain_lora", "(b) vLLM + plain LoRA"),
        ("c_vblora_serve", "(c) vblora serve (HF-model server)"),
    ):
        if arm not in r:
            continue
        a = r[arm]
        cells = []
        for key in ("8", big):
            t = a[f"tokens_per_s_{key}"]
            spread = f" ({t['min']:.1f}-{t['max']:.1f})" if t["runs"] > 1 else ""
            lat = a[key][-1]["latency_s"]
            cells += [f"{t['median']:.1f}{spread}", f"{lat['p50']:.2f} / {lat['p99']:.2f}"]
        rows.append(f"| {label} | {' | '.join(cells)} | {a['cold_median_s']:.2f} |")
    d = r["disk_bytes_for_1000"]
    rows += [
        "",
        f"Bytes on disk for 1,000 adapters: native files {d['native_files']:,}; plain LoRA directories "
        f"{d['plain_lora_dirs']:,} ({d['plain_lora_dirs'] / d['native_files']:.1f}x).",
    ]
    return "\n".join(rows)


if __name__ == "__main__":
    sys.exit(main())
