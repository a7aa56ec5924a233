"""Running a prompt and keeping what came out: tokens, text, timings, statistics.

Contract: :func:`collect` consumes one response stream -- the engine's
:class:`~eagle3_mlx.engine.GenerationResponse` stream or mlx-lm's
``stream_generate`` -- and returns a :class:`Run`: every token and the text,
the finish reason, time to the first token and decode time, and for the
engine's streams the target forwards, draft and verify time and accepted
tokens per draft source. ``on_response`` sees each response as it arrives
(printing, the online tuner). :func:`format_stats` is the one line of
statistics the commands print. Neither starts a generation nor imports MLX.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Optional


@dataclass
class Run:
    tokens: List[int] = field(default_factory=list)
    text: str = ""
    first_s: float = 0.0          # call -> first token (prompt processing)
    decode_s: float = 0.0         # first token -> last token
    steps: int = 0                # target forwards (engine streams)
    draft_ms: float = 0.0
    verify_ms: float = 0.0
    finish: Optional[str] = None
    source_tokens: Optional[dict] = None  # accepted drafted tokens per draft source
    last: Any = None              # the last response (the engine's carries running statistics)

    @property
    def decode_tokens(self) -> int:
        return max(0, len(self.tokens) - 1)

    @property
    def tps(self) -> Optional[float]:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 and self.decode_tokens else None

    @property
    def ttft_ms(self) -> float:
        return self.first_s * 1000


def collect(responses: Iterable, on_response: Optional[Callable[[Any], None]] = None) -> Run:
    """Drain ``responses`` (a generator: timing starts with its first step) into a Run."""
    run = Run()
    t0 = time.perf_counter()
    t_first = t_last = None
    for r in responses:
        now = time.perf_counter()
        if t_first is None:
            t_first = now
        t_last = now
        run.tokens.append(int(r.token))
        run.text += r.text
        run.finish = r.finish_reason
        if hasattr(r, "new_step"):            # the engine's response: step statistics
            run.steps = r.steps
            run.source_tokens = r.source_tokens or run.source_tokens
            if r.new_step:
                run.draft_ms += r.draft_ms
                run.verify_ms += r.verify_ms
        run.last = r
        if on_response is not None:
            on_response(r)
    if t_first is not None:
        run.first_s = t_first - t0
        run.decode_s = t_last - t_first
    return run


def format_stats(r: Any, ttft_ms: Optional[float] = None) -> str:
    """One line of a generation's statistics from its last engine response."""
    def g(name, spec, unit=""):
        v = getattr(r, name, None)
        return "–" if v is None else f"{v:{spec}}{unit}"

    parts = [f"{g('generation_tokens', 'd')} tokens", f"{g('tokens_per_step', '.2f')} tokens/step",
             f"{g('generation_tps', '.1f')} tok/s", f"draft {g('draft_ms', '.2f')} ms",
             f"verify {g('verify_ms', '.2f')} ms", f"peak {g('peak_memory', '.2f')} GB"]
    if ttft_ms is not None:
        parts.append(f"first token {ttft_ms:.0f} ms")
    parts.append(f"finish {getattr(r, 'finish_reason', None)}")
    src = getattr(r, "source_tokens", None)
    if src and getattr(r, "speculative", False):
        drafter = getattr(r, "drafter", "eagle")   # the model drafter's slot: a head or MTP
        parts.append("accepted by source " + ", ".join(
            f"{drafter if k == 'eagle' else k} {v}" for k, v in src.items()))
    return "[" + " · ".join(parts) + "]"
