"""Which finished run a study may reuse: every study (compare, ablate, shared bank) writes one results.json per
run, and a study started again continues where it stopped, but only over runs made with the same settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from vblora.config import VBLoRAConfig

# Settings that only one method reads: a LoRA run is still valid when, say, the recipe's bank size changed.
# Every method reads the shared adapter knobs (targets, rank, dropout, heads); the rest of VBLoRAConfig is VB-LoRA's.
_SHARED = {"target_modules", "rank", "dropout", "layers", "modules_to_save"}
_ONLY_FOR = {
    "vblora": {f.name for f in dataclasses.fields(VBLoRAConfig)} - _SHARED - {"seed"}
    | {"bank", "freeze_bank", "record_selection_every", "lr_bank", "lr_logits", "extra_eval_topk"},
    "lora": {"lora_alpha"},
    "vera": {"vera_rank"},
    "tied-lora": {"tied_rank"},
}
_BOOKKEEPING = {"output", "overwrite", "resume", "resume_partial", "logging_steps", "save_steps"}


def result_settings(config: dict) -> dict:
    """The settings that decide a run's result, as JSON stores them (bookkeeping and other methods' knobs left out)."""
    method = config.get("method")
    skip = _BOOKKEEPING | {k for m, keys in _ONLY_FOR.items() if m != method for k in keys}
    return {k: v for k, v in json.loads(json.dumps(config, default=str)).items() if k not in skip}


def finished(run_dir: str | Path, cfg, log=print) -> dict | None:
    """The results of the run in `run_dir` if it finished with the settings of `cfg` (a RunConfig), else None.

    A results.json written with other settings (a changed recipe or flag) or one that cannot be read is not reused:
    the run is done again and overwrites it, and the log says so."""
    f = Path(run_dir) / "results.json"
    if not f.exists():
        return None
    try:
        old = json.loads(f.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:  # damaged by hand or by the disk
        log(f"{f} cannot be read ({e}); running again")
        return None
    if not isinstance(old, dict) or result_settings(old.get("config") or {}) != result_settings(cfg.to_dict()):
        log(f"{f} has other settings; running again")
        return None
    log(f"reusing {f}")
    return old
