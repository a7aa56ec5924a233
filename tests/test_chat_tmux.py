"""Smoke test of `eagle3-mlx chat` in a real terminal (tmux), as a user runs it.

Starts the installed console script on a tiny offline model in a detached tmux
session (private socket), types a question, reads the screen with
capture-pane, checks that an answer and the statistics panel appear, then
quits with ctrl+q and checks the process exited cleanly.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


def _script() -> list[str]:
    exe = Path(sys.executable).parent / "eagle3-mlx"
    if exe.exists():
        return [str(exe), "chat"]
    return [sys.executable, "-m", "eagle3_mlx.tui.cli"]


class Tmux:
    def __init__(self, socket: str, session: str):
        self.base = ["tmux", "-L", socket]
        self.session = session

    def run(self, *args, check=True):
        return subprocess.run(self.base + list(args), check=check, capture_output=True, text=True, timeout=20)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", self.session).stdout

    def keys(self, *keys):
        self.run("send-keys", "-t", self.session, *keys)

    def wait_for(self, pred, timeout: float, what: str) -> str:
        t0 = time.monotonic()
        screen = ""
        while time.monotonic() - t0 < timeout:
            screen = self.screen()
            if pred(screen):
                return screen
            time.sleep(0.25)
        raise AssertionError(f"timed out waiting for {what}; screen was:\n{screen}")


def test_chat_in_tmux(demo_dirs, tmp_path):
    model, head = demo_dirs
    done = tmp_path / "exit-code"
    env = {
        "HF_HUB_OFFLINE": "1",
        "TERM": "xterm-256color",
        "COLORTERM": "truecolor",
        "PYTHONUNBUFFERED": "1",
        "EAGLE3_MLX_HOME": str(tmp_path / "home"),
    }
    openblas = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"
    if os.path.exists(openblas):
        env["LD_PRELOAD"] = openblas
    cmd = _script() + ["--model", str(model), "--draft", str(head), "--max-tokens", "40",
                       "--tree", "4,4,16"]
    # COLUMNS/LINES (set by pytest and some shells) would override the pane size
    shell = ("env -u COLUMNS -u LINES " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()) + " "
             + " ".join(shlex.quote(c) for c in cmd)
             + f"; echo $? > {shlex.quote(str(done))}; sleep 60")
    tmux = Tmux(f"eagle3-chat-test-{os.getpid()}", "chat")
    tmux.run("new-session", "-d", "-s", "chat", "-x", "120", "-y", "40", shell)
    try:
        screen = tmux.wait_for(lambda s: "Ready:" in s, 90, "the model to load")
        assert "eagle3-mlx chat" in screen  # header
        assert "SPECULATIVE" in screen and "τ tokens/step" in screen  # panel, before any answer
        tmux.keys("-l", "hello there")
        tmux.keys("Enter")
        screen = tmux.wait_for(
            lambda s: re.search(r"tokens\s+40\b", s) is not None and "ready ·" in s, 60,
            "the answer and its statistics")
        lines = screen.splitlines()
        left = [ln[:86] for ln in lines]
        # the question and the answer are in the conversation
        assert any("hello there" in ln for ln in left)
        i = next(k for k, ln in enumerate(left) if ln.strip().lstrip("▌█▎▍ ").startswith("eagle3"))
        assert left[i + 1].strip(" █▌▎▍"), f"no answer text under the eagle3 label:\n{screen}"
        # the statistics panel shows numbers for this answer
        assert re.search(r"τ tokens/step\s+\d+\.\d\d", screen), screen
        assert re.search(r"tok/s\s+\d+\.\d", screen), screen
        assert re.search(r"first token\s+\d+ ms", screen), screen
        assert re.search(r"peak memory\s+\d+\.\d+ [MG]B", screen), screen
        assert "k4 d4 n16" in screen  # tree shape
        # quit cleanly
        tmux.keys("C-q")
        t0 = time.monotonic()
        while not done.exists() and time.monotonic() - t0 < 20:
            time.sleep(0.2)
        assert done.exists(), f"chat did not exit on ctrl+q:\n{tmux.screen()}"
        assert done.read_text().strip() == "0"
        after = tmux.screen()
        assert "Traceback" not in after
    finally:
        tmux.run("kill-server", check=False)
