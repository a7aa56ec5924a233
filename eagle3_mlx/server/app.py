"""FastAPI routes of ``eagle3-mlx serve`` (OpenAI-compatible).

Contract: ``create_app(worker, model_name=..., ...)`` returns an ASGI app with

* ``POST /v1/chat/completions`` and ``POST /v1/completions``: JSON answers or,
  with ``"stream": true``, server-sent events (``data: {chunk}`` lines ending
  with ``data: [DONE]``; ``stream_options.include_usage`` adds a usage chunk).
  ``usage`` has prompt / completion tokens (and the prompt tokens served from
  the KV cache); the extra top-level field ``eagle3`` (in the answer, or in
  the streamed chunk that carries ``finish_reason``) has the speculation
  statistics: tokens per step, steps, accepted drafts per source, draft and
  verify ms. OpenAI clients ignore it (``model_extra`` in openai-python).
* ``GET /v1/models`` (the one served model), ``GET /health``.
* Every error is OpenAI's error JSON with the right status: 400 for invalid or
  unsupported input (including request validation, which FastAPI would answer
  with 422), 401 bad key, 404, 413 oversize body, 429 queue full (with
  ``Retry-After``), 500, 503 while shutting down.

The ``model`` field of a request is accepted whatever it says (clients insist
on sending one and one model is served); it never loads anything. One
generation runs at a time on the worker's engine thread; a client that
disconnects cancels its request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .guards import Guard
from .schemas import (ApiError, ChatRequest, CompletionRequest, chat_prompt, completion_prompt,
                      error_body, sampling_args)
from .worker import EngineWorker, QueueFull, ShuttingDown

# How often a request that is not streaming yet checks that its client is still there
# (once streaming, Starlette notices a disconnect and cancels the response).
DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    pass


def create_app(worker: EngineWorker, *, model_name: str, max_tokens_limit: int = 8192,
               api_key: str | None = None, max_body_bytes: int = 1 << 20, info: dict | None = None):
    """``info``: extra facts for ``/health`` (tree, draft source, ...)."""
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        worker.shutdown()  # usually done already by the signal handler (cli.py)
        await asyncio.to_thread(worker.join, 10.0)

    app = FastAPI(title="eagle3-mlx", lifespan=lifespan, docs_url=None, redoc_url=None)
    _install_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, **(info or {}), "queue": worker.status()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise ApiError(404, f"model {model_id!r} is not served here (this server serves "
                                f"{model_name!r})", param="model", code="model_not_found")
        return _model_card(model_name, created)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatRequest, request: Request):
        args = sampling_args(body, max_tokens_limit)
        return await _respond(worker, request, "chat", chat_prompt(body), args, body, model_name)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        args = sampling_args(body, max_tokens_limit)
        return await _respond(worker, request, "text", completion_prompt(body), args, body, model_name)

    return Guard(app, api_key=api_key, max_body_bytes=max_body_bytes)


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "eagle3-mlx"}


# -- errors ---------------------------------------------------------------------------


def _install_error_handlers(app: FastAPI):
    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            detail = (first.get("ctx") or {}).get("error", "")
            return JSONResponse(error_body(f"the request body is not valid JSON ({detail})"),
                                status_code=400)
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        return JSONResponse(error_body(f"{param or 'body'}: {msg}{more}", param=param),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def crash(request, exc: Exception):
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", type="server_error"),
                            status_code=500)


# -- one request ---------------------------------------------------------------------


class _Watch:
    """Tells whether a request's client has gone, asking the server at most
    every DISCONNECT_POLL_S (tokens may arrive far more often than that)."""

    def __init__(self, request: Request):
        self.request, self.last = request, time.monotonic()

    async def gone(self) -> bool:
        now = time.monotonic()
        if now - self.last < DISCONNECT_POLL_S:
            return False
        self.last = now
        return await self.request.is_disconnected()


async def _next_event(job, watch: _Watch | None):
    """The job's next event; with ``watch``, raises ClientGone once its client left."""
    if watch is None:
        return await job.events.get()
    while True:
        if await watch.gone():
            raise ClientGone()
        try:
            return await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            pass


