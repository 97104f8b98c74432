"""Guards in front of vLLM's OpenAI server, as ASGI middleware that `vblora serve` gives vLLM through its public
`--middleware` option (an import path; vLLM calls `app.add_middleware(cls)`, which puts them outside vLLM's own).
Plain ASGI: no vLLM needed to import or test them.

- `BodyLimit`: a request body over VBLORA_MAX_BODY_BYTES (default 16 MiB; suffixes K, M, G) is a 413 before vLLM
  reads it. vLLM reads any body whole first: a 200 MB body in a field it ignores was accepted (2.3 s, `/health`
  delayed up to 1.5 s meanwhile). A body with a Content-Length over the bound is refused unread; one without
  (chunked) is read up to the bound, refused past it, and otherwise handed on as it came.
- `LoadEndpointGuard`: `/v1/load_lora_adapter` is a 403 unless VBLORA_ALLOW_LOAD_ENDPOINT=1. Resolver plugins need
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=1, which also opens that endpoint, and it loads a LoRA directory from any path
  the server can read; adapters served through the plugin come from VBLORA_ADAPTERS only. `/v1/unload_lora_adapter`
  stays open (it makes a replaced adapter file be read again).
"""

from __future__ import annotations

import json
import os

from vblora.serve.lora_dirs import parse_bytes

MAX_BODY_ENV = "VBLORA_MAX_BODY_BYTES"
DEFAULT_MAX_BODY = "16M"
ALLOW_LOAD_ENV = "VBLORA_ALLOW_LOAD_ENDPOINT"
LOAD_ENDPOINT = "/v1/load_lora_adapter"


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


class BodyLimit:
    """ASGI middleware: HTTP requests whose body is over `max_bytes` (default: `body_bound()`) get a 413 in the
    OpenAI error shape vLLM uses; everything else passes through."""

    def __init__(self, app, max_bytes: int | None = None) -> None:
        self.app = app
        self.max_bytes = body_bound() if max_bytes is None else max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = next((v for k, v in scope.get("headers", ()) if k.lower() == b"content-length"), None)
        if length is not None:
            if not length.isdigit() or int(length) > self.max_bytes:
                await self.refuse(send)
                return
            await self.app(scope, receive, send)
            return
        # no Content-Length (chunked): read up to the bound, then replay what was read
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


class LoadEndpointGuard:
    """ASGI middleware: `/v1/load_lora_adapter` answers 403 unless `allow` (default: VBLORA_ALLOW_LOAD_ENDPOINT=1);
    everything else passes through."""

    def __init__(self, app, allow: bool | None = None) -> None:
        self.app = app
        self.allow = os.environ.get(ALLOW_LOAD_ENV) == "1" if allow is None else allow

    async def __call__(self, scope, receive, send) -> None:
        # endswith: under vLLM's --root-path the path carries the prefix too
        if self.allow or scope["type"] != "http" or not scope.get("path", "").rstrip("/").endswith(LOAD_ENDPOINT):
            await self.app(scope, receive, send)
            return
        message = (
            f"{LOAD_ENDPOINT} is closed: it loads a LoRA directory from any path the server can read; adapters are "
            f"served by name from VBLORA_ADAPTERS. Open it with {ALLOW_LOAD_ENV}=1 (vblora serve --allow-load-endpoint)"
        )
        await send_error(send, 403, "PermissionDenied", message)
