"""The one thread that owns the engine, under both the chat and the server.

MLX streams belong to the thread that created them (MLX work on another
thread fails or waits on the first one's stream), so a single thread loads
the engine and does every piece of MLX work: prefill, drafting, verification,
cache resets and tree changes.

Contract:
* :class:`EngineOwner` runs ``loader()`` on its thread (it returns
  ``(engine, tuner)``; ``tuner`` is the online tuner for ``--tree auto`` or
  None), then hands the queued items to ``handle(item)`` one at a time in
  arrival order. Every item has a ``cancel`` :class:`threading.Event`.
* ``submit`` queues (``max_waiting`` bounds the queue: :class:`Full`, after
  ``close``: :class:`Closed`); ``remove`` drops a waiting item;
  ``cancel_running`` sets the running item's event; ``close`` refuses new
  items, cancels the running one and returns the waiting ones, which never run.
* On the owner's thread, :meth:`EngineOwner.generate` runs one generation:
  every response goes to the tuner (speculative answers only) and
  ``on_response``, and a :class:`eagle3_mlx.runs.Run` accumulates the stream.
  After a failure that may have left the KV cache half-updated the engine is
  reset; input refused up front (ValueError/TypeError before the first
  token, e.g. the context limit) keeps the cache. :meth:`retune` lets the
  tuner refresh the tree between answers (a failing tuner is dropped).
* The engine reuses its KV cache for the longest common token prefix with the
  previous request, so nothing here resets it between answers.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Optional

from .runs import Run


class Full(Exception):
    """The queue holds ``max_waiting`` items; ``ahead`` are waiting or running."""

    def __init__(self, ahead: int):
        super().__init__("queue full")
        self.ahead = ahead


class Closed(Exception):
    """The owner was closed: it takes no new items."""


class EngineOwner:
    def __init__(self, loader: Callable[[], tuple], handle: Callable[[Any], None], *,
                 on_loaded: Optional[Callable[[Optional[BaseException]], None]] = None,
                 name: str = "eagle3-engine"):
        self._loader, self._handle, self._on_loaded = loader, handle, on_loaded
        self.engine: Any = None
        self.tuner: Any = None
        self.load_error: Optional[BaseException] = None
        self.loaded = threading.Event()       # set once loading finished (ok or not)
        self._waiting: collections.deque = collections.deque()
        self._running: Any = None
        self._cond = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    # -- any thread ------------------------------------------------------------------

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: Optional[float] = None) -> None:
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def submit(self, item, max_waiting: Optional[int] = None):
        with self._cond:
            if self._closing:
                raise Closed()
            if max_waiting is not None and len(self._waiting) >= max_waiting:
                raise Full(len(self._waiting) + (self._running is not None))
            self._waiting.append(item)
            self._cond.notify()
        return item

    def remove(self, item) -> bool:
        """Drop ``item`` if it is still waiting (True), else leave it be."""
        with self._cond:
            try:
                self._waiting.remove(item)
            except ValueError:
                return False
            return True

    def cancel_running(self) -> None:
        with self._cond:
            if self._running is not None:
                self._running.cancel.set()

    def close(self) -> list:
        """Refuse new items, cancel the running one; the waiting ones, which will not run."""
        with self._cond:
            self._closing = True
            waiting, self._waiting = list(self._waiting), collections.deque()
            if self._running is not None:
                self._running.cancel.set()
            self._cond.notify_all()
        for item in waiting:
            item.cancel.set()
        return waiting

    def status(self) -> dict:
        with self._cond:
            return {"waiting": len(self._waiting), "running": self._running is not None}

    # -- the owner's thread --------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.engine, self.tuner = self._loader()
        except BaseException as exc:  # noqa: BLE001 - reported through on_loaded / load_error
            self.load_error = exc
        self.loaded.set()
        if self._on_loaded is not None:
            self._on_loaded(self.load_error)
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if not self._waiting:
                    return  # closing and nothing left
                item = self._running = self._waiting.popleft()
            try:
                self._handle(item)
            except Exception:  # noqa: BLE001 - handlers report their own errors; never let the thread die
                pass
            finally:
                with self._cond:
                    self._running = None

    def generate(self, prompt, *, cancel: threading.Event, speculative: bool = True,
                 on_response: Callable[[Any], None] = lambda r: None, **params) -> Run:
        """One generation on this thread (see the module's contract); the Run's
        ``prompt_processed`` is how many prompt tokens were not reused."""
        engine = self.engine
        tuner = self.tuner if speculative else None
        run = Run()
        before = engine.prompt_tokens_processed
        try:
            for r in engine.stream_generate(prompt, speculative=speculative, cancel=cancel, **params):
                run.add(r)
                if tuner is not None:
                    tuner.observe(r)
                on_response(r)
        except Exception as exc:
            if run.tokens or not isinstance(exc, (ValueError, TypeError)):
                engine.reset()   # the KV cache may be half-updated: start clean next time
            raise
        run.prompt_processed = engine.prompt_tokens_processed - before
        return run

    def retune(self, on_error: Callable[[Exception], None] = lambda exc: None):
        """After an answer: the tuner refreshes the acceptance and may switch the
        tree (returns the new TreeSpec, else None). A failing tuner is dropped:
        the tree stays as it is."""
        if self.tuner is None:
            return None
        try:
            return self.tuner.maybe_retune()
        except Exception as exc:  # noqa: BLE001 - tuning is optional
            self.tuner = None
            on_error(exc)
            return None
