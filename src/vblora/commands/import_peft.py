"""`vblora import-peft PEFT_DIR --base BASE -o OUT`: an HF PEFT VB-LoRA adapter directory (either variant) as a
vblora adapter file, checked against the base model it belongs to."""

from __future__ import annotations


def run(args) -> int:
    from vblora.commands.export import load_base
    from vblora.storage.peft_vblora import import_peft, read_peft_dir
    from vblora.storage import save_adapter

    conf, _, _ = read_peft_dir(args.peft_dir)
    architecture = args.model_class or (conf.get("auto_mapping") or {}).get("base_model_class")
    model = import_peft(load_base(args.base, architecture), args.peft_dir)
    out = save_adapter(model, args.output, precision=args.precision, pack_indices=args.pack_indices)
    print(f"wrote {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("import-peft", help="convert an HF PEFT VB-LoRA adapter directory to a vblora file")
    p.add_argument("peft_dir")
    p.add_argument("--base", required=True, help="base model directory (transformers from_pretrained)")
    p.add_argument("-o", "--output", required=True, help="output directory (adapter.safetensors is written there)")
    p.add_argument("--model-class", default=None, help="transformers class of the base (default: from the adapter)")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16", "int8"])
    p.add_argument("--pack-indices", action="store_true")
    p.set_defaults(func=run)
