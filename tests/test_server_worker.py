"""The server's queue and engine thread, in process with a fake engine (no MLX):
bounded FIFO (429 + Retry-After beyond it), arrival order, cancellation of
waiting and running requests, and 503 for waiting requests at shutdown."""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from eagle3_mlx.server.app import create_app  # noqa: E402
from eagle3_mlx.server.worker import EngineWorker, QueueFull  # noqa: E402


class FakeEngine:
    """Emits one character per step of the prompt's text; each step waits for
    ``gate`` so a test can hold a request while others queue up."""

    def __init__(self):
        self.gate = threading.Event()
        self.order = []
        self.prompt_tokens_processed = 0
        self.spec = SimpleNamespace(top_k=2, depth=3, total_tokens=8)
        self.draft_source = "eagle"
        self.max_context = 100
        self.target = SimpleNamespace(vocab_size=1000)
        self.thread = None

    def encode(self, prompt):
        text = prompt[-1]["content"] if isinstance(prompt, list) else prompt
        return [ord(c) for c in text]

    def reset(self):
        pass

    def stream_generate(self, ids, *, cancel, max_tokens, **_):
        self.thread = threading.current_thread()
        self.order.append("".join(map(chr, ids)))
        self.prompt_tokens_processed += len(ids)
        for n in range(1, max_tokens + 1):
            assert self.gate.wait(10)
            finish = "cancelled" if cancel.is_set() else ("length" if n == max_tokens else None)
            yield SimpleNamespace(
                text=chr(ids[(n - 1) % len(ids)]), token=ids[(n - 1) % len(ids)], from_draft=n % 2 == 0,
                new_step=True, step_index=n - 1, step_tokens=1, source="eagle" if n % 2 == 0 else "", draft_ms=1.0, verify_ms=2.0, tokens_per_step=1.5, steps=n,
                prompt_tokens=len(ids), generation_tokens=n, finish_reason=finish, source_tokens={},
                speculative=True, prompt_ms=1.0, generation_tps=10.0)
            if finish:
                return


@pytest.fixture
def setup():
    engine = FakeEngine()
    worker = EngineWorker(lambda: (engine, None), queue_size=1)
    worker.start()
    worker.wait_loaded(5)
    app = create_app(worker, model_name="fake", max_tokens_limit=50)
    yield engine, worker, app
    engine.gate.set()
    worker.shutdown()
    worker.join(5)


async def _until(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.01)


def _chat(text, max_tokens=3):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": max_tokens, "temperature": 0}


async def test_queue_full_is_429_and_fifo_order(setup):
    engine, worker, app = setup
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        a = asyncio.create_task(c.post("/v1/chat/completions", json=_chat("aaa")))
        await _until(lambda: worker.status()["running"])
        b = asyncio.create_task(c.post("/v1/chat/completions", json=_chat("bbb")))
        await _until(lambda: worker.status()["waiting"] == 1)
        r = await c.post("/v1/chat/completions", json=_chat("ccc"))
        assert r.status_code == 429
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["code"] == "queue_full"
        engine.gate.set()
        ra, rb = await a, await b
    assert [x.json()["choices"][0]["message"]["content"] for x in (ra, rb)] == ["aaa", "bbb"]
    assert engine.order == ["aaa", "bbb"]
    assert engine.thread is worker._thread  # all engine work on the one engine thread
    body = ra.json()
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6,
                             "prompt_tokens_details": {"cached_tokens": 0}}
    assert body["eagle3"]["steps"] == 3 and body["eagle3"]["accepted_drafts"] == 1
    assert worker.status()["rejected_queue_full"] == 1


async def test_cancel_waiting_and_running_jobs(setup):
    engine, worker, app = setup
    loop = asyncio.get_running_loop()
    running = worker.submit("xyz", {"max_tokens": 40}, loop)
    await _until(lambda: worker.status()["running"])
    waiting = worker.submit("abc", {"max_tokens": 5}, loop)
    with pytest.raises(QueueFull):
        worker.submit("def", {"max_tokens": 5}, loop)
    worker.cancel(waiting)
    assert worker.status()["waiting"] == 0
    worker.cancel(running)
    engine.gate.set()
    events = []
    while not events or events[-1][0] == "delta":
        events.append(await asyncio.wait_for(running.events.get(), 5))
    assert events[-1][0] == "done" and events[-1][1]["finish_reason"] == "cancelled"
    assert len(events) - 1 < 40  # stopped at the next step, not after 40 tokens
    await _until(lambda: not worker.status()["running"])
    assert engine.order == ["xyz"] and worker.status()["cancelled"] == 2


async def test_shutdown_fails_waiting_requests_with_503(setup):
    engine, worker, app = setup
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        a = asyncio.create_task(c.post("/v1/chat/completions", json=_chat("aaa", 20)))
        await _until(lambda: worker.status()["running"])
        b = asyncio.create_task(c.post("/v1/chat/completions", json=_chat("bbb")))
        await _until(lambda: worker.status()["waiting"] == 1)
        worker.shutdown()
        engine.gate.set()
        ra, rb = await a, await b
        assert ra.status_code == 200 and ra.json()["choices"][0]["finish_reason"] == "cancelled"
        assert rb.status_code == 503 and rb.json()["error"]["code"] == "shutting_down"
        r = await c.post("/v1/chat/completions", json=_chat("ccc"))
        assert r.status_code == 503
