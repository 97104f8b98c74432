"""vblora: VB-LoRA (Li, Han, Ji, NeurIPS 2024) for any PyTorch / Hugging Face model.

Every LoRA matrix of the model is cut into sub-vectors of length b, each a top-k softmax mix of vectors from one
bank shared by all modules and layers. Public API only; see docs/ and the README.
"""

from vblora.bank import VectorBank, compose
from vblora.config import VBLoRAConfig
from vblora.errors import AdapterFormatError, ConfigError, NonFiniteError, QuantizedBaseError, TargetError, VBLoRAError
from vblora.inject import (
    adapted_layers,
    add_vblora,
    count_parameters,
    disable_adapter,
    get_bank,
    merge,
    parameter_groups,
    unload,
    unmerge,
)
from vblora.storage import (
    export_lora,
    export_peft,
    import_peft,
    load_adapter,
    load_checkpoint,
    merge_and_save,
    save_adapter,
    save_bank,
    save_checkpoint,
)
from vblora.version import __version__ as __version__  # the `as` re-exports it (PEP 484): vblora.__version__

__all__ = [
    "AdapterFormatError",
    "AdapterTrainer",
    "ConfigError",
    "NonFiniteError",
    "QuantizedBaseError",
    "TargetError",
    "VBLoRAConfig",
    "VBLoRAError",
    "VectorBank",
    "adapted_layers",
    "add_vblora",
    "compose",
    "count_parameters",
    "disable_adapter",
    "export_lora",
    "export_peft",
    "get_bank",
    "import_peft",
    "load_adapter",
    "load_checkpoint",
    "merge",
    "merge_and_save",
    "parameter_groups",
    "save_adapter",
    "save_bank",
    "save_checkpoint",
    "unload",
    "unmerge",
]


def __getattr__(name: str):
    """`vblora.AdapterTrainer` (vblora/integrations.py), imported on first use: it needs transformers, and
    `import vblora` needs torch alone."""
    if name == "AdapterTrainer":
        try:
            from vblora.integrations import AdapterTrainer
        except ImportError as e:
            raise ImportError(f"vblora.AdapterTrainer needs transformers ({e}): pip install transformers") from None
        return AdapterTrainer
    raise AttributeError(f"module 'vblora' has no attribute {name!r}")
