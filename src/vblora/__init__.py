"""vblora: VB-LoRA (Li, Han, Ji, NeurIPS 2024) for any PyTorch / Hugging Face model.

Every LoRA matrix of the model is cut into sub-vectors of length b, each a top-k softmax mix of vectors from one
bank shared by all modules and layers. Public API only; see docs/ and the README.
"""

from vblora.bank import VectorBank, compose
from vblora.config import VBLoRAConfig
from vblora.errors import (AdapterFormatError, ConfigError, NonFiniteError, QuantizedBaseError, TargetError,
                           VBLoRAError)
from vblora.inject import (
    add_vblora,
    adapted_layers,
    count_parameters,
    disable_adapter,
    get_bank,
    merge,
    parameter_groups,
    unload,
    unmerge,
)
from vblora.storage import (export_lora, export_peft, import_peft, load_adapter, load_checkpoint, merge_and_save,
                            save_adapter, save_bank, save_checkpoint)
from vblora.version import __version__

__all__ = [
    "VBLoRAConfig",
    "VectorBank",
    "compose",
    "add_vblora",
    "adapted_layers",
    "get_bank",
    "parameter_groups",
    "count_parameters",
    "merge",
    "unmerge",
    "disable_adapter",
    "unload",
    "VBLoRAError",
    "ConfigError",
    "TargetError",
    "NonFiniteError",
    "AdapterFormatError",
    "QuantizedBaseError",
    "save_adapter",
    "load_adapter",
    "save_bank",
    "export_peft",
    "import_peft",
    "export_lora",
    "merge_and_save",
    "save_checkpoint",
    "load_checkpoint",
    "AdapterTrainer",
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
