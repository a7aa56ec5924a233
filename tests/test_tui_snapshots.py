"""Snapshot tests (pytest-textual-snapshot) of the chat's main, settings and help screens.

The fake engine streams a fixed answer with fixed statistics, and the time to
first token comes from a frozen clock, so nothing here depends on timing.
Update with: pytest tests/test_tui_snapshots.py --snapshot-update
"""

from __future__ import annotations

import time

from eagle3_mlx.tui.app import ChatApp
from eagle3_mlx.tui.fake_engine import FakeEngine
from eagle3_mlx.tui.screens import ChatSettings

SIZE = (112, 40)


def snapshot_app() -> ChatApp:
    return ChatApp(lambda progress: FakeEngine(), model_label="Qwen2.5-Coder-0.5B + EAGLE-3 head",
                   settings=ChatSettings(max_tokens=256, top_k_tree=4, depth=4, total_tokens=16),
                   clock=lambda: 0.0, animate_loading=False)


async def _wait(pilot, cond, timeout=30.0):
    t0 = time.monotonic()
    while not cond():
        assert time.monotonic() - t0 < timeout, "timed out"
        await pilot.pause(0.02)


async def _answered(pilot):
    app = pilot.app
    app.prompt_input.cursor_blink = False
    await _wait(pilot, lambda: app.ready)
    await pilot.press(*"What does speculative decoding do?", "enter")
    await _wait(pilot, lambda: app.answers == 1 and app.turn is None)
    await pilot.pause(0.3)  # let the Markdown stream and the panel settle
    app.prompt_input.cursor_blink = False


async def _ready(pilot):
    pilot.app.prompt_input.cursor_blink = False
    await _wait(pilot, lambda: pilot.app.ready)
    await pilot.pause(0.1)


def test_main_screen(snap_compare):
    assert snap_compare(snapshot_app(), terminal_size=SIZE, run_before=_answered)


def test_main_screen_coloured_by_origin(snap_compare):
    async def run_before(pilot):
        await _answered(pilot)
        await pilot.press("ctrl+t")
        pilot.app.clear_notifications()
        await pilot.pause(0.1)

    assert snap_compare(snapshot_app(), terminal_size=SIZE, run_before=run_before)


def test_settings_screen(snap_compare):
    async def run_before(pilot):
        await _ready(pilot)
        await pilot.press("ctrl+s")
        await pilot.pause(0.2)
        pilot.app.screen.query_one("#system").cursor_blink = False
        pilot.app.screen.query_one("#temp").cursor_blink = False

    assert snap_compare(snapshot_app(), terminal_size=SIZE, run_before=run_before)


def test_help_screen(snap_compare):
    async def run_before(pilot):
        await _ready(pilot)
        await pilot.press("f1")
        await pilot.pause(0.2)

    assert snap_compare(snapshot_app(), terminal_size=SIZE, run_before=run_before)
