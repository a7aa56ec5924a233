"""Target adapter: drives an unmodified mlx-lm model layer by layer.

One loop gives everything speculative decoding needs from the target:

* prefill and verification with any attention mask (causal, or a tree mask over
  the committed prefix plus the ancestor matrix of the draft tree),
* per-token RoPE positions for tree nodes (each layer's ``self_attn.rope`` is
  wrapped once; positions are folded into the batch axis of ``mx.fast.rope``),
* the three auxiliary hidden states EAGLE-3 heads read,
* logits only for the rows that need them.

Aux layer convention: an id k is the HF ``output_hidden_states[k]`` index, i.e.
the residual stream *entering* decoder layer k (0 is the embedding output),
without the final norm. k = L (the number of decoder layers) is the output of
the last decoder layer, still before the final norm, as heads such as NVIDIA's
gpt-oss EAGLE-3 ([24, 30, 36] for L = 36) read it. Default ``[2, L//2, L-3]``.

Families: dense llama/mistral/qwen2/qwen3/gemma3_text, the mixture-of-experts
qwen3_moe and gpt_oss, and the Gated DeltaNet hybrids qwen3_5, qwen3_5_moe and
qwen3_next (text model, or the text tower of the vision-language wrapper),
whose linear-attention layers run the tree through :mod:`.recurrent`; and
gemma4_text (dense and MoE): per-layer input embeddings, computed by mlx-lm's
own model for the step's tokens, and KV-shared layers, which attend over the
keys and values their source layer returned this forward (prefix + tree rows,
so the same tree mask applies; they have no cache of their own to compact). The MoE blocks route each token on its own row (router
top-k and a gather matmul per row), so tree tokens need nothing beyond the tree
mask and their positions. gpt_oss adds attention sinks (an extra logit per head
inside ``mx.fast.scaled_dot_product_attention``, combined with whatever mask is
passed) and YaRN RoPE (its mscale multiplies q and k inside the RoPE module,
which the position wrapper calls unchanged).
"""

from __future__ import annotations

from typing import Optional, Sequence

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import ArraysCache, KVCache, QuantizedKVCache

from .compat import default_aux_layer_ids
from .head import apply_rope
from .recurrent import DEFAULT_STRATEGY, HybridCache, TreeShape, is_recurrent_layer, tree_layer

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "qwen3_moe", "gpt_oss",
                         "qwen3_5", "qwen3_5_moe", "qwen3_next", "gemma4_text")


class UnsupportedModelError(ValueError):
    pass


class _PositionState:
    """Shared by every wrapped RoPE of a model; a plain object so the per-token
    positions never enter the module's parameter tree."""

    positions: Optional[mx.array] = None


class PositionalRope(nn.Module):
    """Wraps a layer's RoPE: normal behaviour unless per-token positions are set."""

    def __init__(self, inner, state: _PositionState):
        super().__init__()
        # Stored outside the Module dict so parameter paths stay unchanged.
        object.__setattr__(self, "_inner", inner)
        object.__setattr__(self, "_state", state)

    def __call__(self, x, offset=0):
        pos = self._state.positions
        if pos is None:
            return self._inner(x, offset=offset)
        return apply_rope(self._inner, x, pos)


