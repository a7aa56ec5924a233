"""Plain-Python records that travel from the engine thread to the UI.

Nothing here touches MLX or Textual: the engine thread copies every field it
needs out of the engine's responses into these records before posting them, so
the UI thread never holds a reference to an MLX array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from eagle3_mlx.runs import Run

# Fields copied from each engine response (see docs/architecture.md, Engine API).
RESPONSE_FIELDS = (
    "tokens_per_step",
    "generation_tokens",
    "generation_tps",
    "prompt_tokens",
    "prompt_tps",
    "prompt_ms",
    "peak_memory",
    "finish_reason",
)


def _num(value: Any, kind=float):
    if value is None:
        return None
    try:
        return kind(value)
    except (TypeError, ValueError):
        return None


@dataclass(frozen=True)
class TokenRecord:
    """One streamed token (or text delta) of an answer, shaped like the
    engine's response as far as :class:`eagle3_mlx.runs.Run` reads it (the
    running source counts travel in the snapshot instead)."""

    text: str
    token: int
    from_draft: bool
    step_index: int | None
    new_step: bool
    step_tokens: int | None
    draft_ms: float | None
    verify_ms: float | None
    steps: int = 0
    finish_reason: str | None = None
    source_tokens = None

    @classmethod
    def from_response(cls, r: Any) -> "TokenRecord":
        return cls(text=str(r.text or ""), token=int(r.token), from_draft=bool(r.from_draft),
                   step_index=_num(r.step_index, int), new_step=bool(r.new_step),
                   step_tokens=_num(r.step_tokens, int), draft_ms=_num(r.draft_ms),
                   verify_ms=_num(r.verify_ms), steps=_num(r.steps, int) or 0,
                   finish_reason=None if r.finish_reason is None else str(r.finish_reason))


def snapshot_response(r: Any) -> dict:
    """Copy the running statistics of an engine response into a plain dict."""
    out = {}
    for name in RESPONSE_FIELDS:
        v = getattr(r, name)
        if name == "finish_reason":
            out[name] = None if v is None else str(v)
        elif name in ("generation_tokens", "prompt_tokens"):
            out[name] = _num(v, int)
        else:
            out[name] = _num(v)
    src = r.source_tokens
    if isinstance(src, dict) and r.speculative:
        # accepted drafted tokens per source so far: {"eagle": n, "ngram": n, "both": n}
        out["source_tokens"] = {str(k): _num(n, int) or 0 for k, n in src.items()}
    return out


@dataclass
class AnswerStats:
    """Statistics of one answer, accumulated on the UI side from TokenRecords.

    The running tau, tok/s, token counts and peak memory are the engine's own
    figures (copied from its latest response), never recomputed here; the
    per-step series for the sparkline, the histogram and the per-step timing
    means are the one stream accumulator's (:class:`eagle3_mlx.runs.Run`).
    """

    speculative: bool = True
    run: Run = field(default_factory=Run)
    latest: dict = field(default_factory=dict)
    ttft_ms: float | None = None
    new_prompt_tokens: int | None = None
    finish_reason: str | None = None

    def add_tokens(self, records) -> None:
        for rec in records:
            self.run.add(rec)

    def update(self, latest: dict | None) -> None:
        if latest:
            self.latest = dict(latest)
            if latest.get("finish_reason"):
                self.finish_reason = latest["finish_reason"]

    # -- derived figures -------------------------------------------------
    @property
    def step_lengths(self) -> list[int]:
        return self.run.step_lengths

    @property
    def draft_tokens(self) -> int:
        return self.run.drafted

    @property
    def target_tokens(self) -> int:
        return len(self.run.tokens) - self.run.drafted

    @property
    def tau(self) -> float | None:
        return self.latest.get("tokens_per_step")

    @property
    def tps(self) -> float | None:
        return self.latest.get("generation_tps")

    @property
    def tokens(self) -> int | None:
        return self.latest.get("generation_tokens")

    @property
    def last_step(self) -> int | None:
        return self.step_lengths[-1] if self.step_lengths else None

    @property
    def steps(self) -> int:
        return len(self.step_lengths)

    @staticmethod
    def _mean(xs) -> float | None:
        return sum(xs) / len(xs) if xs else None

    @property
    def mean_draft_ms(self) -> float | None:
        return self._mean(self.run.step_draft_ms)

    @property
    def mean_verify_ms(self) -> float | None:
        return self._mean(self.run.step_verify_ms)

    def histogram(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for n in self.step_lengths:
            counts[n] = counts.get(n, 0) + 1
        return dict(sorted(counts.items()))
