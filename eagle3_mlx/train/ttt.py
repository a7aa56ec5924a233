"""Training-time test (TTT): the unrolled head forward and its loss.

Index convention (reference §3.3, §6.3): at index t the step-0 input is
(target feature f_t, token x_{t+1}); step s feeds the head's own output hidden
state from step s-1 at the same index, the ground-truth token x_{t+1+s}, and
RoPE position t+s. Its teacher is the target's distribution at position
t+1+s (predicting x_{t+2+s}) restricted to the draft vocabulary.

Attention at step s for the query at index t (reference §6.4): the step-0 keys
at indices <= t (causal prefix) plus the keys of steps 1..s at the same index
t, under one softmax. Computed efficiently as ``q @ K0^T`` with a causal mask
plus s per-position dot-product columns. The routine reuses the head's own
projection and norm modules, so :class:`Eagle3Head` stays the single owner of
the weights. :func:`ttt_forward_reference` computes the same thing through the
head's regular ``__call__`` with a KV cache and an explicit mask, for tests.

Batch arrays (``T`` indices, ``S`` steps, ``E = T + S``):

* ``feats``  [B, T, 3*Ht]  target features f_t
* ``emb``    [B, E, H]     embeddings of x_{i+1} at row i (frozen target table)
* ``tlogp``  [B, E, Vd]    teacher log-probs at position i+1 (row i)
* ``valid``  [B, E]        loss mask at row i: x_{i+1} is an assistant token and
  the target's top-1 at position i+1 is inside the draft vocabulary
"""

from __future__ import annotations

from typing import List

import mlx.core as mx
import mlx.nn as nn


def _layer(head):
    if len(head.layers) != 1:
        raise ValueError("the trainer supports one-layer EAGLE-3 heads only")
    return head.layers[0]


def _project(attn, a, s):
    B, T, _ = a.shape
    q = attn.q_proj(a).reshape(B, T, attn.n_heads, -1).transpose(0, 2, 1, 3)
    k = attn.k_proj(a).reshape(B, T, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    v = attn.v_proj(a).reshape(B, T, attn.n_kv_heads, -1).transpose(0, 2, 1, 3)
    # RoPE position t + s for both queries and keys of step s.
    return attn.rope(q, offset=s), attn.rope(k, offset=s), v


def ttt_attention(attn, q, k0, v0, extra_k: List, extra_v: List, causal_bias):
    """One softmax over [causal step-0 keys | own keys of steps 1..s at index t].

    q [B, nh, T, hd]; k0, v0 [B, nkv, T, hd]; extra_k/v: s arrays [B, nkv, T, hd].
    Returns [B, T, nh*hd] (before o_proj)."""
    B, nh, T, hd = q.shape
    nkv = k0.shape[1]
    g = nh // nkv
    qg = q.reshape(B, nkv, g, T, hd) * attn.scale
    s0 = qg @ k0[:, :, None].swapaxes(-1, -2) + causal_bias      # [B, nkv, g, T, T]
    cols = [s0]
    for kj in extra_k:
        cols.append(mx.sum(qg * kj[:, :, None], axis=-1, keepdims=True))  # [B,nkv,g,T,1]
    scores = mx.concatenate(cols, axis=-1) if len(cols) > 1 else s0
    p = mx.softmax(scores.astype(mx.float32), axis=-1, precise=True).astype(q.dtype)
    o = p[..., :T] @ v0[:, :, None]                                 # [B, nkv, g, T, hd]
    for j, vj in enumerate(extra_v):
        o = o + p[..., T + j : T + j + 1] * vj[:, :, None]
    return o.reshape(B, nh, T, hd).transpose(0, 2, 1, 3).reshape(B, T, nh * hd)


def causal_bias(T: int, dtype=mx.float32):
    i = mx.arange(T)
    return mx.where(i[None, :] <= i[:, None], 0.0, -1e9).astype(dtype)


def ttt_forward(head, feats, emb, steps: int):
    """Yield (hidden_out, logits) for each TTT step s = 0..steps-1."""
    layer = _layer(head)
    attn = layer.self_attn
    B, T, _ = feats.shape
    h = feats
    if head.config.norm_before_fc:
        h = head.input_norm(h)
    h = head.fc(h)
    bias = causal_bias(T, h.dtype)
    k0 = v0 = None
    ek, ev = [], []
    for s in range(steps):
        e = emb[:, s : s + T]
        hn = layer.hidden_norm(h)
        res = hn if layer.norm_before_residual else h
        a = mx.concatenate([layer.input_layernorm(e), hn], axis=-1)
        q, k, v = _project(attn, a, s)
        if s == 0:
            k0, v0 = k, v
        else:
            ek.append(k)
            ev.append(v)
        o = ttt_attention(attn, q, k0, v0, ek, ev, bias)
        h1 = res + attn.o_proj(o)
        h = h1 + layer.mlp(layer.post_attention_layernorm(h1))
        yield h, head.lm_head(head.norm(h))


def ttt_forward_reference(head, feats, emb, steps: int):
    """The same unroll through ``head.__call__``: all steps share one KV cache
    and step s attends with the explicit mask [causal | I | I | ... | I] over
    its (s+1)*T keys (the definition; O((sT)^2))."""
    B, T, _ = feats.shape
    cache = head.make_cache()
    tri = mx.tril(mx.ones((T, T), dtype=mx.bool_))
    eye = mx.eye(T, dtype=mx.bool_)
    h, out = feats, []
    for s in range(steps):
        mask = mx.concatenate([tri] + [eye] * s, axis=1)
        h, logits = head(emb[:, s : s + T], h, cache=cache, mask=mask, positions=s,
                         from_target=(s == 0))
        out.append((h, logits))
    return out


def ttt_loss(head, feats, emb, tlogp, valid, steps: int = 7, decay: float = 0.8):
    """Σ_s decay^s · soft-CE(teacher, draft) over valid positions, each step
    normalised by B·T. Returns (loss, per-step losses [S], per-step correct [S],
    per-step counts [S])."""
    B, T, _ = feats.shape
    losses, correct, counts = [], [], []
    total = mx.array(0.0, dtype=mx.float32)
    for s, (_, logits) in enumerate(ttt_forward(head, feats, emb, steps)):
        logq = nn.log_softmax(logits.astype(mx.float32), axis=-1)
        tl = tlogp[:, s : s + T]
        m = valid[:, s : s + T].astype(mx.float32)
        ce = -mx.sum(mx.exp(tl) * logq, axis=-1)
        L = mx.sum(ce * m) / (B * T)
        total = total + (decay ** s) * L
        hit = (mx.argmax(logq, axis=-1) == mx.argmax(tl, axis=-1)).astype(mx.float32)
        losses.append(L)
        correct.append(mx.sum(hit * m))
        counts.append(mx.sum(m))
    return total, mx.stack(losses), mx.stack(correct), mx.stack(counts)
