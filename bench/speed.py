"""Speed and memory of VB-LoRA (ours) against HF PEFT LoRA r=4, LoRA r=64 and PEFT VB-LoRA, side by side.

One process, one run, interleaved: every method of a case is built on the same random-init model shape, then each
timed step runs every method once (in a rotating order), so a noisy shared machine slows all methods alike. Records,
per method: train step (forward + backward + AdamW step) median/min/max, inference forward (eval, no grad) unmerged
and merged, the base model's forward, peak memory (CUDA only), trainable and stored parameters and the memory of the
VB-LoRA logits (fp32 logits + grads + AdamW state). Writes JSON (rewritten after every case, so a crash keeps
finished cases) to bench/results/ unless --out says otherwise.

    PYTHONPATH=src python bench/speed.py --device cpu --cases smollm2_all --steps 12
    PYTHONPATH=src python bench/speed.py --device cuda --cases roberta_qv,roberta_all,llama1b_all,smollm2_all
    PYTHONPATH=src python bench/speed.py --tiny          # seconds, CPU; exercised by tests/test_bench_tiny.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

METHODS = ("lora_r4", "lora_r64", "peft_vblora", "ours")
ROBERTA_ALL = r".*\.layer\.\d+\..*(query|key|value|dense)"
ROBERTA_QV = r".*\.layer\.\d+\.attention\.self\.(query|value)"
LLAMA_ALL = r".*\.layers\.\d+\..*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


@dataclass(frozen=True)
class Case:
    arch: str  # "roberta" (sequence classification) or "llama" (causal LM)
    dtype: str
    batch: int
    seq: int
    targets: str  # regex, identical for every method
    h: int  # VB-LoRA num_vectors
    b: int  # VB-LoRA vector_length
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    r: int = 4
    k: int = 2


CASES = {
    # RoBERTa-base shape, GLUE-like sequence classification (head frozen in every method).
    "roberta_qv": Case("roberta", "float32", 32, 128, ROBERTA_QV, 90, 256, 768, 12, 12, 12, 3072, 50265),
    "roberta_all": Case("roberta", "float32", 32, 128, ROBERTA_ALL, 90, 256, 768, 12, 12, 12, 3072, 50265),
    # TinyLlama-1.1B dims, causal LM loss over the 32000-word vocabulary.
    "llama1b_all": Case("llama", "bfloat16", 4, 1024, LLAMA_ALL, 2048, 256, 2048, 22, 32, 4, 5632, 32000),
    # SmolLM2-135M dims (tied embeddings), the CPU bar of issue 4.
    "smollm2_all": Case("llama", "float32", 2, 128, LLAMA_ALL, 256, 64, 576, 30, 9, 3, 1536, 49152),
}
TINY = dict(batch=2, seq=16, h=8, b=32, hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, vocab=256)


# -- models ------------------------------------------------------------------------------------------------------
def build_base(case: Case, device: str, seed: int = 0) -> torch.nn.Module:
    """Random-init model built from a config directly on `device` in `case.dtype` (no download)."""
    from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaForSequenceClassification

    dtype = getattr(torch, case.dtype)
    torch.manual_seed(seed)
    if case.arch == "roberta":
        cfg = RobertaConfig(
            vocab_size=case.vocab,
            hidden_size=case.hidden,
            num_hidden_layers=case.layers,
            num_attention_heads=case.heads,
            intermediate_size=case.ffn,
            num_labels=2,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            max_position_embeddings=max(514, case.seq + 2),
            attn_implementation="sdpa",
        )
        cls = RobertaForSequenceClassification
    else:
        cfg = LlamaConfig(
            vocab_size=case.vocab,
            hidden_size=case.hidden,
            num_hidden_layers=case.layers,
            num_attention_heads=case.heads,
            num_key_value_heads=case.kv_heads,
            intermediate_size=case.ffn,
            max_position_embeddings=max(2048, case.seq),
            tie_word_embeddings=case.vocab == 49152,
            attn_implementation="sdpa",
        )
        cls = LlamaForCausalLM
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(cfg)
    finally:
        torch.set_default_dtype(prev)
    return model.to(device=device, dtype=dtype)


def adapt(method: str, model: torch.nn.Module, case: Case) -> torch.nn.Module:
    if method == "base":
        return model.requires_grad_(False)
    if method == "ours":
        import vblora

        cfg = vblora.VBLoRAConfig(
            target_modules=case.targets, rank=case.r, num_vectors=case.h, vector_length=case.b, topk=case.k
        )
        return vblora.add_vblora(model, cfg)
    import peft

    if method.startswith("lora_r"):
        r = int(method[len("lora_r") :])
        cfg = peft.LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, target_modules=case.targets)
    elif method == "peft_vblora":
        cfg = peft.VBLoRAConfig(
            r=case.r,
            topk=case.k,
            num_vectors=case.h,
            vector_length=case.b,
            vblora_dropout=0.0,
            target_modules=case.targets,
        )
    else:
        raise ValueError(method)
    return peft.get_peft_model(model, cfg)


def make_batch(case: Case, device: str, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, case.vocab, (case.batch, case.seq), generator=g).to(device)
    labels = torch.randint(0, 2, (case.batch,), generator=g).to(device) if case.arch == "roberta" else ids
    return {"input_ids": ids, "labels": labels}


def set_merged(method: str, model: torch.nn.Module, merged: bool) -> None:
    if method == "base":
        return
    if method == "ours":
        import vblora

        (vblora.merge if merged else vblora.unmerge)(model)
    else:
        model.merge_adapter() if merged else model.unmerge_adapter()


# -- measurement --------------------------------------------------------------------------------------------------
def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def tensor_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += t.untyped_storage().nbytes()
    return total


def static_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> int:
    """Resident bytes of one method between steps: parameters, buffers and optimizer state."""
    tensors = list(model.parameters()) + list(model.buffers())
    if opt is not None:
        tensors += [v for s in opt.state.values() for v in s.values()]
    return tensor_bytes(tensors)


def logits_params(method: str, model: torch.nn.Module) -> list[torch.Tensor]:
    if method == "ours":
        import vblora

        return [vblora.get_bank(model).logits]
    if method == "peft_vblora":
        return [p for n, p in model.named_parameters() if "vblora_logits" in n]
    return []


def count(method: str, model: torch.nn.Module, case: Case) -> dict:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if method == "ours":
        import vblora

        c = vblora.count_parameters(model)
        return {"trainable": trainable, "stored": c["stored"], "subvectors": c["subvectors"]}
    if method == "peft_vblora":
        n = sum(p.numel() // case.h for p in logits_params(method, model))
        w = 0.25 if case.h <= 256 else 0.5  # index width in float32 units, as the paper counts
        return {"trainable": trainable, "stored": case.h * case.b + n * (case.k * w + case.k - 1), "subvectors": n}
    return {"trainable": trainable, "stored": trainable}


class Runner:
    """One method of one case: its model, optimizer and timings."""

    def __init__(self, method: str, case: Case, device: str, batch: dict) -> None:
        self.method, self.case, self.device, self.batch = method, case, device, batch
        self.model = adapt(method, build_base(case, device), case)
        self.opt = None
        if method != "base":
            params = [p for p in self.model.parameters() if p.requires_grad]
            self.opt = torch.optim.AdamW(params, lr=1e-5)
        self.times = {"train": [], "fwd": [], "fwd_merged": [], "train_cpu": []}
        self.peak_step = 0  # CUDA: max extra bytes allocated during a train step, over the static bytes

    def train_step(self) -> float:
        self.model.train()
        cuda = self.device == "cuda"
        sync(self.device)
        if cuda:
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        c0, t0 = time.process_time(), time.perf_counter()
        loss = self.model(**self.batch).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        t = time.perf_counter() - t0
        self.cpu_time = time.process_time() - c0
        if cuda:
            self.peak_step = max(self.peak_step, torch.cuda.max_memory_allocated() - before)
        if not torch.isfinite(loss.detach()).item():
            raise FloatingPointError(f"{self.method}: non-finite loss")
        return t

    @torch.no_grad()
    def forward(self) -> float:
        self.model.eval()
        sync(self.device)
        t0 = time.perf_counter()
        self.model(input_ids=self.batch["input_ids"])
        sync(self.device)
        return time.perf_counter() - t0


def summary(xs: list[float]) -> dict:
    ms = [1000 * x for x in xs]
    if not ms:
        return {}
    return {
        "median": statistics.median(ms),
        "min": min(ms),
        "max": max(ms),
        "n": len(ms),
        "all": [round(x, 3) for x in ms],
    }


def interleave(runners: list[Runner], fn, key: str | None, warmup: int, steps: int, log=None) -> None:
    n = len(runners)
    for i in range(warmup + steps):
        if log is not None:
            log(f"  {key} step {i + 1}/{warmup + steps}")
        for j in range(n):
            r = runners[(i + j) % n]  # rotate the order so no method always runs first
            t = fn(r)
            if i >= warmup and key is not None and t is not None:
                r.times[key].append(t)
                if key == "train" and r.device == "cpu":
                    r.times["train_cpu"].append(getattr(r, "cpu_time", 0.0))


def run_case(name: str, case: Case, args, log) -> dict:
    device = args.device
    batch = make_batch(case, device)
    methods = [m for m in args.methods.split(",") if m]
    t_case = time.perf_counter()
    runners, errors = [], {}
    for m in [*methods, "base"]:
        try:
            runners.append(Runner(m, case, device, batch))
        except Exception as e:  # one broken method must not lose the others
            errors[m] = f"build: {type(e).__name__}: {e}"
            log(traceback.format_exc())
    trainers = [r for r in runners if r.method != "base"]
    log(f"[{name}] built {[r.method for r in runners]} in {time.perf_counter() - t_case:.1f}s")

    def guarded(phase, fn):
        def call(r):
            if r.method in errors:
                return None
            try:
                return fn(r)
            except Exception as e:
                errors[r.method] = f"{phase}: {type(e).__name__}: {e}"
                log(traceback.format_exc())
                if device == "cuda":
                    torch.cuda.empty_cache()  # e.g. after an out-of-memory error, let the others go on
                return None

        return call

    interleave(
        trainers, guarded("train", Runner.train_step), "train", args.warmup, args.steps, log if args.progress else None
    )
    log(f"[{name}] train done {time.perf_counter() - t_case:.1f}s")
    interleave(runners, guarded("fwd", Runner.forward), "fwd", 1, args.fwd_steps)
    for r in trainers:
        guarded("merge", lambda r: set_merged(r.method, r.model, True))(r)
    interleave(runners, guarded("fwd_merged", Runner.forward), "fwd_merged", 1, args.fwd_steps)
    for r in trainers:
        guarded("unmerge", lambda r: set_merged(r.method, r.model, False))(r)
    log(f"[{name}] forward done {time.perf_counter() - t_case:.1f}s")

    out = {"case": asdict(case), "methods": {}, "errors": errors}
    base = next((r for r in runners if r.method == "base"), None)
    if base is not None:
        out["base"] = {
            "fwd_ms": summary(base.times["fwd"]),
            "fwd_merged_phase_ms": summary(base.times["fwd_merged"]),
            "params": sum(p.numel() for p in base.model.parameters()),
            "static_bytes": static_bytes(base.model, None),
        }
    for r in trainers:
        stat = static_bytes(r.model, r.opt)
        lp = logits_params(r.method, r.model)
        logits_bytes = 4 * sum(p.numel() * p.element_size() for p in lp)  # param + grad + 2 AdamW moments
        peak = stat + r.peak_step if device == "cuda" and r.peak_step else None
        out["methods"][r.method] = {
            "train_ms": summary(r.times["train"]),
            "fwd_ms": summary(r.times["fwd"]),
            "train_process_cpu_ms": summary(r.times["train_cpu"]),  # CPU only: less sensitive to other jobs
            "fwd_merged_ms": summary(r.times["fwd_merged"]),
            "peak_bytes": peak,
            "static_bytes": stat,
            "logits_state_bytes": logits_bytes,
            "logits_share_of_peak": (logits_bytes / peak) if peak else None,
            **count(r.method, r.model, case),
        }
    out["ratios"] = ratios(out)
    out["paired_ratios"] = paired_ratios({r.method: r.times for r in runners})
    out["seconds"] = round(time.perf_counter() - t_case, 1)
    del runners, trainers, base
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def ratios(res: dict) -> dict:
    m = res["methods"]

    def med(method, key):
        return (m.get(method, {}).get(key) or {}).get("median")

    def div(a, b):
        return round(a / b, 4) if a and b else None

    base_fwd = (res.get("base", {}).get("fwd_merged_phase_ms") or {}).get("median")  # same phase as merged
    return {
        "train_ours_vs_lora_r4": div(med("ours", "train_ms"), med("lora_r4", "train_ms")),
        "train_peft_vblora_vs_ours": div(med("peft_vblora", "train_ms"), med("ours", "train_ms")),
        "train_peft_vblora_vs_lora_r4": div(med("peft_vblora", "train_ms"), med("lora_r4", "train_ms")),
        "train_cpu_time_ours_vs_lora_r4": div(
            med("ours", "train_process_cpu_ms"), med("lora_r4", "train_process_cpu_ms")
        ),
        "fwd_ours_vs_lora_r4": div(med("ours", "fwd_ms"), med("lora_r4", "fwd_ms")),
        "fwd_merged_ours_vs_base": div(med("ours", "fwd_merged_ms"), base_fwd),
        "peak_ours_vs_lora_r64": div(m.get("ours", {}).get("peak_bytes"), m.get("lora_r64", {}).get("peak_bytes")),
    }


def paired_ratios(times: dict) -> dict:
    """Median over interleaved rounds of the per-round ratio: robust when the machine's load drifts."""

    def paired(a, ka, b, kb):
        xa, xb = times.get(a, {}).get(ka, []), times.get(b, {}).get(kb, [])
        rs = [x / y for x, y in zip(xa, xb, strict=False) if x and y]
        return (
            {"median": round(statistics.median(rs), 4), "min": round(min(rs), 4), "max": round(max(rs), 4)}
            if rs
            else None
        )

    return {
        "train_ours_vs_lora_r4": paired("ours", "train", "lora_r4", "train"),
        "train_peft_vblora_vs_ours": paired("peft_vblora", "train", "ours", "train"),
        "fwd_ours_vs_lora_r4": paired("ours", "fwd", "lora_r4", "fwd"),
        "fwd_merged_ours_vs_base": paired("ours", "fwd_merged", "base", "fwd_merged"),
    }


