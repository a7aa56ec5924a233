"""Context n-gram matcher: where did the current context's tail occur before,
and what followed it there.

Contract: :class:`ContextMatcher` holds one token sequence (prompt plus
everything committed so far) and an index from every n-gram of length
``1..max_ngram`` to the positions that followed its most recent occurrences.
``extend`` appends tokens and updates the index in O(max_ngram) per token (no
rescan of the context); ``propose`` returns up to ``max_candidates`` distinct
continuations, longest match first, most recent occurrence first. Pure Python,
no MLX: it runs on the host between two target forwards.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Sequence


@dataclass(frozen=True)
class Candidate:
    match_len: int          # how many context tokens matched before the continuation
    tokens: tuple           # the proposed continuation


class ContextMatcher:
    def __init__(self, max_ngram: int = 8, min_ngram: int = 2, occurrences: int = 4):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"n-gram lengths must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram, self.occurrences = max_ngram, min_ngram, occurrences
        self.tokens: List[int] = []
        # n-gram -> start positions of what followed its latest occurrences (oldest first)
        self._follow: dict = {}

    def __len__(self):
        return len(self.tokens)

    def extend(self, tokens: Iterable[int]):
        toks, follow, cap = self.tokens, self._follow, self.occurrences
        for t in tokens:
            toks.append(int(t))
            end = len(toks)
            for n in range(1, min(self.max_ngram, end) + 1):
                key = tuple(toks[end - n:])
                starts = follow.get(key)
                if starts is None:
                    follow[key] = [end]
                else:
                    starts.append(end)
                    if len(starts) > cap:
                        del starts[0]

    def reset(self, tokens: Sequence[int] = ()):
        self.tokens, self._follow = [], {}
        self.extend(tokens)

    def sync(self, tokens: Sequence[int]):
        """Make the matcher hold ``tokens``: extended when they continue what it
        holds (a chat's next turn), rebuilt otherwise."""
        n = len(self.tokens)
        if len(tokens) >= n and list(tokens[:n]) == self.tokens:
            self.extend(tokens[n:])
        else:
            self.reset(tokens)

    def propose(self, max_len: int, max_candidates: int = 3) -> List[Candidate]:
        """Distinct continuations of the context's tail, best first."""
        toks, end = self.tokens, len(self.tokens)
        out, seen = [], set()
        for n in range(min(self.max_ngram, end), self.min_ngram - 1, -1):
            for start in reversed(self._follow.get(tuple(toks[end - n:]), ())):
                if start >= end:        # the tail itself: nothing follows yet
                    continue
                cont = tuple(toks[start:start + max_len])
                if cont in seen:
                    continue
                seen.add(cont)
                out.append(Candidate(n, cont))
                if len(out) >= max_candidates:
                    return out
        return out

