"""`vblora import-peft PEFT_DIR --base BASE -o OUT`: an HF PEFT VB-LoRA adapter directory (either variant) as a
vblora adapter file, checked against the base model it belongs to."""

from __future__ import annotations


def run(args) -> int:
    from vblora.commands.export import load_adapter_base
    from vblora.storage import import_peft, save_adapter
    from vblora.storage.peft_vblora import read_peft

    snap = read_peft(args.peft_dir)
    snap.architecture = args.model_class or snap.architecture
    model = import_peft(load_adapter_base(args.base, snap), args.peft_dir)
    out = save_adapter(model, args.output, precision=args.precision, pack_indices=args.pack_indices)
    print(f"wrote {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("import-peft", help="convert an HF PEFT VB-LoRA adapter directory to a vblora file")
    p.add_argument("peft_dir")
    p.add_argument(
        "--base",
        default=None,
        help="base model directory (transformers from_pretrained); default: the adapter's base_model_name_or_path",
    )
    p.add_argument("-o", "--output", required=True, help="output directory (adapter.safetensors is written there)")
    p.add_argument("--model-class", default=None, help="transformers class of the base (default: from the adapter)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"])
    p.add_argument("--pack-indices", action="store_true")
    p.set_defaults(func=run)
