"""EAGLE-2/3 dynamic draft tree, built entirely on device.

Expansion (``top_k`` children per node, ``top_k`` nodes per level, ``depth``
levels after the first) ranks nodes by cumulative draft log-probability; the
pool of every candidate is then reranked and the best ``total_tokens - 1``
kept, in level order, under the root. ``top_k=1`` gives a chain: the same code
with one node per level.

Shapes are fixed by (top_k, depth, total_tokens), so no host sync happens here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx

from .treespec import TreeSpec  # noqa: F401 - re-exported: trees are built to this shape

# Deeper nodes lose this much score per level so a parent always outranks its
# child, even when a child's log-probability rounds to exactly 0; keeps the
# kept set ancestor-closed. It only reorders near-ties.
_DEPTH_TIEBREAK = 1e-3


@dataclass
class DraftTree:
    tokens: mx.array      # [T] int32 target ids, node 0 = root
    parents: mx.array     # [T] int32 node index of the parent (root: 0)
    ancestors: mx.array   # [T, T] bool, ancestors[i, j]: j is i or an ancestor of i
    depths: mx.array      # [T] int32, root = 0
    size: int
    is_chain: bool
    scores: Optional[mx.array] = None  # [T] cumulative draft log-prob (root 0), when drafted


def draft_tree(head, embed, dcache, ids, features, root_token, spec: TreeSpec):
    """Extend the head's stable cache and expand a draft tree.

    head      : Eagle3Head
    embed     : callable token ids -> embeddings for the head
    dcache    : the head's per-layer KV caches; on entry they hold the stable
                rows; ``len(ids)`` rows are appended; tree rows are trimmed on exit.
    ids       : [1, n] token ids paired with ``features`` (shifted by one)
    features  : [1, n, 3*Ht] target features of the positions to add
    root_token: [1] int32 target id of the tree root (the last committed,
                not yet verified token)
    """
    k = spec.top_k
    # A tree of N draft nodes never holds a path longer than N, so deeper
    # levels could not be kept.
    D = min(spec.depth, spec.num_nodes - 2)
    start = dcache[0].offset
    out, logits = head(embed(ids), features, cache=dcache, mask="causal", positions=start,
                       from_target=True, logits_rows=slice(-1, None))
    P = dcache[0].offset  # next draft position; level-i nodes run at P + i - 1
    h_last = out[:, -1:, :]
    lp = _log_softmax(logits[0, -1])

    scores = _topk(lp, k)                       # [k] draft ids
    s = lp[scores]
    front_tok = head.to_target_ids(scores)      # [k]
    front_hidden = mx.repeat(h_last, k, axis=1)  # [1, k, H]
    front_pool = mx.arange(k)
    tree_mask = mx.eye(k, dtype=mx.bool_)       # frontier rows x tree columns so far
    front_scores = s

    pool_scores = [s]
    pool_tokens = [front_tok]
    pool_parent = [mx.full((k,), -1, dtype=mx.int32)]
    pool_depth = [mx.ones((k,), dtype=mx.int32)]
    base = k
    stable = P
    for i in range(1, D + 1):
        mask = mx.concatenate([mx.ones((k, stable), dtype=mx.bool_), tree_mask], axis=1)
        out, logits = head(embed(front_tok[None]), front_hidden, cache=dcache, mask=mask,
                           positions=P + i - 1, from_target=False)
        lp = _log_softmax(logits[0])                       # [k, Vd]
        child = _topk(lp, k)                               # [k, k]
        child_lp = mx.take_along_axis(lp, child, axis=-1)  # [k, k]
        cu = (front_scores[:, None] + child_lp).reshape(-1)
        child_tok = head.to_target_ids(child.reshape(-1))
        pool_scores.append(cu)
        pool_tokens.append(child_tok)
        pool_parent.append(mx.repeat(front_pool, k))
        pool_depth.append(mx.full((k * k,), i + 1, dtype=mx.int32))
        if i == D:
            break
        sel = _topk(cu, k)                                 # best k children -> next frontier
        parent_row = sel // k
        front_scores = cu[sel]
        front_tok = child_tok[sel]
        front_hidden = out[:, parent_row, :]
        front_pool = base + sel
        tree_mask = mx.concatenate([tree_mask[parent_row], mx.eye(k, dtype=mx.bool_)], axis=1)
        base += k * k
    # Tree rows are temporary: the stable cache covers committed positions only.
    for c in dcache:
        c.trim(c.offset - stable)

    scores = mx.concatenate(pool_scores)
    tokens = mx.concatenate(pool_tokens)
    parent = mx.concatenate(pool_parent)
    depth = mx.concatenate(pool_depth)
    return _select(scores, tokens, parent, depth, root_token, spec, D)


def _select(scores, tokens, parent, depth, root_token, spec: TreeSpec, levels: int) -> DraftTree:
    """Keep the best nodes in level order and build the verification buffers."""
    M = scores.shape[0]
    N = min(spec.num_nodes - 1, M)
    ranked = scores - _DEPTH_TIEBREAK * depth.astype(scores.dtype)
    kept = mx.sort(_topk(ranked, N)) if N < M else mx.arange(M)
    # Map pool index -> node index (1..N); the root is node 0.
    node_of = mx.zeros((M + 1,), dtype=mx.int32)
    node_of = node_of.at[kept].add(mx.arange(1, N + 1, dtype=mx.int32))
    kept_parent = parent[kept]
    parents = mx.where(kept_parent < 0, 0, node_of[mx.maximum(kept_parent, 0)])
    parents = mx.concatenate([mx.zeros((1,), dtype=mx.int32), parents.astype(mx.int32)])
    T = N + 1
    ancestors = _ancestor_matrix(parents, T, levels + 1)
    node_tokens = mx.concatenate([root_token.astype(mx.int32), tokens[kept].astype(mx.int32)])
    depths = (ancestors.sum(axis=1) - 1).astype(mx.int32)
    node_scores = mx.concatenate([mx.zeros((1,), scores.dtype), scores[kept]])
    return DraftTree(node_tokens, parents, ancestors, depths, T, spec.is_chain, node_scores)


def _ancestor_matrix(parents, T: int, max_depth: int):
    idx = mx.arange(T)
    anc = idx[:, None] == idx[None]
    cur = idx
    for _ in range(max_depth):
        cur = parents[cur]
        anc = anc | (cur[:, None] == idx[None])
    return anc


def tree_from_parents(tokens, parents) -> DraftTree:
    """A tree with the given node tokens and parent indices (host lists; node 0
    is the root, parents precede their children), e.g. a fixed shape to time."""
    T = len(tokens)
    depth = [0] * T
    for i in range(1, T):
        depth[i] = depth[parents[i]] + 1
    par = mx.array(parents, dtype=mx.int32)
    anc = _ancestor_matrix(par, T, max(depth) + 1)
    return DraftTree(mx.array(tokens, dtype=mx.int32), par, anc, mx.array(depth, dtype=mx.int32), T,
                     all(parents[i] == i - 1 for i in range(1, T)))


def chain_tree(tokens, root_token) -> DraftTree:
    """A tree that is a single path (used for plain decoding: no drafts)."""
    toks = mx.concatenate([root_token.astype(mx.int32), tokens.astype(mx.int32)])
    T = toks.shape[0]
    idx = mx.arange(T)
    anc = idx[None] <= idx[:, None]
    return DraftTree(toks, mx.maximum(idx - 1, 0).astype(mx.int32), anc, idx.astype(mx.int32), T, True)


def _topk(x, k):
    """Indices of the k largest entries along the last axis (any order)."""
    if k >= x.shape[-1]:
        return mx.broadcast_to(mx.arange(x.shape[-1]), x.shape)
    return mx.argpartition(-x, kth=k - 1, axis=-1)[..., :k]


def _log_softmax(x):
    x = x.astype(mx.float32)
    return x - mx.logsumexp(x, axis=-1, keepdims=True)
