"""`vblora serve --model PATH --adapters DIR`: an OpenAI-compatible HTTP server over one base model and every
VB-LoRA adapter in DIR (each named by its sub-directory or file stem); the request's `model` picks the adapter.
docs/serving.md has the API, the batching and the road to vLLM."""

from __future__ import annotations

import socket
import sys


def check_port(host: str, port: int) -> None:
    from vblora.train.errors import SetupError

    if not 0 <= port <= 65535:
        raise SetupError(f"--port {port} is not a port number (0-65535)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SetupError(f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host") \
                from None


def load_base(args):
    import torch

    from vblora.train.errors import SetupError
    from vblora.train.models import load_model, load_tokenizer, resolve_model

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path, gguf = resolve_model(args.model, args.gguf_file)
    tokenizer = load_tokenizer(path, gguf)
    model = load_model(path, gguf, "causal-lm")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        model = model.to(device=device, dtype=getattr(torch, args.dtype)).eval()
    except (RuntimeError, AssertionError) as e:  # e.g. --device cuda on a machine without one
        raise SetupError(f"cannot place the model on --device {device}: {e}") from None
    return model, tokenizer


def run(args) -> int:
    from pathlib import Path

    from vblora.train.errors import SetupError

    import fastapi  # noqa: F401  (the serve extra: a missing one is named by cli.EXTRAS in one line)
    import uvicorn  # noqa: F401
    if args.adapters is not None and not Path(args.adapters).is_dir():
        raise SetupError(f"--adapters '{args.adapters}' is not a directory (give the directory holding one "
                         f"sub-directory or .safetensors file per adapter)")
    minimum = {"max_batch": 1, "max_queue": 0, "max_tokens_default": 1, "cache_mb": 1, "threads": 1}
    for name, least in minimum.items():
        value = getattr(args, name)
        if value is not None and value < least:  # --threads may be left to torch (None)
            raise SetupError(f"--{name.replace('_', '-')} must be >= {least}")
    check_port(args.host, args.port)

    from vblora.serve import AdapterStore
    from vblora.serve.server import Engine, create_app, serve

    model, tokenizer = load_base(args)
    store = AdapterStore(model, args.adapters, cache_bytes=args.cache_mb << 20)
    for name, problem in store.problems().items():
        print(f"vblora serve: warning: adapter '{name}' cannot be served: {problem}", file=sys.stderr)
    engine = Engine(model, tokenizer, store, base_name=args.served_model_name or args.model,
                    max_batch=args.max_batch, max_waiting=args.max_queue, max_model_len=args.max_model_len,
                    default_max_tokens=args.max_tokens_default)
    print(f"vblora serve: {engine.base_name} ({model.device}, {args.dtype}) with {len(store.names())} adapter(s) "
          f"on http://{args.host}:{args.port}/v1 (max batch {args.max_batch}, queue {args.max_queue}, "
          f"context {engine.max_model_len})", file=sys.stderr)
    serve(create_app(engine, api_key=args.api_key), args.host, args.port, log_level=args.log_level)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("serve", help="OpenAI-compatible server: one base model, many VB-LoRA adapters, "
                                            "continuous batching across adapters")
    p.add_argument("--model", required=True, help="base model: a local transformers directory, or the offline "
                                                   "aliases 'smollm2' / 'minilm'")
    p.add_argument("--adapters", default=None, help="directory of adapters: one sub-directory or .safetensors "
                                                    "file per adapter, named by it (native or PEFT VB-LoRA)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine "
                                                       "only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: --model "
                                                            "as given); requests naming it use no adapter")
    p.add_argument("--max-batch", type=int, default=32, help="requests decoded together (default 32)")
    p.add_argument("--max-queue", type=int, default=256, help="requests waiting for a batch slot before new ones "
                                                             "get 429 (default 256)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit for prompt + completion "
                                                                  "(default: the model's max_position_embeddings)")
    p.add_argument("--max-tokens-default", type=int, default=256, help="chat completions' max_tokens when the "
                                                                      "request gives none (default 256)")
    p.add_argument("--cache-mb", type=int, default=64, help="memory for composed adapters, least recently used "
                                                           "evicted (default 64 MiB)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="weights and activations (default float32)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice, one "
                                                             "per core; 1 on a machine shared with other jobs)")
    p.add_argument("--gguf-file", default=None, help="GGUF file inside --model, if the model is one")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1 (health and "
                                                   "metrics stay open)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default info)")
    p.set_defaults(func=run)
