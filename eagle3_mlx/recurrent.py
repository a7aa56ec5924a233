"""Exact tree verification over recurrent (Gated DeltaNet) layers.

Hybrid targets (mlx-lm's ``qwen3_5``, ``qwen3_5_moe``, ``qwen3_next``) put
linear-attention layers between full-attention ones. A linear layer keeps no
per-token keys that a mask could select: its state is an ``ArraysCache`` of
[conv state (the last ``conv_kernel - 1`` projected inputs), recurrent state],
and mlx-lm's ``gated_delta_update`` returns only the state after the last
token. A tree node must see the state of *its own* root-to-node path, and after
acceptance the cache must hold the state after the last *accepted* token.

Both designs here run mlx-lm's own decoder layer (``GatedDeltaNet`` and the
MLP / MoE after it) unmodified and keep one state per tree node, so the
commit is a gather, never a re-run:

* ``levels`` — one call per tree depth: the nodes of depth d are batch rows of
  one token each, their caches gathered from their parents' states. Runs
  exactly T tokens through the layer, in depth + 1 calls.
* ``paths`` — one call: every node is a batch row holding its root-to-node
  path (right-padded, masked, ``lengths`` = depth + 1, as mlx-lm's batched
  decoding pads). One call, but T x (depth + 1) tokens of work.

Which is cheaper depends on the device (work against dispatches); the
measurements and the default are in ``docs/hybrid-targets.md``.

Prompt-cache reuse: a recurrent state cannot be cut back to an arbitrary
prefix, so :class:`HybridCache` keeps references to the states at the start of
its last few forwards (MLX arrays are immutable: a snapshot costs nothing) and
rewinds to the latest one at or before the requested length.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

STRATEGIES = ("levels", "paths")
DEFAULT_STRATEGY = "levels"


def is_recurrent_layer(layer) -> bool:
    return bool(getattr(layer, "is_linear", False))


class HybridCache(list):
    """Per-layer caches of a hybrid target (``KVCache``/``QuantizedKVCache`` for
    attention layers, ``ArraysCache`` for linear ones) plus what exact rollback
    needs: per-node states of the last tree forward and state snapshots."""

    MAX_SNAPSHOTS = 4

    def __init__(self, caches, attention_index: int):
        super().__init__(caches)
        self.attention_index = attention_index
        self.recurrent = [i for i, c in enumerate(caches) if isinstance(c, ArraysCache)]
        self.node_states = None        # {layer: (conv [T', ...], state [T', ...])}, level order
        self.node_slot = None          # node index -> row in node_states
        self.snapshots: "OrderedDict[int, list]" = OrderedDict()
        self.pinned: Optional[int] = None

    @property
    def offset(self) -> int:
        return self[self.attention_index].offset

    # -- snapshots -----------------------------------------------------------

    def snapshot(self):
        """Remember the recurrent states at the current offset (references only)."""
        pos = self.offset
        self.snapshots[pos] = [(self[i][0], self[i][1]) for i in self.recurrent]
        self.snapshots.move_to_end(pos)
        while len(self.snapshots) > self.MAX_SNAPSHOTS:
            oldest = next(k for k in self.snapshots if k != self.pinned)
            del self.snapshots[oldest]

    def pin(self):
        """Keep the snapshot at the current offset (e.g. the end of a prompt) while
        newer ones come and go."""
        self.snapshot()
        self.pinned = self.offset

    def rewind(self, length: int) -> int:
        """Go back to the latest snapshot at or before ``length`` (0: empty state).
        Returns the length reached; attention caches are trimmed to it."""
        pos = max((p for p in self.snapshots if p <= length), default=0)
        states = self.snapshots.get(pos)
        for j, i in enumerate(self.recurrent):
            self[i][0], self[i][1] = states[j] if states is not None else (None, None)
        for p in [p for p in self.snapshots if p > pos]:
            del self.snapshots[p]
        if self.pinned is not None and self.pinned > pos:
            self.pinned = None
        for i, c in enumerate(self):
            if i not in self.recurrent and c.offset > pos:
                c.trim(c.offset - pos)
        self.node_states = self.node_slot = None
        return pos

    # -- commit after a tree forward -------------------------------------------

    def commit(self, last_node: int):
        """Recurrent states after tree node ``last_node`` (the deepest accepted)."""
        if self.node_states is None:
            raise RuntimeError("no tree forward to commit (recurrent states would be wrong)")
        row = self.node_slot[last_node]
        for i, (conv, state) in self.node_states.items():
            self[i][0] = conv[row : row + 1]
            self[i][1] = state[row : row + 1]
        self.node_states = self.node_slot = None


class TreeShape:
    """Host-side shape of a draft tree that the recurrent layers need."""

    def __init__(self, parents: Sequence[int]):
        T = len(parents)
        depth = [0] * T
        for i in range(1, T):
            depth[i] = depth[parents[i]] + 1
        self.size = T
        self.parents = list(parents)
        self.depths = depth
        self.max_depth = max(depth)
        # Nodes by depth (stable), where each node's row lands in level order.
        self.levels = [[i for i in range(T) if depth[i] == d] for d in range(self.max_depth + 1)]
        self.order = [i for lvl in self.levels for i in lvl]
        self.slot = {n: r for r, n in enumerate(self.order)}
        # paths[i]: root-to-i node indices, right-padded with i.
        self.paths = []
        for i in range(T):
            p, n = [i], i
            while n != 0:
                n = parents[n]
                p.append(n)
            p.reverse()
            self.paths.append(p + [i] * (self.max_depth + 1 - len(p)))


def tree_layer(layer, x, cache: ArraysCache, shape: TreeShape, strategy: str = DEFAULT_STRATEGY):
    """Run a linear-attention decoder layer over the tree nodes ``x`` [1, T, H].

    Returns (output [1, T, H], (conv, state) per node in level order). The
    cache is left unchanged: the caller commits one node's states."""
    if strategy == "levels":
        return _by_levels(layer, x, cache, shape)
    if strategy == "paths":
        return _by_paths(layer, x, cache, shape)
    raise ValueError(f"unknown recurrent tree strategy {strategy!r} (choose from {STRATEGIES})")


