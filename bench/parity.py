"""Device parity checks: ours vs HF PEFT VB-LoRA on a tiny LLaMA-shaped model, on any device (cuda or cpu).

Checks, each reported PASS/FAIL with its max error, written as JSON to --out:
  fp32_train   loss, logits and gradients (bank, logits) equal PEFT's with the same bank and logits
  bf16_model   bf16 model: ours (adapter in bf16) is as close to the fp32 reference as PEFT (adapter in fp32)
  eval_cache   no-grad eval output reused, then changed after an in-place parameter update
  merge        merged forward == unmerged forward (fp32)
  autocast_bf16  fp32 model under bf16 autocast: likewise, and the gradients are finite
  compile      (--compile) torch.compile(fullgraph=True) forward + backward == eager
Kernels: src/vblora/kernels/ ships no fused kernel (see docs/benchmarks.md), so there is no kernel parity to check.

    PYTHONPATH=src python bench/parity.py --device cuda --out parity.json [--compile]
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import traceback

import torch

TARGETS = r".*\.layers\.\d+\..*(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"


def tiny_llama(device: str, dtype=torch.float32, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        attn_implementation="eager",
    )
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def pair(device: str, dtype=torch.float32):
    """(ours, peft) over identical base weights, with PEFT's bank and logits copied from ours."""
    import peft

    import vblora

    base = tiny_llama(device, dtype)
    twin = copy.deepcopy(base)
    cfg = vblora.VBLoRAConfig(
        target_modules=TARGETS,
        rank=4,
        num_vectors=16,
        vector_length=32,
        topk=2,
        init_logits_std=0.5,
        init_bank_bound=0.5,
    )
    ours = vblora.add_vblora(base, cfg)
    pm = peft.get_peft_model(
        twin,
        peft.VBLoRAConfig(r=4, topk=2, num_vectors=16, vector_length=32, vblora_dropout=0.0, target_modules=TARGETS),
    )
    bank = vblora.get_bank(ours)
    h, b = cfg.num_vectors, cfg.vector_length
    with torch.no_grad():
        pbank = pm.base_model.vblora_vector_bank["default"]
        pbank.copy_(bank.bank.to(pbank.dtype))
        for name, layer in vblora.adapted_layers(ours).items():
            pl = pm.base_model.model.get_submodule(name)
            s, r = layer.slot, layer.rank
            la, lb = pl.vblora_logits_A["default"], pl.vblora_logits_B["default"]
            la.copy_(bank.logits[s.a_start : s.a_start + s.a_count].view(r, layer.in_features // b, h))
            lb.copy_(bank.logits[s.b_start : s.b_start + s.b_count].view(layer.out_features // b, r, h))
    return ours, pm


def peft_grads(ours, pm):
    import vblora

    bank = vblora.get_bank(ours)
    flat = torch.zeros_like(bank.logits)
    for name, layer in vblora.adapted_layers(ours).items():
        pl = pm.base_model.model.get_submodule(name)
        s = layer.slot
        flat[s.a_start : s.a_start + s.a_count] = pl.vblora_logits_A["default"].grad.reshape(s.a_count, -1)
        flat[s.b_start : s.b_start + s.b_count] = pl.vblora_logits_B["default"].grad.reshape(s.b_count, -1)
    return pm.base_model.vblora_vector_bank["default"].grad.float(), flat


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def batch(device: str):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (2, 16), generator=g).to(device)
    return {"input_ids": ids, "labels": ids}


def check_train(device: str, dtype, tol_out: float, tol_grad: float | None) -> dict:
    import vblora

    ours, pm = pair(device, dtype)
    ours.train(), pm.train()
    x = batch(device)
    o1, o2 = ours(**x), pm(**x)
    o1.loss.backward(), o2.loss.backward()
    res = {"loss_rel": rel(o1.loss, o2.loss), "logits_rel": rel(o1.logits, o2.logits)}
    if tol_grad is not None:
        bank = vblora.get_bank(ours)
        gb, gl = peft_grads(ours, pm)
        res["bank_grad_rel"], res["logits_grad_rel"] = rel(bank.bank.grad, gb), rel(bank.logits.grad, gl)
    ok = res["loss_rel"] < tol_out and res["logits_rel"] < tol_out
    if tol_grad is not None:
        ok = ok and res["bank_grad_rel"] < tol_grad and res["logits_grad_rel"] < tol_grad
    return {"ok": bool(ok), **res}


def check_eval_cache(device: str) -> dict:
    import vblora

    ours, _ = pair(device)
    ours.eval()
    x = batch(device)["input_ids"]
    bank = vblora.get_bank(ours)
    with torch.no_grad():
        y1 = ours(input_ids=x).logits
        cached = bank._inference[1]
        y1b = ours(input_ids=x).logits
        reused = bank._inference[1] is cached
        bank.bank.mul_(2.0)
        y2 = ours(input_ids=x).logits
    changed = bank._inference[1] is not cached and not torch.allclose(y1, y2)
    return {"ok": bool(reused and changed and torch.equal(y1, y1b)), "reused": reused, "invalidated": changed}


def check_merge(device: str) -> dict:
    import vblora

    ours, _ = pair(device)
    ours.eval()
    x = batch(device)["input_ids"]
    with torch.no_grad():
        y = ours(input_ids=x).logits
        vblora.merge(ours)
        ym = ours(input_ids=x).logits
        vblora.unmerge(ours)
        yu = ours(input_ids=x).logits
    r1, r2 = rel(ym, y), rel(yu, y)
    return {"ok": r1 < 1e-4 and r2 < 1e-4, "merged_rel": r1, "unmerged_rel": r2}


def check_low_precision(device: str, mode: str) -> dict:
    """bf16 model (`mode="bf16"`) or fp32 model under bf16 autocast (`mode="autocast"`): ours runs the adapter in
    bf16, PEFT in fp32, so both are compared to the fp32 reference: ours' error must be of PEFT's order."""
    import vblora

    x = batch(device)
    ref, _ = pair(device)
    ref.train()
    y = ref(**x).logits.detach().float()
    ours, pm = pair(device, torch.bfloat16 if mode == "bf16" else torch.float32)
    ours.train(), pm.train()
    with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=mode == "autocast"):
        o1, o2 = ours(**x), pm(**x)
    o1.loss.backward()
    o2.loss.backward()
    e_ours, e_peft = rel(o1.logits, y), rel(o2.logits, y)
    finite = bool(torch.isfinite(vblora.get_bank(ours).logits.grad).all())
    return {
        "ok": finite and e_ours <= max(2 * e_peft, 2e-2),
        "ours_vs_fp32_rel": e_ours,
        "peft_vs_fp32_rel": e_peft,
        "ours_vs_peft_rel": rel(o1.logits, o2.logits),
    }


def check_compile(device: str) -> dict:
    import vblora

    ours, _ = pair(device)
    ours.train()
    x = batch(device)
    eager = ours(**x)
    eager.loss.backward()
    bank = vblora.get_bank(ours)
    g_eager = bank.logits.grad.clone()
    bank.zero_grad(set_to_none=True)
    compiled = torch.compile(ours, fullgraph=True)
    t0 = time.perf_counter()
    out = compiled(**x)
    out.loss.backward()
    r_out, r_grad = rel(out.logits, eager.logits), rel(bank.logits.grad, g_eager)
    return {
        "ok": r_out < 1e-4 and r_grad < 1e-3,
        "logits_rel": r_out,
        "logits_grad_rel": r_grad,
        "compile_s": round(time.perf_counter() - t0, 1),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="ours vs PEFT VB-LoRA parity on a device")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    p.add_argument("--compile", action="store_true", help="also check torch.compile(fullgraph=True)")
    args = p.parse_args(argv)
    d = args.device
    checks = {
        "fp32_train": lambda: check_train(d, torch.float32, 1e-4, 1e-3),
        "bf16_model": lambda: check_low_precision(d, "bf16"),
        "eval_cache": lambda: check_eval_cache(d),
        "merge": lambda: check_merge(d),
        "autocast_bf16": lambda: check_low_precision(d, "autocast"),
    }
    if args.compile:
        checks["compile"] = lambda: check_compile(d)
    results = {"device": d, "torch": torch.__version__, "checks": {}}
    if d == "cuda":
        results["gpu"] = torch.cuda.get_device_name()
    for name, fn in checks.items():
        t0 = time.perf_counter()
        try:
            res = fn()
        except Exception as e:
            res = {"ok": False, "error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-2000:]}
        res["seconds"] = round(time.perf_counter() - t0, 2)
        results["checks"][name] = res
        shown = {k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in res.items() if k not in ("trace", "ok")}
        print(f"{'PASS' if res['ok'] else 'FAIL'} {name} {shown}", flush=True)
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    return 0 if all(c["ok"] for c in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
