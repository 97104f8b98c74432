"""Guards in front of vLLM's OpenAI server, as ASGI middleware that `vblora serve` gives vLLM through its public
`--middleware` option (an import path; vLLM calls `app.add_middleware(cls)`, which puts them outside vLLM's own).
Plain ASGI: no vLLM needed to import or test them.

- `BodyLimit`: a request body over VBLORA_MAX_BODY_BYTES (default 16 MiB; suffixes K, M, G) is a 413 before vLLM
  reads it. vLLM reads any body whole first: a 200 MB body in a field it ignores was accepted (2.3 s, `/health`
  delayed up to 1.5 s meanwhile). A body with a Content-Length over the bound is refused unread; a chunked one
  (Transfer-Encoding, which overrides any Content-Length) is read up to the bound, refused past it, and otherwise
  handed on as it came.
- `RouteGuard`: routes that load a LoRA directory from any path the server can read are a 403 unless
  VBLORA_ALLOW_LOAD_ENDPOINT=1: `/v1/load_lora_adapter` (resolver plugins need VLLM_ALLOW_RUNTIME_LORA_UPDATING=1,
  which also opens it) and `POST /adapters`, the same handler on vLLM's SageMaker route, which vLLM's API key does
  not cover. With an API key set (VLLM_API_KEY), the other SageMaker routes outside the key's reach are a 403 too:
  `/invocations` (inference) and `/adapters/NAME` (unload). Adapters served through the plugin come from
  VBLORA_ADAPTERS only; `/v1/unload_lora_adapter` stays open (it makes a replaced adapter file be read again).
"""

from __future__ import annotations

import json
import os

from vblora.errors import VBLoRAError
from vblora.serve.lora_dirs import parse_bytes

MAX_BODY_ENV = "VBLORA_MAX_BODY_BYTES"
DEFAULT_MAX_BODY = "16M"
ALLOW_LOAD_ENV = "VBLORA_ALLOW_LOAD_ENDPOINT"
LOAD_ROUTES = ("/v1/load_lora_adapter", "/adapters")  # load from any path; the second is outside the API key
UNKEYED_ROUTES = ("/invocations",)  # vLLM's SageMaker inference route: outside its API key (which guards /v1 ...)
UNKEYED_PREFIXES = ("/adapters/",)  # DELETE /adapters/NAME (unload), the same


async def send_error(send, status: int, kind: str, message: str) -> None:
    """An error response in the OpenAI shape vLLM uses (`{"error": {"message", "type", "param", "code"}}`); the
    connection is closed after it (a refused body may still be on its way)."""
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": status}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": [*headers, (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def body_bound(environ=os.environ) -> int:
    """The bound VBLORA_MAX_BODY_BYTES sets (VBLoRAError naming the setting if it is not a byte count)."""
    return parse_bytes(environ.get(MAX_BODY_ENV) or DEFAULT_MAX_BODY, MAX_BODY_ENV)


def header(scope, name: bytes) -> bytes | None:
    return next((v for k, v in scope.get("headers", ()) if k.lower() == name), None)


class BodyLimit:
    """ASGI middleware: HTTP requests whose body is over `max_bytes` (default: `body_bound()`) get a 413 in the
    OpenAI error shape vLLM uses; everything else passes through."""

    def __init__(self, app, max_bytes: int | None = None) -> None:
        self.app = app
        try:
            self.max_bytes = body_bound() if max_bytes is None else max_bytes
        except VBLoRAError as e:  # inside vLLM's start-up: one line, not its traceback
            raise SystemExit(f"vblora: {e}") from None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = header(scope, b"content-length")
        if length is not None and header(scope, b"transfer-encoding") is None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self.refuse(send)
                return
            await self.app(scope, receive, send)  # the server delivers no more than the declared length
            return
        # chunked, or no length: read up to the bound, then replay what was read
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":  # the client went away
                break
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self.refuse(send)
                return
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def replayed():
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)

    async def refuse(self, send) -> None:
        message = (
            f"request body over {self.max_bytes} bytes; send less, or raise {MAX_BODY_ENV} "
            f"(vblora serve --max-body-bytes)"
        )
        await send_error(send, 413, "RequestTooLarge", message)


class RouteGuard:
    """ASGI middleware: the routes that load adapters from any path answer 403 unless `allow_load` (default:
    VBLORA_ALLOW_LOAD_ENDPOINT=1); with an API key (`keyed`, default: VLLM_API_KEY set), so do the SageMaker routes
    vLLM's key check leaves open. Everything else passes through."""

    def __init__(self, app, allow_load: bool | None = None, keyed: bool | None = None) -> None:
        self.app = app
        self.allow_load = os.environ.get(ALLOW_LOAD_ENV) == "1" if allow_load is None else allow_load
        self.keyed = bool(os.environ.get("VLLM_API_KEY")) if keyed is None else keyed

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        # as vLLM's own key check reads it: the path under --root-path
        path = scope.get("path", "").removeprefix(scope.get("root_path", "")).rstrip("/") or "/"
        if path in LOAD_ROUTES and not self.allow_load:
            message = (
                f"{path} is closed: it loads a LoRA directory from any path the server can read; adapters are "
                f"served by name from VBLORA_ADAPTERS. Open it with {ALLOW_LOAD_ENV}=1 (vblora serve "
                f"--allow-load-endpoint)"
            )
            await send_error(send, 403, "PermissionDenied", message)
        elif self.keyed and (path in UNKEYED_ROUTES or path.startswith(UNKEYED_PREFIXES)):
            message = (
                f"{path} is closed: vLLM's API key does not guard it; use the OpenAI routes under /v1 with the key"
            )
            await send_error(send, 403, "PermissionDenied", message)
        else:
            await self.app(scope, receive, send)
