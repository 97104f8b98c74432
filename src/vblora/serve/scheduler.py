"""Continuous batching across adapters: one thread runs the model; requests join the running batch and leave it
between decode steps, token by token, each row with its own adapter.

Why a scheduler of our own rather than transformers' continuous-batching engine (`generate_batch` /
`init_continuous_batching`, read in transformers 5.24): that engine packs all requests into one (1, T) sequence over
a paged cache, but calls `model(**batch_data)` with nothing that says which request owns which token (only
cumulative lengths; the request order lives in its internal IO objects, double-buffered in async mode), shares KV
blocks between requests whose prompts hash alike (prefix sharing: keys computed under one adapter would serve
another), and samples with one `do_sample` and one global seed for the whole batch. A per-request adapter and a
per-request seed would need its private internals. Here each step is one ordinary forward over a left-padded
`DynamicCache` (serve/batch.py) inside `store.rows(handles)`, which every transformers causal LM supports.

One iteration (`step`): drop cancelled rows; admit waiting requests up to `max_batch` rows and `max_prefill_tokens`
prompt tokens, prefill them together (each emits its first token) and join them to the batch; then one decode step
for every row (one token each); rows that finished leave. Events go to each request's `emit` from this thread:
("token", id), then ("done", "stop" | "length" | "cancelled") or ("error", message).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from vblora.serve.batch import RunningBatch, cache_layers, prefill_inputs
from vblora.serve.sampling import Sampling, new_generator, next_tokens

log = logging.getLogger("vblora.serve")


class Overloaded(RuntimeError):
    """The waiting queue is full: the caller should answer 429 and let the client retry."""


@dataclass(eq=False)
class GenerationRequest:
    prompt: list[int]  # token ids
    max_tokens: int
    adapter: object | None = None  # an AdapterHandle from store.acquire, or None for the base model
    sampling: Sampling = field(default_factory=Sampling)
    emit: Callable[[str, object], None] = lambda kind, value: None  # called from the scheduler thread
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    generated: list[int] = field(default_factory=list)
    cancelled: str | None = None  # why the caller stopped it: "cancelled" (client gone) or "stop" (stop string)
    finished: bool = False
    generator: torch.Generator | None = None


class Scheduler:
    def __init__(self, model, store=None, *, eos_ids=(), pad_id: int = 0, max_batch: int = 32,
                 max_waiting: int = 256, max_prefill_tokens: int = 4096) -> None:
        self.model, self.store = model, store
        self.eos_ids = set(eos_ids)
        self.pad_id = pad_id
        self.max_batch, self.max_waiting, self.max_prefill_tokens = max_batch, max_waiting, max_prefill_tokens
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"  # transformers >= 5.2x renames it
        self.keep_last = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.batch = RunningBatch(self.device)
        self.waiting: deque[GenerationRequest] = deque()
        self.cond = threading.Condition()
        self.thread: threading.Thread | None = None
        self.stopping = False
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.generated_tokens = 0
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) of the last 10 s, for tokens/s
        self.steps = 0

    # ---- called from any thread
    def submit(self, req: GenerationRequest) -> None:
        with self.cond:
            if self.stopping:
                raise Overloaded("the server is shutting down")
            if len(self.waiting) >= self.max_waiting:
                self.counts["rejected"] += 1
                raise Overloaded(f"the server is busy: {len(self.waiting)} requests are waiting (the limit); "
                                 f"retry later")
            self.waiting.append(req)
            self.cond.notify()

    def cancel(self, req: GenerationRequest, reason: str = "cancelled") -> None:
        """Stop a request at the next step; its last event is ("done", reason)."""
        req.cancelled = reason
        with self.cond:
            self.cond.notify()

    def stats(self) -> dict:
        now = time.perf_counter()
        with self.cond:
            recent = [(t, n) for t, n in self.recent if now - t <= 10.0]
            span = max(now - recent[0][0], 1.0) if recent else 1.0
            return {"waiting": len(self.waiting), "running": len(self.batch), "max_batch": self.max_batch,
                    "max_waiting": self.max_waiting, "generated_tokens": self.generated_tokens,
                    "tokens_per_s": round(sum(n for _, n in recent) / span, 2), "steps": self.steps,
                    "requests": dict(self.counts)}

    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="vblora-scheduler", daemon=True)
        self.thread.start()

    def close(self, timeout: float = 10.0) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify()
        if self.thread is not None:
            self.thread.join(timeout)
        for req in list(self.waiting) + list(self.batch.rows):
            self.finish(req, "error", "the server shut down before this request finished")
        self.waiting.clear()
        self.batch = RunningBatch(self.device)

    # ---- the scheduler thread
    def run(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.waiting and not len(self.batch):
                    self.cond.wait(0.5)
                if self.stopping:
                    return
            try:
                self.step()
            except Exception:  # a bug, not a request's fault: keep serving, fail what was running
                log.exception("scheduler step failed")
                for req in self.batch.rows:
                    self.finish(req, "error", "internal error while generating")
                self.batch = RunningBatch(self.device)

    @torch.no_grad()
    def step(self) -> None:
        self.drop_cancelled()
        group = self.admit()
        if group:
            self.prefill(group)
        if len(self.batch):
            self.decode()
        self.steps += 1

    def drop_cancelled(self) -> None:
        with self.cond:
            for req in [r for r in self.waiting if r.cancelled]:
                self.waiting.remove(req)
                self.finish(req, "done", req.cancelled)
        gone = [r for r in self.batch.rows if r.cancelled]
        self.batch.keep([i for i, r in enumerate(self.batch.rows) if not r.cancelled])
        for req in gone:
            self.finish(req, "done", req.cancelled)

    def admit(self) -> list[GenerationRequest]:
        group, tokens = [], 0
        with self.cond:
            while self.waiting and len(self.batch) + len(group) < self.max_batch:
                nxt = self.waiting[0]
                if group and tokens + len(nxt.prompt) > self.max_prefill_tokens:
                    break
                group.append(self.waiting.popleft())
                tokens += len(nxt.prompt)
        return group

    def forward(self, rows: list[GenerationRequest], cache, **inputs) -> torch.Tensor:
        """Each row's next token `(B,)`, chosen from the last-position logits of one forward in which each row runs
        under its own adapter."""
        ctx = self.store.rows([r.adapter for r in rows]) if self.store is not None else contextlib.nullcontext()
        with ctx:
            logits = self.model(**inputs, **{self.cache_kw: cache}, use_cache=True, **self.keep_last).logits[:, -1]
        return next_tokens(logits, [r.sampling for r in rows], [r.generator for r in rows])

    def prefill(self, group: list[GenerationRequest]) -> None:
        from transformers import DynamicCache

        inputs = prefill_inputs([r.prompt for r in group], self.pad_id, self.device)
        cache = DynamicCache()
        for req in group:
            req.generator = new_generator(req.sampling, self.device)
        try:
            tokens = self.forward(group, cache, **inputs)
            cache_layers(cache)  # a cache the batch cannot pad: refused here, for these requests only
        except Exception as e:  # e.g. an adapter that fails to compose: fail this group only
            log.exception("prefill failed")
            for req in group:
                self.finish(req, "error", f"generation failed: {type(e).__name__}: {e}")
            return
        mask = inputs["attention_mask"]
        self.batch.join(group, cache, mask, mask.sum(1), tokens)
        self.accept(tokens)

    def decode(self) -> None:
        inputs = self.batch.step_inputs()
        tokens = self.forward(self.batch.rows, self.batch.cache, **inputs)
        self.batch.advance(tokens, inputs["attention_mask"])
        self.accept(tokens)

    def accept(self, tokens: torch.Tensor) -> None:
        """Hand each row its new token (the batch's last `len(tokens)` rows); rows that finished leave."""
        rows = self.batch.rows[len(self.batch) - len(tokens):]
        for req, tok in zip(rows, tokens.tolist()):
            if tok in self.eos_ids:
                self.finish(req, "done", "stop")
                continue
            req.generated.append(tok)
            self.send(req, "token", tok)
            if len(req.generated) >= req.max_tokens:
                self.finish(req, "done", "length")
        with self.cond:
            self.generated_tokens += len(rows)
            self.recent.append((time.perf_counter(), len(rows)))
            while self.recent and time.perf_counter() - self.recent[0][0] > 10.0:
                self.recent.popleft()
        self.batch.keep([i for i, r in enumerate(self.batch.rows) if not r.finished])

    def finish(self, req: GenerationRequest, kind: str, value: str) -> None:
        """The request's last event: ("done", reason) or ("error", message)."""
        if req.finished:
            return
        req.finished = True
        self.counts["failed" if kind == "error" else "cancelled" if value == "cancelled" else "completed"] += 1
        self.send(req, kind, value)

    @staticmethod
    def send(req: GenerationRequest, kind: str, value) -> None:
        try:
            req.emit(kind, value)
        except Exception:  # a client gone away (its event loop closed) must not stop the scheduler
            log.debug("emit failed for %s", req.id, exc_info=True)
