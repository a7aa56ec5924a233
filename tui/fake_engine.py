"""A small deterministic stand-in for ``eagle3_mlx.Engine``.

It streams a fixed Markdown answer in fixed-size "steps" with fixed timings,
so UI layout and snapshot tests are reproducible and need no model.  It has
the real engine's attributes the chat uses: ``stream_generate``, ``reset``,
``set_tree``, ``spec``, ``draft_source``, ``max_context`` and
``prompt_tokens_processed``.
"""

from __future__ import annotations

import re
import time

from eagle3_mlx.engine import GenerationResponse
from eagle3_mlx.treespec import TreeSpec

DEFAULT_ANSWER = (
    "Speculative decoding lets a small **draft head** propose several tokens, "
    "and the target model checks them all in *one* forward pass.\n\n"
    "```python\n"
    "def add(a, b):\n"
    "    return a + b\n"
    "```\n\n"
    "Every token you see is exactly what the target alone would produce."
)


def _pieces(text: str) -> list[str]:
    return re.findall(r"\s*\S+|\s+", text)


class FakeEngine:
    def __init__(self, answer: str = DEFAULT_ANSWER, pattern=(3, 1, 4, 2, 5, 2, 1, 3), *,
                 draft_ms: float = 1.5, verify_ms: float = 4.0, step_delay: float = 0.0,
                 top_k: int = 4, depth: int = 4, total_tokens: int = 16, peak_memory: float = 0.25):
        self.answer = answer
        self.pattern = tuple(pattern)
        self.draft_ms_value = draft_ms
        self.verify_ms_value = verify_ms
        self.step_delay = step_delay
        self.top_k, self.depth, self.total_tokens = top_k, depth, total_tokens
        self.peak_memory = peak_memory
        self.prompt_tokens_processed = 0
        self._cache: list[str] = []
        self.calls: list[dict] = []
        self.fail_next: BaseException | None = None
        self.draft_source = "eagle"
        self.max_context = 32768

    @property
    def spec(self) -> TreeSpec:
        return TreeSpec(self.top_k, self.depth, self.total_tokens)

    # -- engine surface -------------------------------------------------
    def reset(self) -> None:
        self._cache = []

    def set_tree(self, top_k=None, depth=None, total_tokens=None) -> None:
        if top_k is not None:
            self.top_k = int(top_k)
        if depth is not None:
            self.depth = int(depth)
        if total_tokens is not None:
            self.total_tokens = int(total_tokens)

    def _encode(self, prompt) -> list[str]:
        if isinstance(prompt, str):
            return _pieces(prompt)
        if prompt and isinstance(prompt[0], dict):
            text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in prompt) + "<assistant>"
            return re.findall(r"\w+|[^\w\s]", text)
        return [str(t) for t in prompt]

    def stream_generate(self, prompt, max_tokens: int = 256, temp: float = 0.0, top_p: float = 1.0,
                        top_k: int = 0, min_p: float = 0.0, stop=None, speculative: bool = True,
                        cancel=None):
        self.calls.append(dict(prompt=prompt, max_tokens=max_tokens, temp=temp, top_p=top_p,
                               speculative=speculative))
        if self.fail_next is not None:
            exc, self.fail_next = self.fail_next, None
            raise exc
        toks = self._encode(prompt)
        common = 0
        for a, b in zip(self._cache, toks):
            if a != b:
                break
            common += 1
        self.prompt_tokens_processed += len(toks) - common
        self._cache = list(toks)
        question = ""
        if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
            question = prompt[-1].get("content", "")
        text = self.answer.replace("{question}", question)
        pieces = _pieces(text)[:max_tokens]
        finish = "stop" if len(_pieces(text)) <= max_tokens else "length"
        n = 0
        step = 0
        spent_ms = 0.0
        while n < len(pieces):
            if cancel is not None and cancel.is_set():
                yield self._response("", 0, False, step, False, 0, n, step, spent_ms, len(toks), "cancelled")
                return
            if self.step_delay:
                time.sleep(self.step_delay)
            size = self.pattern[step % len(self.pattern)] if speculative else 1
            size = min(size, len(pieces) - n)
            d_ms = self.draft_ms_value if speculative else 0.0
            spent_ms += d_ms + self.verify_ms_value
            for j in range(size):
                n += 1
                last = n == len(pieces)
                yield self._response(pieces[n - 1], 100 + n, speculative and j < size - 1, step, j == 0,
                                     size, n, step + 1, spent_ms, len(toks), finish if last else None,
                                     d_ms)
            step += 1
        if not pieces:
            yield self._response("", 0, False, 0, False, 0, 0, 0, 0.0, len(toks), finish)

    def _response(self, text, token, from_draft, step_index, new_step, step_tokens, n, steps, spent_ms,
                  prompt_tokens, finish, draft_ms=None):
        return GenerationResponse(
            text=text, token=token, from_draft=from_draft, step_index=step_index, new_step=new_step,
            step_tokens=step_tokens, draft_ms=self.draft_ms_value if draft_ms is None else draft_ms,
            verify_ms=self.verify_ms_value, tokens_per_step=(n / steps) if steps else 0.0,
            generation_tokens=n, generation_tps=(n / (spent_ms / 1000.0)) if spent_ms else 0.0,
            prompt_tokens=prompt_tokens, prompt_tps=1000.0, prompt_ms=prompt_tokens / 1.0,
            peak_memory=self.peak_memory, finish_reason=finish, steps=steps,
        )
