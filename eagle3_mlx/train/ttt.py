"""Training-time test (TTT): the unrolled head forward and its loss.

Index convention (the draft position of docs/architecture.md, "Conventions",
which the engine drafts with): at index t the step-0 input is
(target feature f_t, token x_{t+1}); step s feeds the head's own output hidden
state from step s-1 at the same index, the ground-truth token x_{t+1+s}, and
RoPE position t+s. Its teacher is the target's distribution at position
t+1+s (predicting x_{t+2+s}) restricted to the draft vocabulary.

Attention at step s for the query at index t: the step-0 keys
at indices <= t (causal prefix) plus the keys of steps 1..s at the same index
t, under one softmax. Computed efficiently as ``q @ K0^T`` with a causal mask
plus s per-position dot-product columns. The routine reuses the head's own
projection and norm modules, so :class:`Eagle3Head` stays the single owner of
the weights. :func:`ttt_forward_reference` computes the same thing through the
head's regular ``__call__`` with a KV cache and an explicit mask, for tests.

Batch arrays (``T`` indices, ``S`` steps, ``E = T + S``):

* ``feats``  [B, T, 3*Ht]  target features f_t
* ``emb``    [B, E, H]     embeddings of x_{i+1} at row i (frozen target table)
* ``tprob``  [B, E, Vd]    teacher probabilities at position i+1 (row i)
* ``valid``  [B, E]        loss mask at row i: x_{i+1} is an assistant token and
  the target's top-1 at position i+1 is inside the draft vocabulary
"""

from __future__ import annotations

from typing import List

import mlx.core as mx
import numpy as np


def _layer(head):
    if len(head.layers) != 1:
        raise ValueError("the trainer supports one-layer EAGLE-3 heads only")
    return head.layers[0]




def _softmax_parts_mlx(x):
    """(max, softmax, sum of exp(x - max)) over the last axis."""
    m = mx.max(x, axis=-1, keepdims=True)
    e = mx.exp(x - m)
    s = mx.sum(e, axis=-1, keepdims=True)
    return m, e / s, s


def _softmax_parts_numpy(x):
    """The same through numpy (float32 only); evaluates ``x``."""
    a = np.asarray(x)
    m = a.max(axis=-1, keepdims=True)
    e = np.exp(a - m)
    s = e.sum(axis=-1, keepdims=True)
    e /= s
    return mx.array(m), mx.array(e), mx.array(s)


def _softmax_parts(x):
    # On MLX's CPU backend exp runs scalar (176 ms for 1552 x 8192 float32 on
    # the 2-core x86 box, numpy 7-12 ms), so the trainer's softmaxes over the
    # draft vocabulary cost as much as the lm_head matmul; numpy does them there.
    if mx.default_device() == mx.cpu:
        return _softmax_parts_numpy(x)
    return _softmax_parts_mlx(x)


@mx.custom_function
def softmax(x):
    """Softmax over the last axis (float32), fast on the CPU backend."""
    return _softmax_parts(x)[1]


@softmax.vjp
def _softmax_vjp(primals, cotangent, output):
    return output * (cotangent - mx.sum(cotangent * output, axis=-1, keepdims=True))


