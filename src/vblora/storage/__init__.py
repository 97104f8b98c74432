"""Adapters on disk, one module per format:

- `native`: the paper's stored triplet in one safetensors file (and shared bank files)
- `peft_vblora`: HF PEFT's VB-LoRA adapter directory, both directions
- `lora`: an exact plain LoRA adapter in HF PEFT's LoRA format (export)
- `merged`: the merged full model (export)
- `checkpoint`: resumable training checkpoints of any method

Each format encodes or decodes an `AdapterSnapshot` (`snapshot`); `files` and `encoding` hold the safe file I/O and
the compact integer encodings they share.
"""

from vblora.storage.checkpoint import load_checkpoint, save_checkpoint
from vblora.storage.lora import export_lora
from vblora.storage.merged import merge_and_save, merged_state_dict
from vblora.storage.native import adapter_file, load_adapter, read_adapter, read_bank, save_adapter, save_bank
from vblora.storage.peft_vblora import export_peft, import_peft
from vblora.storage.snapshot import AdapterSnapshot, take_snapshot

__all__ = [
    "AdapterSnapshot",
    "adapter_file",
    "export_lora",
    "export_peft",
    "import_peft",
    "load_adapter",
    "load_checkpoint",
    "merge_and_save",
    "merged_state_dict",
    "read_adapter",
    "read_bank",
    "save_adapter",
    "save_bank",
    "save_checkpoint",
    "take_snapshot",
]
