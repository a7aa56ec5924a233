"""How often the head's drafts are accepted: the acceptance model (pure, no MLX).

Contract: :class:`AcceptanceModel` is built from teacher-forced rank sequences
(:func:`.measure.measure_ranks`) and answers ``expected_tau(spec)`` for any tree
shape, simulated in "rank space" the way ``tree.py`` builds trees (level 1:
top_k ranks; each level expands the top_k most likely frontier nodes by top_k
ranks; the best ``total_tokens - 1`` of the pool are kept). ``rho`` is the
online correction the tuner (:mod:`.tuner`) keeps up to date.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Iterable, List, Sequence, Tuple

from ..treespec import TreeSpec

DEFAULT_LEVELS = 9          # acceptance measured for draft levels 1..9 (depth <= 8)
DEFAULT_MAX_RANK = 8


@dataclass
class AcceptanceModel:
    """Per-level, per-rank acceptance.

    q[j][r] : probability that the target's token at draft level j+1 is the
              head's rank-(r+1) candidate, given that levels 1..j were accepted.
    samples : measured rank sequences (1-based ranks, cut at the first level
              where the target's token is not among the top ``max_rank``);
              when there are enough, expected tau is their empirical mean.
    runs    : the same sequences kept per prompt, one per consecutive root
              position. With them expected tau is computed the way the engine
              advances: from root n it accepts a(n) tokens and the next root
              is n + a(n) + 1, so long accepted runs are counted once, not at
              every position inside them (the per-position mean overestimates
              tau when acceptance comes in streaks).
    rho     : online correction: tau' = 1 + rho * (tau - 1).
    """

    q: List[List[float]]
    samples: List[List[int]] = field(default_factory=list)
    runs: List[List[List[int]]] = field(default_factory=list)
    rho: float = 1.0
    source: str = "measured"
    min_samples: int = 50
    walk_offsets: int = 4

    def __post_init__(self):
        if self.runs and not self.samples:
            self.samples = [list(x) for run in self.runs for x in run]
        self._orders: dict = {}
        self._prefix: dict = {}
        self.q = [[min(1.0, max(0.0, float(p))) for p in row] for row in self.q]
        for j, row in enumerate(self.q):
            s = sum(row)
            if s > 1.0 + 1e-6:
                raise ValueError(f"acceptance probabilities at level {j + 1} sum to {s:.3f} > 1")

    @property
    def levels(self) -> int:
        return len(self.q)

    @property
    def max_rank(self) -> int:
        return max((len(r) for r in self.q), default=0)

    def _qp(self, level: int, rank: int) -> float:
        """q for 1-based level and rank (0 outside the measured range)."""
        if level > len(self.q) or rank > len(self.q[level - 1]):
            return 0.0
        return self.q[level - 1][rank - 1]

    @classmethod
    def from_rank_sequences(cls, seqs: Iterable[Sequence[int]], levels: int, max_rank: int,
                            prior: float = 0.5, **kw) -> "AcceptanceModel":
        """Estimate q from rank sequences (``prior``: pseudo-count, spread evenly
        over ranks and the miss outcome, so unseen cells are small but nonzero)."""
        seqs = [list(s)[:levels] for s in seqs]
        q = []
        for j in range(levels):
            reached = [s for s in seqs if len(s) >= j]   # levels 1..j accepted
            counts = [0] * max_rank
            for s in reached:
                if len(s) > j and 1 <= s[j] <= max_rank:
                    counts[s[j] - 1] += 1
            n = len(reached)
            if n == 0:
                q.append([0.0] * max_rank)
                continue
            eps = prior / (max_rank + 1)
            q.append([(c + eps) / (n + prior) for c in counts])
        return cls(q=q, samples=[list(s) for s in seqs], **kw)

    @classmethod
    def from_runs(cls, runs: Sequence[Sequence[Sequence[int]]], levels: int, max_rank: int,
                  **kw) -> "AcceptanceModel":
        """Like :meth:`from_rank_sequences`, keeping the per-prompt order."""
        runs = [[list(x)[:levels] for x in run] for run in runs]
        m = cls.from_rank_sequences([x for run in runs for x in run], levels, max_rank, **kw)
        m.runs = runs
        return m

    @property
    def per_level_rates(self) -> List[float]:
        """P(some top-max_rank candidate accepted at level j | levels < j accepted)."""
        return [sum(r) for r in self.q]

    def top1_rates(self) -> List[float]:
        return [r[0] if r else 0.0 for r in self.q]

    # -- shapes ----------------------------------------------------------------------

    def pool(self, top_k: int, depth: int) -> List[Tuple[float, int, Tuple[int, ...]]]:
        """The candidate pool of a (top_k, depth) tree in rank space, as
        (probability, level, rank path) in expansion order, mirroring tree.py."""
        level1 = [((r,), self._qp(1, r)) for r in range(1, top_k + 1)]
        pool = [(p, 1, path) for path, p in level1]
        front = level1
        for i in range(1, depth + 1):
            children = []
            for path, p in front:
                lvl = len(path) + 1
                for r in range(1, top_k + 1):
                    children.append((path + (r,), p * self._qp(lvl, r)))
            pool += [(p, len(path), path) for path, p in children]
            if i == depth:
                break
            order = sorted(range(len(children)), key=lambda c: (-children[c][1], c))
            front = [children[c] for c in order[:top_k]]
        return pool

    def _order(self, top_k: int, depth: int):
        """The (top_k, depth) pool and its nodes' keep order (best first)."""
        key = (top_k, depth)
        if key not in self._orders:
            pool = self.pool(top_k, depth)
            order = sorted(range(len(pool)), key=lambda i: (-pool[i][0], pool[i][1], i))
            self._orders[key] = (pool, order)
        return self._orders[key]

    def tau_curve(self, top_k: int, depth: int) -> List[float]:
        """Expected tau (bonus included, before ``rho``), per-position estimate,
        for every tree size: element ``n`` is the tree with n + 1 nodes kept
        (n = 0: root only)."""
        pool, order = self._order(top_k, depth)
        if len(self.samples) >= self.min_samples:
            index = {pool[i][2]: rank for rank, i in enumerate(order)}
            hist = [0] * len(pool)
            for s in self.samples:
                for j in range(1, len(s) + 1):
                    idx = index.get(tuple(s[:j]))
                    if idx is None:
                        break
                    hist[idx] += 1
            gains = [h / len(self.samples) for h in hist]
        else:
            gains = [pool[i][0] for i in order]
        curve, acc = [1.0], 1.0
        for g in gains:
            acc += g
            curve.append(acc)
        return curve

    @property
    def has_runs(self) -> bool:
        return sum(len(r) for r in self.runs) >= self.min_samples

    def walk_tau(self, spec: TreeSpec) -> float:
        """Expected tau (before ``rho``) stepping through the measured runs as
        the engine does, averaged over a few starting offsets."""
        k, d = spec.top_k, spec.depth
        if (k, d) not in self._prefix:
            pool, order = self._order(k, d)
            index = {pool[i][2]: r for r, i in enumerate(order)}
            pref = []
            for run in self.runs:
                rows = []
                for s in run:
                    idx = []
                    for j in range(1, len(s) + 1):
                        r = index.get(tuple(s[:j]))
                        if r is None:
                            break
                        idx.append(r)
                    rows.append(idx)
                pref.append(rows)
            self._prefix[(k, d)] = pref
        limit = spec.num_nodes - 1          # kept nodes have order index < limit
        toks = steps = 0
        for rows in self._prefix[(k, d)]:
            acc = [bisect.bisect_left(idx, limit) for idx in rows]
            for off in range(min(self.walk_offsets, len(acc))):
                i = off
                while i < len(acc):
                    toks += acc[i] + 1
                    steps += 1
                    i += acc[i] + 1
        return toks / steps if steps else 1.0

    def expected_tau(self, spec: TreeSpec, raw: bool = False) -> float:
        if self.has_runs:
            tau = self.walk_tau(spec)
        else:
            curve = self.tau_curve(spec.top_k, spec.depth)
            tau = curve[min(spec.num_nodes - 1, len(curve) - 1)]
        return tau if raw else 1.0 + self.rho * (tau - 1.0)

    def to_dict(self) -> dict:
        return {
            "q": [[round(p, 5) for p in row] for row in self.q],
            **({"runs": self.runs} if self.runs else {"samples": self.samples}),
            "rho": self.rho,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "AcceptanceModel":
        return cls(q=d["q"], samples=d.get("samples", []), runs=d.get("runs", []),
                   rho=d.get("rho", 1.0), source=d.get("source", "measured"))

    @classmethod
    def prior(cls, levels: int = DEFAULT_LEVELS, max_rank: int = DEFAULT_MAX_RANK) -> "AcceptanceModel":
        """A generic guess for a trained EAGLE-3 head (used only when acceptance
        cannot be measured): top-1 ~0.6 falling slowly with depth."""
        q = []
        for j in range(levels):
            top1 = 0.62 * (0.97 ** j)
            row = [top1] + [top1 * 0.25 * (0.6 ** r) for r in range(max_rank - 1)]
            q.append(row)
        return cls(q=q, source="prior")
