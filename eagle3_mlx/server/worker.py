"""The one engine thread of the server, and its bounded FIFO of requests.

Contract:
* :class:`EngineWorker` starts ONE thread that loads the engine (``loader()``
  runs there) and then does every piece of MLX work: MLX streams are
  thread-local, so the engine must never be touched from the HTTP threads.
  One generation runs at a time.
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
import collections
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

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


class EngineWorker:
    """``loader()`` runs on the engine thread and returns ``(engine, tuner)``;
    ``tuner`` (an ``OnlineTuner`` for ``--tree auto``, or None) sees every
    response and may retune the tree between requests."""

    def __init__(self, loader: Callable[[], tuple], *, queue_size: int = 16):
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self._loader = loader
        self.queue_size = queue_size
        self.engine: Any = None
        self.tuner: Any = None
        self.load_error: Optional[BaseException] = None
        self.loaded = threading.Event()
        self.counters = Counters()
        self._waiting: collections.deque = collections.deque()
        self._running: Optional[Job] = None
        self._cond = threading.Condition()
        self._closing = False
        self._avg_s = 1.0  # running mean of a request's engine time, for Retry-After
        self._thread = threading.Thread(target=self._run, name="eagle3-engine", daemon=True)

    # -- asyncio side ----------------------------------------------------------------

    def start(self):
        self._thread.start()

    def wait_loaded(self, timeout: Optional[float] = None):
        """Block until the engine is loaded; re-raise the load error."""
        self.loaded.wait(timeout)
        if self.load_error is not None:
            raise self.load_error
        if self.engine is None:
            raise TimeoutError("the engine did not load in time")
        return self.engine

    def submit(self, prompt, args: dict, loop: asyncio.AbstractEventLoop) -> Job:
        job = Job(prompt, dict(args), loop)
        with self._cond:
            if self._closing:
                raise ShuttingDown()
            if len(self._waiting) >= self.queue_size:
                self.counters.rejected_queue_full += 1
                ahead = len(self._waiting) + (self._running is not None)
                raise QueueFull(max(1, round(self._avg_s * ahead)))
            self._waiting.append(job)
            self._cond.notify()
        return job

    def cancel(self, job: Job):
        job.cancel.set()
        with self._cond:
            try:
                self._waiting.remove(job)
            except ValueError:
                return  # running (stops at its next step) or already finished
            self.counters.cancelled += 1

    def shutdown(self):
        """Refuse new jobs, fail the waiting ones (503) and cancel the running one."""
        with self._cond:
            self._closing = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            if self._running is not None:
                self._running.cancel.set()
            self._cond.notify_all()
        for job in waiting:
            job.cancel.set()
            job.emit("error", ApiError(503, "the server is shutting down", type="server_error",
                                       code="shutting_down"))

    def join(self, timeout: Optional[float] = None):
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def status(self) -> dict:
        with self._cond:
            return {"waiting": len(self._waiting), "running": self._running is not None,
                    "queue_size": self.queue_size, **vars(self.counters)}

    # -- engine thread -------------------------------------------------------------

    def _run(self):
        try:
            self.engine, self.tuner = self._loader()
        except BaseException as e:  # noqa: BLE001 - reported by wait_loaded
            self.load_error = e
            self.loaded.set()
            return
        self.loaded.set()
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if not self._waiting:
                    return  # closing and nothing left
                job = self._running = self._waiting.popleft()
            t0 = time.perf_counter()
            try:
                self._serve(job)
            finally:
                with self._cond:
                    self._running = None
                self._avg_s = 0.8 * self._avg_s + 0.2 * (time.perf_counter() - t0)

    def _serve(self, job: Job):
        engine = self.engine
        if job.cancel.is_set():
            self.counters.cancelled += 1
            return
        started = False
        run = Run()
        before = engine.prompt_tokens_processed
        try:
            ids = self._encode(job.prompt)
            for r in engine.stream_generate(ids, cancel=job.cancel, **job.args):
                started = True
                run.add(r)
                if r.text:
                    job.emit("delta", r.text)
                if self.tuner is not None:
                    self.tuner.observe(r)
        except ApiError as e:
            self.counters.failed += 1
            job.emit("error", e)
            return
        except Exception as e:  # noqa: BLE001 - one request's failure never stops the server
            from ..engine import ContextLimitError

            self.counters.failed += 1
            if isinstance(e, ContextLimitError):
                job.emit("error", ApiError(400, str(e), param="messages", code="context_length_exceeded"))
            elif isinstance(e, (ValueError, TypeError)) and not started:
                job.emit("error", ApiError(400, str(e)))
            else:
                engine.reset()  # the KV cache may be half-updated: start clean next time
                job.emit("error", ApiError(500, f"generation failed: {type(e).__name__}: {e}",
                                           type="server_error"))
            return
        totals = summary(run, engine, engine.prompt_tokens_processed - before)
        if totals["finish_reason"] == "cancelled":
            self.counters.cancelled += 1
        else:
            self.counters.completed += 1
        job.emit("done", totals)
        if self.tuner is not None and totals["finish_reason"] != "cancelled":
            self._retune()

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

    def _retune(self):
        try:
            self.tuner.maybe_retune()
        except Exception:  # noqa: BLE001 - tuning is optional: keep the current tree
            self.tuner = None


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
