"""The 2026 head layouts: EAGLE-3.1 (fc_norm, norm_output), Qwen3-style draft
layers (q/k norms, attention bias), draft sliding windows, aux ids from every
config spelling. Each head is built here from random weights, saved in a
published layout, converted, and compared with a NumPy forward written from
the equations (float64)."""

import json

import mlx.core as mx
import numpy as np
import pytest

from _convert_fixtures import _rms, _rope, ref_head_weights, write_head
from eagle3_mlx.convert.cli import main
from eagle3_mlx.compat import aux_ids_from_config, num_aux_states
from eagle3_mlx.head import HeadConfig, load_head

T = 12
NH, NKV, HD, EPS = 4, 2, 16, 1e-5
PARITY = {}  # layout -> max abs diff, printed once at the end of the module


def weights_2026(seed=0, *, fc_norm=False, qwen3=False):
    """Reference weights plus the 2026 tensors (MLX names)."""
    w = ref_head_weights(seed=seed)
    rng = np.random.default_rng(seed + 100)
    Ht = w["fc.weight"].shape[1] // 3
    if fc_norm:
        for i in range(3):
            w[f"fc_norm.{i}.weight"] = (1 + 0.3 * rng.standard_normal(Ht)).astype(np.float32)
    if qwen3:
        a = "layers.0.self_attn."
        w[a + "q_norm.weight"] = (1 + 0.3 * rng.standard_normal(HD)).astype(np.float32)
        w[a + "k_norm.weight"] = (1 + 0.3 * rng.standard_normal(HD)).astype(np.float32)
        for p, n in (("q", NH * HD), ("k", NKV * HD), ("v", NKV * HD), ("o", w["fc.weight"].shape[0])):
            w[a + f"{p}_proj.bias"] = (0.05 * rng.standard_normal(n)).astype(np.float32)
    return w


def qwen3_layer_config(w, **extra):
    H = w["fc.weight"].shape[0]
    cfg = {"model_type": "qwen3", "hidden_size": H, "intermediate_size": w["layers.0.mlp.gate_proj.weight"].shape[0],
           "num_attention_heads": NH, "num_key_value_heads": NKV, "head_dim": HD, "rms_norm_eps": EPS,
           "vocab_size": w["t2d"].shape[0], "num_hidden_layers": 1, "attention_bias": True}
    cfg.update(extra)
    return cfg


