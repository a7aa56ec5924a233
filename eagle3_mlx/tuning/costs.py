"""What one speculative step costs on this machine: the cost model (pure, no MLX).

Contract: :class:`CostModel` holds measured milliseconds (verify per tree width,
draft per top_k as a + b * depth, per-step bookkeeping, extension per extra
committed token) and answers ``step(top_k, depth, T, tau)``. The fits here
(:func:`monotone`, :func:`fit_draft_costs`, :func:`ext_cost`) turn raw timings
from :mod:`.measure` into that model. Nothing here times anything.

    tokens/s = E[tau](tree) / (t_draft(top_k, depth) + t_verify(T) + t_overhead)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple


def _interp(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """Piecewise-linear interpolation, linear extrapolation past the ends."""
    if len(xs) == 1:
        return ys[0]
    if x <= xs[0]:
        i = 0
    elif x >= xs[-1]:
        i = len(xs) - 2
    else:
        i = max(j for j in range(len(xs) - 1) if xs[j] <= x)
    x0, x1, y0, y1 = xs[i], xs[i + 1], ys[i], ys[i + 1]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def monotone(points: Dict[int, float]) -> Dict[int, float]:
    """Least-squares non-decreasing fit (pool adjacent violators): verifying
    more tokens never costs less, so timing noise must not say otherwise."""
    xs = sorted(points)
    blocks = []  # [sum, count]
    for x in xs:
        blocks.append([points[x], 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            s, n = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += n
    out, i = {}, 0
    for s, n in blocks:
        for _ in range(n):
            out[xs[i]] = s / n
            i += 1
    return out


@dataclass
class CostModel:
    """Measured costs in milliseconds.

    verify_ms : {T: ms} one verification step over T tree tokens (root
                included); T = 1 is a plain one-token decoding step.
    draft_ms  : {top_k: (a, b)}: drafting a tree costs a + b * depth.
    overhead_ms: per-step bookkeeping outside draft and verify.
    decode_ms : one plain decoding step (the baseline); defaults to verify_ms[1].
    ext_ms    : extra draft cost per committed token beyond the first: each
                step first extends the head's cache with the tau tokens the
                last step committed (draft_ms is measured with one).
    """

    verify_ms: Dict[int, float]
    draft_ms: Dict[int, Tuple[float, float]]
    overhead_ms: float = 0.0
    decode_ms: Optional[float] = None
    ext_ms: float = 0.0

    def __post_init__(self):
        self.verify_ms = {int(k): float(v) for k, v in self.verify_ms.items()}
        self.draft_ms = {int(k): (float(v[0]), float(v[1])) for k, v in self.draft_ms.items()}
        if not self.verify_ms or not self.draft_ms:
            raise ValueError("cost model needs verify and draft measurements")

    @property
    def max_width(self) -> int:
        return max(self.verify_ms)

    @property
    def max_top_k(self) -> int:
        return max(self.draft_ms)

    def verify(self, T: int) -> float:
        xs = sorted(self.verify_ms)
        return max(0.0, _interp(xs, [self.verify_ms[x] for x in xs], T))

    def draft(self, top_k: int, depth: int) -> float:
        ks = sorted(self.draft_ms)
        a = _interp(ks, [self.draft_ms[k][0] for k in ks], top_k)
        b = _interp(ks, [self.draft_ms[k][1] for k in ks], top_k)
        return max(0.0, a + b * depth)

    def step(self, top_k: int, depth: int, T: int, tau: float = 1.0) -> float:
        return (self.draft(top_k, depth) + self.ext_ms * max(0.0, tau - 1.0) + self.verify(T)
                + self.overhead_ms)

    @property
    def baseline_ms(self) -> float:
        return self.decode_ms if self.decode_ms is not None else self.verify(1)

    def to_dict(self) -> dict:
        return {
            "verify_ms": {str(k): round(v, 4) for k, v in sorted(self.verify_ms.items())},
            "draft_ms": {str(k): [round(a, 4), round(b, 4)] for k, (a, b) in sorted(self.draft_ms.items())},
            "overhead_ms": round(self.overhead_ms, 4),
            "decode_ms": None if self.decode_ms is None else round(self.decode_ms, 4),
            "ext_ms": round(self.ext_ms, 4),
        }

    @classmethod
    def from_dict(cls, d: dict) -> "CostModel":
        return cls(d["verify_ms"], d["draft_ms"], d.get("overhead_ms", 0.0), d.get("decode_ms"),
                   d.get("ext_ms", 0.0))


def ext_cost(raw: dict) -> float:
    """ms per extra extension token, from the ("ext", n) entries of the raw draft timings."""
    pts = sorted((n, ms) for key, ms in raw.items() if isinstance(key, tuple) and key[0] == "ext"
                 for n in [key[1]])
    if len(pts) < 2 or pts[-1][0] == pts[0][0]:
        return 0.0
    return max(0.0, (pts[-1][1] - pts[0][1]) / (pts[-1][0] - pts[0][0]))


def _nnls(rows: List[List[float]], ys: List[float]) -> List[float]:
    """Least squares with non-negative coefficients (active-set by elimination;
    fine for three unknowns)."""
    import numpy as np

    A, y = np.array(rows, dtype=float), np.array(ys, dtype=float)
    active = list(range(A.shape[1]))
    while True:
        coef = np.zeros(A.shape[1])
        if active:
            sol, *_ = np.linalg.lstsq(A[:, active], y, rcond=None)
            coef[active] = sol
        neg = [i for i in active if coef[i] < 0]
        if not neg:
            return [float(c) for c in coef]
        active.remove(min(neg, key=lambda i: coef[i]))


def fit_draft_costs(raw: Dict[Tuple[int, int], float]) -> Dict[int, Tuple[float, float]]:
    """One model for every (top_k, depth) measurement: ms = a + depth * (b + c * top_k)
    (each level runs the head on top_k rows and ranks top_k x vocab), fitted
    jointly so a noisy point cannot reorder the top_k values. Returned in the
    cost model's per-top_k form {top_k: (a, b + c * top_k)}."""
    raw = {kd: ms for kd, ms in raw.items() if isinstance(kd[0], int)}
    if len({d for _, d in raw}) < 2:
        return {k: (ms, 0.0) for (k, _), ms in raw.items()}
    keys = sorted(raw)
    a, b, c = _nnls([[1.0, d, d * k] for k, d in keys], [raw[kd] for kd in keys])
    return {k: (a, b + c * k) for k in sorted({k for k, _ in keys})}
