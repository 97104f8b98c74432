"""The five methods of the harness on the same targets: VB-LoRA (this library), LoRA and VeRA (HF PEFT),
Tied-LoRA (tied_lora.py) and full fine-tuning.

`apply_method` returns an `Adapted`: the model to train, its AdamW parameter groups, the trainable and stored
parameter counts (stored = what the adapter file holds, float32-equivalent, trained heads included) and a
`save(dir)` that writes the adapter. All methods adapt exactly the modules `resolve_targets` names, which uses the
core's matching rules, so "all-linear" means the same six modules per layer for every method.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, VeraConfig, get_peft_model
from safetensors.torch import save_file
from torch import nn

import vblora
from vblora.inject import find_targets
from vblora.storage import adapter_file, read_adapter, read_bank
from vblora.train.checkpoints import first_line
from vblora.train.config import RunConfig
from vblora.train.errors import SetupError
from vblora.train.tied_lora import add_tied_lora

HEAD_NAMES = ("pre_classifier", "classifier", "score")  # sequence-classification heads of HF models


@dataclass
class Adapted:
    model: nn.Module
    method: str
    param_groups: list[dict]
    trainable_parameters: int
    stored_parameters: float
    save: Callable[[Path], None]
    targets: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)


def head_modules(model: nn.Module, cfg: RunConfig) -> list[str]:
    """modules_to_save as given (each must exist), else the model's sequence-classification head (if it has one)."""
    for h in cfg.vblora.modules_to_save or ():
        try:
            model.get_submodule(h)
        except AttributeError:
            raise SetupError(f"modules_to_save: '{h}' is not a module of {type(model).__name__}") from None
    if cfg.vblora.modules_to_save:
        return list(cfg.vblora.modules_to_save)
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]


def resolve_targets(model: nn.Module, cfg: RunConfig) -> list[str]:
    """Qualified names of the modules to adapt (core semantics; raises the core's TargetError when none match)."""
    spec = cfg.vblora.target_modules
    names = [n for n, _ in find_targets(model, vblora.VBLoRAConfig(target_modules=spec, layers=cfg.vblora.layers))]
    if isinstance(spec, (list, tuple)):  # every name asked for must exist somewhere
        for t in spec:
            if not any(n == t or n.endswith("." + t) for n in names):
                raise SetupError(
                    f"target module '{t}' is not in {type(model).__name__} "
                    f"(adaptable modules end in e.g. {sorted({n.rsplit('.', 1)[-1] for n in names})})"
                )
    return names


def _adapted(model, cfg: RunConfig, adapter: list, head: list, save, details: dict | None = None) -> Adapted:
    """A baseline's Adapted: AdamW groups with the adapter at the method's learning rate and trained heads (if any)
    at lr_head; every trained parameter is stored (trainable = stored)."""
    groups = [{"name": "adapter", "params": adapter, "lr": cfg.method_lr(), "weight_decay": cfg.weight_decay}]
    if head:
        groups.append({"name": "head", "params": head, "lr": cfg.lr_head, "weight_decay": cfg.weight_decay})
    n = sum(p.numel() for p in adapter + head)
    return Adapted(model, cfg.method, groups, n, float(n), save, details=details or {})


def apply_method(model: nn.Module, cfg: RunConfig) -> Adapted:
    heads = head_modules(model, cfg)
    if cfg.method == "full":
        model.requires_grad_(True)
        hf_model: Any = model  # a transformers model: it saves itself
        return _adapted(model, cfg, list(model.parameters()), [], lambda d: hf_model.save_pretrained(str(d)))
    targets = resolve_targets(model, cfg)
    if cfg.method == "vblora":  # its config's target rule matches exactly `targets`
        out = _vblora(model, cfg, heads)
    else:
        out = {"lora": _lora, "vera": _vera, "tied-lora": _tied}[cfg.method](model, cfg, targets, heads)
    out.targets = targets
    return out


def _vblora(model, cfg, heads) -> Adapted:
    vcfg = cfg.vblora.replace(modules_to_save=tuple(heads))
    model = vblora.add_vblora(model, vcfg)
    bank_source = _start_bank(model, cfg)
    groups = vblora.parameter_groups(
        model, lr_bank=cfg.lr_bank, lr_logits=cfg.lr_logits, lr_other=cfg.lr_head, weight_decay=cfg.weight_decay
    )
    counts = vblora.count_parameters(model)

    def save(d: Path) -> None:
        if cfg.freeze_bank:  # a shared bank: the adapter stores its sha256; the bank file sits beside it once
            vblora.save_adapter(model, str(d), bank="reference")
            vblora.save_bank(model, str(d.parent))  # the run directory, so adapter/ holds only per-task bytes
        else:
            vblora.save_adapter(model, str(d))

    return Adapted(
        model,
        "vblora",
        groups,
        counts["trainable"],
        float(counts["stored"]),
        save,
        details={k: v for k, v in counts.items() if isinstance(v, (int, float))}
        | {"config": vcfg.to_dict(), "bank_source": bank_source, "freeze_bank": cfg.freeze_bank},
    )