class TargetModel:
    """An mlx-lm causal LM prepared for EAGLE-3 drafting and tree verification."""

    def __init__(self, model: nn.Module, aux_layer_ids: Optional[Sequence[int]] = None,
                 recurrent_strategy: str = DEFAULT_STRATEGY, final_features: bool = False,
                 aux_features: Optional[bool] = None):
        self.model = model
        # MTP drafting reads the final-normed hidden state; an EAGLE-3 head the
        # aux layers. Features are [aux states..., final state], each present
        # only when asked for (aux by default unless only the final one is).
        self.final_features = final_features
        aux_features = not final_features if aux_features is None else aux_features
        # Vision-language wrappers (qwen3_5) keep the text model in language_model.
        self.text_model = getattr(model, "language_model", model)
        args = getattr(self.text_model, "args", None)
        self.args = args
        self.model_type = getattr(model, "model_type", None) or getattr(args, "model_type", "?")
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"model type {self.model_type!r} is not supported for speculative decoding "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        self.inner = model.model
        self.layers = list(model.layers)
        self.num_layers = len(self.layers)
        self.hidden_size = args.hidden_size
        self.vocab_size = args.vocab_size
        self.max_position_embeddings = getattr(args, "max_position_embeddings", None)
        self.aux_layer_ids = [] if not aux_features else list(
            aux_layer_ids or default_aux_layer_ids(self.num_layers))
        for i in self.aux_layer_ids:
            # 0..L-1: input of that layer; L: output of the last layer (pre-norm).
            if not 0 <= i <= self.num_layers:
                raise UnsupportedModelError(
                    f"aux layer id {i} is outside the target's {self.num_layers} decoder layers "
                    f"(HF hidden_states index convention: 0..{self.num_layers})"
                )
        self._capture = {}
        for slot, i in enumerate(self.aux_layer_ids):
            self._capture.setdefault(i, []).append(slot)

        self.is_gemma = self.model_type.startswith("gemma")
        # gemma4: layers that read another layer's keys and values (no cache).
        self.kv_source = list(getattr(self.inner, "previous_kvs", range(self.num_layers)))
        self.has_kv = [getattr(layer.self_attn, "has_kv", True) if "self_attn" in layer else True
                       for layer in self.layers]
        self.per_layer_inputs = bool(getattr(self.inner, "hidden_size_per_layer_input", 0))
        self.softcap = getattr(self.text_model, "final_logit_softcapping", None)
        self.windows = self._layer_windows(args)
        # Gated DeltaNet layers: a recurrent state instead of keys and values.
        self.recurrent = [is_recurrent_layer(layer) for layer in self.layers]
        self.is_hybrid = any(self.recurrent)
        self.recurrent_strategy = recurrent_strategy
        attention = [layer for layer, r in zip(self.layers, self.recurrent) if not r]
        # gpt_oss: every attention layer carries per-head sink logits.
        self.has_sinks = any("sinks" in layer.self_attn for layer in attention)
        # Wrap each layer's RoPE once per model; adapters created later on the
        # same model share the wrappers' position state.
        first = attention[0].self_attn.rope
        self._state = first._state if isinstance(first, PositionalRope) else _PositionState()
        self.supports_tree = True
        for layer in attention:
            attn = layer.self_attn
            if not isinstance(attn.rope, PositionalRope):
                attn.rope = PositionalRope(attn.rope, self._state)
            if type(attn.rope._inner).__name__ == "DynamicNTKScalingRoPE":
                self.supports_tree = False

    # -- structure -----------------------------------------------------------------

    def _layer_windows(self, args):
        """Sliding-window size per layer (None = full attention). Sliding layers use
        a full KVCache here plus a window mask, which stays exact past the window."""
        L = self.num_layers
        if self.model_type == "gemma3_text":
            p = args.sliding_window_pattern
            return [None if i % p == p - 1 else args.sliding_window for i in range(L)]
        if self.model_type in ("llama", "mistral"):
            return [args.sliding_window if layer.use_sliding else None for layer in self.layers]
        if self.model_type == "gpt_oss":
            # mlx-lm gives these layers a RotatingKVCache(max_size=sliding_window),
            # which cannot rewind once it wraps; a full cache + window mask can.
            return [args.sliding_window if t == "sliding_attention" else None
                    for t in self.inner.layer_types]
        if self.model_type == "gemma4_text":
            # KV-shared layers read their source's keys, which have its window.
            return [args.sliding_window if t == "sliding_attention" else None
                    for t in args.layer_types]
        if self.model_type in ("qwen2", "qwen3", "qwen3_moe"):
            # mlx-lm's qwen2/qwen3/qwen3_moe attend over the full context.
            return [None] * L
        return [None] * L

    @property
    def embed_tokens(self):
        return self.inner.embed_tokens

    def embed(self, tokens):
        h = self.inner.embed_tokens(tokens)
        if self.model_type == "gemma4_text":
            return h * self.inner.embed_scale
        if self.is_gemma:
            h = h * mx.array(self.hidden_size**0.5, mx.bfloat16).astype(h.dtype)
        return h

    def lm_head(self, h):
        if "lm_head" in self.text_model:
            logits = self.text_model.lm_head(h)
        else:
            logits = self.inner.embed_tokens.as_linear(h)
        if self.softcap is not None:
            logits = mx.tanh(logits / self.softcap) * self.softcap
        return logits

    def check_kv_bits(self, kv_bits: Optional[int]):
        """Refuse a quantized KV cache the model cannot attend over (one line)."""
        if kv_bits and not all(self.has_kv):
            raise UnsupportedModelError(
                f"{self.model_type}: a quantized KV cache (kv_bits={kv_bits}) is not supported: "
                "its KV-shared layers attend over another layer's keys without a cache of their own; "
                "use an unquantized KV cache"
            )
        if kv_bits and self.has_sinks:
            raise UnsupportedModelError(
                f"{self.model_type}: a quantized KV cache (kv_bits={kv_bits}) is not supported: "
                "mlx-lm's quantized attention has no attention sinks; use an unquantized KV cache"
            )

    def make_cache(self, kv_bits: Optional[int] = None, kv_group_size: int = 64):
        """One full (never rotating) cache per layer: sliding layers get a window
        mask instead, so trimming and compaction stay exact past the window."""
        self.check_kv_bits(kv_bits)

        def attention_cache():
            return QuantizedKVCache(group_size=kv_group_size, bits=kv_bits) if kv_bits else KVCache()

        if not self.is_hybrid:
            return [attention_cache() if kv else None for kv in self.has_kv]
        # Recurrent states stay in full precision; only attention layers quantize.
        caches = [ArraysCache(size=2) if r else attention_cache() for r in self.recurrent]
        return HybridCache(caches, attention_index=self.recurrent.index(False))

    def check_cache(self, cache):
        for c in cache:
            if type(c) not in (KVCache, QuantizedKVCache, ArraysCache):
                raise UnsupportedModelError(
                    f"{self.model_type}: cache class {type(c).__name__} cannot be compacted after "
                    "tree acceptance (supported: KVCache, QuantizedKVCache)"
                )

    # -- masks ---------------------------------------------------------------------

    def _masks(self, T: int, offset: int, tree_mask, positions):
        """Mask per distinct window size: None/'causal'/bool array [T, offset+T]."""
        masks = {}
        for w in set(self.windows):
            if tree_mask is None:
                if w is None or offset + T <= w:
                    masks[w] = None if T == 1 else "causal"
                else:
                    q = mx.arange(offset, offset + T)[:, None]
                    k = mx.arange(offset + T)[None]
                    masks[w] = (k <= q) & (q - k < w)
            else:
                prefix = mx.ones((T, offset), dtype=mx.bool_)
                full = mx.concatenate([prefix, tree_mask], axis=1) if offset else tree_mask
                if w is not None:
                    kpos = mx.concatenate([mx.arange(offset), positions])
                    full = full & ((positions[:, None] - kpos[None]) < w)
                masks[w] = full
        return masks

    # -- forward -------------------------------------------------------------------

    def forward(self, tokens, cache, *, tree_mask=None, positions=None, logits_rows=None,
                return_hidden=False, tree_shape: Optional[TreeShape] = None):
        """Run the target over ``tokens`` [B, T], appending T rows to ``cache``.

        tree_mask: bool [T, T] ancestor-or-self matrix (None: causal).
        positions: int32 [T] absolute RoPE positions for tree nodes (with tree_mask).
        tree_shape: the tree's parents on the host; hybrid targets need it with
        a tree mask (their linear layers keep one state per node until
        :func:`compact_cache` commits the accepted one).
        logits_rows: optional index array/slice of rows to compute logits for.
        Returns (logits, features[B, T, 3*Ht]) and, with return_hidden, the final
        normed hidden states of the logits rows.
        """
        if tree_mask is not None and not self.supports_tree:
            raise UnsupportedModelError(
                f"{self.model_type}: its RoPE (dynamic NTK) cannot take per-token positions; "
                "use chain mode (top_k=1)"
            )
        if self.has_sinks and cache is not None and isinstance(cache[0], QuantizedKVCache):
            self.check_kv_bits(cache[0].bits)  # e.g. an engine quantizing after prefill
        T = tokens.shape[1]
        offset = cache_offset(cache)
        hybrid_tree = self.is_hybrid and tree_mask is not None
        if hybrid_tree and (tree_shape is None or not isinstance(cache, HybridCache)):
            raise ValueError("a hybrid target's tree forward needs tree_shape and its make_cache()")
        if isinstance(cache, HybridCache):
            cache.snapshot()
        node_states = {}
        masks = self._masks(T, offset, tree_mask, positions)
        h = self.embed(tokens)
        shared = self.model_type == "gemma4_text"
        if shared:   # gemma4: what each layer's call takes beyond (h, mask, cache)
            kvs = [(None, None)] * self.num_layers
            pli = None
            if self.per_layer_inputs:   # a small embedding per layer, mlx-lm's own
                pli = self.inner._project_per_layer_inputs(
                    h, self.inner._get_per_layer_inputs(tokens))
        captured = [None] * len(self.aux_layer_ids)
        self._state.positions = positions if tree_mask is not None else None
        try:
            for i, layer in enumerate(self.layers):
                for slot in self._capture.get(i, ()):
                    captured[slot] = h
                c = cache[i] if cache is not None else None
                if self.recurrent[i]:
                    if hybrid_tree:
                        h, node_states[i] = tree_layer(layer, h, c, tree_shape,
                                                       self.recurrent_strategy)
                    else:
                        h = layer(h, None, c)
                elif shared:
                    prev_kv, prev_offset = kvs[self.kv_source[i]]
                    h, kv, off = layer(h, masks[self.windows[i]], c, shared_kv=prev_kv,
                                       offset=prev_offset,
                                       per_layer_input=None if pli is None else pli[:, :, i, :])
                    kvs[i] = (kv, off)
                else:
                    h = layer(h, masks[self.windows[i]], c)
        finally:
            self._state.positions = None
        if hybrid_tree:
            cache.node_states, cache.node_shape = node_states, tree_shape
        for slot in self._capture.get(self.num_layers, ()):
            captured[slot] = h  # aux id L: the last layer's output, before the final norm
        if self.final_features:
            normed = self.inner.norm(h)
            features = mx.concatenate(captured + [normed], axis=-1) if captured else normed
            hn = normed if logits_rows is None else normed[:, logits_rows]
        else:
            features = mx.concatenate(captured, axis=-1)
            hn = self.inner.norm(h if logits_rows is None else h[:, logits_rows])
        logits = self.lm_head(hn)
        if return_hidden:
            return logits, features, hn
        return logits, features

    __call__ = forward