def environment(device: str) -> dict:
    import importlib.metadata as md

    env = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "versions": {},
    }
    for pkg in ("torch", "transformers", "peft", "accelerate", "triton", "vblora"):
        try:
            env["versions"][pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            env["versions"][pkg] = None
    env["versions"]["torch"] = torch.__version__
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
    return env


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--cases", default="smollm2_all", help=f"comma list of {sorted(CASES)}")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of " + ",".join(METHODS))
    p.add_argument("--steps", type=int, default=10, help="timed train steps per method (median over these)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--fwd-steps", type=int, default=10)
    p.add_argument("--layers", type=int, default=None, help="override the number of layers (e.g. a 6-layer cut)")
    p.add_argument("--progress", action="store_true", help="log every interleaved train step")
    p.add_argument("--tiny", action="store_true", help="tiny shapes, 2 timed steps: checks the script in seconds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads on CPU")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/speed-<device>-<date>.json)")
    p.add_argument("--time-budget", type=float, default=None, help="skip remaining cases after this many seconds")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tiny:
        args.steps, args.warmup, args.fwd_steps = min(args.steps, 2), min(args.warmup, 1), min(args.fwd_steps, 2)
    names = [c for c in args.cases.split(",") if c]
    unknown = [c for c in names if c not in CASES]
    if unknown:
        p.error(f"unknown cases {unknown}; choose from {sorted(CASES)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M")
    out = Path(
        args.out
        or Path(__file__).parent / "results" / f"speed-{args.device}{'-tiny' if args.tiny else ''}-{stamp}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = {"env": environment(args.device), "args": vars(args), "cases": {}}
    t0 = time.perf_counter()
    for name in names:
        if args.time_budget and time.perf_counter() - t0 > args.time_budget:
            result["cases"][name] = {"skipped": "time budget"}
            continue
        case = CASES[name]
        if args.tiny:
            case = replace(case, **TINY)
        if args.layers:
            case = replace(case, layers=args.layers)
        try:
            result["cases"][name] = run_case(name, case, args, log)
        except Exception as e:
            log(traceback.format_exc())
            result["cases"][name] = {"error": f"{type(e).__name__}: {e}", "case": asdict(case)}
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1))
        tmp.replace(out)
        res = result["cases"][name]
        log(f"[{name}] ratios {res.get('ratios')} errors {res.get('errors') or res.get('error')}")
    print(out)
    ok = all(not c.get("error") and not c.get("errors") for c in result["cases"].values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
