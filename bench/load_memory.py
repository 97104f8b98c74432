"""Peak memory of loading a VB-LoRA adapter: `vblora.load_adapter` (inference form from indices and weights)
versus HF PEFT's `PeftModel.from_pretrained` of a `save_only_topk_weights` adapter (which re-inflates dense `(N, h)`
logits filled with -inf, on top of the random `(N, h)` logits it creates when it builds the adapter).

Model: LLaMA-7B layer shapes (hidden 4096, intermediate 11008, 32 heads), all seven linear modules, h=2048, b=256,
r=4, k=2, with --layers of the 32 layers (default 8) to fit this CPU; the logits scale linearly with layers. The
base weights are allocated uninitialised (`to_empty`), so only the adapter's own allocations touch memory.

Each method runs in its own process: build the base, reset the peak-RSS counter (/proc/self/clear_refs), load,
and report VmHWM - RSS before loading. Usage: python bench/load_memory.py [--layers 8] [--out bench/results/...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

H, B, R, K = 2048, 256, 4, 2


def base_model(layers: int):
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=layers,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=1000,
    )
    with torch.device("meta"):
        model = transformers.LlamaModel(cfg)
    return model.to_empty(device="cpu").eval()


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def prepare(layers: int, work: Path) -> dict:
    """Write the same adapter in both formats (random selection; sizes, not values, matter here)."""
    import torch

    import vblora
    from vblora.storage import save_adapter
    from vblora.storage.peft_vblora import export_peft

    cfg = vblora.VBLoRAConfig(target_modules="all-linear", rank=R, num_vectors=H, vector_length=B, topk=K)
    model = vblora.add_vblora(base_model(layers), cfg, with_logits=False)
    bank = vblora.get_bank(model)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        bank.indices.copy_(torch.stack([torch.randperm(H, generator=g)[:K] for _ in range(bank.num_subvectors)]))
        bank.weights.copy_(torch.rand(bank.num_subvectors, K, generator=g).softmax(dim=1))
    save_adapter(model, work / "ours")
    export_peft(model, work / "peft", save_only_topk_weights=True)
    return {
        "subvectors": bank.num_subvectors,
        "dense_logits_bytes": bank.num_subvectors * H * 4,
        "ours_file_bytes": (work / "ours" / "adapter.safetensors").stat().st_size,
        "peft_file_bytes": (work / "peft" / "adapter_model.safetensors").stat().st_size,
    }


def measure(method: str, layers: int, work: Path) -> dict:
    import peft
    import torch  # noqa: F401  (imported before the baseline so library pages are not counted)

    from vblora.storage import load_adapter

    base = base_model(layers)
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    if method == "ours":
        model = load_adapter(base, work / "ours")
    else:
        model = peft.PeftModel.from_pretrained(base, work / "peft")
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    after = rss_kib("VmRSS")
    del model
    return {
        "method": method,
        "peak_delta_mib": (peak - before) / 1024,
        "resident_delta_mib": (after - before) / 1024,
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--out", default="bench/results/load_memory.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(args.child, args.layers, Path(args.work))))
        return
    import peft
    import torch
    import transformers

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        sizes = prepare(args.layers, work)
        runs = []
        for method in ("ours", "peft", "ours", "peft"):  # alternate, two runs each
            out = subprocess.run(
                [sys.executable, __file__, "--child", method, "--layers", str(args.layers), "--work", str(work)],
                capture_output=True,
                text=True,
                check=True,
            )
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(runs[-1])
    best = {m: min(r["peak_delta_mib"] for r in runs if r["method"] == m) for m in ("ours", "peft")}
    result = {
        "benchmark": "load_memory",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, {platform.platform()}",
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },
        "model": f"LLaMA-7B layer shapes, {args.layers} of 32 layers, all-linear, h={H}, b={B}, r={R}, k={K}",
        **sizes,
        "runs": runs,
        "peak_delta_mib": best,
        "ratio_ours_over_peft": best["ours"] / best["peft"],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("model", "peak_delta_mib", "ratio_ours_over_peft")}, indent=2))


if __name__ == "__main__":
    main()
