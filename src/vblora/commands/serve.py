"""`vblora serve --model PATH --adapters DIR`: vLLM's OpenAI server over one base model, serving every VB-LoRA adapter
in DIR by name through the vblora resolver plugin (`vblora.serve.vllm_plugin`). One command for the common case:
it finds vLLM's interpreter, picks `--max-lora-rank` from the adapters' headers, keeps the API key out of the
process list, and then becomes vLLM's server (exec). docs/serving.md has the details and the measurements that
chose vLLM as the engine."""

from __future__ import annotations

import ipaddress
import os
import shlex
import socket
import sys
from pathlib import Path

# the environment `--print-command` shows (the API key never: it stays in the environment of the exec'd server)
PRINTED_SETTINGS = (
    "VLLM_PLUGINS",
    "VLLM_ALLOW_RUNTIME_LORA_UPDATING",
    "VBLORA_ADAPTERS",
    "VBLORA_SERVED_MODEL",
    "VBLORA_LORA_CACHE",
    "VBLORA_LORA_CACHE_BYTES",
    "VBLORA_MAX_BODY_BYTES",
    "VBLORA_ALLOW_LOAD_ENDPOINT",
    "VLLM_TARGET_DEVICE",
    "VLLM_CPU_KVCACHE_SPACE",
)


def check_port(host: str, port: int) -> None:
    """One line (not vLLM's traceback after its start-up) when the address cannot be listened on."""
    from vblora.train.errors import SetupError

    if not 0 <= port <= 65535:
        raise SetupError(f"--port {port} is not a port number (0-65535)")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as e:
            raise SetupError(
                f"cannot listen on {host}:{port} ({e.strerror}); choose another --port or --host"
            ) from None


def check_bytes(given: str | None, flag: str, env: str) -> None:
    """VBLoRAError naming the flag, or else the environment variable, whose byte count is not one."""
    from vblora.serve.lora_dirs import parse_bytes

    if given is not None:
        parse_bytes(given, flag)
    elif os.environ.get(env):
        parse_bytes(os.environ[env], env)


def largest_rank(adapters: Path) -> int:
    """The largest rank among the adapters of the directory (their headers only), 8 if none is readable."""
    from vblora.serve.sources import discover

    ranks = [
        int(s.summary["rank"])
        for s in discover(adapters)[0].values()
        if s.error is None and isinstance(s.summary.get("rank"), int)
    ]
    return max(ranks, default=8)


def served_model(model: str) -> str:
    """A directory vLLM can load: `model` itself, or the fp32 copy of an offline alias (`smollm2`; written once)."""
    from vblora.train.models import resolve_model, transformers_checkpoint

    return transformers_checkpoint(*resolve_model(model, None), "vblora serve (vLLM)")


