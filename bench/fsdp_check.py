"""FSDP check on the device: VB-LoRA on a LLaMA-shaped model sharded with `vblora.train.sharding.shard_model` (FSDP2,
the frozen base sharded, bank / logits whole) over N processes, against one process on the same global batch.

Each process also holds an unsharded copy, trained on the whole global batch with no collectives: the one-process
run. Compared per step (3 AdamW steps, float32, TF32 off): the loss (mean over processes vs one process), the bank
and logits gradients (max |difference| / max |gradient|), and the parameters after the steps (max |difference| /
learning rate). Also: one composition per forward, base bytes held per process vs whole.

Backends: NCCL with one GPU per process when there are >= 2 GPUs. With one GPU, 2 processes on it: NCCL is tried
first (it normally refuses two ranks on one device), then gloo with CUDA tensors; every attempt and its outcome is in
the JSON. Without CUDA: gloo on the CPU (`--tiny` for a quick run here).

    python bench/fsdp_check.py [--procs 2] [--tiny] [--out bench/results/fsdp_check-<device>.json]

Prints one JSON line; exit status 0 when the check passes.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {  # LLaMA-shaped: (hidden, intermediate, layers, heads, kv heads, vocab, sequence), global batch 4
    "gpu": (1024, 2816, 4, 16, 4, 32000, 128),
    "tiny": (64, 128, 2, 2, 1, 96, 12),
}
STEPS, GLOBAL_BATCH = 3, 4
LR_BANK, LR_LOGITS = 1e-2, 5e-2
# pass: loss within 1e-5 (relative), gradients within 1e-4 of their largest entry, parameters within 1e-2 of one
# learning-rate step (AdamW divides by sqrt(v): a near-zero gradient's last bits move its parameter visibly)
TOL_LOSS, TOL_GRAD, TOL_PARAM = 1e-5, 1e-4, 1e-2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build(shape: str, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    import vblora

    hidden, inter, layers, heads, kv, vocab, _ = SHAPES[shape]
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg)
    h, b = (2048, 256) if shape == "gpu" else (16, 32)  # paper's LLM bank on the GPU
    model = vblora.add_vblora(
        model, vblora.VBLoRAConfig(target_modules="all-linear", num_vectors=h, vector_length=b, rank=4, topk=2)
    )
    return model.to(device)


def worker(rank: int, world: int, port: int, backend: str, device_kind: str, shape: str, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import vblora
    from vblora.train import sharding

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    if device_kind == "cuda":
        index = rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    dist.init_process_group(backend, rank=rank, world_size=world, device_id=device if backend == "nccl" else None)
    try:
        model = build(shape, device)
        one = copy.deepcopy(model)  # the one-process run
        whole_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        sharding.shard_model(model, init_device_mesh(device_kind, (world,)))
        bank, bank_one = vblora.get_bank(model), vblora.get_bank(one)
        compositions = []
        compose = bank.compose_rows
        bank.compose_rows = lambda *a, **kw: (compositions.append(1), compose(*a, **kw))[1]
        opts = [
            torch.optim.AdamW(vblora.parameter_groups(m, lr_bank=LR_BANK, lr_logits=LR_LOGITS)) for m in (model, one)
        ]
        vocab, seq = SHAPES[shape][5], SHAPES[shape][6]
        g = torch.Generator().manual_seed(1)
        steps = []
        t0 = time.time()
        for _ in range(STEPS):
            ids = torch.randint(0, vocab, (GLOBAL_BATCH, seq), generator=g).to(device)  # (B, T), no padding
            part = ids.chunk(world)[rank]
            compositions.clear()
            loss = model(input_ids=part, labels=part).loss
            composed = len(compositions)
            loss.backward()
            loss_one = one(input_ids=ids, labels=ids).loss
            loss_one.backward()
            mean = loss.detach().clone()
            dist.all_reduce(mean, op=dist.ReduceOp.AVG)
            row = {"loss": mean.item(), "loss_one": loss_one.item(), "compositions": composed}
            for what in ("bank", "logits"):
                got, want = getattr(bank, what).grad, getattr(bank_one, what).grad
                row[f"grad_{what}_rel"] = float((got - want).abs().max() / want.abs().max())
            steps.append(row)
            for o in opts:
                o.step()
                o.zero_grad()
        elapsed = time.time() - t0
        params = {
            f"{what}_diff_over_lr": float((getattr(bank, what) - getattr(bank_one, what)).abs().max() / lr)
            for what, lr in (("bank", LR_BANK), ("logits", LR_LOGITS))
        }
        local_bytes = sum(p.to_local().numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        base = model.model.layers[0].self_attn.q_proj.base.weight
        seen = {
            "rank": rank,
            "steps": steps,
            **params,
            "base_bytes_whole": whole_bytes,
            "base_bytes_this_process": local_bytes,
            "base_weight_type": type(base).__name__,
            "bank_type": type(bank.bank).__name__,
            "seconds_3_steps_both_models": round(elapsed, 3),
        }
        if device_kind == "cuda":
            seen["max_memory_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
        if rank == 0:
            Path(out).write_text(json.dumps(seen))
    finally:
        dist.destroy_process_group()


def attempt(backend: str, world: int, device_kind: str, shape: str, timeout: float) -> dict:
    """Run the check once on `world` processes; {'ok': bool, 'error': str, 'result': dict}."""
    import torch.multiprocessing as mp

    handle, out = tempfile.mkstemp(suffix=".json")  # the workers write it; nothing is kept open here
    os.close(handle)
    ctx = mp.start_processes(
        worker,
        args=(world, _free_port(), backend, device_kind, shape, out),
        nprocs=world,
        join=False,
        start_method="spawn",
    )
    deadline = time.time() + timeout
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.time())):
            if time.time() > deadline:
                for p in ctx.processes:
                    p.terminate()
                return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    except Exception as e:  # a process raised: keep its message's last line
        lines = [ln for ln in str(e).strip().splitlines() if ln.strip()]
        return {"ok": False, "error": lines[-1][:300] if lines else type(e).__name__}
    return {"ok": True, "result": json.loads(Path(out).read_text())}


def verdict(r: dict) -> dict:
    steps = r["steps"]
    checks = {
        "loss": all(abs(s["loss"] - s["loss_one"]) <= TOL_LOSS * abs(s["loss_one"]) for s in steps),
        "gradients": all(s["grad_bank_rel"] <= TOL_GRAD and s["grad_logits_rel"] <= TOL_GRAD for s in steps),
        "parameters": r["bank_diff_over_lr"] <= TOL_PARAM and r["logits_diff_over_lr"] <= TOL_PARAM,
        "one_composition_per_forward": all(s["compositions"] == 1 for s in steps),
        "base_sharded_bank_whole": r["base_weight_type"] == "DTensor" and r["bank_type"] == "Parameter",
    }
    return {"checks": checks, "pass": all(checks.values())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--procs", type=int, default=2, help="processes (with >= 2 GPUs: at most one per GPU)")
    ap.add_argument("--tiny", action="store_true", help="tiny shape (CPU smoke test)")
    ap.add_argument("--timeout", type=float, default=45.0, help="seconds per attempt")
    ap.add_argument("--out", default=None, help="results JSON (default bench/results/fsdp_check-<device>.json)")
    args = ap.parse_args()
    t0 = time.time()
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    shape = "tiny" if args.tiny or not gpus else "gpu"
    if gpus >= 2:
        plan = [("nccl", min(args.procs, gpus), "cuda")]
    elif gpus == 1:
        plan = [("nccl", args.procs, "cuda"), ("gloo", args.procs, "cuda")]  # two processes on one GPU
    else:
        plan = [("gloo", args.procs, "cpu")]
    attempts, result = [], None
    for backend, world, kind in plan:
        a = attempt(backend, world, kind, shape, args.timeout)
        attempts.append(
            {
                "backend": backend,
                "processes": world,
                "device": kind,
                "gpus": gpus,
                "ok": a["ok"],
                **({"error": a["error"]} if not a["ok"] else {}),
            }
        )
        if a["ok"]:
            result = {"backend": backend, "processes": world, "device": kind, **a["result"]}
            break
    report = {
        "name": "fsdp_check",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": torch.cuda.get_device_name(0) if gpus else platform.processor() or platform.machine(),
        "gpus": gpus,
        "shape": dict(
            zip(
                ("hidden", "intermediate", "layers", "heads", "kv_heads", "vocab", "sequence"),
                SHAPES[shape],
                strict=True,
            )
        ),
        "global_batch": GLOBAL_BATCH,
        "steps": STEPS,
        "tolerances": {"loss_rel": TOL_LOSS, "grad_rel": TOL_GRAD, "param_over_lr": TOL_PARAM},
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpus else None,
        },
        "attempts": attempts,
        "result": result,
        **(verdict(result) if result else {"pass": False}),
        "wall_s": round(time.time() - t0, 1),
    }
    out = Path(args.out or ROOT / "bench" / "results" / f"fsdp_check-{'cuda' if gpus else 'cpu'}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report))
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:
        traceback.print_exc()
        sys.exit(2)
