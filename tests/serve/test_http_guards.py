"""`vblora.serve.http_guards`, the ASGI middleware `vblora serve` gives vLLM (`--middleware`): a request body over
VBLORA_MAX_BODY_BYTES is a 413 before vLLM reads it (`BodyLimit`); the routes that load adapters from any path, and
the SageMaker routes vLLM's API key leaves open, are 403s (`RouteGuard`). Plain ASGI, checked here without a
server; tests/serve/test_vllm_plugin.py checks both inside vLLM."""

from __future__ import annotations

import asyncio
import json

import pytest

from vblora.errors import VBLoRAError
from vblora.serve.http_guards import BodyLimit, RouteGuard, body_bound


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


def call(limit: int, chunks: list[bytes], content_length: bool, chunked: bool = False):
    """Run one request through BodyLimit(App): (app, messages sent back, chunks the middleware pulled). With
    `chunked`, a Transfer-Encoding header is sent, and any Content-Length declares only the first chunk."""
    app, sent, pulled = App(), [], []
    headers = [(b"content-type", b"application/json")]
    if content_length:
        declared = len(chunks[0]) if chunked else sum(map(len, chunks))
        headers.append((b"content-length", str(declared).encode()))
    if chunked:
        headers.append((b"transfer-encoding", b"chunked"))
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


def test_transfer_encoding_overrides_a_declared_length():
    """A request with both headers is read as chunked (RFC 9112): a small Content-Length cannot carry a large body
    past the bound."""
    app, sent, pulled = call(1000, [b"x" * 600, b"x" * 600], content_length=True, chunked=True)
    assert status_and_error(sent)[0] == 413 and not app.called and len(pulled) == 2


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


def guarded(path: str, allow: bool = False, keyed: bool = False, root_path: str = ""):
    """Run one request for `path` through RouteGuard(App): (app called, messages sent back)."""
    app, sent = App(), []
    queue = [{"type": "http.request", "body": b"{}", "more_body": False}]

    async def receive():
        return queue.pop(0) if queue else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": root_path + path, "root_path": root_path, "headers": []}
    asyncio.run(RouteGuard(app, allow, keyed)(scope, receive, send))
    return app.called, sent


@pytest.mark.parametrize(
    "path,root_path",
    [("/v1/load_lora_adapter", ""), ("/v1/load_lora_adapter/", ""), ("/adapters", ""), ("/v1/load_lora_adapter", "/p")],
)
def test_the_any_path_load_routes_are_closed(path, root_path):
    """/adapters is vLLM's SageMaker route to the same loader, outside its API key; --root-path is honoured."""
    called, sent = guarded(path, root_path=root_path)
    status, error = status_and_error(sent)
    assert status == 403 and not called
    assert "is closed" in error["message"] and "VBLORA_ALLOW_LOAD_ENDPOINT=1" in error["message"]
    assert guarded(path, allow=True, root_path=root_path)[0]  # opened when asked


@pytest.mark.parametrize("path", ["/invocations", "/adapters/some-adapter"])
def test_routes_outside_the_api_key_are_closed_when_a_key_is_set(path):
    called, sent = guarded(path, keyed=True)
    assert status_and_error(sent)[0] == 403 and not called
    assert guarded(path, keyed=False)[0]  # no key: every route is open alike


@pytest.mark.parametrize("path", ["/v1/unload_lora_adapter", "/v1/completions", "/health", "/ping"])
def test_other_routes_pass(path):
    assert guarded(path, keyed=True)[0]


def test_settings_from_the_environment(monkeypatch):
    monkeypatch.setenv("VBLORA_ALLOW_LOAD_ENDPOINT", "1")
    monkeypatch.setenv("VLLM_API_KEY", "k")
    guard = RouteGuard(App())
    assert guard.allow_load and guard.keyed
    monkeypatch.delenv("VBLORA_ALLOW_LOAD_ENDPOINT")
    monkeypatch.delenv("VLLM_API_KEY")
    guard = RouteGuard(App())
    assert not guard.allow_load and not guard.keyed
    monkeypatch.setenv("VBLORA_MAX_BODY_BYTES", "lots")
    with pytest.raises(SystemExit, match="VBLORA_MAX_BODY_BYTES='lots' is not a positive byte count"):
        BodyLimit(App())