def ref_step(w, emb, hidden, *, from_target, window=None, feedback="prenorm"):
    """(fed-back state, logits) of one causal pass over T positions 0..T-1."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items() if k not in ("d2t", "t2d")}
    Tn = emb.shape[0]
    h = hidden.astype(np.float64)
    if from_target:
        if "fc_norm.0.weight" in w:  # EAGLE-3.1: each aux state normed on its own
            h = np.concatenate([_rms(p, w[f"fc_norm.{i}.weight"], EPS)
                                for i, p in enumerate(np.split(h, 3, axis=-1))], -1)
        h = h @ w["fc.weight"].T
    L = "layers.0."
    hn = _rms(h, w[L + "hidden_norm.weight"], EPS)
    a = np.concatenate([_rms(emb.astype(np.float64), w[L + "input_layernorm.weight"], EPS), hn], -1)

    def proj(p, n):
        y = a @ w[L + f"self_attn.{p}_proj.weight"].T + w.get(L + f"self_attn.{p}_proj.bias", 0.0)
        y = y.reshape(Tn, n, HD)
        if L + f"self_attn.{p}_norm.weight" in w:  # Qwen3: per-head RMSNorm before RoPE
            y = _rms(y, w[L + f"self_attn.{p}_norm.weight"], EPS)
        return y

    pos = np.arange(Tn, dtype=np.float64)
    q, k, v = _rope(proj("q", NH), pos, 10000.0), _rope(proj("k", NKV), pos, 10000.0), proj("v", NKV)
    k, v = np.repeat(k, NH // NKV, axis=1), np.repeat(v, NH // NKV, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(HD)
    i, j = np.arange(Tn)[:, None], np.arange(Tn)[None, :]
    keep = (j <= i) & ((i - j < window) if window else True)
    s = np.where(keep[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", p, v).reshape(Tn, NH * HD)
    h1 = h + o @ w[L + "self_attn.o_proj.weight"].T + w.get(L + "self_attn.o_proj.bias", 0.0)
    m = _rms(h1, w[L + "post_attention_layernorm.weight"], EPS)
    g = m @ w[L + "mlp.gate_proj.weight"].T
    h2 = h1 + ((g / (1 + np.exp(-g))) * (m @ w[L + "mlp.up_proj.weight"].T)) @ w[L + "mlp.down_proj.weight"].T
    n2 = _rms(h2, w["norm.weight"], EPS)
    return (n2 if feedback == "normed" else h2), n2 @ w["lm_head.weight"].T


def inputs(w, seed=0):
    rng = np.random.default_rng(seed)
    emb = w["embed_tokens.weight"][rng.integers(0, w["embed_tokens.weight"].shape[0], size=T)]
    feats = rng.standard_normal((T, w["fc.weight"].shape[1])).astype(np.float32)
    emb2 = w["embed_tokens.weight"][rng.integers(0, w["embed_tokens.weight"].shape[0], size=T)]
    return emb, feats, emb2


def two_steps(head, emb, feats, emb2):
    """Step 0 from target features, step 1 from the fed-back state (no cache)."""
    fed, logits = head(mx.array(emb[None]), mx.array(feats[None]), mask="causal", positions=0, from_target=True)
    fed2, logits2 = head(mx.array(emb2[None]), fed, mask="causal", positions=0, from_target=False)
    return [np.array(x[0]) for x in (fed, logits, fed2, logits2)]


def convert(src, out, *extra):
    assert main([str(src), "--mlx-path", str(out), *map(str, extra)]) == 0
    return out


def check_parity(name, head, w, *, window=None, feedback="prenorm"):
    emb, feats, emb2 = inputs(w)
    got = two_steps(head, emb, feats, emb2)
    fed, logits = ref_step(w, emb, feats, from_target=True, window=window, feedback=feedback)
    fed2, logits2 = ref_step(w, emb2, fed, from_target=False, window=window, feedback=feedback)
    err = max(float(np.abs(g - r).max()) for g, r in zip(got, (fed, logits, fed2, logits2)))
    PARITY[name] = err
    assert err <= 1e-5, (name, err)
    return got


LAYOUTS_31 = {
    # SpecForge flat config with its EAGLE-3.1 flags, safetensors with midlayer.* names
    "specforge-3.1": ("specforge", dict(fc_norm=True, norm_output=True)),
    # speculators nested config, flags at the top level
    "speculators-3.1": ("speculators", dict(fc_norm=True, norm_output=True)),
}


@pytest.mark.parametrize("name", list(LAYOUTS_31))
def test_eagle31_layouts_match_the_equations(name, tmp_path, capsys):
    layout, flags = LAYOUTS_31[name]
    w = weights_2026(fc_norm=True)
    out = convert(write_head(layout, tmp_path / "src", w, **flags), tmp_path / "mlx")
    printed = capsys.readouterr().out
    assert "EAGLE-3.1 fc_norm" in printed and "norm_output" in printed
    t = mx.load(str(out / "model.safetensors"))
    for i in range(3):  # converted tensors equal the source
        assert np.array_equal(np.array(t[f"fc_norm.{i}.weight"]), w[f"fc_norm.{i}.weight"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["fc_norm"] and cfg["norm_output"] and cfg["feedback"] == "normed"
    assert cfg["eagle3_mlx_format"] == 2
    check_parity(name, load_head(out), w, feedback="normed")


def test_norm_output_differs_exactly_in_the_fed_back_state(tmp_path):
    w = weights_2026(fc_norm=True)
    src = write_head("specforge", tmp_path / "src", w, fc_norm=True, norm_output=True)
    normed = load_head(convert(src, tmp_path / "normed"))
    pre = load_head(convert(src, tmp_path / "pre", "--draft-feedback", "prenorm"))
    assert pre.config.norm_output and pre.config.feedback == "prenorm"
    emb, feats, emb2 = inputs(w)
    fn, ln, fn2, ln2 = two_steps(normed, emb, feats, emb2)
    fp, lp, fp2, lp2 = two_steps(pre, emb, feats, emb2)
    assert np.array_equal(ln, lp)                        # lm_head sees the normed state in both
    assert not np.allclose(fn, fp)                       # the fed-back states differ ...
    want = np.array(normed.norm(mx.array(fp)))           # ... by exactly the final norm
    assert np.array_equal(fn, want)
    assert not np.allclose(ln2, lp2)                     # and so does everything after
    # the load-time override gives the same head as the conversion-time one
    again = load_head(tmp_path / "normed", feedback="prenorm")
    assert np.array_equal(two_steps(again, emb, feats, emb2)[3], lp2)
    check_parity("specforge-3.1 prenorm feedback", pre, w, feedback="prenorm")


def test_fc_norm_and_norm_before_fc_are_exclusive(tmp_path, capsys):
    w = weights_2026(fc_norm=True)
    w["input_norm.weight"] = np.ones(w["fc.weight"].shape[1], np.float32)
    src = write_head("modelopt", tmp_path / "src", w)
    assert main([str(src), "--mlx-path", str(tmp_path / "out")]) == 1
    assert "exclusive" in capsys.readouterr().err
    with pytest.raises(ValueError, match="exclusive"):
        HeadConfig(hidden_size=8, intermediate_size=8, num_attention_heads=2, num_key_value_heads=2,
                   vocab_size=8, draft_vocab_size=8, target_hidden_size=8, fc_norm=True, norm_before_fc=True)


def test_qwen3_style_layer_matches_the_equations(tmp_path, capsys):
    w = weights_2026(qwen3=True)
    src = write_head("speculators", tmp_path / "src", w, transformer_layer_config=qwen3_layer_config(w))
    out = convert(src, tmp_path / "mlx")
    assert "Qwen3-style layer" in capsys.readouterr().out
    t = mx.load(str(out / "model.safetensors"))
    for k in ("layers.0.self_attn.q_norm.weight", "layers.0.self_attn.k_norm.weight",
              "layers.0.self_attn.q_proj.bias", "layers.0.self_attn.o_proj.bias"):
        assert np.array_equal(np.array(t[k]), w[k]), k
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["qk_norm"] and cfg["attention_bias"] and cfg["head_dim"] == HD
    assert cfg["sliding_window"] is None  # Qwen3 defaults: use_sliding_window false
    check_parity("speculators qwen3 layer", load_head(out), w)


def test_sliding_window_differs_from_full_attention_only_past_the_window(tmp_path, capsys):
    W = 5
    w = weights_2026(qwen3=True)
    src_w = write_head("speculators", tmp_path / "win", w,
                       transformer_layer_config=qwen3_layer_config(w, sliding_window=W, use_sliding_window=True,
                                                                   layer_types=["sliding_attention"]))
    src_f = write_head("speculators", tmp_path / "full", w, transformer_layer_config=qwen3_layer_config(w))
    hw = load_head(convert(src_w, tmp_path / "win-mlx"))
    hf = load_head(convert(src_f, tmp_path / "full-mlx"))
    assert hw.config.sliding_window == W and hf.config.sliding_window is None
    check_parity("speculators qwen3 + sliding window", hw, w, window=W)
    emb, feats, _ = inputs(w)
    _, lw = hw(mx.array(emb[None]), mx.array(feats[None]), mask="causal", from_target=True)
    _, lf = hf(mx.array(emb[None]), mx.array(feats[None]), mask="causal", from_target=True)
    lw, lf = np.array(lw[0]), np.array(lf[0])
    assert np.array_equal(lw[:W], lf[:W])                 # within the window: identical
    assert all(not np.allclose(lw[t], lf[t]) for t in range(W, T))
    # through the KV cache in chunks (the engine's path) it is the same function
    cache = hw.make_cache()
    e, f = mx.array(emb[None]), mx.array(feats[None])
    _, a = hw(e[:, :7], f[:, :7], cache=cache, mask="causal", from_target=True)
    _, b = hw(e[:, 7:], f[:, 7:], cache=cache, mask="causal", from_target=True)
    assert float(np.abs(np.concatenate([np.array(a[0]), np.array(b[0])]) - lw).max()) <= 1e-5
    # per-token positions (the calibration path) too
    _, c = hw(e, f, mask="causal", positions=mx.arange(T), from_target=True)
    assert float(np.abs(np.array(c[0]) - lw).max()) <= 1e-5


def test_plain_sliding_window_and_layer_types(tmp_path):
    w = weights_2026()
    out = convert(write_head("speculators", tmp_path / "a", w, sliding_window=2048), tmp_path / "a-mlx")
    assert json.loads((out / "config.json").read_text())["sliding_window"] == 2048
    out = convert(write_head("specforge", tmp_path / "b", w, sliding_window=64,
                             layer_types=["full_attention"]), tmp_path / "b-mlx")
    assert json.loads((out / "config.json").read_text())["sliding_window"] is None


@pytest.mark.parametrize("scaling", [
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 512},
])
def test_rope_scaling_reaches_the_draft(tmp_path, scaling):
    from mlx_lm.models.rope_utils import initialize_rope

    w = weights_2026()
    src = write_head("specforge", tmp_path / "src", w, rope_theta=500000.0, rope_scaling=scaling,
                     max_position_embeddings=4096)
    head = load_head(convert(src, tmp_path / "mlx"))
    assert head.config.rope_scaling["rope_type"] == scaling["rope_type"]
    want = initialize_rope(HD, 500000.0, False, head.config.rope_scaling, 4096)
    rope = head.layers[0].self_attn.rope
    assert type(rope) is type(want) and type(rope).__name__ != "RoPE"
    x = mx.random.normal((1, NH, 9, HD))
    assert mx.allclose(rope(x, offset=700), want(x, offset=700)).item()


def test_aux_ids_from_every_spelling():
    # top level (speculators / vLLM): HF hidden-states index, taken as is, L allowed
    assert aux_ids_from_config({"eagle_aux_hidden_state_layer_ids": [2, 18, 36]}, 36)[0] == [2, 18, 36]
    # eagle_config (SpecForge / ModelOpt) output-of-layer ids: +1
    cfg = {"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 17, 32]}}
    assert aux_ids_from_config(cfg, 36)[0] == [2, 18, 33]
    assert aux_ids_from_config({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 11, 21]}})[0] == [2, 12, 22]
    # ModelOpt gpt-oss v3: [24, 30, 36] with L = 36 is already HF (36 = the last layer's output)
    assert aux_ids_from_config({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [24, 30, 36]}}, 36)[0] == [24, 30, 36]
    # an output-of-layer reading that would pass L is read as HF
    assert aux_ids_from_config({"eagle_config": {"eagle_aux_hidden_state_layer_ids": [1, 5, 8]}}, 8)[0] == [1, 5, 8]
    # this package's own key wins; no ids: None (the target's default)
    assert aux_ids_from_config({"aux_layer_ids": [3, 4, 5], "eagle_aux_hidden_state_layer_ids": [1, 2, 3]})[0] == [3, 4, 5]
    assert aux_ids_from_config({}) == (None, None)
    # widths: num_aux_hidden_states / target_hidden_size / ids against fc's width
    assert num_aux_states({"num_aux_hidden_states": 3}, 192) == (3, 64)
    assert num_aux_states({"target_hidden_size": 32}, 96) == (3, 32)
    assert num_aux_states({"target_hidden_size": 64}, 128) == (2, 64)
    assert num_aux_states({}, 192, [1, 2, 3]) == (3, 64)
    with pytest.raises(ValueError, match="aux layer ids"):
        num_aux_states({"num_aux_hidden_states": 3}, 192, [1, 2])
    with pytest.raises(ValueError, match="target_hidden_size"):
        num_aux_states({"num_aux_hidden_states": 3, "target_hidden_size": 32}, 192)


def test_aux_ids_settled_by_the_target(tmp_path):
    """--target gives L: an ambiguous eagle_config id list is read the right way."""
    w = weights_2026()
    src = write_head("modelopt", tmp_path / "src", w, eagle_config={"eagle_aux_hidden_state_layer_ids": [1, 2, 4]})
    tgt = tmp_path / "target.json"
    tgt.write_text(json.dumps({"hidden_size": 64, "vocab_size": 384, "num_hidden_layers": 4}))
    out = convert(src, tmp_path / "a", "--target", tgt)
    assert json.loads((out / "config.json").read_text())["aux_layer_ids"] == [1, 2, 4]
    out = convert(src, tmp_path / "b")  # without a target: the SpecForge/ModelOpt default reading
    assert json.loads((out / "config.json").read_text())["aux_layer_ids"] == [2, 3, 5]


def test_zz_print_parity_table():
    print("\n[parity] 2026 layouts, MLX (fp32) vs NumPy reference (fp64), fed-back states and logits over two steps:")
    for k, v in PARITY.items():
        print(f"[parity]   {k:40s} max abs diff {v:.2e}")


def test_rope_from_the_verifier(tmp_path, capsys):
    w = weights_2026()
    src = write_head("speculators", tmp_path / "src", w)
    tgt = tmp_path / "target"
    tgt.mkdir()
    (tgt / "config.json").write_text(json.dumps({
        "hidden_size": 64, "vocab_size": 384, "num_hidden_layers": 4, "rope_theta": 1e6,
        "rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}}))
    out = convert(src, tmp_path / "mlx", "--target", tgt, "--rope-from-target")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["rope_theta"] == 1e6 and cfg["rope_scaling"]["rope_type"] == "yarn"
    assert "draft RoPE from the target: base 1e+06, yarn scaling" in capsys.readouterr().out
    assert main([str(src), "--mlx-path", str(tmp_path / "x"), "--rope-from-target"]) == 1
    assert "--rope-from-target: needs --target" in capsys.readouterr().err
