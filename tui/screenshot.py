"""Write the README screenshot of the chat (an SVG) with the scripted fake engine.

    python -m eagle3_mlx.tui.screenshot docs/chat.svg

The fake engine streams a fixed answer with fixed per-step statistics, so the
picture is reproducible; its numbers are illustrative, not a measurement.
"""

from __future__ import annotations

import asyncio
import sys
import time

from eagle3_mlx.tui.app import ChatApp
from eagle3_mlx.tui.fake_engine import FakeEngine
from eagle3_mlx.tui.screens import ChatSettings

ANSWER = (
    "Use slicing, which returns a **new** reversed list:\n\n"
    "```python\n"
    "items = [1, 2, 3]\n"
    "backwards = items[::-1]   # [3, 2, 1]\n"
    "items.reverse()           # in place\n"
    "```\n\n"
    "`reversed(items)` gives a lazy iterator instead."
)


async def _shoot(path: str, size=(112, 36)) -> None:
    engine = FakeEngine(ANSWER, pattern=(4, 3, 5, 2, 4, 1, 3, 5, 4, 2), draft_ms=1.1, verify_ms=9.4)
    app = ChatApp(lambda progress: engine, model_label="Qwen2.5-Coder-0.5B-Instruct + EAGLE-3 head",
                  settings=ChatSettings(max_tokens=512, top_k_tree=4, depth=4, total_tokens=16),
                  clock=lambda: 0.0, animate_loading=False)

    async def wait(pilot, cond):
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > 30:
                raise TimeoutError("screenshot: the fake answer did not finish")
            await pilot.pause(0.02)

    async with app.run_test(size=size) as pilot:
        app.prompt_input.cursor_blink = False
        await wait(pilot, lambda: app.ready)
        # one plain answer first, so the panel can compare speeds
        app.action_toggle_plain()
        await pilot.press(*"How do I reverse a list?", "enter")
        await wait(pilot, lambda: app.answers == 1 and app.turn is None)
        app.action_toggle_plain()
        await pilot.press(*"And with speculation?", "enter")
        await wait(pilot, lambda: app.answers == 2 and app.turn is None)
        app.action_toggle_colour()
        app.clear_notifications()
        await pilot.pause(0.4)
        app.save_screenshot(path)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    path = argv[0] if argv else "docs/chat.svg"
    asyncio.run(_shoot(path))
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