def _by_levels(layer, x, cache, shape):
    ys, convs, states = [], [], []
    prev_slot = {0: 0}
    conv, state = cache[0], cache[1]
    for d, nodes in enumerate(shape.levels):
        c = ArraysCache(size=2)
        if d == 0:
            c[0], c[1] = conv, state
        else:
            rows = mx.array([prev_slot[shape.parents[n]] for n in nodes], dtype=mx.int32)
            c[0], c[1] = conv[rows], state[rows]
        xd = x[0, mx.array(nodes, dtype=mx.int32)][:, None, :]
        ys.append(layer(xd, None, c)[:, 0])
        conv, state = c[0], c[1]
        convs.append(conv)
        states.append(state)
        prev_slot = {n: r for r, n in enumerate(nodes)}
    y = mx.concatenate(ys, axis=0)                     # level order
    inverse = mx.array([shape.slot[i] for i in range(shape.size)], dtype=mx.int32)
    return y[inverse][None], (mx.concatenate(convs, axis=0), mx.concatenate(states, axis=0))


def _by_paths(layer, x, cache, shape):
    T, S = shape.size, shape.max_depth + 1
    paths = mx.array(shape.paths, dtype=mx.int32)                # [T, S]
    depths = mx.array(shape.depths, dtype=mx.int32)
    xs = x[0][paths]                                            # [T, S, H]
    valid = mx.arange(S)[None] <= depths[:, None]
    c = ArraysCache(size=2)
    conv, state = cache[0], cache[1]
    c[0] = None if conv is None else mx.broadcast_to(conv, (T,) + conv.shape[1:])
    c[1] = None if state is None else mx.broadcast_to(state, (T,) + state.shape[1:])
    c.lengths = depths + 1
    y = layer(xs, valid, c)
    y = y[mx.arange(T), depths]                                 # each node's own row
    order = mx.array(shape.order, dtype=mx.int32)
    return y[None], (c[0][order], c[1][order])
