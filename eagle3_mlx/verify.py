"""Tree verification: which drafted tokens the target accepts.

Greedy: a node is accepted when its token is the target's argmax at its parent
and the same holds for all its ancestors; the deepest accepted node wins and the
target's argmax there is the bonus token. Computed on device, one host transfer.

Sampling: the multi-candidate recursive rejection rule (SpecInfer / EAGLE).
Walking down from the root, each child x (a deterministic draft pick) is accepted
with probability p(x) / (mass not yet rejected); a rejected child's mass is
removed; when no child is accepted the next token is drawn from the renormalised
residual. The output distribution is exactly the target's.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p


@dataclass
class SamplingParams:
    temp: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0

    def __post_init__(self):
        if self.temp < 0:
            raise ValueError(f"temp must be >= 0, got {self.temp}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise ValueError(f"min_p must be in [0, 1), got {self.min_p}")

    @property
    def greedy(self) -> bool:
        return self.temp == 0


def target_probs(logits, params: SamplingParams):
    """The distribution mlx-lm's sampler draws from: filters on the log-probs,
    then softmax(filtered / temp). logits: [T, V] -> probs [T, V] (fp32)."""
    x = logits.astype(mx.float32)
    logprobs = x - mx.logsumexp(x, axis=-1, keepdims=True)
    if 0 < params.top_p < 1.0:
        logprobs = apply_top_p(logprobs, params.top_p)
    if params.min_p != 0.0:
        logprobs = apply_min_p(logprobs, params.min_p, 1)
    if params.top_k > 0:
        logprobs = apply_top_k(logprobs, params.top_k)
    return mx.softmax(logprobs * (1.0 / params.temp), axis=-1)


def choose(logits, params: SamplingParams):
    """Next token from one row of logits [V] (plain decoding / prefill)."""
    if params.greedy:
        return mx.argmax(logits, axis=-1).astype(mx.int32)
    p = target_probs(logits[None], params)[0]
    return mx.random.categorical(mx.log(p)).astype(mx.int32)


def greedy_verify(tree, logits):
    """Returns device arrays (path_mask [T] bool, bonus scalar int32).

    logits: [T, V] target logits at every tree node."""
    g = mx.argmax(logits, axis=-1).astype(mx.int32)
    match = tree.tokens == g[tree.parents]
    match = mx.concatenate([mx.array([True]), match[1:]])
    ok = mx.all(match[None, :] | ~tree.ancestors, axis=1)
    best = mx.argmax(mx.where(ok, tree.depths, -1))
    return tree.ancestors[best], g[best]


def sample_verify(tree, logits, params: SamplingParams):
    """Recursive rejection over the tree. Two host transfers: the acceptance
    walk runs on the host over T scalars; the residual draw runs on device."""
    p = target_probs(logits, params)                       # [T, V]
    child_p = p[tree.parents, tree.tokens]                 # p(node token | parent)
    u = mx.random.uniform(shape=(tree.size,))
    parents, child_p_h, u_h = (a.tolist() for a in (tree.parents, child_p, u))
    children = [[] for _ in range(tree.size)]
    for i in range(1, tree.size):
        children[parents[i]].append(i)
    node, path, rejected = 0, [0], []
    while True:
        mass = 1.0
        rejected = []
        for c in children[node]:
            if u_h[c] * mass <= child_p_h[c] and child_p_h[c] > 0:
                node = c
                path.append(c)
                break
            mass -= child_p_h[c]
            rejected.append(c)
        else:
            break
    row = p[node]
    if rejected:
        row = row.at[tree.tokens[mx.array(rejected)]].multiply(0.0)
    bonus = mx.random.categorical(mx.log(row)).astype(mx.int32)
    return path, bonus
