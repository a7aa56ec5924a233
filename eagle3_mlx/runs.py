"""Running a prompt and keeping what came out: tokens, text, timings, statistics.

Contract: :class:`Run` is the one accumulator of a response stream -- the
engine's :class:`~eagle3_mlx.engine.GenerationResponse` stream or mlx-lm's
``stream_generate``: every token and the text, the finish reason, time to the
first token and decode time, and for the engine's streams the target
forwards, draft and verify time, accepted tokens per draft source and the
per-step series (tokens per step, draft and verify ms per step).
:func:`collect` drains a stream into one. ``on_response`` sees each response as it arrives
(printing, the online tuner). :func:`format_stats` is the one line of
statistics the commands print. Neither starts a generation nor imports MLX.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, List, Optional


@dataclass
class Run:
    """What one response stream produced, accumulated one response at a time
    (:meth:`add`): the server's per-request totals, the chat's per-step series
    and the commands' runs are all this.

    A response is mlx-lm's (token, text, finish_reason) or step-shaped like the
    engine's :class:`~eagle3_mlx.engine.GenerationResponse` (also its test
    doubles and the chat's :class:`~eagle3_mlx.tui.stats.TokenRecord`), which
    adds the step statistics below."""

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
    drafted: int = 0              # tokens a draft proposed and the target accepted
    step_lengths: List[int] = field(default_factory=list)   # committed tokens per target forward
    step_draft_ms: List[float] = field(default_factory=list)   # per step that drafted or decoded
    step_verify_ms: List[float] = field(default_factory=list)
    prompt_processed: Optional[int] = None   # prompt tokens not reused from the cache (the owner's runs)
    started: float = field(default_factory=time.perf_counter)
    _first: Optional[float] = None

    def add(self, r) -> None:
        now = time.perf_counter()
        if self._first is None:
            self._first = now
            self.first_s = now - self.started
        self.decode_s = now - self._first
        self.tokens.append(int(r.token))
        self.text += r.text
        self.finish = r.finish_reason
        self.last = r
        if hasattr(r, "new_step"):            # a step-shaped response: step statistics
            self._add_step(r)

    def _add_step(self, r) -> None:
        self.steps = r.steps
        self.source_tokens = r.source_tokens or self.source_tokens
        self.drafted += bool(r.from_draft)
        if not r.new_step:                   # a step's figures repeat on each of its tokens
            return
        self.draft_ms += r.draft_ms or 0.0
        self.verify_ms += r.verify_ms or 0.0
        first = not self.step_lengths
        if r.step_tokens is not None:
            self.step_lengths.append(r.step_tokens)
        # The prefill forward (the first step) has no draft/verify timing.
        if not (first and not r.verify_ms):
            if r.draft_ms is not None:
                self.step_draft_ms.append(r.draft_ms)
            if r.verify_ms is not None:
                self.step_verify_ms.append(r.verify_ms)

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
    for r in responses:
        run.add(r)
        if on_response is not None:
            on_response(r)
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
