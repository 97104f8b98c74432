"""Adapter file sizes and the accuracy cost of each storage option, against HF PEFT's adapter files.

Model: RoBERTa-base shapes (transformers.RobertaConfig(), randomly initialised), all six linear modules of every
layer (query, key, value, attention.output.dense, intermediate.dense, output.dense), h=90, b=256, r=4, k=2, no
modules_to_save: the paper's 26,928 stored parameters. The adapter is random but far from init (bank ~ N(0, 0.05),
logits ~ N(0, 1)), so the adapter moves the outputs visibly; differences are reported both absolute and relative
to that movement (max |adapted - base|).

PEFT's files are written by PEFT itself (`save_pretrained`, full logits and `save_only_topk_weights`) for the same
adapter, loaded into PEFT from our export. Usage: python bench/storage_sizes.py [--out bench/results/...]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
OPTIONS = [
    ("fp32", False),
    ("fp32", True),
    ("fp16", False),
    ("fp16", True),
    ("bf16", False),
    ("bf16", True),
    ("int8", False),
    ("int8", True),
]


def file_parts(path: Path) -> tuple[int, int]:
    from safetensors.torch import load_file

    tensors = sum(t.numel() * t.element_size() for t in load_file(path).values())
    return path.stat().st_size, tensors


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="bench/results/storage_sizes.json")
    args = ap.parse_args()
    import peft
    import transformers

    import vblora
    from vblora.storage import load_adapter, save_adapter
    from vblora.storage.peft_vblora import export_peft

    torch.manual_seed(0)
    base = transformers.RobertaModel(transformers.RobertaConfig()).eval()
    ids = torch.randint(0, 50265, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base_out = base(input_ids=ids).last_hidden_state
    model = vblora.add_vblora(
        copy.deepcopy(base),
        vblora.VBLoRAConfig(target_modules=TARGETS, rank=4, num_vectors=90, vector_length=256, topk=2),
    ).eval()
    bank = vblora.get_bank(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        bank.bank.copy_(torch.randn(bank.bank.shape, generator=g) * 0.05)
        bank.logits.copy_(torch.randn(bank.logits.shape, generator=g))
        ref = model(input_ids=ids).last_hidden_state
    effect = float((ref - base_out).abs().max())
    count = vblora.count_parameters(model)
    print(f"stored parameters {count['stored']:,.0f}, adapter effect max|adapted - base| = {effect:.4g}")

    def diff(m) -> dict:
        with torch.no_grad():
            d = float((m(input_ids=ids).last_hidden_state - ref).abs().max())
        return {"max_abs_diff": d, "diff_over_effect": d / effect}

    rows, peft_files = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        export_peft(model, tmp / "export")
        theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp / "export").eval()
        peft_diff = diff(theirs)
        for topk in (False, True):
            theirs.peft_config["default"].save_only_topk_weights = topk
            theirs.save_pretrained(tmp / f"peft_{topk}")
            size, tensors = file_parts(tmp / f"peft_{topk}" / "adapter_model.safetensors")
            peft_files["topk" if topk else "full"] = {"file_bytes": size, "tensor_bytes": tensors}
        peft_topk = peft_files["topk"]["file_bytes"]
        for precision, pack in OPTIONS:
            path = save_adapter(model, tmp / f"{precision}_{pack}", precision=precision, pack_indices=pack)
            size, tensors = file_parts(path)
            row = {
                "precision": precision,
                "pack_indices": pack,
                "file_bytes": size,
                "tensor_bytes": tensors,
                "header_bytes": size - tensors,
                "ratio_to_peft_topk": size / peft_topk,
                **diff(load_adapter(copy.deepcopy(base), path)),
            }
            rows.append(row)
            print(row)
    result = {
        "benchmark": "storage_sizes",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__},
        "model": "RoBERTa-base shapes, 6 linear modules x 12 layers, h=90, b=256, r=4, k=2",
        "stored_parameters": count["stored"],
        "stored_bytes_fp32": count["stored_bytes"],
        "adapter_effect_max_abs": effect,
        "input": "2 x 64 random token ids, seed 0",
        "peft": {**peft_files, "max_abs_diff_peft_vs_ours": peft_diff["max_abs_diff"]},
        "ours": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"PEFT full {peft_files['full']['file_bytes']:,} B, top-k {peft_topk:,} B; wrote {args.out}")


if __name__ == "__main__":
    main()
