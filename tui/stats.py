"""Plain-Python records that travel from the engine thread to the UI.

Nothing here touches MLX or Textual: the engine thread copies every field it
needs out of the engine's responses into these records before posting them, so
the UI thread never holds a reference to an MLX array.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    """One streamed token (or text delta) of an answer."""

    text: str
    from_draft: bool
    step_index: int | None
    new_step: bool
    step_tokens: int | None
    draft_ms: float | None
    verify_ms: float | None

    @classmethod
    def from_response(cls, r: Any) -> "TokenRecord":
        return cls(
            text=str(getattr(r, "text", "") or ""),
            from_draft=bool(getattr(r, "from_draft", False)),
            step_index=_num(getattr(r, "step_index", None), int),
            new_step=bool(getattr(r, "new_step", False)),
            step_tokens=_num(getattr(r, "step_tokens", None), int),
            draft_ms=_num(getattr(r, "draft_ms", None)),
            verify_ms=_num(getattr(r, "verify_ms", None)),
        )


def snapshot_response(r: Any) -> dict:
    """Copy the running statistics of an engine response into a plain dict."""
    out = {}
    for name in RESPONSE_FIELDS:
        v = getattr(r, name, None)
        if name == "finish_reason":
            out[name] = None if v is None else str(v)
        elif name in ("generation_tokens", "prompt_tokens"):
            out[name] = _num(v, int)
        else:
            out[name] = _num(v)
    src = getattr(r, "source_tokens", None)
    if isinstance(src, dict) and getattr(r, "speculative", True):
        # accepted drafted tokens per source so far: {"eagle": n, "ngram": n, "both": n}
        out["source_tokens"] = {str(k): _num(n, int) or 0 for k, n in src.items()}
    return out


@dataclass
class AnswerStats:
    """Statistics of one answer, accumulated on the UI side from TokenRecords.

    The running tau, tok/s, token counts and peak memory are the engine's own
    figures (copied from its latest response), never recomputed here; this
    class only collects the per-step series for the sparkline, the histogram
    and the per-step timing means.
    """

    speculative: bool = True
    step_lengths: list[int] = field(default_factory=list)
    draft_ms: list[float] = field(default_factory=list)
    verify_ms: list[float] = field(default_factory=list)
    draft_tokens: int = 0
    target_tokens: int = 0
    latest: dict = field(default_factory=dict)
    ttft_ms: float | None = None
    new_prompt_tokens: int | None = None
    finish_reason: str | None = None

    def add_tokens(self, records) -> None:
        for rec in records:
            if rec.new_step and rec.step_tokens is not None:
                self.step_lengths.append(rec.step_tokens)
                # The prefill forward (step 0) has no draft/verify timing.
                if not (rec.step_index == 0 and not rec.verify_ms):
                    if rec.draft_ms is not None:
                        self.draft_ms.append(rec.draft_ms)
                    if rec.verify_ms is not None:
                        self.verify_ms.append(rec.verify_ms)
            if rec.from_draft:
                self.draft_tokens += 1
            else:
                self.target_tokens += 1

    def update(self, latest: dict | None) -> None:
        if latest:
            self.latest = dict(latest)
            if latest.get("finish_reason"):
                self.finish_reason = latest["finish_reason"]

    # -- derived figures -------------------------------------------------
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
        return self._mean(self.draft_ms)

    @property
    def mean_verify_ms(self) -> float | None:
        return self._mean(self.verify_ms)

    def histogram(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for n in self.step_lengths:
            counts[n] = counts.get(n, 0) + 1
        return dict(sorted(counts.items()))