def api_key(args) -> str | None:
    """The API key: --api-key-file, else VBLORA_API_KEY / VLLM_API_KEY (never on the command line, where `ps`
    shows it to every user of the machine)."""
    from vblora.train.errors import SetupError

    if args.api_key_file:
        try:
            key = Path(args.api_key_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise SetupError(f"--api-key-file {args.api_key_file}: cannot read it ({e})") from None
        if not key:
            raise SetupError(f"--api-key-file {args.api_key_file} is empty")
        return key
    return os.environ.get("VBLORA_API_KEY") or os.environ.get("VLLM_API_KEY") or None


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args) -> int:
    from vblora.serve.vllm_launch import vllm_command, vllm_python
    from vblora.train.errors import SetupError

    adapters = Path(args.adapters)
    if not adapters.is_dir():
        raise SetupError(
            f"--adapters '{adapters}' is not a directory (give the directory holding one "
            f"sub-directory or .safetensors file per adapter)"
        )
    check_port(args.host, args.port)
    # a bad bound, given or in the environment, is one line here, before vLLM starts
    check_bytes(args.lora_cache_bytes, "--lora-cache-bytes", "VBLORA_LORA_CACHE_BYTES")
    check_bytes(args.max_body_bytes, "--max-body-bytes", "VBLORA_MAX_BODY_BYTES")
    python = vllm_python(args.vllm_python)
    key = api_key(args)
    extra = list(args.vllm_args)
    if args.served_model_name:
        extra += ["--served-model-name", args.served_model_name]
    if args.max_model_len:
        extra += ["--max-model-len", str(args.max_model_len)]
    if args.max_loras:
        extra += ["--max-loras", str(args.max_loras)]
    if key is not None:
        extra.append("--disable-fastapi-docs")  # vLLM guards /v1 only: /docs and /openapi.json would stay open
    elif not is_loopback(args.host):
        print(
            f"vblora serve: warning: listening on {args.host} without an API key: anyone who reaches this port "
            f"can use the server (set VBLORA_API_KEY or --api-key-file)",
            file=sys.stderr,
        )
    argv, env = vllm_command(
        python,
        served_model(args.model),
        adapters,
        host=args.host,
        port=args.port,
        rank=args.max_lora_rank or largest_rank(adapters),
        cache=args.lora_cache,
        cache_bytes=args.lora_cache_bytes,
        max_body_bytes=args.max_body_bytes,
        allow_load_endpoint=args.allow_load_endpoint,
        dtype=args.dtype,
        extra=extra,
    )
    if key is not None:
        env["VLLM_API_KEY"] = key
    if args.print_command:
        settings = [f"{k}={shlex.quote(env[k])}" for k in PRINTED_SETTINGS if k in env]
        print(" ".join(settings), shlex.join(argv))  # quoted: it runs as printed, spaces in paths included
        return 0
    sys.stdout.flush()
    sys.stderr.flush()
    # vLLM's server replaces this process (signals and exit code are its own); PATH is searched, as the probe did
    os.execvpe(argv[0], argv, env)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="vLLM's OpenAI server with every VB-LoRA adapter of a directory served "
        "by name (the vblora resolver plugin)",
    )
    p.add_argument(
        "--model", required=True, help="base model: a local transformers directory, or the offline alias 'smollm2'"
    )
    p.add_argument(
        "--adapters",
        required=True,
        help="directory of adapters: one sub-directory or .safetensors file "
        "per adapter, named by it (native, PEFT VB-LoRA, shared bank)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API")
    p.add_argument(
        "--max-lora-rank",
        type=int,
        default=None,
        help="largest adapter rank to serve (default: the largest in --adapters; rounded up to vLLM's values)",
    )
    p.add_argument("--max-loras", type=int, default=None, help="adapters in one batch (vLLM's --max-loras)")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit (vLLM's --max-model-len)")
    p.add_argument(
        "--dtype",
        default="auto",
        help="vLLM's --dtype (default auto; float32 for exact parity with transformers in fp32)",
    )
    p.add_argument(
        "--lora-cache",
        default=None,
        help="where composed LoRA directories are kept (default ~/.cache/vblora/vllm-lora; VBLORA_LORA_CACHE)",
    )
    p.add_argument(
        "--lora-cache-bytes", default=None, help="bound of that cache, e.g. 4G (default 4 GiB; VBLORA_LORA_CACHE_BYTES)"
    )
    p.add_argument(
        "--max-body-bytes",
        default=None,
        help="largest request body accepted, e.g. 16M (default 16 MiB; VBLORA_MAX_BODY_BYTES): larger ones get 413 "
        "before vLLM reads them",
    )
    p.add_argument(
        "--allow-load-endpoint",
        action="store_true",
        help="open vLLM's /v1/load_lora_adapter (closed by default: it loads a LoRA directory from any path the "
        "server can read; adapters are served by name from --adapters)",
    )
    p.add_argument(
        "--api-key-file",
        default=None,
        help="file holding the API key required on /v1 (or set "
        "VBLORA_API_KEY); /docs and /openapi.json are then disabled",
    )
    p.add_argument(
        "--vllm-python",
        default=None,
        help="interpreter of the environment holding vLLM and vblora (default: VBLORA_VLLM_PYTHON, else this one)",
    )
    p.add_argument("--print-command", action="store_true", help="print the vLLM command and exit")
    p.add_argument("vllm_args", nargs="*", help="after --: more vLLM arguments, passed as they are")
    p.set_defaults(func=run)
