"""`ktcli serve`'s HTTP side: an OpenAI-compatible API (Starlette) in front of the scheduler.

/v1/chat/completions and /v1/completions (server-sent events with "stream": true), /v1/models, /health. The
engine thread hands text to the event loop with call_soon_threadsafe; a client that disconnects cancels its job.
"""
from __future__ import annotations

import asyncio
import json
import secrets

from starlette.applications import Starlette
from starlette.requests import Request as HttpRequest
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from ..engine import GenerationConfig
from ..engine.conversation import Conversation
from . import protocol
from .protocol import ApiError, Reply
from .scheduler import Job, Scheduler


class Server:
    def __init__(self, engine, tokenizer, model_name: str, api_key: str | None = None, max_queue: int = 8):
        self.engine, self.tok, self.name, self.api_key = engine, tokenizer, model_name, api_key
        self.sched = Scheduler(engine, tokenizer, max_queue)
        routes = [Route("/health", self.health), Route("/v1/models", self.models),
                  Route("/v1/chat/completions", self.chat, methods=["POST"]),
                  Route("/v1/completions", self.completions, methods=["POST"])]
        self.app = Starlette(routes=routes, exception_handlers={ApiError: self._api_error, 404: self._not_found,
                                                                405: self._not_allowed})

    # -- plumbing ---------------------------------------------------------------------------------------------
    async def _api_error(self, request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    async def _not_found(self, request, e):
        return JSONResponse(ApiError(404, f"no route {request.url.path}", None, "not_found").body(), status_code=404)

    async def _not_allowed(self, request, e):
        err = ApiError(405, f"{request.method} is not allowed on {request.url.path}")
        return JSONResponse(err.body(), status_code=405)

    def _authorize(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given, self.api_key):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", None, "invalid_api_key",
                           "authentication_error")

    async def _body(self, request: HttpRequest):
        self._authorize(request)
        try:
            return json.loads(await request.body())
        except (ValueError, UnicodeDecodeError):
            raise ApiError(400, "the request body is not valid JSON", None, "invalid_json") from None

    # -- endpoints ----------------------------------------------------------------------------------------------
    async def health(self, request):
        return JSONResponse({"status": "ok", "model": self.name, "queued": self.sched.pending})

    async def models(self, request):
        self._authorize(request)
        return JSONResponse({"object": "list", "data": [{"id": self.name, "object": "model", "created": 0,
                                                         "owned_by": "ktcli"}]})

    async def chat(self, request):
        r = protocol.parse(await self._body(request), "chat", self.name)
        conv = Conversation(self.tok, self.engine.max_len, thinking=r.thinking)
        with self.sched.tok_lock:
            ids = conv.encode(r.messages)
        return await self._run(request, r, "chat", ids)

    async def completions(self, request):
        r = protocol.parse(await self._body(request), "completion", self.name)
        with self.sched.tok_lock:
            ids = self.tok.encode(r.prompt)
        return await self._run(request, r, "completion", ids)

    async def _run(self, request, r, kind, ids):
        if not ids:
            raise ApiError(400, "the prompt encodes to no tokens", "messages" if kind == "chat" else "prompt")
        cfg = GenerationConfig(max_new_tokens=protocol.fit_context(r, len(ids), self.engine.max_len),
                               temperature=r.temperature, top_k=r.top_k, top_p=r.top_p, seed=r.seed,
                               ignore_eos=r.ignore_eos)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(ids, cfg, r.stop, lambda *ev: loop.call_soon_threadsafe(events.put_nowait, ev), stream=r.stream)
        if not self.sched.submit(job):
            raise ApiError(429, f"the server is busy: {self.sched.pending} requests running or queued", None,
                           "rate_limit_exceeded", "rate_limit_error")
        reply = Reply(r, kind)
        if r.stream:
            return StreamingResponse(self._events(job, events, reply), media_type="text/event-stream")
        return await self._whole(request, job, events, reply)

    async def _whole(self, request, job, events, reply):
        text = []
        try:
            while True:
                try:
                    what, a, st = await asyncio.wait_for(events.get(), timeout=0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return JSONResponse({}, status_code=499)   # nobody reads it (nginx's "client closed")
                    continue
                if what == "text":
                    text.append(a)
                elif what == "error":
                    raise ApiError(500, f"generation failed: {a!r}", None, "internal_error", "server_error")
                else:
                    return JSONResponse(reply.whole("".join(text), a, st))
        finally:
            job.cancel.set()       # gone or done: either way the engine need not go on

    async def _events(self, job, events, reply):
        sse = lambda obj: f"data: {json.dumps(obj)}\n\n"  # noqa: E731
        try:
            if reply.kind == "chat":
                yield sse(reply.chunk(first=True))
            while True:
                what, a, st = await events.get()
                if what == "text":
                    yield sse(reply.chunk(a))
                elif what == "error":
                    yield sse(ApiError(500, f"generation failed: {a!r}", None, "internal_error", "server_error").body())
                    break
                else:
                    yield sse(reply.chunk(finish=a, st=st))
                    break
            yield "data: [DONE]\n\n"
        finally:
            job.cancel.set()       # the client went away mid-stream (or the stream ended)
