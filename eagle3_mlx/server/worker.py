"""The server's side of the engine owner: a bounded FIFO of requests and the
events each request's asyncio queue receives.

Contract:
* :class:`EngineWorker` runs on one :class:`eagle3_mlx.owner.EngineOwner`:
  ``loader()`` runs on the owner's thread and every piece of MLX work stays
  there (MLX streams are thread-local: the HTTP threads never touch the
  engine). One generation runs at a time.
* ``submit(prompt, args, loop)`` (called on the asyncio loop) queues a
  :class:`Job` in arrival order; beyond ``queue_size`` waiting jobs it raises
  :class:`QueueFull` (the app answers 429 with ``Retry-After``), and after
  ``shutdown()`` :class:`ShuttingDown` (503).
* A job's events reach its asyncio queue through ``loop.call_soon_threadsafe``:
  ``("delta", text)`` per generated piece, then exactly one of
  ``("done", summary)`` or ``("error", ApiError)``. The very first event tells
  the app whether the request was accepted (prompt encoded, context checked,
  first token out) before it commits to an HTTP status.
* ``cancel(job)`` sets the job's ``threading.Event``: a waiting job is dropped
  from the queue, a running one stops at the engine's next step
  (``Engine.stream_generate(cancel=...)``), so a client that disconnects frees
  the engine quickly.
* The engine reuses its KV cache for the longest common token prefix with the
  previous request (clients re-send the whole conversation every turn).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from ..owner import Closed, EngineOwner, Full
from ..runs import Run
from .schemas import ApiError


class QueueFull(Exception):
    def __init__(self, retry_after: int):
        super().__init__("queue full")
        self.retry_after = retry_after


class ShuttingDown(Exception):
    pass


_ids = itertools.count(1)


@dataclass
class Job:
    prompt: Any
    args: dict
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))

    def emit(self, kind: str, value=None):
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


@dataclass
class Counters:
    completed: int = 0
    cancelled: int = 0
    failed: int = 0
    rejected_queue_full: int = 0


SHUTTING_DOWN = dict(type="server_error", code="shutting_down")


class EngineWorker:
    """``loader()`` runs on the engine thread and returns ``(engine, tuner)``;
    ``tuner`` (an ``OnlineTuner`` for ``--tree auto``, or None) sees every
    response and may retune the tree between requests."""

    def __init__(self, loader: Callable[[], tuple], *, queue_size: int = 16):
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.queue_size = queue_size
        self.counters = Counters()
        self._avg_s = 1.0  # running mean of a request's engine time, for Retry-After
        self._owner = EngineOwner(loader, self._serve)
        self._thread = self._owner.thread
        self.loaded = self._owner.loaded

    @property
    def engine(self):
        return self._owner.engine

    @property
    def tuner(self):
        return self._owner.tuner

    @property
    def load_error(self) -> Optional[BaseException]:
        return self._owner.load_error

    # -- asyncio side ----------------------------------------------------------------

    def start(self):
        self._owner.start()

    def wait_loaded(self, timeout: Optional[float] = None):
        """Block until the engine is loaded; re-raise the load error."""
        self.loaded.wait(timeout)
        if self.load_error is not None:
            raise self.load_error
        if self.engine is None:
            raise TimeoutError("the engine did not load in time")
        return self.engine

    def submit(self, prompt, args: dict, loop: asyncio.AbstractEventLoop) -> Job:
        try:
            return self._owner.submit(Job(prompt, dict(args), loop), max_waiting=self.queue_size)
        except Closed:
            raise ShuttingDown() from None
        except Full as full:
            self.counters.rejected_queue_full += 1
            raise QueueFull(max(1, round(self._avg_s * full.ahead))) from None

    def cancel(self, job: Job):
        job.cancel.set()
        if self._owner.remove(job):
            self.counters.cancelled += 1
        # else running (stops at its next step) or already finished

    def shutdown(self):
        """Refuse new jobs, fail the waiting ones (503) and cancel the running one."""
        for job in self._owner.close():
            job.emit("error", ApiError(503, "the server is shutting down", **SHUTTING_DOWN))

    def join(self, timeout: Optional[float] = None):
        self._owner.join(timeout)

    def status(self) -> dict:
        return {**self._owner.status(), "queue_size": self.queue_size, **vars(self.counters)}

    # -- engine thread -------------------------------------------------------------

    def _serve(self, job: Job):
        if self.engine is None or job.cancel.is_set():
            self.counters.cancelled += 1
            return
        t0 = time.perf_counter()
        try:
            self._generate(job)
        finally:
            self._avg_s = 0.8 * self._avg_s + 0.2 * (time.perf_counter() - t0)

    def _generate(self, job: Job):
        started = []

        def emit(r):
            started.append(True)
            if r.text:
                job.emit("delta", r.text)

        try:
            run = self._owner.generate(self._encode(job.prompt), cancel=job.cancel, on_response=emit,
                                       **job.args)
        except Exception as e:  # noqa: BLE001 - one request's failure never stops the server
            self.counters.failed += 1
            job.emit("error", api_error(e, started=bool(started)))
            return
        totals = summary(run, self.engine, run.prompt_processed)
        cancelled = totals["finish_reason"] == "cancelled"
        if cancelled:
            self.counters.cancelled += 1
        else:
            self.counters.completed += 1
        job.emit("done", totals)
        if not cancelled:
            self._owner.retune()   # a failing tuner is dropped: the tree stays

    def _encode(self, prompt) -> list:
        """Token ids of the prompt (tokenizer work stays on this thread: HF fast
        tokenizers are not safe to share between threads)."""
        engine = self.engine
        try:
            ids = engine.encode(prompt)
        except Exception as e:  # noqa: BLE001 - e.g. no chat template
            raise ApiError(400, f"could not encode the prompt: {e}") from None
        vocab = engine.target.vocab_size
        if any(not 0 <= t < vocab for t in ids):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return ids


def api_error(e: Exception, started: bool) -> ApiError:
    """The OpenAI-shaped error a failed generation answers with."""
    from ..engine import ContextLimitError

    if isinstance(e, ApiError):
        return e
    if isinstance(e, ContextLimitError):
        return ApiError(400, str(e), param="messages", code="context_length_exceeded")
    if isinstance(e, (ValueError, TypeError)) and not started:
        return ApiError(400, str(e))
    return ApiError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error")


def summary(run: Run, engine, prompt_processed: int) -> dict:
    """A request's totals (usage, finish reason, the ``eagle3`` statistics)."""
    r = run.last
    if r is None:
        return {"finish_reason": "length", "prompt_tokens": 0, "completion_tokens": 0,
                "cached_tokens": 0, "eagle3": {}}
    spec = engine.spec
    return {
        "finish_reason": r.finish_reason or "length",
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.generation_tokens,
        "cached_tokens": max(0, r.prompt_tokens - prompt_processed),
        "eagle3": {
            "speculative": r.speculative,
            "draft_source": engine.draft_source,
            "tree": f"{spec.top_k},{spec.depth},{spec.total_tokens}",
            "tokens_per_step": round(r.tokens_per_step, 4),
            "steps": r.steps,
            "accepted_drafts": run.drafted,
            "source_tokens": dict(r.source_tokens or {}),
            "draft_ms": round(run.draft_ms, 3),
            "verify_ms": round(run.verify_ms, 3),
            "prompt_ms": round(r.prompt_ms, 3),
            "generation_tps": round(r.generation_tps, 2),
        },
    }
