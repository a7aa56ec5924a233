"""The one long-lived thread that owns the engine.

MLX streams belong to the thread that created them (MLX work on another
thread fails or waits on the first one's stream), so a single thread loads the model and
does every piece of MLX work: prefill, drafting, verification, cache resets and
tree changes.  The UI puts requests on a ``queue.Queue`` and never waits for
the model; the thread posts Textual messages back (``post_message`` is
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

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from textual.message import Message

from eagle3_mlx.entry import describe_error, describe_load_error
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
    pass


@dataclass
class SetTreeRequest:
    tree: dict


@dataclass
class CallRequest:
    """Run ``fn(engine)`` on the engine thread (tests and tools)."""

    fn: Callable[[Any], Any]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


_STOP = object()


def engine_tree(engine: Any) -> dict | None:
    """Best-effort read of the tree shape an engine is using."""
    for holder in (getattr(engine, "spec", None), engine, getattr(engine, "tree", None),
                   getattr(engine, "tree_config", None)):
        if holder is None:
            continue
        vals = {}
        for key in ("top_k", "depth", "total_tokens"):
            v = holder.get(key) if isinstance(holder, dict) else getattr(holder, key, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                vals[key] = int(v)
        if len(vals) == 3:
            return vals
    return None


class EngineThread:
    """Owns the engine on one daemon thread and serves requests from a queue.

    ``loader(progress)`` runs on that thread and returns the engine;
    ``progress(text, fraction=None)`` reports load progress to the UI.
    ``post(message)`` delivers messages to the UI (``app.post_message``).
    ``tuner_factory(engine)`` (default: the loader's ``make_tuner`` attribute,
    which ``cli.make_loader`` sets only for the calibrated tree) returns an
    ``OnlineTuner`` or None; it runs on this thread right after loading.
    """

    def __init__(self, loader: Callable[[Callable[..., None]], Any], post: Callable[[Message], Any], *,
                 clock: Callable[[], float] = time.perf_counter, flush_interval: float = 0.05,
                 name: str = "eagle3-engine",
                 tuner_factory: Callable[[Any], Any] | None = None) -> None:
        self._loader = loader
        self._tuner_factory = tuner_factory if tuner_factory is not None else getattr(loader, "make_tuner", None)
        self.tuner: Any = None  # the OnlineTuner while the tree is tuned automatically
        self._post_fn = post
        self._clock = clock
        self._flush_interval = flush_interval
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._current: GenerateRequest | None = None
        self._lock = threading.Lock()
        self.engine: Any = None
        self.load_error: str | None = None
        self.loaded = threading.Event()  # set once loading finished (ok or not)

    # -- UI-side API (never blocks) -----------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def thread(self) -> threading.Thread:
        return self._thread

    def generate(self, request_id: int, prompt: Any, params: dict, speculative: bool = True) -> GenerateRequest:
        req = GenerateRequest(request_id, prompt, dict(params), speculative)
        self._queue.put(req)
        return req

    def reset(self) -> None:
        self._queue.put(ResetRequest())

    def set_tree(self, **tree) -> None:
        self._queue.put(SetTreeRequest(dict(tree)))

    def call(self, fn: Callable[[Any], Any]) -> CallRequest:
        req = CallRequest(fn)
        self._queue.put(req)
        return req

    def cancel_current(self) -> None:
        with self._lock:
            if self._current is not None:
                self._current.cancel.set()

    def close(self, timeout: float = 3.0) -> None:
        """Cancel any answer, stop the thread and wait a little for it."""
        self.cancel_current()
        # Cancel queued answers too, so shutdown does not run them.
        pending = []
        try:
            while True:
                pending.append(self._queue.get_nowait())
        except queue.Empty:
            pass
        for req in pending:
            if isinstance(req, GenerateRequest):
                req.cancel.set()
            elif isinstance(req, CallRequest):
                req.error = RuntimeError("engine thread closed")
                req.done.set()
        self._queue.put(_STOP)
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    # -- engine thread ------------------------------------------------------
    def _post(self, message: Message) -> None:
        try:
            self._post_fn(message)
        except RuntimeError:
            pass  # the app (and its event loop) is gone

    def _progress(self, text: str, fraction: float | None = None) -> None:
        self._post(LoadProgress(str(text), fraction))

    def _run(self) -> None:
        try:
            self._progress("Loading model…")
            engine = self._loader(self._progress)
        except BaseException as exc:  # noqa: BLE001 - shown to the user
            self.load_error = describe_load_error(exc)
            self.loaded.set()
            self._post(LoadFailed(self.load_error))
        else:
            self.engine = engine
            if self._tuner_factory is not None:
                try:
                    self.tuner = self._tuner_factory(engine)
                except Exception:  # noqa: BLE001 - tuning is optional; the tree stays as loaded
                    self.tuner = None
            self.loaded.set()
            self._post(EngineReady({"tree": engine_tree(engine)}))
        while True:
            req = self._queue.get()
            if req is _STOP:
                break
            try:
                if isinstance(req, GenerateRequest):
                    self._generate(req)
                elif isinstance(req, ResetRequest):
                    self._reset()
                elif isinstance(req, SetTreeRequest):
                    self._set_tree(req)
                elif isinstance(req, CallRequest):
                    try:
                        req.result = req.fn(self.engine)
                    except BaseException as exc:  # noqa: BLE001
                        req.error = exc
                    finally:
                        req.done.set()
            except Exception as exc:  # noqa: BLE001 - never let the thread die
                self._post(EngineNotice(describe_error(exc), error=True))

    def _reset(self) -> None:
        if self.engine is not None:
            self.engine.reset()

    def _set_tree(self, req: SetTreeRequest) -> None:
        if self.engine is None:
            return
        try:
            self.engine.set_tree(**req.tree)
        except Exception as exc:  # noqa: BLE001
            self._post(TreeSet(engine_tree(self.engine), f"Could not change the tree: {describe_error(exc)}"))
        else:
            self.tuner = None  # the user chose this tree: no automatic changes for the session
            self._post(TreeSet(engine_tree(self.engine) or dict(req.tree)))

    def _retune(self) -> None:
        """After an answer: let the online tuner refresh the acceptance and
        maybe switch the tree; the app hears about a switch."""
        tuner = self.tuner
        if tuner is None or self.engine is None:
            return
        try:
            spec = tuner.maybe_retune()
        except Exception as exc:  # noqa: BLE001 - stop tuning, keep chatting
            self.tuner = None
            self._post(EngineNotice(f"Automatic tree tuning stopped: {describe_error(exc)}"))
            return
        if spec is not None:
            tree = {"top_k": spec.top_k, "depth": spec.depth, "total_tokens": spec.total_tokens}
            self._post(TreeSet(engine_tree(self.engine) or tree, retuned=True))

    def _generate(self, req: GenerateRequest) -> None:
        if req.cancel.is_set():
            self._post(AnswerDone(req.request_id, None, None, 0, True))
            return
        engine = self.engine
        if engine is None:
            msg = self.load_error or "The model is not loaded."
            self._post(AnswerFailed(req.request_id, f"No model is loaded. {msg}"))
            return
        with self._lock:
            self._current = req
        self._post(AnswerStarted(req.request_id))
        before = getattr(engine, "prompt_tokens_processed", None)
        clock = self._clock  # reported timings (TTFT); injectable for snapshots
        t0 = clock()
        last_flush = time.monotonic()  # batching always uses the real clock
        ttft_ms = None
        pending: list[TokenRecord] = []
        latest = None
        cancel_sent = False
        tuner = self.tuner if req.speculative else None
        finished = False

        def flush():
            nonlocal pending, last_flush
            if pending and not cancel_sent:
                self._post(AnswerChunk(req.request_id, pending, latest, ttft_ms))
            pending = []
            last_flush = time.monotonic()

        try:
            for r in engine.stream_generate(req.prompt, speculative=req.speculative, cancel=req.cancel,
                                            **req.params):
                now = clock()
                first = ttft_ms is None
                if first:
                    ttft_ms = (now - t0) * 1000.0
                pending.append(TokenRecord.from_response(r))
                latest = snapshot_response(r)
                if tuner is not None:
                    tuner.observe(r)
                if req.cancel.is_set():
                    # The UI has already frozen the answer; drain quietly until
                    # the engine notices the flag at its next step boundary.
                    cancel_sent = True
                    continue
                if first or time.monotonic() - last_flush >= self._flush_interval:
                    flush()
            flush()
        except Exception as exc:  # noqa: BLE001 - shown in the chat
            flush()
            detail = describe_error(exc)
            try:  # the KV cache may be half-updated: start clean next time
                engine.reset()
            except Exception:  # noqa: BLE001
                pass
            self._post(AnswerFailed(req.request_id, detail))
        else:
            after = getattr(engine, "prompt_tokens_processed", None)
            new_prompt = after - before if isinstance(after, int) and isinstance(before, int) else None
            self._post(AnswerDone(req.request_id, latest, ttft_ms, new_prompt, req.cancel.is_set()))
            finished = True
        finally:
            with self._lock:
                self._current = None
        if tuner is not None and finished:
            self._retune()  # after AnswerDone: the answer is never held up by it
