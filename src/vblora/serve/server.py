"""`vblora serve`'s HTTP server: the OpenAI API (`/v1/models`, `/v1/completions`, `/v1/chat/completions`, with
streaming) over one base model and an adapter store, the request's `model` choosing the adapter (the base's own
name: no adapter); endpoints to add and remove adapters; `/health` and `/metrics`.

Handlers run on the event loop; every forward runs in the scheduler's one thread (serve/scheduler.py), which hands
tokens back through `loop.call_soon_threadsafe`. A client always gets JSON in OpenAI's error shape, never a
traceback: 400 bad parameters or an over-long prompt, 401 a wrong API key, 404 an unknown model, 429 a full queue.
"""

import asyncio
import contextlib
import hmac
import json
import logging
import threading
import time
from contextlib import asynccontextmanager

from vblora.errors import VBLoRAError
from vblora.serve.protocol import (AdapterRequest, APIError, ChatCompletionRequest, CompletionRequest,
                                   LoRALoadRequest, LoRAUnloadRequest, chat_chunk, chat_completion, completion,
                                   model_card, model_not_found, new_id, usage, usage_chunk)
from vblora.serve.sampling import Sampling
from vblora.serve.scheduler import GenerationRequest, Overloaded, Scheduler
from vblora.serve.store import UnknownAdapterError
from vblora.serve.text import IncrementalText

log = logging.getLogger("vblora.serve")

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def eos_ids(model, tokenizer) -> set[int]:
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = {tokenizer.eos_token_id, *(eos if isinstance(eos, (list, tuple)) else [eos])}
    return {i for i in ids if i is not None}


class Engine:
    """What the handlers share: tokenizer, store, scheduler, the served names and the length limits."""

    def __init__(self, model, tokenizer, store, *, base_name: str, max_batch: int = 32, max_waiting: int = 256,
                 max_model_len: int | None = None, default_max_tokens: int = 256, max_prefill_tokens: int = 4096):
        self.tokenizer, self.store, self.base_name = tokenizer, store, base_name
        limit = getattr(model.config, "max_position_embeddings", None)
        self.max_model_len = min((x for x in (limit, max_model_len) if x), default=2048)
        self.default_max_tokens = default_max_tokens
        self.vocab = len(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.scheduler = Scheduler(model, store, eos_ids=eos_ids(model, tokenizer), pad_id=pad or 0,
                                   max_batch=max_batch, max_waiting=max_waiting,
                                   max_prefill_tokens=max_prefill_tokens)
        self.created = int(time.time())
        self.started = time.time()

    def names(self) -> list[str]:
        return [self.base_name] + [n for n in self.store.names() if n != self.base_name]

    def resolve(self, name: str):
        """The adapter handle for a request's `model` (None: the base). Runs in a worker thread (lazy load)."""
        if name == self.base_name:
            return None
        try:
            return self.store.acquire(name)
        except UnknownAdapterError:
            raise model_not_found(name, self.names()) from None
        except (VBLoRAError, OSError) as e:
            raise APIError(400, f"adapter '{name}' cannot be loaded: {e}", param="model",
                           code="adapter_load_failed") from None

    def limit(self, prompt: list[int], asked: int | None, default: int) -> int:
        """max_tokens for a prompt: 400 when prompt + asked exceeds the context; without `asked`, what fits."""
        n, cap = len(prompt), self.max_model_len
        if n == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if n >= cap or (asked is not None and n + asked > cap):
            raise APIError(400, f"This model's maximum context length is {cap} tokens. However, you requested "
                                f"{n + (asked or 0)} tokens ({n} in the prompt, {asked or 0} for the completion). "
                                f"Shorten the prompt or lower max_tokens.",
                           param="messages" if asked is None else "max_tokens", code="context_length_exceeded")
        return asked if asked is not None else min(default, cap - n)

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        p = req.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            if any(not 0 <= t < self.vocab for t in p):
                raise APIError(400, f"prompt token ids must lie in [0, {self.vocab})", param="prompt")
            return list(p)
        text = p[0] if isinstance(p, list) and p else p if isinstance(p, str) else ""
        return self.tokenizer(text)["input_ids"]

    def chat_prompt(self, req: ChatCompletionRequest) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"the model '{self.base_name}' has no chat template; use /v1/completions",
                           param="messages")
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()}
                    for m in req.messages]
        try:
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # a template that raises on these roles (e.g. no system role)
            raise APIError(400, f"the chat template refused these messages: {e}", param="messages") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


