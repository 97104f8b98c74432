"""A bound on request bodies for vLLM's OpenAI server: an ASGI middleware that answers 413 to a body over
VBLORA_MAX_BODY_BYTES (default 16 MiB; suffixes K, M, G) before vLLM reads it.

vLLM's server reads any body whole before looking at it: a 200 MB body in a field it ignores was accepted (2.3 s,
`/health` delayed up to 1.5 s meanwhile, docs/serving.md's security table). `vblora serve` adds this class with
vLLM's public `--middleware` option (an import path; vLLM calls `app.add_middleware(BodyLimit)`, which makes it the
outermost of vLLM's middleware). A body with a Content-Length over the bound is refused unread; a body without one
(chunked) is read up to the bound, refused past it, and otherwise handed on as it came. Needs no vLLM: plain ASGI.
"""

from __future__ import annotations

import json
import os

from vblora.serve.lora_dirs import parse_bytes

MAX_BODY_ENV = "VBLORA_MAX_BODY_BYTES"
DEFAULT_MAX_BODY = "16M"


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
        body = json.dumps(
            {"error": {"message": message, "type": "RequestTooLarge", "param": None, "code": 413}}
        ).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": 413, "headers": [*headers, (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})
