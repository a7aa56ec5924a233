"""The best tree for measured costs and acceptance: the tree optimiser (pure, no MLX).

Contract: :func:`optimise` scores every (top_k, depth, total_tokens) inside the
measured verify widths by expected tokens/s and returns the best (the smallest
within a tolerance of the fastest) with every candidate; :func:`evaluate`
scores one shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, List, Optional, Tuple

from ..treespec import TreeSpec
from .acceptance import AcceptanceModel
from .costs import CostModel


@dataclass
class Candidate:
    spec: TreeSpec
    tau: float
    step_ms: float
    tps: float
    speedup: float

    def to_dict(self) -> dict:
        return {"top_k": self.spec.top_k, "depth": self.spec.depth, "total_tokens": self.spec.num_nodes,
                "tau": round(self.tau, 4), "step_ms": round(self.step_ms, 4),
                "tokens_per_s": round(self.tps, 4), "speedup": round(self.speedup, 4)}


def evaluate(spec: TreeSpec, costs: CostModel, acc: AcceptanceModel) -> Candidate:
    tau = acc.expected_tau(spec)
    ms = costs.step(spec.top_k, spec.depth, spec.num_nodes, tau)
    tps = 1000.0 * tau / ms if ms > 0 else float("inf")
    return Candidate(spec, tau, ms, tps, tps * costs.baseline_ms / 1000.0)


def optimise(costs: CostModel, acc: AcceptanceModel, *, top_ks: Optional[Iterable[int]] = None,
             depths: Optional[Iterable[int]] = None, max_nodes: Optional[int] = None,
             tolerance: float = 0.005, rescore: int = 64) -> Tuple[Candidate, List[Candidate]]:
    """Best tree for the cost curves and acceptance model, plus every candidate
    evaluated (best first; with per-prompt runs, the ``rescore`` best by the
    per-position estimate, re-scored). Only tree sizes inside the measured verify widths
    are considered. Among trees within ``tolerance`` of the best, the smallest
    (fewest nodes, then shallowest, then narrowest) wins."""
    max_nodes = min(max_nodes or costs.max_width, costs.max_width)
    if max_nodes < 2:
        raise ValueError("verify costs must cover a width of at least 2")
    top_ks = sorted(set(top_ks or range(1, costs.max_top_k + 1)))
    depths = sorted(set(depths or range(1, max(1, acc.levels - 1) + 1)))
    base = costs.baseline_ms
    cands = []
    for k in top_ks:
        for d in depths:
            curve = acc.tau_curve(k, d)
            draft = costs.draft(k, d)
            pool_nodes = len(curve)              # pool size + root
            for T in range(2, min(max_nodes, pool_nodes) + 1):
                tau = 1.0 + acc.rho * (curve[T - 1] - 1.0)
                ms = draft + costs.ext_ms * (tau - 1.0) + costs.verify(T) + costs.overhead_ms
                tps = 1000.0 * tau / ms
                cands.append(Candidate(TreeSpec(k, d, T), tau, ms, tps, tps * base / 1000.0))
    if not cands:
        raise ValueError("no candidate trees")
    if acc.has_runs:
        # The per-position curve ranks every shape quickly; the best ones are
        # re-scored by stepping through the measured runs like the engine.
        cands.sort(key=lambda c: -c.tps)
        seen, top = set(), []
        for c in cands:
            key = (c.spec.top_k, c.spec.depth, c.spec.num_nodes)
            if key not in seen:
                seen.add(key)
                top.append(c)
            if len(top) >= rescore:
                break
        cands = [evaluate(c.spec, costs, acc) for c in top]
    best_tps = max(c.tps for c in cands)
    near = [c for c in cands if c.tps >= best_tps * (1 - tolerance)]
    best = min(near, key=lambda c: (c.spec.num_nodes, c.spec.depth, c.spec.top_k))
    cands.sort(key=lambda c: -c.tps)
    return best, cands