class Generation:
    """One request's trip through the scheduler, as text: `submit` (429 when the queue is full), then `deltas`."""

    def __init__(self, engine: Engine, prompt: list[int], adapter, req, max_tokens: int) -> None:
        self.engine, self.prompt = engine, prompt
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.text = IncrementalText(engine.tokenizer, req.stop)
        self.request = GenerationRequest(prompt, max_tokens, adapter,
                                         Sampling(req.temperature, req.top_p, req.seed), emit=self.emit)
        self.finish_reason: str | None = None

    def emit(self, kind: str, value) -> None:  # scheduler thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    def submit(self) -> None:
        try:
            self.engine.scheduler.submit(self.request)
        except Overloaded as e:
            raise APIError(429, str(e), type="server_busy", code="queue_full") from None

    @property
    def usage(self) -> dict:
        return usage(len(self.prompt), len(self.text.ids))

    async def deltas(self):
        """Yield new text as it becomes final; `finish_reason` is set when this ends."""
        try:
            while True:
                kind, value = await self.queue.get()
                if kind == "token":
                    delta, stopped = self.text.push(value)
                    if delta:
                        yield delta
                    if stopped:
                        self.finish_reason = "stop"
                        return
                elif kind == "done":
                    rest = self.text.finish()
                    if rest:
                        yield rest
                    self.finish_reason = "length" if value == "length" else "stop"
                    return
                else:
                    raise APIError(500, value, type="server_error")
        finally:
            if not self.request.finished:  # a stop string ended it, or the client went away
                self.engine.scheduler.cancel(self.request, "stop" if self.finish_reason == "stop" else "cancelled")


async def whole_text(gen: Generation, receive) -> str | None:
    """The whole text of a non-streamed request, or None if its client went away first (ASGI `receive` said
    "http.disconnect"): then the request is cancelled, its row leaving the batch at the next step, rather than
    generated to the end for nobody. A streamed request needs no watch: Starlette stops its generator when the
    client goes."""
    text = asyncio.ensure_future(_join(gen.deltas()))
    gone = asyncio.ensure_future(_disconnect(receive))
    await asyncio.wait({text, gone}, return_when=asyncio.FIRST_COMPLETED)
    if text.done():
        gone.cancel()
        return text.result()
    text.cancel()  # deltas()' `finally` cancels the scheduler's request
    with contextlib.suppress(asyncio.CancelledError):
        await text
    return None


async def _join(deltas) -> str:
    return "".join([d async for d in deltas])


async def _disconnect(receive) -> None:
    """Returns when the client has gone (the request body was read already, so nothing else arrives)."""
    while (await receive())["type"] != "http.disconnect":
        pass


def sse(body: dict | str) -> str:
    return f"data: {body if isinstance(body, str) else json.dumps(body)}\n\n"


async def stream_events(gen: Generation, model: str, chat: bool, include_usage: bool):
    rid = new_id("chatcmpl" if chat else "cmpl")
    obj = "chat.completion.chunk" if chat else "text_completion"
    try:
        if chat:
            yield sse(chat_chunk(rid, model, {"role": "assistant", "content": ""}, None))
        async for delta in gen.deltas():
            yield sse(chat_chunk(rid, model, {"content": delta}, None) if chat else
                      completion(rid, model, delta, None))
        yield sse(chat_chunk(rid, model, {}, gen.finish_reason) if chat else
                  completion(rid, model, "", gen.finish_reason))
        if include_usage:
            yield sse(usage_chunk(rid, model, obj, gen.usage))
    except APIError as e:  # the status line is gone already: the error travels as an event
        yield sse(e.body())
    yield sse("[DONE]")


