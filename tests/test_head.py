"""Eagle3Head against a NumPy reference written from the published equations."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from eagle3_mlx.head import (
    Eagle3Head,
    HeadError,
    d2t_from_used,
    load_head,
    quantize_head,
    save_head,
    t2d_from_d2t,
)

CFG = dict(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
           vocab_size=50, draft_vocab_size=20, target_hidden_size=24, rms_norm_eps=1e-6)


def rms(x, w, eps=1e-6):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x, pos, base=10000.0):
    # HF rotate-half layout; x: [heads, T, hd]
    hd = x.shape[-1]
    inv = 1.0 / base ** (np.arange(0, hd, 2) / hd)
    ang = np.asarray(pos)[:, None] * inv[None]
    cos, sin = np.cos(ang), np.sin(ang)
    x1, x2 = x[..., : hd // 2], x[..., hd // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def reference_forward(W, cfg, emb, hidden, pos, from_target, norm_before_residual=False,
                      norm_before_fc=False):
    """h = fc(g); a = [in_norm(e), hid_norm(h)]; causal GQA attention with RoPE;
    h1 = res + o; h2 = h1 + mlp(post_norm(h1)); logits = lm_head(norm(h2))."""
    g = hidden
    if from_target:
        if norm_before_fc:
            g = rms(g, W["input_norm.weight"])
        h = g @ W["fc.weight"].T + W.get("fc.bias", 0.0)
    else:
        h = g
    p = "layers.0."
    hn = rms(h, W[p + "hidden_norm.weight"])
    res = hn if norm_before_residual else h
    a = np.concatenate([rms(emb, W[p + "input_layernorm.weight"]), hn], -1)
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg["hidden_size"] // nh
    T = a.shape[0]
    q = (a @ W[p + "self_attn.q_proj.weight"].T).reshape(T, nh, hd).transpose(1, 0, 2)
    k = (a @ W[p + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
    v = (a @ W[p + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd).transpose(1, 0, 2)
    q, k = rope(q, pos), rope(k, pos)
    k = np.repeat(k, nh // nkv, axis=0)
    v = np.repeat(v, nh // nkv, axis=0)
    s = q @ k.transpose(0, 2, 1) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = (s @ v).transpose(1, 0, 2).reshape(T, nh * hd)
    h1 = res + o @ W[p + "self_attn.o_proj.weight"].T
    m = rms(h1, W[p + "post_attention_layernorm.weight"])
    gate = m @ W[p + "mlp.gate_proj.weight"].T
    up = m @ W[p + "mlp.up_proj.weight"].T
    h2 = h1 + ((gate / (1 + np.exp(-gate))) * up) @ W[p + "mlp.down_proj.weight"].T
    return h2, rms(h2, W["norm.weight"]) @ W["lm_head.weight"].T


def random_head(seed=0, **over):
    cfg = dict(CFG, **over)
    head = Eagle3Head.from_config(cfg)
    mx.random.seed(seed)
    head.update(
        {k: v for k, v in _tree_random(head).items()}
    )
    return head, cfg


def _tree_random(head):
    from mlx.utils import tree_unflatten

    flat = [(k, mx.random.normal(v.shape) * 0.3 + (1.0 if "norm" in k else 0.0))
            for k, v in tree_flatten(head.parameters()) if k != "d2t"]
    return tree_unflatten(flat)


@pytest.mark.parametrize(
    "variant",
    [dict(), dict(norm_before_residual=True), dict(norm_before_fc=True), dict(fc_bias=True)],
    ids=["official", "norm_before_residual", "norm_before_fc", "fc_bias"],
)
def test_forward_matches_numpy_reference(variant):
    head, cfg = random_head(**variant)
    W = {k: np.array(v) for k, v in tree_flatten(head.parameters())}
    rng = np.random.default_rng(1)
    T = 6
    emb = rng.standard_normal((T, 32)).astype(np.float32)
    feats = rng.standard_normal((T, 72)).astype(np.float32)
    out, logits = head(mx.array(emb)[None], mx.array(feats)[None], mask="causal", positions=3)
    ref_h, ref_logits = reference_forward(W, cfg, emb, feats, np.arange(3, 3 + T), True,
                                          variant.get("norm_before_residual", False),
                                          variant.get("norm_before_fc", False))
    assert np.abs(np.array(out[0]) - ref_h).max() < 1e-4
    assert np.abs(np.array(logits[0]) - ref_logits).max() < 1e-4
    # Own hidden (no fc) path, per-token positions.
    own = rng.standard_normal((T, 32)).astype(np.float32)
    pos = np.array([7, 8, 8, 9, 10, 12])
    out2, logits2 = head(mx.array(emb)[None], mx.array(own)[None], mask="causal",
                         positions=mx.array(pos), from_target=False)
    ref_h2, ref_l2 = reference_forward(W, cfg, emb, own, pos, False,
                                       variant.get("norm_before_residual", False))
    assert np.abs(np.array(logits2[0]) - ref_l2).max() < 1e-4


def test_cache_extension_equals_full_pass():
    head, _ = random_head()
    emb = mx.random.normal((1, 7, 32))
    feats = mx.random.normal((1, 7, 72))
    _, full = head(emb, feats, mask="causal")
    cache = head.make_cache()
    head(emb[:, :4], feats[:, :4], cache=cache, mask="causal")
    _, tail = head(emb[:, 4:], feats[:, 4:], cache=cache, mask="causal")
    assert mx.allclose(full[:, 4:], tail, atol=1e-5)


def test_d2t_offsets_and_t2d():
    used = [1, 4, 5, 9, 30, 49]
    d2t = d2t_from_used(used)
    assert np.array(d2t).tolist() == [1, 3, 3, 6, 26, 44]
    head, _ = random_head(draft_vocab_size=6)
    head.set_vocab_mapping(d2t)
    assert np.array(head.to_target_ids(mx.arange(6))).tolist() == used
    assert np.flatnonzero(t2d_from_d2t(d2t, 50)).tolist() == used
    with pytest.raises(HeadError, match="offset"):
        head.set_vocab_mapping(mx.array(used))  # absolute ids, not offsets


def test_save_load_roundtrip_and_quantized(tmp_path):
    head, _ = random_head()
    head.set_vocab_mapping(d2t_from_used(list(range(0, 40, 2))))
    save_head(head, tmp_path / "h")
    loaded = load_head(tmp_path / "h")
    emb, feats = mx.random.normal((1, 3, 32)), mx.random.normal((1, 3, 72))
    assert mx.array_equal(head(emb, feats)[1], loaded(emb, feats)[1])
    assert mx.array_equal(loaded.d2t, head.d2t)
    quantize_head(loaded, bits=8, group_size=32)
    save_head(loaded, tmp_path / "q")
    q = load_head(tmp_path / "q")
    assert q.config.quantization["bits"] == 8
    assert float(mx.abs(q(emb, feats)[1] - head(emb, feats)[1]).max()) < 0.1


def test_hidden_width_must_match():
    head, _ = random_head()
    with pytest.raises(HeadError, match="hidden width 40"):
        head(mx.zeros((1, 2, 32)), mx.zeros((1, 2, 40)))


def test_load_head_errors(tmp_path):
    with pytest.raises(HeadError, match="config.json"):
        load_head(tmp_path)
    (tmp_path / "config.json").write_text('{"hidden_size": 8}')
    with pytest.raises(HeadError, match="not an MLX EAGLE-3 head"):
        load_head(tmp_path)
