"""The OpenAI API shapes the server speaks: request bodies (validated by pydantic), response and stream-chunk
bodies, and errors in OpenAI's `{"error": {"message", "type", "param", "code"}}` form.

Fields OpenAI defines but this server does not implement (logprobs, echo, best_of > 1, n > 1, penalties, tools) are
refused with a 400 naming the field rather than silently ignored; unknown fields are ignored (pydantic's default),
as OpenAI's own clients send a few extras.
"""

from __future__ import annotations

import time
import uuid
from typing import Literal, Union

from pydantic import BaseModel, Field, field_validator


class APIError(Exception):
    """An answer in OpenAI's error shape: status, one-line message, type, the parameter at fault, a code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def model_not_found(name: str, known: list[str]) -> APIError:
    shown = ", ".join(known[:20]) + (f" ... ({len(known)} in all)" if len(known) > 20 else "")
    return APIError(404, f"The model '{name}' does not exist. Served models: {shown} (GET /v1/models)",
                    param="model", code="model_not_found")


class Sampled(BaseModel):
    """What both endpoints share: the adapter (`model`), length, sampling and stop settings."""

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1)
    seed: int | None = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: dict | None = None
    logprobs: Union[bool, int, None] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("stop")
    @classmethod
    def stop_list(cls, v):
        v = [v] if isinstance(v, str) else v
        if v is not None and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def refuse_unsupported(self) -> None:
        """400 for OpenAI features this server does not implement."""
        if self.n != 1:
            raise APIError(400, "only n=1 is supported", param="n")
        if self.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                raise APIError(400, f"{name} is not supported by this server (leave it 0)", param=name)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(Sampled):
    prompt: Union[str, list[str], list[int]]
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if isinstance(self.prompt, list) and self.prompt and isinstance(self.prompt[0], str) and len(self.prompt) > 1:
            raise APIError(400, "one prompt per request (a list of several strings is not supported)",
                           param="prompt")
        for name, bad in (("echo", self.echo), ("best_of", self.best_of not in (None, 1)), ("suffix", self.suffix)):
            if bad:
                raise APIError(400, f"{name} is not supported by this server", param=name)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list | None = None

    def refuse_unsupported(self) -> None:
        super().refuse_unsupported()
        if self.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")

    @property
    def limit(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class AdapterRequest(BaseModel):
    """POST /v1/adapters: register an adapter file or directory under a name."""
    name: str = Field(min_length=1)
    path: str = Field(min_length=1)


class LoRALoadRequest(BaseModel):
    """vLLM's POST /v1/load_lora_adapter body, accepted as an alias of POST /v1/adapters."""
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class LoRAUnloadRequest(BaseModel):
    lora_name: str = Field(min_length=1)


# ---- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion(rid: str, model: str, text: str | None, finish: str | None, use: dict | None = None) -> dict:
    """A /v1/completions body; with `use=None` a stream chunk (text = the new text)."""
    out = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": model,
           "choices": [{"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}]}
    if use is not None:
        out["usage"] = use
    return out


def chat_completion(rid: str, model: str, text: str, finish: str, use: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish}],
            "usage": use}


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}


def usage_chunk(rid: str, model: str, obj: str, use: dict) -> dict:
    """The last chunk when stream_options.include_usage is set: no choices, the usage."""
    return {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [], "usage": use}


def model_card(name: str, created: int, parent: str | None = None) -> dict:
    card = {"id": name, "object": "model", "created": created, "owned_by": "vblora"}
    if parent is not None:
        card["parent"] = card["root"] = parent
    return card