def cache_offset(cache) -> int:
    """Positions a target cache holds (0 for none)."""
    if cache is None:
        return 0
    return cache.offset if isinstance(cache, HybridCache) else cache[0].offset


def compact_cache(cache, offset: int, keep: Sequence[int]):
    """Keep rows ``offset + keep`` (relative indices, in order) at
    ``[offset, offset + len(keep))`` and drop the rest. Exact for KVCache and
    QuantizedKVCache (quantization groups run along head_dim); a hybrid cache's
    recurrent layers take the states after the last kept node."""
    n = len(keep)
    contiguous = list(keep) == list(range(n))
    if isinstance(cache, HybridCache):
        cache.commit(int(keep[-1]))
        cache = [c for i, c in enumerate(cache) if i not in cache.recurrent]
    for c in filter(None, cache):   # KV-shared layers (gemma4) have no cache
        if not contiguous:
            idx = mx.array([offset + int(k) for k in keep], dtype=mx.int32)
            if isinstance(c, QuantizedKVCache):
                for buf in (c.keys, c.values):
                    for j in range(len(buf)):
                        buf[j][..., offset : offset + n, :] = buf[j][..., idx, :]
            else:
                c.keys[..., offset : offset + n, :] = c.keys[..., idx, :]
                c.values[..., offset : offset + n, :] = c.values[..., idx, :]
        c.offset = offset + n


def trim_cache(cache, length: int) -> int:
    """Drop rows past ``length``; returns the length kept. A hybrid cache can only
    go back to a state it kept (see :class:`~.recurrent.HybridCache`), so it may
    keep fewer."""
    if isinstance(cache, HybridCache):
        return cache.rewind(length)
    for c in filter(None, cache):
        if c.offset > length:
            c.trim(c.offset - length)
    return length
