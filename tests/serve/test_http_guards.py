"""`vblora.serve.http_guards`, the ASGI middleware `vblora serve` gives vLLM (`--middleware`): a request body over
VBLORA_MAX_BODY_BYTES is a 413 before vLLM reads it (`BodyLimit`), and `/v1/load_lora_adapter`, which loads from
any path, is a 403 unless opened (`LoadEndpointGuard`). Plain ASGI, checked here without a server;
tests/serve/test_vllm_plugin.py checks both inside vLLM."""

from __future__ import annotations

import asyncio
import json

import pytest

from vblora.errors import VBLoRAError
from vblora.serve.http_guards import BodyLimit, LoadEndpointGuard, body_bound


class App:
    """An ASGI app that reads the whole body and answers 200, recording what it received."""

    def __init__(self) -> None:
        self.called = False
        self.body = b""

    async def __call__(self, scope, receive, send) -> None:
        self.called = True
        while True:
            message = await receive()
            self.body += message.get("body", b"")
            if not message.get("more_body", False):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(limit: int, chunks: list[bytes], content_length: bool):
    """Run one request through BodyLimit(App): (app, messages sent back, chunks the middleware pulled)."""
    app, sent, pulled = App(), [], []
    headers = [(b"content-type", b"application/json")]
    if content_length:
        headers.append((b"content-length", str(sum(map(len, chunks))).encode()))
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "headers": headers}
    queue = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)] + [
        {"type": "http.disconnect"}
    ]

    async def receive():
        pulled.append(queue[0])
        return queue.pop(0)

    async def send(message):
        sent.append(message)

    asyncio.run(BodyLimit(app, limit)(scope, receive, send))
    return app, sent, pulled


def status_and_error(sent):
    start, body = sent
    return start["status"], json.loads(body["body"])["error"]


@pytest.mark.parametrize("content_length", [True, False])
def test_a_body_within_the_bound_reaches_the_app_whole(content_length):
    chunks = [b"a" * 400, b"b" * 400, b"c" * 200]
    app, sent, _ = call(1000, chunks, content_length)
    assert app.called and app.body == b"".join(chunks) and sent[0]["status"] == 200


def test_a_declared_length_over_the_bound_is_refused_unread():
    app, sent, pulled = call(1000, [b"x" * 1001], content_length=True)
    status, error = status_and_error(sent)
    assert status == 413 and error["code"] == 413 and "over 1000 bytes" in error["message"]
    assert "VBLORA_MAX_BODY_BYTES" in error["message"] and not app.called and not pulled


def test_a_chunked_body_is_refused_once_past_the_bound():
    app, sent, pulled = call(1000, [b"x" * 600, b"x" * 600, b"x" * 600], content_length=False)
    assert status_and_error(sent)[0] == 413 and not app.called
    assert len(pulled) == 2  # stopped reading at the chunk that crossed the bound


def test_other_scopes_pass_through():
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])

    asyncio.run(BodyLimit(app, 10)({"type": "lifespan"}, None, None))
    assert seen == ["lifespan"]


def test_the_bound_from_the_environment():
    assert body_bound({}) == 16 << 20 and body_bound({"VBLORA_MAX_BODY_BYTES": "2M"}) == 2 << 20
    with pytest.raises(VBLoRAError, match="VBLORA_MAX_BODY_BYTES='lots' is not a positive byte count"):
        body_bound({"VBLORA_MAX_BODY_BYTES": "lots"})


def guarded(path: str, allow: bool | None = None):
    """Run one request for `path` through LoadEndpointGuard(App): (app called, messages sent back)."""
    app, sent = App(), []
    queue = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": []}
    asyncio.run(LoadEndpointGuard(app, allow)(scope, receive, send))
    return app.called, sent


@pytest.mark.parametrize("path", ["/v1/load_lora_adapter", "/v1/load_lora_adapter/", "/prefix/v1/load_lora_adapter"])
def test_the_any_path_load_endpoint_is_closed(path, monkeypatch):
    monkeypatch.delenv("VBLORA_ALLOW_LOAD_ENDPOINT", raising=False)
    called, sent = guarded(path)
    status, error = status_and_error(sent)
    assert status == 403 and not called
    assert "/v1/load_lora_adapter is closed" in error["message"] and "VBLORA_ALLOW_LOAD_ENDPOINT=1" in error["message"]


@pytest.mark.parametrize("path", ["/v1/unload_lora_adapter", "/v1/completions", "/health"])
def test_other_endpoints_pass(path, monkeypatch):
    monkeypatch.delenv("VBLORA_ALLOW_LOAD_ENDPOINT", raising=False)
    assert guarded(path)[0]


def test_the_load_endpoint_opens_when_asked(monkeypatch):
    monkeypatch.setenv("VBLORA_ALLOW_LOAD_ENDPOINT", "1")
    assert guarded("/v1/load_lora_adapter")[0]
    assert guarded("/v1/load_lora_adapter", allow=True)[0]
