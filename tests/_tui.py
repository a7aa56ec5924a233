"""What the chat's pilot tests share: waiting on the app, asking it a question,
starting it with its model loaded, and recording what the engine yielded."""

from __future__ import annotations

import contextlib
import time


async def wait_for(pilot, cond, timeout: float = 30.0, what: str = "condition"):
    t0 = time.monotonic()
    while not cond():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out waiting for {what}")
        await pilot.pause(0.02)


async def ask(pilot, app, text: str, timeout: float = 30.0):
    """Type ``text`` into the prompt, press enter and wait for the answer; returns its widget."""
    from eagle3_mlx.tui.widgets import AssistantMessage

    before = app.answers
    await pilot.press(*text, "enter")
    await wait_for(pilot, lambda: app.answers > before and app.turn is None, timeout, f"answer to {text!r}")
    return app.query(AssistantMessage).last()


@contextlib.asynccontextmanager
async def ready(app, size, timeout: float = 30.0):
    """``app`` running under a pilot of ``size``, its model loaded."""
    async with app.run_test(size=size) as pilot:
        await wait_for(pilot, lambda: app.ready, timeout, "model load")
        yield pilot


class Recorder:
    """Pass-through engine wrapper that records what the engine was asked and yielded."""

    def __init__(self, engine):
        self._engine = engine
        self.calls: list[dict] = []
        self.answers: list[list] = []
        self.fail_next: BaseException | None = None

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def stream_generate(self, prompt, **kw):
        self.calls.append(dict(kw, prompt=prompt))
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        got: list = []
        self.answers.append(got)
        for r in self._engine.stream_generate(prompt, **kw):
            got.append(r)
            yield r


def recording(loader, holder: dict):
    """``loader`` wrapped so its engine is recorded in ``holder["rec"]``; keeps its ``make_tuner``."""

    def wrapped(progress):
        holder["rec"] = Recorder(loader(progress))
        return holder["rec"]

    if hasattr(loader, "make_tuner"):
        wrapped.make_tuner = loader.make_tuner
    return wrapped
