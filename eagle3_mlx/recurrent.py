"""Exact tree verification over recurrent (Gated DeltaNet) layers.

Hybrid targets (mlx-lm's ``qwen3_5``, ``qwen3_5_moe``, ``qwen3_next``) put
linear-attention layers between full-attention ones. A linear layer keeps no
per-token keys that a mask could select: its state is an ``ArraysCache`` of
[conv state (the last ``conv_kernel - 1`` projected inputs), recurrent state],
and mlx-lm's ``gated_delta_update`` returns only the state after the last
token. A tree node must see the state of *its own* root-to-node path, and after
acceptance the cache must hold the state after the last *accepted* token.

Every design here keeps one state per tree node, so the commit is a gather,
never a re-run:

* ``fused`` (default) — mlx-lm's decoder layer runs once over all T nodes
  (norms, MLP / MoE, and the GatedDeltaNet's projections read their weights
  once); only the linear attention's two sequential parts follow the tree: the
  short convolution reads each node's own path window, and mlx-lm's
  ``gated_delta_update`` runs level by level, each node's state from its
  parent's.
* ``levels`` — mlx-lm's decoder layer as a black box, one call per tree depth:
  the nodes of depth d are batch rows of one token, their caches gathered from
  their parents' states. Every weight is read depth + 1 times.
* ``paths`` — one black-box call: every node is a batch row holding its
  root-to-node path (right-padded, masked, ``lengths`` = depth + 1, as
  mlx-lm's batched decoding pads). T x (depth + 1) tokens of work.

Measured on a Qwen3.5-0.8B-shaped target in ``docs/hybrid-targets.md``; the
two black-box designs stay as references the tests hold ``fused`` to.

Prompt-cache reuse: a recurrent state cannot be cut back to an arbitrary
prefix, so :class:`HybridCache` keeps references to the states at the start of
its last few forwards (MLX arrays are immutable: a snapshot costs nothing) and
rewinds to the latest one at or before the requested length.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache
from mlx_lm.models.gated_delta import gated_delta_update, normalize_qk

STRATEGIES = ("fused", "levels", "paths")
DEFAULT_STRATEGY = "fused"


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
        # Last tree forward: {layer: (conv [T, ...] in level order, states)}, the
        # states one array in level order or a list with one array per level.
        self.node_states = None
        self.node_shape: Optional["TreeShape"] = None
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
        self.node_states = self.node_shape = None
        return pos

    # -- commit after a tree forward -------------------------------------------

    def commit(self, last_node: int):
        """Recurrent states after tree node ``last_node`` (the deepest accepted)."""
        if self.node_states is None:
            raise RuntimeError("no tree forward to commit (recurrent states would be wrong)")
        shape = self.node_shape
        row = shape.slot[last_node]
        level = shape.depths[last_node]
        in_level = shape.levels[level].index(last_node)
        for i, (conv, state) in self.node_states.items():
            self[i][0] = conv[row : row + 1]
            if isinstance(state, list):
                self[i][1] = state[level][in_level : in_level + 1]
            else:
                self[i][1] = state[row : row + 1]
        self.node_states = self.node_shape = None


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

        # Device index arrays, built once per step and shared by every linear layer.
        self.level_nodes = [mx.array(lvl, dtype=mx.int32) for lvl in self.levels]
        # Per level after the root: each node's parent as a row of the level above.
        self.parent_rows = [None] + [
            mx.array([self.levels[d - 1].index(parents[n]) for n in lvl], dtype=mx.int32)
            for d, lvl in enumerate(self.levels) if d]
        self.order_index = mx.array(self.order, dtype=mx.int32)
        self.inverse_index = mx.array([self.slot[i] for i in range(T)], dtype=mx.int32)
        self._windows = {}

    def conv_windows(self, k: int) -> mx.array:
        """[T, k] rows of concat(conv state (k - 1 rows), node inputs): each
        node's convolution window along its own path (built once per k)."""
        if k not in self._windows:
            rows = []
            for p in self.paths:
                seq = list(range(k - 1)) + [k - 1 + n for n in p[: self.depths[p[-1]] + 1]]
                rows.append(seq[-k:])
            self._windows[k] = mx.array(rows, dtype=mx.int32)
        return self._windows[k]

    def walk_levels(self, states, step):
        """Runs ``step(level nodes, parent states) -> (out, states)`` depth by depth,
        each level's states gathered from its parents' rows of the level above.
        Returns (outputs in node order, per-level states)."""
        outs, per_level = [], []
        for nodes, rows in zip(self.level_nodes, self.parent_rows):
            out, states = step(nodes, states if rows is None else [s[rows] for s in states])
            outs.append(out)
            per_level.append(states)
        return mx.concatenate(outs, axis=0)[self.inverse_index], per_level


