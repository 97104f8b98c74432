"""Many adapters on one base (issue 12): SmolLM2-135M on the CPU, every arm side by side in one run.

(a) throughput: B requests over B distinct adapters in one mixed batch (`AdapterStore.rows`) vs the same B requests
    on one adapter (through the store, and through the plain single-adapter model `vblora.load_adapter`) vs the
    merged model vs the base; greedy `generate`, fixed prompt and new-token counts; arms interleaved, median of reps.
    Also the two groupings of a mixed batch forced (gathered bmm / per-adapter loop), and the shared-bank
    alternative measured on one layer: projecting activations on the bank once for all adapters vs gathering each
    row's A (micro-benchmark, the A side of one 576 -> 576 layer).
(b) cold start: adapter file -> first generated token: `store.add` + `acquire` + a 1-token generate, vs HF PEFT
    loading the same adapter exported as plain LoRA (`vblora.export_lora`): `PeftModel.load_adapter` +
    `set_adapter` + a 1-token generate; fresh adapter files each repetition; median. Each side then answers the same
    request again with its adapter warm; cold minus warm is the cold-start penalty, what a cold adapter adds to a
    request (the base model's own forward, the same on both sides, cancels out).
(c) memory: 1,000 registered adapters (half referencing one shared bank file, half embedding their own bank) in a
    fresh process: resident set growth after registering, after acquiring all, and after a forward through every
    one of them (composed cache at its cap), vs the sum of their file sizes plus the cache cap.

Usage: flock /tmp/vblora-bench.lock python bench/serve_adapters.py [--out bench/results/serve-adapters-cpu.json]
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import vblora
from vblora.serve import AdapterStore
from vblora.storage.native import encode, read_adapter, write_adapter
from vblora.train.models import load_model, resolve_model

CFG = dict(target_modules="all-linear", rank=4, num_vectors=256, vector_length=64, topk=2)


def base_model():
    path, gguf = resolve_model("smollm2", None)
    return load_model(path, gguf, "causal-lm").eval()


def write_variants(base, out: Path, count: int, *, shared_bank: bool, start: int = 0) -> list[Path]:
    """`count` adapter files: one `add_vblora` snapshot, then per file its own random selection (indices and
    weights) and, unless `shared_bank`, its own random bank; shared ones reference `out/bank.safetensors`."""
    model = vblora.add_vblora(copy.deepcopy(base), vblora.VBLoRAConfig(**CFG, seed=start))
    out.mkdir(parents=True, exist_ok=True)
    first = out / "first.safetensors"
    vblora.save_adapter(model, first)
    if shared_bank:
        vblora.save_bank(model, out / "bank.safetensors")
    snap = read_adapter(first)[0]
    first.unlink()
    n, k = snap.indices.shape
    h = snap.bank.shape[0]
    files = []
    for i in range(start, start + count):
        g = torch.Generator().manual_seed(i)
        snap.indices = torch.randint(0, h, (n, k), generator=g)
        snap.weights = torch.rand(n, k, generator=g).softmax(dim=1)
        if not shared_bank:
            snap.bank = torch.empty_like(snap.bank).uniform_(-0.02, 0.02, generator=g)
        tensors, header = encode(snap, bank_mode="reference" if shared_bank else "embed")
        files.append(write_adapter(out / f"a{i:04d}.safetensors", tensors, header))
    return files


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "runs": len(xs)}


# -- (a) throughput ----------------------------------------------------------------------------------------------


def throughput(base, work: Path, batch: int, prompt: int, new: int, reps: int) -> dict:
    files = write_variants(base, work / "tp", batch, shared_bank=False)
    served = copy.deepcopy(base)
    store = AdapterStore(served, work / "tp")
    handles = [store.acquire(f.stem) for f in files]
    single = vblora.load_adapter(copy.deepcopy(base), files[0])
    merged = vblora.merge(vblora.load_adapter(copy.deepcopy(base), files[0]))
    ids = torch.randint(0, base.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    kw = dict(
        max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids)
    )

    def gen(model, entries=None, strategy=None):
        def run():
            with torch.no_grad():
                if entries is None:
                    model.generate(ids, **kw)
                else:
                    with store.rows(entries, strategy=strategy):
                        model.generate(ids, **kw)

        return run

    arms = {
        "mixed: B distinct adapters (store)": gen(served, handles),
        "mixed, gathered bmm forced": gen(served, handles, "gather"),
        "mixed, per-adapter loop forced": gen(served, handles, "loop"),
        "one adapter for all B (store)": gen(served, [handles[0]] * batch),
        "one adapter (vblora.load_adapter model)": gen(single),
        "merged model": gen(merged),
        "base model (no adapter)": gen(base),
    }
    gen(served, handles)()  # warm-up: compositions cached, allocator warm
    for fn in arms.values():
        fn()
    times = {name: [] for name in arms}
    for _ in range(reps):  # interleaved, so drifting machine load hits every arm alike
        for name, fn in arms.items():
            times[name].append(timed(fn))
    tokens = batch * new
    rows = {name: {**spread(ts), "tokens_per_s": tokens / statistics.median(ts)} for name, ts in times.items()}
    ref = rows["one adapter for all B (store)"]["tokens_per_s"]
    ref_plain = rows["one adapter (vblora.load_adapter model)"]["tokens_per_s"]
    for r in rows.values():
        r["vs_one_adapter_store"] = r["tokens_per_s"] / ref
        r["vs_one_adapter_plain"] = r["tokens_per_s"] / ref_plain
    return {
        "batch": batch,
        "prompt_tokens": prompt,
        "new_tokens": new,
        "reps": reps,
        "arms": rows,
        "store": store.stats(),
    }


def bank_projection(batch: int, reps: int = 200) -> dict:
    """A side of one 576 -> 576 layer (r=4, h=256, b=64, k=2), B rows of B distinct adapters sharing one bank:
    gathered A (B, r, in) + bmm vs projecting x on the bank once ((B, L, in/b, h)) and mixing each row's selected
    projections. Both give x A^T `(B, L, r)`; checked equal."""
    g = torch.Generator().manual_seed(0)
    d_in, r, h, b, k = 576, 4, 256, 64, 2
    c = d_in // b
    bank = torch.randn(h, b, generator=g)
    idx = torch.randint(0, h, (batch, r, c, k), generator=g)  # per adapter: its A's sub-vectors (r, in/b)
    w = torch.rand(batch, r, c, k, generator=g).softmax(-1)
    A = (w.unsqueeze(-1) * bank[idx]).sum(3).reshape(batch, r, d_in)  # (B, r, in)
    out = {}
    for L in (1, 32):
        x = torch.randn(batch, L, d_in, generator=g)

        def gathered(x=x):
            return torch.bmm(x, A.transpose(1, 2))

        def projected(x=x, L=L):
            p = x.view(batch, L, c, b) @ bank.T  # (B, L, c, h): every activation on every bank vector, once
            sel = p.gather(3, idx.permute(0, 2, 1, 3).reshape(batch, 1, c, r * k).expand(batch, L, c, r * k))
            return (sel.view(batch, L, c, r, k) * w.permute(0, 2, 1, 3).unsqueeze(1)).sum((2, 4))  # (B, L, r)

        assert torch.allclose(gathered(), projected(), atol=1e-4)
        t_g = [timed(gathered) for _ in range(reps)]
        t_p = [timed(projected) for _ in range(reps)]
        out[f"L={L}"] = {
            "gathered_bmm_us": 1e6 * statistics.median(t_g),
            "bank_projection_us": 1e6 * statistics.median(t_p),
            "projection_vs_gather": statistics.median(t_p) / statistics.median(t_g),
        }
    return {"batch": batch, "layer": "576->576, r=4, h=256, b=64, k=2 (A side)", **out}


# -- (b) cold start ----------------------------------------------------------------------------------------------


def cold_start(base, work: Path, reps: int, prompt: int) -> dict:
    from peft import PeftModel

    files = write_variants(base, work / "cold", reps + 2, shared_bank=False, start=100)
    lora_dirs = [vblora.export_lora(f, work / "cold-lora" / f.stem) for f in files]
    ids = torch.randint(0, base.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    kw = dict(max_new_tokens=1, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(ids))
    served = copy.deepcopy(base)
    store = AdapterStore(served)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(base), str(lora_dirs[0]), adapter_name="first").eval()
    ours, theirs, ours_load, theirs_load, first_token = [], [], [], [], []
    ours_warm, theirs_warm = [], []  # first token of the same request once the adapter is loaded
    for i in range(1, reps + 2):  # i = 1: warm-up of both sides (first-call costs), not counted
        t0 = time.perf_counter()
        store.add(files[i].stem, files[i])
        handle = store.acquire(files[i].stem)
        t1 = time.perf_counter()
        with torch.no_grad(), store.rows([handle]):
            served.generate(ids, **kw)
        t2 = time.perf_counter()
        if i > 1:
            ours.append(t2 - t0)
            ours_load.append(t1 - t0)
            with torch.no_grad(), store.rows([handle]):  # the same request again, adapter now warm
                ours_warm.append(timed(lambda: served.generate(ids, **kw)))
        t0 = time.perf_counter()
        peft_model.load_adapter(str(lora_dirs[i]), adapter_name=f"a{i}")
        peft_model.set_adapter(f"a{i}")
        t1 = time.perf_counter()
        with torch.no_grad():
            peft_model.generate(input_ids=ids, **kw)
        t2 = time.perf_counter()
        if i > 1:
            theirs.append(t2 - t0)
            theirs_load.append(t1 - t0)
            with torch.no_grad():
                theirs_warm.append(timed(lambda: peft_model.generate(input_ids=ids, **kw)))
            first_token.append(timed(lambda: base.generate(ids, **kw)))
    return {
        "reps": reps,
        "prompt_tokens": prompt,
        "ours_file_to_first_token_s": spread(ours),
        "peft_lora_file_to_first_token_s": spread(theirs),
        "ours_add_acquire_s": spread(ours_load),
        "peft_load_set_adapter_s": spread(theirs_load),
        "base_first_token_s": spread(first_token),
        "speedup_file_to_first_token": statistics.median(theirs) / statistics.median(ours),
        "speedup_load_only": statistics.median(theirs_load) / statistics.median(ours_load),
        "ours_warm_first_token_s": spread(ours_warm),
        "peft_lora_warm_first_token_s": spread(theirs_warm),
        # what a cold adapter adds to a request: cold file-to-first-token minus the same side's warm first token
        # (per repetition, then the median); the base model's own forward cancels out of each side
        "ours_cold_penalty_s": spread([c - w for c, w in zip(ours, ours_warm, strict=True)]),
        "peft_lora_cold_penalty_s": spread([c - w for c, w in zip(theirs, theirs_warm, strict=True)]),
        "speedup_cold_penalty": statistics.median([c - w for c, w in zip(theirs, theirs_warm, strict=True)])
        / statistics.median([c - w for c, w in zip(ours, ours_warm, strict=True)]),
        "bytes_on_disk": {
            "vblora": files[1].stat().st_size,
            "peft_lora": sum(p.stat().st_size for p in lora_dirs[1].iterdir()),
        },
    }


# -- (c) memory (own process) ------------------------------------------------------------------------------------


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def write_many(base, d: Path, count: int) -> None:
    """The memory part's adapters (written by the parent, so the child's resident set holds only the store)."""
    half = count // 2
    write_variants(base, d / "shared", half, shared_bank=True)
    write_variants(base, d, count - half, shared_bank=False, start=half)


def memory_part(work: Path, count: int, cache_mb: int) -> dict:
    base = base_model()
    d = work / "many"
    shared = sorted((d / "shared").glob("a*.safetensors"))  # registered by path (add), their bank beside them
    own = sorted(d.glob("a*.safetensors"))  # registered by the directory
    half = len(shared)
    file_bytes = sum(f.stat().st_size for f in shared + own) + (d / "shared" / "bank.safetensors").stat().st_size
    ids = torch.randint(0, base.config.vocab_size, (8, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        base(input_ids=ids)  # allocator and kernels warm before the first reading
    import gc

    gc.collect()
    r0 = rss()
    store = AdapterStore(base, d, cache_bytes=cache_mb << 20)
    for f in shared:
        store.add(f"shared-{f.stem}", f)
    gc.collect()
    r1 = rss()
    names = store.names()
    assert len(names) == count, len(names)
    handles = [store.acquire(n) for n in names]
    gc.collect()
    r2 = rss()
    t = time.perf_counter()
    with torch.no_grad():
        for i in range(0, count, 8):
            with store.rows(handles[i : i + 8]):
                base(input_ids=ids)
    forward_s = time.perf_counter() - t
    gc.collect()
    r3 = rss()
    stats = store.stats()
    cap = cache_mb << 20
    return {
        "adapters": count,
        "shared_bank": half,
        "own_bank": count - half,
        "file_bytes": file_bytes,
        "cache_cap_bytes": cap,
        "rss_growth_registered": r1 - r0,
        "rss_growth_loaded": r2 - r0,
        "rss_growth_after_forward_through_all": r3 - r0,
        "forward_through_all_s": forward_s,
        "per_adapter_registered_bytes": (r1 - r0) / count,
        "per_adapter_loaded_bytes": (r2 - r0) / count,
        "ratio_vs_files_plus_cap": (r3 - r0) / (file_bytes + cap),
        "store": stats,
    }


def tables(r: dict) -> str:
    """Markdown tables of a result file (for docs/serving.md)."""
    tp = r["throughput"]
    out = [
        f"Throughput: {tp['batch']} requests, {tp['prompt_tokens']}-token prompts, {tp['new_tokens']} new tokens "
        f"each (greedy), median of {tp['reps']} interleaved runs, {r['threads']} threads",
        "",
        "| arm | tokens/s | vs one adapter (store) | vs one adapter (load_adapter) | s: median (min-max) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, a in tp["arms"].items():
        out.append(
            f"| {name} | {a['tokens_per_s']:.1f} | {a['vs_one_adapter_store']:.2f}x | "
            f"{a['vs_one_adapter_plain']:.2f}x | {a['median']:.2f} ({a['min']:.2f}-{a['max']:.2f}) |"
        )
    bp = r["bank_projection_vs_gather"]
    out += [
        "",
        f"Shared bank, {bp['layer']}, {bp['batch']} rows of distinct adapters:",
        "",
        "| tokens per row | gathered A + bmm (us) | project on the bank once (us) | projection / gather |",
        "|---:|---:|---:|---:|",
    ]
    for key in ("L=1", "L=32"):
        v = bp[key]
        out.append(
            f"| {key[2:]} | {v['gathered_bmm_us']:.0f} | {v['bank_projection_us']:.0f} | "
            f"{v['projection_vs_gather']:.1f}x |"
        )
    c = r["cold_start"]

    def med(k: str) -> float:
        return c[k]["median"]

    out += [
        "",
        f"Cold start ({c['prompt_tokens']}-token prompt, median of {c['reps']}, fresh adapter each run):",
        "",
        "| | ours (store.add + acquire) | HF PEFT LoRA (load_adapter + set_adapter) | speed-up |",
        "|---|---:|---:|---:|",
        f"| load (s) | {med('ours_add_acquire_s'):.3f} | {med('peft_load_set_adapter_s'):.3f} | "
        f"{c['speedup_load_only']:.1f}x |",
        f"| file to first token (s) | {med('ours_file_to_first_token_s'):.3f} | "
        f"{med('peft_lora_file_to_first_token_s'):.3f} | {c['speedup_file_to_first_token']:.1f}x |",
        f"| warm first token, same request (s) | {med('ours_warm_first_token_s'):.3f} | "
        f"{med('peft_lora_warm_first_token_s'):.3f} | |",
        f"| cold-start penalty: cold minus warm (s) | {med('ours_cold_penalty_s'):.3f} | "
        f"{med('peft_lora_cold_penalty_s'):.3f} | {c['speedup_cold_penalty']:.1f}x |",
        f"| bytes on disk | {c['bytes_on_disk']['vblora']:,} | {c['bytes_on_disk']['peft_lora']:,} | |",
        f"| (base model's own first token, s) | {med('base_first_token_s'):.3f} | | |",
    ]
    m = r["memory"]

    def mib(b: float) -> str:
        return f"{b / 2**20:.1f} MiB"

    out += [
        "",
        f"Memory, {m['adapters']} registered adapters ({m['shared_bank']} on one shared bank file, "
        f"{m['own_bank']} with their own bank), cache cap {mib(m['cache_cap_bytes'])}:",
        "",
        "| resident set growth | total | per adapter |",
        "|---|---:|---:|",
        f"| registered (headers read) | {mib(m['rss_growth_registered'])} | "
        f"{m['per_adapter_registered_bytes'] / 1024:.1f} KiB |",
        f"| all acquired (loaded, verified) | {mib(m['rss_growth_loaded'])} | "
        f"{m['per_adapter_loaded_bytes'] / 1024:.1f} KiB |",
        f"| after a forward through every adapter | {mib(m['rss_growth_after_forward_through_all'])} | |",
        f"| sum of files + cache cap | {mib(m['file_bytes'] + m['cache_cap_bytes'])} | |",
        f"| ratio (target <= 1.2) | {m['ratio_vs_files_plus_cap']:.2f} | |",
    ]
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/results/serve-adapters-cpu.json")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=32)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--cold-reps", type=int, default=5)
    ap.add_argument("--cold-prompt", type=int, default=8)
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--cache-mb", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--part", choices=["all", "memory"], default="all")
    ap.add_argument("--work", default=None)
    ap.add_argument("--tables", metavar="JSON", help="print the markdown tables of a result file and exit")
    args = ap.parse_args()
    if args.tables:
        print(tables(json.loads(Path(args.tables).read_text())))
        return
    torch.set_num_threads(args.threads)
    if args.part == "memory":  # child process: print one JSON line
        print(json.dumps(memory_part(Path(args.work), args.adapters, args.cache_mb)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        base = base_model()
        result = {
            "model": "SmolLM2-135M-Instruct (fp32)",
            "adapter_config": CFG,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
            "threads": args.threads,
            "versions": {"torch": torch.__version__, "python": platform.python_version()},
        }
        import peft
        import transformers

        result["versions"].update(
            transformers=transformers.__version__, peft=peft.__version__, vblora=vblora.__version__
        )
        print("(a) throughput ...", flush=True)
        result["throughput"] = throughput(base, work, args.batch, args.prompt, args.new, args.reps)
        result["bank_projection_vs_gather"] = bank_projection(args.batch)
        print("(b) cold start ...", flush=True)
        result["cold_start"] = cold_start(base, work, args.cold_reps, args.cold_prompt)
        print("(c) memory ...", flush=True)
        write_many(base, work / "many", args.adapters)
        del base
        child = subprocess.run(
            [
                sys.executable,
                __file__,
                "--part",
                "memory",
                "--work",
                str(work),
                "--adapters",
                str(args.adapters),
                "--cache-mb",
                str(args.cache_mb),
                "--threads",
                str(args.threads),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        result["memory"] = json.loads(child.stdout.strip().splitlines()[-1])
        result["wall_s"] = time.perf_counter() - t0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(tables(result))


if __name__ == "__main__":
    main()
