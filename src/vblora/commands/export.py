"""`vblora export PATH --to peft|lora|merged -o OUT`: an adapter file as an HF PEFT VB-LoRA directory, an exact
plain-LoRA directory, or (with `--base`) the merged full model."""

from __future__ import annotations

from typing import Any


def load_adapter_base(base: str | None, snap):
    """A transformers model from a local directory (`base`, else the one the adapter records), of the class the
    adapter was saved from when known, with the adapter's classifier size."""
    from vblora.errors import VBLoRAError

    base = base or snap.name_or_path
    if not base:
        raise VBLoRAError("give --base (the base model's directory): the adapter records none")
    import transformers

    cls = getattr(transformers, snap.architecture, None) if snap.architecture else None
    cls = cls if cls is not None and hasattr(cls, "from_pretrained") else transformers.AutoModel
    kwargs: dict[str, Any] = (
        {"num_labels": len(snap.id2label), "id2label": {int(k): v for k, v in snap.id2label.items()}}
        if snap.id2label
        else {}
    )
    return cls.from_pretrained(base, **kwargs).eval()


def run(args) -> int:
    from vblora.storage import export_lora, export_peft, load_adapter, merge_and_save, read_adapter

    snap, _ = read_adapter(args.path, bank_path=args.bank)
    if args.to == "peft":
        out = export_peft(snap, args.output, save_only_topk_weights=args.topk_only)
    elif args.to == "lora":
        out = export_lora(snap, args.output)
    else:
        model = load_adapter(
            load_adapter_base(args.base, snap),
            args.path,
            bank_path=args.bank,
            verify_weights=not args.ignore_base_weights,
        )
        out = merge_and_save(model, args.output)
    print(f"wrote {args.to} to {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("export", help="convert an adapter file to PEFT VB-LoRA, plain LoRA, or a merged model")
    p.add_argument("path", help="adapter directory or .safetensors file")
    p.add_argument("--to", choices=["peft", "lora", "merged"], required=True)
    p.add_argument("-o", "--output", required=True, help="output directory")
    p.add_argument("--topk-only", action="store_true", help="peft: PEFT's save_only_topk_weights variant")
    p.add_argument(
        "--base",
        default=None,
        help="merged: base model directory (transformers from_pretrained); "
        "default: the base model recorded in the adapter",
    )
    p.add_argument(
        "--ignore-base-weights",
        action="store_true",
        help="merged: load onto a base whose weights differ from those the adapter was trained on",
    )
    p.add_argument("--bank", default=None, help="shared bank file, for adapters saved with bank='reference'")
    p.set_defaults(func=run)