def tree_layer(layer, x, cache: ArraysCache, shape: TreeShape, strategy: str = DEFAULT_STRATEGY):
    """Run a linear-attention decoder layer over the tree nodes ``x`` [1, T, H].

    Returns (output [1, T, H], (conv, state) per node in level order). The
    cache is left unchanged: the caller commits one node's states."""
    if strategy == "fused":
        return _fused(layer, x, cache, shape)
    if strategy == "levels":
        return _by_levels(layer, x, cache, shape)
    if strategy == "paths":
        return _by_paths(layer, x, cache, shape)
    raise ValueError(f"unknown recurrent tree strategy {strategy!r} (choose from {STRATEGIES})")


def _by_levels(layer, x, cache, shape):
    def step(nodes, states):
        c = ArraysCache(size=2)
        c[0], c[1] = states
        y = layer(x[0, nodes][:, None, :], None, c)[:, 0]
        return y, [c[0], c[1]]

    y, per_level = shape.walk_levels([cache[0], cache[1]], step)
    return y[None], tuple(mx.concatenate([lv[j] for lv in per_level], axis=0) for j in (0, 1))


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
    return y[None], (c[0][shape.order_index], c[1][shape.order_index])


def _fused(layer, x, cache, shape):
    tree_gdn = _TreeGatedDeltaNet(layer.linear_attn, shape)
    gdn = layer.linear_attn
    layer.linear_attn = tree_gdn      # the decoder layer itself runs unmodified
    try:
        y = layer(x, None, cache)
    finally:
        layer.linear_attn = gdn
    return y, tree_gdn.node_states


def _project(gdn, inputs):
    """The GatedDeltaNet's input projections over all nodes:
    (conv input [1, T, C], z [1, T, Hv, Dv], b, a [1, T, Hv])."""
    B, T, _ = inputs.shape
    if hasattr(gdn, "in_proj_qkvz"):  # qwen3_next: fused projections, per-key-head order
        q, k, v, z, b, a = gdn.fix_query_key_value_ordering(gdn.in_proj_qkvz(inputs),
                                                            gdn.in_proj_ba(inputs))
        qkv = mx.concatenate([t.reshape(B, T, -1) for t in (q, k, v)], axis=-1)
        return qkv, z, b, a
    z = gdn.in_proj_z(inputs).reshape(B, T, gdn.num_v_heads, gdn.head_v_dim)
    return gdn.in_proj_qkv(inputs), z, gdn.in_proj_b(inputs), gdn.in_proj_a(inputs)


class _TreeGatedDeltaNet:
    """Stands in for a layer's GatedDeltaNet during one tree forward: the same
    weights and mlx-lm's recurrence, with each node's convolution window and
    recurrent state taken along its own path. Leaves the cache unchanged and
    keeps every node's states in ``node_states`` (level order)."""

    def __init__(self, gdn, shape: TreeShape):
        self.gdn, self.shape = gdn, shape
        self.node_states = None

    def __call__(self, inputs, mask=None, cache=None):
        g, shape = self.gdn, self.shape
        T = inputs.shape[1]
        qkv, z, b, a = _project(g, inputs)
        K = g.conv_kernel_size
        conv_state = cache[0] if cache[0] is not None else mx.zeros((1, K - 1, g.conv_dim),
                                                                    inputs.dtype)
        windows = mx.concatenate([conv_state[0], qkv[0]], axis=0)[shape.conv_windows(K)]
        conv_out = nn.silu(g.conv1d(windows))                  # [T, 1, C]: batch rows = nodes
        q, k, v = [
            t.reshape(T, 1, h, d)
            for t, h, d in zip(mx.split(conv_out, [g.key_dim, 2 * g.key_dim], -1),
                               [g.num_k_heads, g.num_k_heads, g.num_v_heads],
                               [g.head_k_dim, g.head_k_dim, g.head_v_dim])
        ]
        q, k = normalize_qk(q, k, inv_scale=g.head_k_dim**-0.5, eps=1e-6)
        a, b = a[0][:, None], b[0][:, None]                    # [T, 1, Hv]

        def step(nodes, states):
            out, state = gated_delta_update(q[nodes], k[nodes], v[nodes], a[nodes], b[nodes],
                                            g.A_log, g.dt_bias, states[0], None,
                                            use_kernel=not g.training)
            return out, [state]

        out, per_level = shape.walk_levels([cache[1]], step)
        out = out.reshape(1, T, g.num_v_heads, g.head_v_dim)
        # Per-level states stay apart: the commit takes one row, no copy of them all.
        self.node_states = (windows[shape.order_index, 1:], [lv[0] for lv in per_level])
        out = g.norm(out, z)
        return g.out_proj(out.reshape(1, T, -1))
