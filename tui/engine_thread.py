"""The chat's side of the one thread that owns the engine
(:class:`eagle3_mlx.owner.EngineOwner`, shared with the server).

That thread loads the model and does every piece of MLX work (MLX streams
are thread-local).  The UI puts requests on the owner's queue and never waits
for the model; the thread posts Textual messages back (``post_message`` is
thread-safe and does not block).  Token deltas are batched to at most about
twenty posts a second so a fast model cannot flood the UI.

With the calibrated tree (``--tree auto``) the thread also runs an
``OnlineTuner``: it sees every response of the speculative answers and, after
each finished answer, refreshes the acceptance estimate from them, saves it
to the calibration cache and may switch to a better tree (posted as
``TreeSet(..., retuned=True)``).  An explicit tree, or one the user sets in
the settings, is never changed.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from textual.message import Message

from eagle3_mlx.entry import describe_error, describe_load_error
from eagle3_mlx.owner import Closed, EngineOwner
from eagle3_mlx.tui.stats import TokenRecord, snapshot_response


# --------------------------------------------------------------------------
# Messages posted to the app (all fields are plain Python values)
# --------------------------------------------------------------------------
class LoadProgress(Message):
    def __init__(self, text: str, fraction: float | None = None) -> None:
        super().__init__()
        self.text = text
        self.fraction = fraction


class EngineReady(Message):
    def __init__(self, info: dict) -> None:
        super().__init__()
        self.info = info


class LoadFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class AnswerStarted(Message):
    def __init__(self, request_id: int) -> None:
        super().__init__()
        self.request_id = request_id


class AnswerChunk(Message):
    def __init__(self, request_id: int, tokens: list[TokenRecord], latest: dict | None,
                 ttft_ms: float | None) -> None:
        super().__init__()
        self.request_id = request_id
        self.tokens = tokens
        self.latest = latest
        self.ttft_ms = ttft_ms


class AnswerDone(Message):
    def __init__(self, request_id: int, latest: dict | None, ttft_ms: float | None,
                 new_prompt_tokens: int | None, cancelled: bool) -> None:
        super().__init__()
        self.request_id = request_id
        self.latest = latest
        self.ttft_ms = ttft_ms
        self.new_prompt_tokens = new_prompt_tokens
        self.cancelled = cancelled


class AnswerFailed(Message):
    def __init__(self, request_id: int, error: str) -> None:
        super().__init__()
        self.request_id = request_id
        self.error = error


class TreeSet(Message):
    """The tree the engine uses after a set_tree request (``error`` if refused),
    or after the online tuner switched it (``retuned``)."""

    def __init__(self, tree: dict | None, error: str | None = None, retuned: bool = False) -> None:
        super().__init__()
        self.tree = tree
        self.error = error
        self.retuned = retuned


class EngineNotice(Message):
    """A short note from the engine thread (cache reset, tree changed, errors)."""

    def __init__(self, text: str, error: bool = False) -> None:
        super().__init__()
        self.text = text
        self.error = error


# --------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------
@dataclass
class GenerateRequest:
    request_id: int
    prompt: Any
    params: dict
    speculative: bool = True
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class ResetRequest:
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class SetTreeRequest:
    tree: dict
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class CallRequest:
    """Run ``fn(engine)`` on the engine thread (tests and tools)."""

    fn: Callable[[Any], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def run(self, engine) -> None:
        try:
            self.result = self.fn(engine)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.error = exc
        finally:
            self.done.set()


def engine_tree(engine: Any) -> dict | None:
    """The tree shape the engine uses."""
    spec = engine.spec
    return {"top_k": int(spec.top_k), "depth": int(spec.depth), "total_tokens": int(spec.total_tokens)}


class _Batcher:
    """Collects an answer's tokens and posts them as AnswerChunks at most every
    ``interval`` seconds (the first token at once)."""

    def __init__(self, thread: "EngineThread", req: GenerateRequest) -> None:
        self.thread, self.req = thread, req
        self.t0 = thread._clock()            # reported timings (TTFT); injectable for snapshots
        self.last_flush = time.monotonic()   # batching always uses the real clock
        self.ttft_ms: float | None = None
        self.pending: list[TokenRecord] = []
        self.latest: dict | None = None
        self.cancel_seen = False

    def add(self, r) -> None:
        first = self.ttft_ms is None
        if first:
            self.ttft_ms = (self.thread._clock() - self.t0) * 1000.0
        self.pending.append(TokenRecord.from_response(r))
        self.latest = snapshot_response(r)
        if self.req.cancel.is_set():
            # The UI has already frozen the answer; drain quietly until the
            # engine notices the flag at its next step boundary.
            self.cancel_seen = True
        elif first or time.monotonic() - self.last_flush >= self.thread._flush_interval:
            self.flush()

    def flush(self) -> None:
        if self.pending and not self.cancel_seen:
            self.thread._post(AnswerChunk(self.req.request_id, self.pending, self.latest, self.ttft_ms))
        self.pending = []
        self.last_flush = time.monotonic()


class EngineThread:
    """The chat's side of the engine owner (:class:`eagle3_mlx.owner.EngineOwner`):
    requests from the UI, Textual messages back.

    ``loader(progress)`` runs on the owner's thread and returns the engine;
    ``progress(text, fraction=None)`` reports load progress to the UI.
    ``post(message)`` delivers messages to the UI (``app.post_message``).
    ``tuner_factory(engine)`` (default: the loader's ``make_tuner`` attribute,
    which ``cli.make_loader`` sets only for the calibrated tree) returns an
    ``OnlineTuner`` or None; it runs on that thread right after loading.
    """

    def __init__(self, loader: Callable[[Callable[..., None]], Any], post: Callable[[Message], Any], *,
                 clock: Callable[[], float] = time.perf_counter, flush_interval: float = 0.05,
                 name: str = "eagle3-engine",
                 tuner_factory: Callable[[Any], Any] | None = None) -> None:
        factory = tuner_factory if tuner_factory is not None else getattr(loader, "make_tuner", None)
        self._post_fn = post
        self._clock = clock
        self._flush_interval = flush_interval
        self._owner = EngineOwner(lambda: self._load(loader, factory), self._handle,
                                  on_loaded=self._loaded, name=name)

    # -- what the owner holds --------------------------------------------------
    @property
    def engine(self) -> Any:
        return self._owner.engine

    @property
    def tuner(self) -> Any:
        """The OnlineTuner while the tree is tuned automatically."""
        return self._owner.tuner

    @property
    def load_error(self) -> str | None:
        exc = self._owner.load_error
        return None if exc is None else describe_load_error(exc)

    @property
    def loaded(self) -> threading.Event:
        return self._owner.loaded

    @property
    def thread(self) -> threading.Thread:
        return self._owner.thread

    # -- UI-side API (never blocks) -----------------------------------------
    def start(self) -> None:
        self._owner.start()

    def generate(self, request_id: int, prompt: Any, params: dict, speculative: bool = True) -> GenerateRequest:
        return self._submit(GenerateRequest(request_id, prompt, dict(params), speculative))

    def reset(self) -> None:
        self._submit(ResetRequest())

    def set_tree(self, **tree) -> None:
        self._submit(SetTreeRequest(dict(tree)))

    def call(self, fn: Callable[[Any], Any]) -> CallRequest:
        return self._submit(CallRequest(fn))

    def _submit(self, req):
        try:
            return self._owner.submit(req)
        except Closed:
            _refuse(req)
            return req

    def cancel_current(self) -> None:
        self._owner.cancel_running()

    def close(self, timeout: float = 3.0) -> None:
        """Cancel any answer and the queued ones, stop the thread and wait a little for it."""
        for req in self._owner.close():
            _refuse(req)
        self._owner.join(timeout)

    # -- the owner's thread ------------------------------------------------------
    def _post(self, message: Message) -> None:
        try:
            self._post_fn(message)
        except RuntimeError:
            pass  # the app (and its event loop) is gone

    def _progress(self, text: str, fraction: float | None = None) -> None:
        self._post(LoadProgress(str(text), fraction))

    def _load(self, loader, factory) -> tuple:
        self._progress("Loading model…")
        engine = loader(self._progress)
        tuner = None
        if factory is not None:
            try:
                tuner = factory(engine)
            except Exception:  # noqa: BLE001 - tuning is optional; the tree stays as loaded
                tuner = None
        return engine, tuner

    def _loaded(self, error: BaseException | None) -> None:
        if error is not None:
            self._post(LoadFailed(self.load_error))
        else:
            self._post(EngineReady({"tree": engine_tree(self.engine)}))

    def _handle(self, req) -> None:
        try:
            if isinstance(req, GenerateRequest):
                self._generate(req)
            elif isinstance(req, ResetRequest):
                if self.engine is not None:
                    self.engine.reset()
            elif isinstance(req, SetTreeRequest):
                self._set_tree(req)
            elif isinstance(req, CallRequest):
                req.run(self.engine)
        except Exception as exc:  # noqa: BLE001 - never let the thread die
            self._post(EngineNotice(describe_error(exc), error=True))

    def _set_tree(self, req: SetTreeRequest) -> None:
        if self.engine is None:
            return
        try:
            self.engine.set_tree(**req.tree)
        except Exception as exc:  # noqa: BLE001
            self._post(TreeSet(engine_tree(self.engine), f"Could not change the tree: {describe_error(exc)}"))
        else:
            self._owner.tuner = None  # the user chose this tree: no automatic changes for the session
            self._post(TreeSet(engine_tree(self.engine)))

    def _retune(self) -> None:
        """After an answer: let the online tuner refresh the acceptance and
        maybe switch the tree; the app hears about a switch."""
        def stopped(exc):
            self._post(EngineNotice(f"Automatic tree tuning stopped: {describe_error(exc)}"))

        if self._owner.retune(on_error=stopped) is not None:
            self._post(TreeSet(engine_tree(self.engine), retuned=True))

    def _generate(self, req: GenerateRequest) -> None:
        if req.cancel.is_set():
            self._post(AnswerDone(req.request_id, None, None, 0, True))
            return
        if self.engine is None:
            msg = self.load_error or "The model is not loaded."
            self._post(AnswerFailed(req.request_id, f"No model is loaded. {msg}"))
            return
        self._post(AnswerStarted(req.request_id))
        batch = _Batcher(self, req)
        try:
            run = self._owner.generate(req.prompt, cancel=req.cancel, speculative=req.speculative,
                                       on_response=batch.add, **req.params)
        except Exception as exc:  # noqa: BLE001 - shown in the chat
            batch.flush()
            self._post(AnswerFailed(req.request_id, describe_error(exc)))
            return
        batch.flush()
        self._post(AnswerDone(req.request_id, batch.latest, batch.ttft_ms, run.prompt_processed,
                              req.cancel.is_set()))
        if req.speculative:
            self._retune()  # after AnswerDone: the answer is never held up by it


def _refuse(req) -> None:
    """A request that will not run: answers are cancelled, calls fail."""
    req.cancel.set()
    if isinstance(req, CallRequest):
        req.error = RuntimeError("engine thread closed")
        req.done.set()
