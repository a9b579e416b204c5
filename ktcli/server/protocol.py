"""The OpenAI API's request and response shapes: requests checked field by field (a bad one becomes a 4xx with an
OpenAI-style error object), responses built from the engine's tokens and GenerationStats (usage, and
llama-server's `timings`)."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field


class ApiError(Exception):
    """A request the server refuses: HTTP status + OpenAI error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Request:
    model: str
    stream: bool = False
    messages: list = field(default_factory=list)     # chat: [{"role", "content"}]
    prompt: str | None = None                         # completions
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple = ()
    thinking: bool | None = None
    include_usage: bool = False
    ignore_eos: bool = False                          # llama-server's extension: run to max_tokens


def _get(body, key, types, default=None, check=None, what=None):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in types or not isinstance(v, types):
        names = " or ".join(t.__name__ for t in types)
        raise ApiError(400, f"'{key}' must be {names}, got {type(v).__name__}", key, "invalid_type")
    if check and not check(v):
        raise ApiError(400, f"'{key}' {what}, got {v!r}", key, "invalid_value")
    return v


def _content(msg, i) -> str:
    """A message's content: a string, or a list of text parts."""
    c = msg.get("content")
    if isinstance(c, str):
        return c
    if isinstance(c, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                   for p in c):
        return "".join(p["text"] for p in c)
    raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content",
                   "invalid_type")


def parse(body, kind: str, served_model: str) -> Request:
    """`kind`: 'chat' (/v1/chat/completions) or 'completion' (/v1/completions)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object", None, "invalid_json")
    model = _get(body, "model", (str,))
    if model is None:
        raise ApiError(400, "'model' is required", "model", "missing_required_parameter")
    if model != served_model:
        raise ApiError(404, f"The model '{model}' does not exist; this server serves '{served_model}'", "model",
                       "model_not_found")
    r = Request(model=model, stream=_get(body, "stream", (bool,), False))
    r.max_tokens = _get(body, "max_tokens", (int,), None, lambda v: v >= 1, "must be ≥ 1")
    r.max_tokens = _get(body, "max_completion_tokens", (int,), r.max_tokens, lambda v: v >= 1, "must be ≥ 1")
    r.temperature = float(_get(body, "temperature", (int, float), 1.0, lambda v: 0 <= v <= 2, "must be in [0, 2]"))
    r.top_p = float(_get(body, "top_p", (int, float), 1.0, lambda v: 0 < v <= 1, "must be in (0, 1]"))
    r.top_k = _get(body, "top_k", (int,), 0, lambda v: v >= 0, "must be ≥ 0")
    r.seed = _get(body, "seed", (int,), None)
    r.ignore_eos = _get(body, "ignore_eos", (bool,), False)
    stop = _get(body, "stop", (str, list), None)
    if isinstance(stop, list) and not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of non-empty strings", "stop", "invalid_type")
    r.stop = tuple([stop] if isinstance(stop, str) else stop or ())
    opts = _get(body, "stream_options", (dict,), {})
    r.include_usage = bool(opts.get("include_usage"))
    kw = _get(body, "chat_template_kwargs", (dict,), {})
    r.thinking = kw.get("enable_thinking") if isinstance(kw.get("enable_thinking"), bool) else None
    if kind == "chat":
        msgs = _get(body, "messages", (list,), None)
        if not msgs:
            raise ApiError(400, "'messages' must be a non-empty list", "messages",
                           "missing_required_parameter" if msgs is None else "invalid_value")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "developer"):
                raise ApiError(400, f"messages[{i}].role must be system, user or assistant", f"messages[{i}].role",
                               "invalid_value")
            r.messages.append({"role": "system" if m["role"] == "developer" else m["role"], "content": _content(m, i)})
    else:
        p = _get(body, "prompt", (str, list), None)
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
            p = p[0]
        if not isinstance(p, str) or not p:
            raise ApiError(400, "'prompt' must be a non-empty string", "prompt",
                           "missing_required_parameter" if p is None else "invalid_value")
        r.prompt = p
    return r


def fit_context(r: Request, prompt_tokens: int, context: int) -> int:
    """max_tokens for this request: as asked, or what the context leaves; refused when it does not fit."""
    room = context - prompt_tokens - 1
    if room < 1:
        raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the context holds {context}", "messages",
                       "context_length_exceeded")
    if r.max_tokens is not None and r.max_tokens > room:
        raise ApiError(400, f"max_tokens {r.max_tokens} + the prompt's {prompt_tokens} tokens exceed the context of "
                       f"{context}", "max_tokens", "context_length_exceeded")
    return r.max_tokens or room


def usage(st) -> dict:
    return {"prompt_tokens": st.prompt_tokens + st.cached_tokens, "completion_tokens": st.completion_tokens,
            "total_tokens": st.prompt_tokens + st.cached_tokens + st.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": st.cached_tokens}}


def timings(st) -> dict:
    """llama-server's per-request timings."""
    pm, dm = st.prefill_s * 1e3, st.decode_s * 1e3
    return {"cache_n": st.cached_tokens, "prompt_n": st.prompt_tokens, "prompt_ms": pm,
            "prompt_per_second": st.prompt_tps, "predicted_n": st.decode_tokens, "predicted_ms": dm,
            "predicted_per_second": st.decode_tps}


class Reply:
    """Shapes one request's response objects (ids and timestamps shared by every chunk)."""

    def __init__(self, r: Request, kind: str):
        self.r, self.kind = r, kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _base(self, obj):
        return {"id": self.id, "object": obj, "created": self.created, "model": self.r.model}

    def whole(self, text: str, finish: str, st) -> dict:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
            out = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            out = self._base("text_completion")
        return {**out, "choices": [choice], "usage": usage(st), "timings": timings(st)}

    def chunk(self, text: str | None = None, finish: str | None = None, first=False, st=None) -> dict:
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text is not None else {})
            out = {**self._base("chat.completion.chunk"), "choices": [{"index": 0, "delta": delta,
                                                                          "finish_reason": finish}]}
        else:
            out = {**self._base("text_completion"), "choices": [{"index": 0, "text": text or "", "logprobs": None,
                                                                  "finish_reason": finish}]}
        if st is not None:
            out["timings"] = timings(st)
            if self.r.include_usage:
                out["usage"] = usage(st)
        return out
