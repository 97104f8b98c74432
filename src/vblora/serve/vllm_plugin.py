"""vLLM serves VB-LoRA adapters by name: a LoRA resolver plugin (vLLM's public `LoRAResolver` interface).

Installed as the `vblora` entry point of the `vllm.general_plugins` group. Started with

    VLLM_PLUGINS=vblora VLLM_ALLOW_RUNTIME_LORA_UPDATING=1 VBLORA_ADAPTERS=adapters/ \
        python -m vllm.entrypoints.openai.api_server --model BASE --enable-lora --max-lora-rank 8

a request for `model: "NAME"` that vLLM does not know yet reaches `resolve_lora`: the adapter NAME is found in
VBLORA_ADAPTERS the way `vblora serve` finds it, verified against the served base, composed exactly into a plain
LoRA directory in VBLORA_LORA_CACHE (bounded by VBLORA_LORA_CACHE_BYTES), and handed to vLLM as a `LoRARequest`
(`vblora.serve.lora_dirs` says what is checked). An unknown name gives vLLM's 404; an adapter that exists but
cannot be served gives a 400 naming the reason; either way the server goes on serving. vLLM keeps a resolved name
until `/v1/unload_lora_adapter`; after that (or a restart) the next request resolves the file again.
"""

from __future__ import annotations

import asyncio
import logging
import os

from vllm.exceptions import VLLMValidationError
from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

from vblora.errors import VBLoRAError
from vblora.serve.lora_dirs import LoRADirCache, cache_from_env

# under vLLM's logger: its handler and VLLM_LOGGING_LEVEL apply, so the plugin's lines (info included) are in the
# server's log; a logger outside "vllm" has no handler there and its info lines were dropped
logger = logging.getLogger("vllm.vblora")
RESOLVER_NAME = "vblora"


class VBLoRAResolver(LoRAResolver):
    """Resolves adapter names through a `LoRADirCache`; the blocking work runs in a thread, off vLLM's event
    loop."""

    def __init__(self, cache: LoRADirCache) -> None:
        self.cache = cache

    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        try:
            found = await asyncio.to_thread(self.cache.resolve, lora_name, base_model_name)
        except (OSError, VBLoRAError) as e:  # AdapterFormatError is a VBLoRAError
            logger.warning("vblora: adapter %r refused: %s", lora_name, e)
            raise VLLMValidationError(f"adapter '{lora_name}' cannot be served: {e}", parameter="model") from None
        if found is None:
            return None
        if self.cache.over_bound:
            logger.warning(
                "vblora: the LoRA cache %s holds %d bytes over VBLORA_LORA_CACHE_BYTES=%d in adapters "
                "this server handed to vLLM (kept: vLLM reloads them from there)",
                self.cache.cache,
                self.cache.over_bound,
                self.cache.max_bytes,
            )
        logger.info(
            "vblora: adapter %r -> %s (rank %d, %s in %.3f s: %s)",
            lora_name,
            found.path,
            found.rank,
            "cached" if found.cached else "composed",
            found.seconds,
            ", ".join(f"{step} {s:.3f}" for step, s in found.steps.items()),
        )
        # lora_int_id: vLLM replaces it with its own counter's value (OpenAIServingModels.resolve_lora)
        return LoRARequest(
            lora_name=lora_name, lora_int_id=1, lora_path=str(found.path), base_model_name=base_model_name
        )


def register() -> None:
    """The entry point vLLM calls in each of its processes. Without VBLORA_ADAPTERS it registers nothing (vLLM loads
    every installed plugin when VLLM_PLUGINS is unset: having vblora installed must not stop an unrelated server);
    with it, it registers the resolver, or stops the start-up with one line if the setting is wrong. With
    VBLORA_SERVED_MODEL (the `--model` vLLM serves; `vblora serve` sets it) the base model the adapters are checked
    against is made ready here, so the first adapter request does not wait for it."""
    if not os.environ.get("VBLORA_ADAPTERS"):
        logger.info("vblora: VBLORA_ADAPTERS is not set; the VB-LoRA resolver is not registered")
        return
    try:
        cache = cache_from_env()
    except VBLoRAError as e:  # vLLM's plugin loader would print a traceback: one line instead
        raise SystemExit(f"vblora plugin: {e}") from None
    served = os.environ.get("VBLORA_SERVED_MODEL")
    if served:  # the base check's model built now (0.1-0.2 s of the start-up), not in the first adapter's request
        try:
            cache.base(served)
        except Exception as e:  # an optimisation only: whatever fails here is retried on the first adapter request
            logger.warning(
                "vblora: the base check for %s is built on the first adapter request instead (%s)", served, e
            )
    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, VBLoRAResolver(cache))