def read_bank_tensor(path: str | Path) -> tuple[torch.Tensor, Path]:
    """A trained `(h, b)` bank and the file it came from: a bank file (`vblora.save_bank`, or a tensor saved with
    torch.save as bank.pt), an adapter file or directory with the bank inside, or a run directory (its adapter/)."""
    p = Path(path)
    candidates = [
        p,
        p / "bank.safetensors",
        p / "adapter" / "bank.safetensors",
        adapter_file(p),
        p / "adapter" / "adapter.safetensors",
        p / "bank.pt",
    ]
    file = next((c for c in candidates if c.is_file()), None)
    if file is None:
        raise SetupError(f"--bank {path}: no bank.safetensors, adapter.safetensors or bank.pt there")
    if file.suffix == ".pt":  # plain tensors only (weights_only): a crafted pickle runs no code, and is one error
        try:
            bank = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as e:
            raise SetupError(f"--bank {file}: not a saved bank tensor ({first_line(e)})") from None
        if not isinstance(bank, torch.Tensor) or bank.dim() != 2 or not bank.is_floating_point():
            raise SetupError(f"--bank {file}: expected one (h, b) float tensor")
        return bank, file
    if file.name == "bank.safetensors":
        return read_bank(file)[0], file
    return read_adapter(file, bank_path=file.parent)[0].bank, file


def _start_bank(model, cfg) -> str | None:
    """`--bank PATH`: copy a trained bank into the model; `--freeze-bank`: stop it training. Returns its file."""
    if cfg.freeze_bank and not cfg.bank:
        raise SetupError("--freeze-bank needs --bank PATH (a trained bank to share)")
    if not cfg.bank:
        return None
    tensor, file = read_bank_tensor(cfg.bank)
    bank = vblora.get_bank(model)
    if tuple(tensor.shape) != tuple(bank.bank.shape):
        raise SetupError(
            f"--bank {file}: bank shape {tuple(tensor.shape)} does not match --num-vectors "
            f"{bank.bank.shape[0]} x --vector-length {bank.bank.shape[1]}; set them to the bank's"
        )
    with torch.no_grad():
        bank.bank.copy_(tensor.to(bank.bank.dtype))
    if cfg.freeze_bank:
        bank.bank.requires_grad_(False)
    return str(file)


def _peft(model, cfg, peft_cfg, details: dict) -> Adapted:
    pmodel = get_peft_model(model, peft_cfg)
    adapter = [p for n, p in pmodel.named_parameters() if p.requires_grad and "modules_to_save" not in n]
    head = [p for n, p in pmodel.named_parameters() if p.requires_grad and "modules_to_save" in n]
    return _adapted(pmodel, cfg, adapter, head, lambda d: pmodel.save_pretrained(str(d)), details)


def _lora(model, cfg, targets, heads) -> Adapted:
    rank = cfg.vblora.rank  # the shared adapter knobs (rank, dropout, targets, heads) live in cfg.vblora
    return _peft(
        model,
        cfg,
        LoraConfig(
            r=rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=cfg.vblora.dropout,
            target_modules=targets,
            modules_to_save=heads or None,
        ),
        {"rank": rank, "alpha": cfg.lora_alpha},
    )


def _vera(model, cfg, targets, heads) -> Adapted:
    # save_projection=False: the frozen random projections are regenerated from the seed, so VeRA stores only
    # its scaling vectors (and the head), which is what the VeRA and VB-LoRA papers count.
    return _peft(
        model,
        cfg,
        VeraConfig(
            r=cfg.vera_rank,
            target_modules=targets,
            vera_dropout=cfg.vblora.dropout,
            modules_to_save=heads or None,
            projection_prng_key=cfg.seed,
            save_projection=False,
        ),
        {"rank": cfg.vera_rank},
    )


def _tied(model, cfg, targets, heads) -> Adapted:
    model = add_tied_lora(
        model, targets, rank=cfg.tied_rank, dropout=cfg.vblora.dropout, modules_to_save=heads, seed=cfg.seed
    )
    head = [p for h in heads for p in model.get_submodule(h).parameters()]
    head_ids = {id(p) for p in head}
    adapter = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]

    def save(d: Path) -> None:
        d.mkdir(parents=True, exist_ok=True)
        sd = {k: v.detach().contiguous() for k, v in model.named_parameters() if v.requires_grad}
        save_file(sd, str(d / "tied_lora.safetensors"))
        (d / "adapter_config.json").write_text(
            json.dumps(
                {"method": "tied-lora", "rank": cfg.tied_rank, "targets": targets, "modules_to_save": heads}, indent=2
            )
        )

    return _adapted(model, cfg, adapter, head, save, {"rank": cfg.tied_rank})


def adapter_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file()) if Path(d).is_dir() else 0