def ttt_attention(attn, q, k0, v0, extra_k: List, extra_v: List, causal_bias):
    """One softmax over [causal step-0 keys | own keys of steps 1..s at index t].

    q [B, nh, T, hd]; k0, v0 [B, nkv, Tk, hd]; extra_k/v: s arrays [B, nkv, T, hd];
    causal_bias broadcastable to [B, nkv, g, T, Tk].
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
    p = softmax(scores.astype(mx.float32)).astype(q.dtype)
    Tk = k0.shape[2]
    o = p[..., :Tk] @ v0[:, :, None]                                # [B, nkv, g, T, hd]
    for j, vj in enumerate(extra_v):
        o = o + p[..., Tk + j : Tk + j + 1] * vj[:, :, None]
    return o.reshape(B, nh, T, hd).transpose(0, 2, 1, 3).reshape(B, T, nh * hd)


def causal_bias(T: int, dtype=mx.float32, window=None, step: int = 0):
    """Additive causal mask [T, T]; with ``window``, also the step-0 keys j
    that are ``window`` or more behind the query's RoPE position t + step (as
    the engine masks a draft at tree level step)."""
    i = mx.arange(T)
    keep = i[None, :] <= i[:, None]
    if window is not None:
        keep = keep & (i[:, None] + step - i[None, :] < window)
    return mx.where(keep, 0.0, -1e9).astype(dtype)


def _rope_rows(rope, x, pos):
    """RoPE at per-row positions ``pos`` [B, R] for x [B, heads, R, hd]."""
    B, H, R, D = x.shape
    y = x.transpose(0, 2, 1, 3).reshape(B * R, H, 1, D)
    y = rope(y, offset=pos.reshape(-1).astype(mx.int32))
    return y.reshape(B, R, H, D).transpose(0, 2, 1, 3)


def ttt_forward(head, feats, emb, steps: int, rows=None, emb_rows=None):
    """Yield (hidden_out, logits) for each TTT step s = 0..steps-1.

    ``rows`` (optional, int [B, R], ascending per batch row): compute the
    unroll only at these indices (the step-0 keys/values still cover all T
    positions, which is all the other indices contribute). Outputs are then
    [B, R, ...], row k standing for index ``rows[:, k]``. ``emb_rows``
    [B, R + steps - 1 (or more), H]: embeddings of x_{rows+1+j} at column j, so
    step s reads columns s..s+R-1; required with ``rows``. Without ``rows``,
    ``emb`` must hold T + steps - 1 (or more) columns as in the module doc."""
    layer = _layer(head)
    attn = layer.self_attn
    B, T, _ = feats.shape
    h = head.project_features(feats)
    window = attn.window
    if rows is None:
        rows = mx.broadcast_to(mx.arange(T)[None], (B, T))
        emb_rows = emb
        full_rows = True
    else:
        full_rows = False
    R = rows.shape[1]
    # Step 0 over all T positions: keys/values of the real prefix.
    hn = layer.hidden_norm(h)
    a_full = mx.concatenate([layer.input_layernorm(emb[:, :T]), hn], axis=-1)
    k0 = attn.rope(attn.heads(a_full, "k"), offset=0)
    v0 = attn.heads(a_full, "v")
    if full_rows:
        a, h_rows = a_full, h
        bias_at = lambda s: causal_bias(T, h.dtype, window, s)  # noqa: E731
    else:
        gather = lambda x: mx.take_along_axis(x, rows[..., None], axis=1)
        a, h_rows = gather(a_full), gather(h)
        hn = gather(hn)
        keep = mx.arange(T)[None, None, :] <= rows[:, :, None]            # [B, R, T]

        def bias_at(s):  # [B,1,1,R,T]
            k = keep
            if window is not None:
                k = k & (rows[:, :, None] + s - mx.arange(T)[None, None, :] < window)
            return mx.where(k, 0.0, -1e9).astype(h.dtype)[:, None, None]
    h = h_rows
    ek, ev = [], []
    for s in range(steps):
        if s > 0:
            e = emb_rows[:, s : s + R]
            hn = layer.hidden_norm(h)
            a = mx.concatenate([layer.input_layernorm(e), hn], axis=-1)
        res = hn if layer.norm_before_residual else h
        pos = rows + s
        q = _rope_rows(attn.rope, attn.heads(a, "q"), pos)
        if s > 0:
            ek.append(_rope_rows(attn.rope, attn.heads(a, "k"), pos))
            ev.append(attn.heads(a, "v"))
        if s == 0 or window is not None:
            bias = bias_at(s)
        o = ttt_attention(attn, q, k0, v0, ek, ev, bias)
        h1 = res + attn.o_proj(o)
        # The state fed to step s+1 is the final-normed one for norm_output heads.
        h, logits = head.outputs(h1 + layer.mlp(layer.post_attention_layernorm(h1)))
        yield h, logits


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


@mx.custom_function
def soft_cross_entropy(logits, tprob):
    """Per-row ``-Σ_v tprob_v · log_softmax(logits)_v`` over the last axis.

    Returns (ce, q) where q = softmax(logits) is kept for the backward pass
    only (it carries no gradient): autograd through log_softmax would run exp
    again in the backward pass, and exp dominates the loss on a CPU."""
    m, q, s = _softmax_parts(logits)
    lse = (m + mx.log(s)).squeeze(-1)
    ce = mx.sum(tprob, axis=-1) * lse - mx.sum(tprob * logits, axis=-1)
    return ce, q


@soft_cross_entropy.vjp
def _soft_cross_entropy_vjp(primals, cotangents, outputs):
    _, tprob = primals
    g = cotangents[0][..., None]
    q = outputs[1]
    # d ce / d logits = (Σ tprob) · q - tprob; the teacher is a constant.
    return (mx.sum(tprob, axis=-1, keepdims=True) * q - tprob) * g, mx.zeros_like(tprob)


def ttt_loss(head, feats, emb, tprob, valid, steps: int = 7, decay: float = 0.8,
             rows=None, emb_rows=None, norm_T=None):
    """Σ_s decay^s · soft-CE(teacher, draft) over valid positions, each step
    normalised by B·T. Returns (loss, per-step losses [S], per-step correct [S],
    per-step counts [S]).

    Without ``rows``: ``tprob`` [B, T+S-1.., Vd] and ``valid`` are indexed like
    ``emb`` (column i <-> position i+1). With ``rows`` [B, R]: they are indexed
    like ``emb_rows`` (column j <-> index rows[:, 0] + j), and ``norm_T`` gives
    the T of the B·T normaliser (default: the number of feature rows)."""
    B, T, _ = feats.shape
    if norm_T is not None:
        T = norm_T
    losses, correct, counts = [], [], []
    total = mx.array(0.0, dtype=mx.float32)
    for s, (_, logits) in enumerate(ttt_forward(head, feats, emb, steps, rows, emb_rows)):
        R = logits.shape[1]
        logits = logits.astype(mx.float32)
        tp = tprob[:, s : s + R]
        m = valid[:, s : s + R].astype(mx.float32)
        ce, _ = soft_cross_entropy(logits, tp)
        L = mx.sum(ce * m) / (B * T)
        total = total + (decay ** s) * L
        hit = (mx.argmax(logits, axis=-1) == mx.argmax(tp, axis=-1)).astype(mx.float32)
        losses.append(L)
        correct.append(mx.sum(hit * m))
        counts.append(mx.sum(m))
    return total, mx.stack(losses), mx.stack(correct), mx.stack(counts)