def create_app(engine: Engine, *, api_key: str | None = None):
    from fastapi import FastAPI, Request
    from fastapi.concurrency import run_in_threadpool
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, Response, StreamingResponse
    from starlette.exceptions import HTTPException

    @asynccontextmanager
    async def lifespan(app):
        engine.scheduler.start()
        yield
        await run_in_threadpool(engine.scheduler.close)

    app = FastAPI(title="vblora serve", lifespan=lifespan)
    app.state.engine = engine

    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def bad_request(request, e: RequestValidationError):
        first = e.errors()[0] if e.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(x) for x in first.get("loc", ()) if x != "body")
        return await api_error(request, APIError(400, f"{where + ': ' if where else ''}{first['msg']}",
                                                 param=where or None))

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        return await api_error(request, APIError(e.status_code, str(e.detail)))

    @app.exception_handler(Exception)
    async def internal(request, e: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return await api_error(request, APIError(500, "internal server error (see the server log)",
                                                 type="server_error"))

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        given = request.headers.get("authorization", "").encode()
        if api_key and request.url.path.startswith("/v1") and \
                not hmac.compare_digest(given, f"Bearer {api_key}".encode()):
            return await api_error(request, APIError(401, "missing or wrong API key (Authorization: Bearer KEY)",
                                                     type="authentication_error", code="invalid_api_key"))
        return await call_next(request)

    @app.get("/health")
    async def health():
        ok = engine.scheduler.alive()
        return JSONResponse({"status": "ok" if ok else "scheduler stopped"}, status_code=200 if ok else 503)

    @app.get("/metrics")
    async def metrics():
        return {**engine.scheduler.stats(), "max_model_len": engine.max_model_len,
                "adapters": len(engine.store.names()), "uptime_s": round(time.time() - engine.started, 1),
                "store": engine.store.stats()}

    @app.get("/v1/models")
    async def models():
        cards = [model_card(engine.base_name, engine.created)]
        cards += [model_card(n, engine.created, engine.base_name) for n in engine.names()[1:]]
        return {"object": "list", "data": cards}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        if name not in engine.names():
            raise model_not_found(name, engine.names())
        return model_card(name, engine.created, None if name == engine.base_name else engine.base_name)

    async def run(req, chat: bool, request: Request):
        req.refuse_unsupported()
        adapter = await run_in_threadpool(engine.resolve, req.model)  # 404 before any other check of the body
        if chat:
            prompt = engine.chat_prompt(req)
            max_tokens = engine.limit(prompt, req.limit, engine.default_max_tokens)
        else:
            prompt = engine.completion_prompt(req)
            max_tokens = engine.limit(prompt, req.max_tokens, COMPLETIONS_DEFAULT_MAX_TOKENS)
        gen = Generation(engine, prompt, adapter, req, max_tokens)
        gen.submit()
        if req.stream:
            return StreamingResponse(stream_events(gen, req.model, chat, req.include_usage),
                                     media_type="text/event-stream")
        text = await whole_text(gen, request.receive)
        if text is None:  # nobody to answer; 499 is nginx's "client closed request", for the access log
            return Response(status_code=499)
        rid = new_id("chatcmpl" if chat else "cmpl")
        return (chat_completion(rid, req.model, text, gen.finish_reason, gen.usage) if chat else
                completion(rid, req.model, text, gen.finish_reason, gen.usage))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await run(req, False, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        return await run(req, True, request)

    async def add_adapter(name: str, path: str) -> dict:
        if name == engine.base_name:
            raise APIError(400, f"'{name}' is the base model's name; choose another adapter name", param="name")

        def add_and_load():
            engine.store.add(name, path)
            try:
                return engine.resolve(name).info  # load now: a bad file is refused here, not at first use
            except APIError:
                engine.store.remove(name)
                raise

        try:
            info = await run_in_threadpool(add_and_load)
        except (VBLoRAError, OSError) as e:
            raise APIError(400, f"cannot add adapter '{name}' from '{path}': {e}", param="path") from None
        return {"object": "adapter", "id": name, "path": path, "info": json.loads(json.dumps(info, default=str))}

    @app.delete("/v1/adapters/{name:path}")
    async def remove_adapter(name: str) -> dict:
        try:
            await run_in_threadpool(engine.store.remove, name)
        except KeyError:
            raise model_not_found(name, engine.names()) from None
        return {"object": "adapter", "id": name, "deleted": True}

    @app.post("/v1/adapters")
    async def post_adapter(body: AdapterRequest):
        return await add_adapter(body.name, body.path)

    @app.post("/v1/adapters/scan")
    async def scan_adapters():
        added, removed = await run_in_threadpool(engine.store.scan)
        return {"added": added, "removed": removed}

    @app.post("/v1/load_lora_adapter")  # vLLM's names for the same two operations
    async def load_lora(body: LoRALoadRequest):
        return await add_adapter(body.lora_name, body.lora_path)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: LoRAUnloadRequest):
        return await remove_adapter(body.lora_name)

    return app


def serve(app, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run until interrupted (Ctrl-C): uvicorn, one worker process (the model lives in it)."""
    import uvicorn

    uvicorn.run(app, host=host, port=port, log_level=log_level)


@contextlib.contextmanager
def running(app, host: str = "127.0.0.1", port: int = 0, timeout: float = 60.0):
    """Serve in a background thread (tests, benchmarks): yields the base URL, e.g. "http://127.0.0.1:54321";
    port 0 takes a free one."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, name="vblora-http", daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError(f"the server did not start on {host}:{port}")
        time.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://{host}:{bound}"
    finally:
        server.should_exit = True
        thread.join(timeout)