async def _respond(worker: EngineWorker, request: Request, kind: str, prompt, args: dict, body,
                   model_name: str):
    try:
        job = worker.submit(prompt, args, asyncio.get_running_loop())
    except QueueFull as e:
        raise ApiError(429, f"the server is busy: {worker.queue_size} requests are already waiting "
                            "(one generation runs at a time); retry later",
                       type="rate_limit_error", code="queue_full",
                       headers={"Retry-After": str(e.retry_after)}) from None
    except ShuttingDown:
        raise ApiError(503, "the server is shutting down", type="server_error",
                       code="shutting_down") from None
    meta = {"id": ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24],
            "created": int(time.time()), "model": model_name}
    handed_over, watch = False, _Watch(request)
    try:
        first = await _next_event(job, watch)  # waits in the queue, then prefill + first token
        if first[0] == "error":
            raise first[1]
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            handed_over = True
            return StreamingResponse(_sse(worker, job, first, kind, meta, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        pieces, ev = [], first
        while ev[0] == "delta":
            pieces.append(ev[1])
            ev = await _next_event(job, watch)
        if ev[0] == "error":
            raise ev[1]
        return JSONResponse(_full_body(kind, meta, "".join(pieces), ev[1]))
    except ClientGone:
        return Response(status_code=499)  # nobody reads it; the finally frees the engine
    finally:
        if not handed_over:
            worker.cancel(job)  # no-op when the job already finished


def _finish(summary: dict) -> str:
    # "context": the answer stopped at the model's context limit, a length stop to OpenAI clients
    return {"context": "length"}.get(summary["finish_reason"], summary["finish_reason"])


def _usage(summary: dict) -> dict:
    p, c = summary["prompt_tokens"], summary["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": summary["cached_tokens"]}}


def _stats(summary: dict) -> dict:
    return {**summary["eagle3"], "finish_reason": summary["finish_reason"]}


def _full_body(kind: str, meta: dict, text: str, summary: dict) -> dict:
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text},
                  "finish_reason": _finish(summary), "logprobs": None}
        obj = "chat.completion"
    else:
        choice = {"index": 0, "text": text, "finish_reason": _finish(summary), "logprobs": None}
        obj = "text_completion"
    return {**meta, "object": obj, "choices": [choice], "usage": _usage(summary),
            "eagle3": _stats(summary)}


def _chunk(kind: str, meta: dict, text: str | None = None, finish: str | None = None,
           role: bool = False, **extra) -> str:
    if kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    return _data({**meta, "object": obj, "choices": [choice], **extra})


def _data(obj) -> str:
    return f"data: {json.dumps(obj, separators=(',', ':'), ensure_ascii=False)}\n\n"


async def _sse(worker: EngineWorker, job, first, kind: str, meta: dict, include_usage: bool):
    """Server-sent events of one streamed answer. Starlette cancels this
    generator when the client disconnects; the finally then cancels the job."""
    finished = False
    try:
        if kind == "chat":
            yield _chunk(kind, meta, role=True)
        ev = first
        while True:
            if ev[0] == "delta":
                # Send what has queued up meanwhile as one chunk: fewer writes
                # when the engine is faster than the socket.
                pieces, nxt = [ev[1]], None
                while nxt is None and not job.events.empty():
                    e = job.events.get_nowait()
                    if e[0] == "delta":
                        pieces.append(e[1])
                    else:
                        nxt = e
                yield _chunk(kind, meta, "".join(pieces))
                ev = nxt or await _next_event(job, None)
                continue
            finished = True
            if ev[0] == "error":
                yield _data(ev[1].body())
            else:
                summary = ev[1]
                yield _chunk(kind, meta, finish=_finish(summary), eagle3=_stats(summary))
                if include_usage:
                    yield _data({**meta, "object": _chunk_object(kind), "choices": [],
                                 "usage": _usage(summary)})
            yield "data: [DONE]\n\n"
            return
    finally:
        if not finished:
            worker.cancel(job)


def _chunk_object(kind: str) -> str:
    return "chat.completion.chunk" if kind == "chat" else "text_completion"
