"""Does the chat UI slow the engine down? Tokens/s of `eagle3-mlx chat` (in a
real terminal: tmux) against `eagle3-mlx generate`, same model, head, prompt,
tree, draft source and max tokens, alternating, median over repeats.

    python scripts/chat_vs_generate.py [--model M --draft D] [--tree 3,1,8]
        [--draft-source hybrid] [--max-tokens 128] [--repeats 3] [--plain]
        [--json results.json]

The chat figure is the engine's own generation tok/s as the statistics panel
shows it after the answer (the same counter `generate` prints), so the two
differ only by what the UI costs the engine: CPU time and the GIL.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a Python function that checks whether a string is a palindrome, with a docstring and two examples."
OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def _exe() -> str:
    exe = Path(sys.executable).parent / "eagle3-mlx"
    return str(exe) if exe.exists() else "eagle3-mlx"


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TERM="xterm-256color", PYTHONUNBUFFERED="1")
    if os.path.exists(OPENBLAS):
        env["LD_PRELOAD"] = OPENBLAS
    env.pop("COLUMNS", None)
    env.pop("LINES", None)
    return env


def common_args(a) -> list:
    out = ["--max-tokens", str(a.max_tokens), "--tree", a.tree]
    if a.model:
        out += ["--model", a.model]
    if a.draft:
        out += ["--draft", a.draft]
    if a.draft_source:
        out += ["--draft-source", a.draft_source]
    return out


def run_generate(a) -> float:
    cmd = [_exe(), "generate", "--prompt", PROMPT] + common_args(a) + (["--no-spec"] if a.plain else [])
    p = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=900)
    m = re.search(r"[|·]\s*([\d.]+) tok/s", p.stderr)   # runs.format_stats separates with ·
    if p.returncode or not m:
        raise RuntimeError(f"generate failed:\n{p.stderr[-2000:]}")
    return float(m.group(1))


class ChatSession:
    """One `eagle3-mlx chat` in a private tmux server; ask() returns the panel's tok/s."""

    def __init__(self, a):
        self.base = ["tmux", "-L", f"chat-vs-gen-{os.getpid()}"]
        cmd = [_exe(), "chat"] + common_args(a) + (["--plain"] if a.plain else [])
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in _env().items()
                       if k in ("HF_HUB_OFFLINE", "TERM", "PYTHONUNBUFFERED", "LD_PRELOAD", "PATH", "HOME",
                                "EAGLE3_MLX_HOME"))
        shell = f"env -u COLUMNS -u LINES {env} {' '.join(shlex.quote(c) for c in cmd)}; sleep 30"
        self.tmux("new-session", "-d", "-s", "chat", "-x", "160", "-y", "50", shell)
        self.wait(lambda s: "Ready:" in s, 600, "the model to load")

    def tmux(self, *args):
        return subprocess.run(self.base + list(args), capture_output=True, text=True, timeout=30).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-t", "chat")

    def wait(self, pred, timeout, what) -> str:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            s = self.screen()
            if pred(s):
                return s
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}:\n{self.screen()}")

    def ask(self, max_tokens: int) -> float:
        self.tmux("send-keys", "-t", "chat", "C-n")          # a new conversation: no cached prefix
        time.sleep(1.0)
        self.tmux("send-keys", "-t", "chat", "-l", PROMPT)
        self.tmux("send-keys", "-t", "chat", "Enter")
        time.sleep(2.0)
        s = self.wait(lambda s: "ready ·" in s and re.search(r"\btokens\s+\d+", s), 900, "the answer")
        m = re.search(r"(?<![a-z] )\btok/s\s+([\d.]+)", s)     # the panel's own row, not "plain tok/s"
        if not m:
            raise RuntimeError(f"no tok/s on the panel:\n{s}")
        return float(m.group(1))

    def close(self):
        self.tmux("kill-server")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model")
    p.add_argument("--draft")
    p.add_argument("--tree", default="auto")
    p.add_argument("--draft-source", default=None)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--plain", action="store_true", help="plain decoding on both sides")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    if not (a.model and a.draft):
        # `generate` needs --model; both sides then run the same model and head
        from eagle3_mlx.default_model import default_paths

        a.model, a.draft = default_paths(a.model, a.draft)
    gen, chat = [], []
    session = ChatSession(a)
    try:
        for i in range(a.repeats):
            # alternate which goes first so drift hits both sides alike
            order = ("gen", "chat") if i % 2 == 0 else ("chat", "gen")
            for what in order:
                if what == "gen":
                    gen.append(run_generate(a))
                else:
                    chat.append(session.ask(a.max_tokens))
                print(f"repeat {i + 1}: {what} {(gen if what == 'gen' else chat)[-1]:.2f} tok/s", flush=True)
    finally:
        session.close()
    g, c = statistics.median(gen), statistics.median(chat)
    res = {"prompt": PROMPT, "tree": a.tree, "draft_source": a.draft_source, "plain": a.plain,
           "max_tokens": a.max_tokens, "generate_tps": gen, "chat_tps": chat,
           "generate_median": g, "chat_median": c, "chat_over_generate": c / g}
    print(f"generate {g:.2f} tok/s, chat {c:.2f} tok/s (medians of {a.repeats}): chat/generate {c / g:.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
