"""The Qwen3.5 / Qwen3-Next MTP module (eagle3_mlx.mtp) and keeping ``mtp.*``
through ``eagle3-mlx convert``.

The NumPy reference below (float64) is written from vLLM's published
implementation (vllm-project/vllm: vllm/model_executor/models/qwen3_next_mtp.py
@ 055e47c28003156421365af985d676fc921cb075, qwen3_5_mtp.py @
01d99805d1ef3d21d30e21a0ae387643fe0cd45a, qwen3_next.py @
002d6073aa034d4f5545d45021b0e56d1f3c3593, v1/spec_decode/eagle.py @
008603a39fff2a383a293c62eec0c752c42199f2): zero-centred RMSNorms ``x * (1 + w)``
on the raw HF weights, ``fc(concat(norm(embed(t+1)), norm(hidden(t))))``, one
gated full-attention layer with partial NeoX RoPE at the hidden's position,
``mtp.norm``, the target's lm_head; depth 2 feeds back the normed output.
"""

import json

import mlx.core as mx
import numpy as np
import pytest

from eagle3_mlx.convert.cli import main
from eagle3_mlx.mtp import (
    CONFIG_KEY,
    MTP_FILE,
    MTPError,
    MTPModule,
    lm_head_logits,
    load_mtp,
    load_mtp_weights,
    mtp_support_problem,
    sha256_file,
    text_args_from_config,
)
from eagle3_mlx.testing import make_tokenizer

IDS = [5, 17, 42, 99, 3, 250, 7, 64]  # depth 1 rows pair IDS[t] with IDS[t + 1]
DRAFT = 131  # the depth-2 input token

BASE = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, full_attention_interval=2,
    num_attention_heads=4, num_key_value_heads=2, head_dim=16, linear_num_value_heads=4,
    linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
    linear_conv_kernel_dim=4, vocab_size=384, rms_norm_eps=1e-6, max_position_embeddings=512,
    tie_word_embeddings=False, torch_dtype="float32", mtp_num_hidden_layers=1,
    rope_parameters=dict(rope_type="default", rope_theta=10000.0, partial_rotary_factor=0.5),
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
           shared_expert_intermediate_size=48, norm_topk_prob=True)
FAMILY_CFG = {
    "qwen3_5": dict(BASE, model_type="qwen3_5", architectures=["Qwen3_5ForCausalLM"]),
    # MoE, tied embeddings (as the small Qwen3.5 releases)
    "qwen3_5_moe": dict(BASE, model_type="qwen3_5_moe", architectures=["Qwen3_5MoeForCausalLM"],
                        tie_word_embeddings=True, **MOE),
    # per-expert HF MoE layout, norm offset detected by mlx-lm's qwen3_next rule
    "qwen3_next": dict({k: v for k, v in BASE.items() if k != "rope_parameters"}, model_type="qwen3_next",
                       architectures=["Qwen3NextForCausalLM"], rope_theta=50000.0, partial_rotary_factor=0.25,
                       decoder_sparse_step=1, mlp_only_layers=[], **MOE),
}
ROPE = {"qwen3_5": (10000.0, 0.5), "qwen3_5_moe": (10000.0, 0.5), "qwen3_next": (50000.0, 0.25)}
_HF_OFFSET_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                    ".q_norm.weight", ".k_norm.weight")


def _rng(seed):
    rng = np.random.default_rng(seed)

    def r(*shape, s=0.08):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    def off(n):  # an RMSNorm weight as HF stores it: an offset from 1
        return (rng.standard_normal(n) * 0.2).astype(np.float32)

    return r, off


def hf_mtp_tensors(cfg, seed=1, experts="fused", prefix="mtp."):
    """The MTP block in HF names, written out by hand (independent of eagle3_mlx.mtp)."""
    r, off = _rng(seed)
    H, nh, nkv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    w = {"fc.weight": r(H, 2 * H), "pre_fc_norm_embedding.weight": off(H),
         "pre_fc_norm_hidden.weight": off(H), "norm.weight": off(H)}
    p = "layers.0."
    w.update({
        p + "input_layernorm.weight": off(H), p + "post_attention_layernorm.weight": off(H),
        p + "self_attn.q_proj.weight": r(2 * nh * hd, H), p + "self_attn.k_proj.weight": r(nkv * hd, H),
        p + "self_attn.v_proj.weight": r(nkv * hd, H), p + "self_attn.o_proj.weight": r(H, nh * hd),
        p + "self_attn.q_norm.weight": off(hd), p + "self_attn.k_norm.weight": off(hd),
    })
    E = cfg.get("num_experts", 0)
    if not E:
        I = cfg["intermediate_size"]
        w.update({p + "mlp.gate_proj.weight": r(I, H), p + "mlp.up_proj.weight": r(I, H),
                  p + "mlp.down_proj.weight": r(H, I)})
    else:
        Im, Is = cfg["moe_intermediate_size"], cfg["shared_expert_intermediate_size"]
        w.update({p + "mlp.gate.weight": r(E, H, s=0.5), p + "mlp.shared_expert_gate.weight": r(1, H),
                  p + "mlp.shared_expert.gate_proj.weight": r(Is, H),
                  p + "mlp.shared_expert.up_proj.weight": r(Is, H),
                  p + "mlp.shared_expert.down_proj.weight": r(H, Is)})
        if experts == "fused":  # transformers-5 Qwen3.5-MoE
            w[p + "mlp.experts.gate_up_proj"] = r(E, 2 * Im, H)
            w[p + "mlp.experts.down_proj"] = r(E, H, Im)
        else:  # per expert (Qwen3-Next)
            for e in range(E):
                w.update({f"{p}mlp.experts.{e}.gate_proj.weight": r(Im, H),
                          f"{p}mlp.experts.{e}.up_proj.weight": r(Im, H),
                          f"{p}mlp.experts.{e}.down_proj.weight": r(H, Im)})
    return {prefix + k: v for k, v in w.items()}


def hf_main_tensors(cfg, seed=0, vl=False):
    """The target's own tensors in HF layout (names from mlx-lm's classes, mapped back)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    r, off = _rng(seed)
    out = {}
    for name, p in tree_flatten(model.parameters()):
        name = name.replace("language_model.lm_head.", "lm_head.")
        name = name.replace("language_model.model.", "model.language_model." if vl else "model.")
        shape = tuple(p.shape)
        if name.endswith("conv1d.weight"):  # mlx [C, K, 1] -> HF [C, 1, K]
            out[name] = r(shape[0], 1, shape[1], s=0.3)
        elif name.endswith(_HF_OFFSET_NORMS):
            out[name] = off(*shape)
        elif name.endswith("linear_attn.norm.weight"):
            out[name] = 1.0 + off(*shape)
        elif name.endswith("embed_tokens.weight"):
            out[name] = r(*shape, s=0.5)
        elif ".switch_mlp." in name:
            continue
        else:
            out[name] = r(*shape)
    E = cfg.get("num_experts", 0)
    if E:
        Im, H = cfg["moe_intermediate_size"], cfg["hidden_size"]
        base = "model.language_model." if vl else "model."
        for i in range(cfg["num_hidden_layers"]):
            if cfg["model_type"] == "qwen3_next":
                for e in range(E):
                    for n, shape in (("gate_proj", (Im, H)), ("up_proj", (Im, H)), ("down_proj", (H, Im))):
                        out[f"{base}layers.{i}.mlp.experts.{e}.{n}.weight"] = r(*shape)
            else:
                out[f"{base}layers.{i}.mlp.experts.gate_up_proj"] = r(E, 2 * Im, H)
                out[f"{base}layers.{i}.mlp.experts.down_proj"] = r(E, H, Im)
    return out


def write_source(path, cfg, *, mtp=True, fmt="safetensors", vl=False):
    path.mkdir(parents=True, exist_ok=True)
    make_tokenizer(path, vocab_size=cfg["vocab_size"])
    w = hf_main_tensors(cfg, vl=vl)
    if vl:
        w["model.visual.patch_embed.proj.weight"] = np.zeros((8, 3), np.float32)  # dropped by sanitize
        text = {k: v for k, v in cfg.items() if k not in ("architectures", "torch_dtype")}
        text["model_type"] = cfg["model_type"] + "_text"
        config = {"model_type": cfg["model_type"], "architectures": ["Qwen3_5ForConditionalGeneration"],
                  "text_config": text, "vision_config": {"depth": 1}, "torch_dtype": "float32",
                  "tie_word_embeddings": cfg["tie_word_embeddings"]}
    else:
        config = dict(cfg)
    if mtp:
        w.update(hf_mtp_tensors(cfg, experts="per_expert" if cfg["model_type"] == "qwen3_next" else "fused"))
    (path / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        mx.save_safetensors(str(path / "model.safetensors"), {k: mx.array(v) for k, v in w.items()},
                            metadata={"format": "pt"})
    else:
        from _convert_fixtures import write_torch_zip

        write_torch_zip(path / "pytorch_model.bin", w)
    return w


def convert(src, out, *extra):
    return main([str(src), "--mlx-path", str(out), *map(str, extra)])


# ---------------------------------------------------------------------------
# NumPy reference of the published forward (float64), on the raw HF tensors


def _rms(x, w, eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * (1.0 + w)


def _rope(x, pos, rot, theta):  # x [T, n, hd]; NeoX halves on the first `rot` dims
    half = rot // 2
    ang = pos[:, None] * theta ** (-np.arange(0, rot, 2) / rot)
    cos, sin = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    x1, x2 = x[..., :half], x[..., half:rot]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x[..., rot:]], -1)


def _silu(x):
    return x / (1.0 + np.exp(-x))


class RefMTP:
    def __init__(self, hf: dict, cfg: dict, *, theta: float, partial: float):
        self.w = {k[len("mtp."):]: np.asarray(v, np.float64) for k, v in hf.items() if k.startswith("mtp.")}
        self.cfg, self.theta = cfg, theta
        self.rot = int(cfg["head_dim"] * partial)
        self.K = self.V = None
        self.kpos = np.zeros(0)

    def _attn(self, x, pos):
        c, w, p = self.cfg, self.w, "layers.0.self_attn."
        T, nh, nkv, hd = len(x), c["num_attention_heads"], c["num_key_value_heads"], c["head_dim"]
        qg = (x @ w[p + "q_proj.weight"].T).reshape(T, nh, 2 * hd)
        q, gate = qg[..., :hd], qg[..., hd:]
        k = (x @ w[p + "k_proj.weight"].T).reshape(T, nkv, hd)
        v = (x @ w[p + "v_proj.weight"].T).reshape(T, nkv, hd)
        eps = c["rms_norm_eps"]
        q = _rope(_rms(q, w[p + "q_norm.weight"], eps), pos, self.rot, self.theta)
        k = _rope(_rms(k, w[p + "k_norm.weight"], eps), pos, self.rot, self.theta)
        self.K = k if self.K is None else np.concatenate([self.K, k])
        self.V = v if self.V is None else np.concatenate([self.V, v])
        self.kpos = np.concatenate([self.kpos, pos])
        o = np.zeros((T, nh, hd))
        for h in range(nh):
            j = h // (nh // nkv)
            s = q[:, h] @ self.K[:, j].T / np.sqrt(hd)
            s = np.where(self.kpos[None, :] <= pos[:, None], s, -np.inf)
            pr = np.exp(s - s.max(-1, keepdims=True))
            o[:, h] = (pr / pr.sum(-1, keepdims=True)) @ self.V[:, j]
        o = o.reshape(T, nh * hd) / (1.0 + np.exp(-gate.reshape(T, nh * hd)))
        return o @ w[p + "o_proj.weight"].T

    def _mlp(self, x):
        w, p = self.w, "layers.0.mlp."
        if p + "gate_proj.weight" in w:
            return (_silu(x @ w[p + "gate_proj.weight"].T) * (x @ w[p + "up_proj.weight"].T)) @ w[p + "down_proj.weight"].T
        E, k = self.cfg["num_experts"], self.cfg["num_experts_per_tok"]
        if p + "experts.gate_up_proj" in w:
            gu, dn = w[p + "experts.gate_up_proj"], w[p + "experts.down_proj"]
            Im = gu.shape[1] // 2
            experts = [(gu[e, :Im], gu[e, Im:], dn[e]) for e in range(E)]
        else:
            experts = [tuple(w[f"{p}experts.{e}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
                       for e in range(E)]
        logits = x @ w[p + "gate.weight"].T
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        y = np.zeros_like(x)
        for t in range(len(x)):
            top = np.argsort(-probs[t])[:k]
            wt = probs[t, top] / (probs[t, top].sum() if self.cfg["norm_topk_prob"] else 1.0)
            for e, a in zip(top, wt):
                g, u, d = experts[e]
                y[t] += a * ((_silu(x[t] @ g.T) * (x[t] @ u.T)) @ d.T)
        sh = (_silu(x @ w[p + "shared_expert.gate_proj.weight"].T) * (x @ w[p + "shared_expert.up_proj.weight"].T))
        sh = sh @ w[p + "shared_expert.down_proj.weight"].T
        return y + sh / (1.0 + np.exp(-(x @ w[p + "shared_expert_gate.weight"].T)))

    def step(self, embeds, hidden, pos):
        w, eps = self.w, self.cfg["rms_norm_eps"]
        x = np.concatenate([_rms(embeds, w["pre_fc_norm_embedding.weight"], eps),
                            _rms(hidden, w["pre_fc_norm_hidden.weight"], eps)], -1) @ w["fc.weight"].T
        h = x + self._attn(_rms(x, w["layers.0.input_layernorm.weight"], eps), pos)
        out = h + self._mlp(_rms(h, w["layers.0.post_attention_layernorm.weight"], eps))
        return _rms(out, w["norm.weight"], eps)


def _parity(mtp, hf, cfg, embed, lm_head, hidden, *, theta, partial):
    """Max |logit diff| at depth 1 (len(IDS) rows) and depth 2 (one row, fed back)."""
    E = lambda ids: mx.array(embed[np.array(ids)][None])  # noqa: E731
    cache = mtp.make_cache()
    fb, normed = mtp(E(IDS[1:] + [IDS[0]]), mx.array(hidden[None]), cache)
    l1 = np.array(normed[0] @ mx.array(lm_head).T)
    fb2, normed2 = mtp(E([DRAFT]), fb[:, -1:], cache, step=1)
    l2 = np.array(normed2[0] @ mx.array(lm_head).T)
    assert cache[0].offset == len(IDS) + 1

    ref = RefMTP(hf, cfg, theta=theta, partial=partial)
    emb64, head64 = embed.astype(np.float64), lm_head.astype(np.float64)
    n = len(IDS)
    r1 = ref.step(emb64[np.array(IDS[1:] + [IDS[0]])], hidden.astype(np.float64), np.arange(n, dtype=np.float64))
    r2 = ref.step(emb64[[DRAFT]], r1[-1:], np.array([float(n)]))  # fed back: the normed output
    d1 = float(np.abs(l1 - r1 @ head64.T).max())
    d2 = float(np.abs(l2 - r2 @ head64.T).max())
    return d1, d2, float(np.abs(r1 @ head64.T).max())


# ---------------------------------------------------------------------------
# conversion keeps mtp.*, and the converted module matches the reference


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (src dir, converted dir, HF tensors), converted once."""
    made = {}

    def get(family):
        if family not in made:
            root = tmp_path_factory.mktemp(family)
            w = write_source(root / "src", FAMILY_CFG[family])
            assert convert(root / "src", root / "mlx", "--dtype", "float32") == 0
            made[family] = (root / "src", root / "mlx", w)
        return made[family]

    return get


@pytest.mark.parametrize("family", ["qwen3_5", "qwen3_5_moe", "qwen3_next"])
def test_convert_keeps_mtp_and_parity(converted, family, capsys):
    from mlx_lm import load

    src, out, hf = converted(family)
    cfg = json.loads((out / "config.json").read_text())
    info = cfg[CONFIG_KEY]
    f = out / MTP_FILE
    assert f.is_file() and info["file"] == MTP_FILE and info["num_layers"] == 1
    assert info["norm_offset_applied"] is True and info["sha256"] == sha256_file(f)
    assert info["dtype"] == "float32"

    # the tensors are the source's, norms shifted by 1, experts stacked
    saved = mx.load(str(f))
    for k, v in hf.items():
        if not k.startswith("mtp."):
            continue
        if ".experts." in k and k.split(".")[-3].isdigit():  # per expert: stacked
            e, base = int(k.split(".")[-3]), k[: k.index("experts.")]
            np.testing.assert_array_equal(np.array(saved[base + "switch_mlp." + k.split(".")[-2] + ".weight"][e]), v)
        elif k.endswith("experts.gate_up_proj"):
            base, mid = k[: -len("experts.gate_up_proj")], v.shape[1] // 2
            np.testing.assert_array_equal(np.array(saved[base + "switch_mlp.gate_proj.weight"]), v[:, :mid])
            np.testing.assert_array_equal(np.array(saved[base + "switch_mlp.up_proj.weight"]), v[:, mid:])
        elif k.endswith("experts.down_proj"):
            np.testing.assert_array_equal(np.array(saved[k[: -len("experts.down_proj")] + "switch_mlp.down_proj.weight"]), v)
        else:
            shift = 1.0 if "norm" in k.split(".")[-2] else 0.0  # every RMSNorm of the block
            np.testing.assert_array_equal(np.array(saved[k]), v + np.float32(shift))

    # the target itself still loads with mlx-lm (mtp.safetensors is not one of its files)
    model, _ = load(str(out))
    mtp = load_mtp(out)
    c = FAMILY_CFG[family]
    assert isinstance(mtp, MTPModule) and mtp.num_layers == 1
    assert not mtp.layers[0].is_linear
    assert type(mtp.layers[0].mlp).__name__ == ("Qwen3NextSparseMoeBlock" if c.get("num_experts") else "Qwen3NextMLP")

    # the target's final-normed hidden state, as the MTP reads it at depth 1
    hidden = np.array(getattr(model, "language_model", model).model(mx.array([IDS]))[0])
    embed = hf["model.embed_tokens.weight"]
    lm_head = embed if c["tie_word_embeddings"] else hf["lm_head.weight"]
    theta, partial = ROPE[family]
    d1, d2, scale = _parity(mtp, hf, c, embed, lm_head, hidden, theta=theta, partial=partial)
    # lm_head_logits uses the target's own head (tied or not)
    _, normed = mtp(mx.array(embed[np.array([IDS[1]])][None]), mx.array(hidden[None, :1]))
    np.testing.assert_allclose(np.array(lm_head_logits(model, normed)[0]),
                               np.array(normed[0]) @ lm_head.T, atol=1e-5)
    with capsys.disabled():
        print(f"\n[parity] MTP {family} fp32 vs NumPy reference: depth 1 {d1:.2e}, depth 2 {d2:.2e} "
              f"(max |logit| {scale:.2f})")
    assert d1 <= 1e-5 and d2 <= 1e-5


def test_unconverted_hf_dir_and_vl_layout(converted, tmp_path):
    src, out, hf = converted("qwen3_5")
    want = dict(tree_items(load_mtp(out)))
    # an unconverted HF directory: the mtp.* tensors, norm offset by mlx-lm's rule
    got = dict(tree_items(load_mtp(src)))
    assert want.keys() == got.keys()
    for k in want:
        np.testing.assert_array_equal(np.array(got[k]), np.array(want[k]))
    # vision-language wrapper: model.language_model.* + top-level mtp.*
    write_source(tmp_path / "vl", FAMILY_CFG["qwen3_5"], vl=True)
    assert convert(tmp_path / "vl", tmp_path / "vl-mlx", "--dtype", "float32") == 0
    vl = dict(tree_items(load_mtp(tmp_path / "vl-mlx")))
    assert vl.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(np.array(vl[k]), np.array(want[k]))


def tree_items(module):
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())


def test_bin_source_and_no_mtp(tmp_path, converted):
    _, out, _ = converted("qwen3_5")
    write_source(tmp_path / "bin", FAMILY_CFG["qwen3_5"], fmt="bin")
    assert convert(tmp_path / "bin", tmp_path / "bin-mlx", "--dtype", "float32") == 0
    a, b = dict(tree_items(load_mtp(out))), dict(tree_items(load_mtp(tmp_path / "bin-mlx")))
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)

    # no mtp.* tensors: exactly as before (no file, no key), and load_mtp says None
    write_source(tmp_path / "plain", FAMILY_CFG["qwen3_5"], mtp=False)
    assert convert(tmp_path / "plain", tmp_path / "plain-mlx") == 0
    assert not (tmp_path / "plain-mlx" / MTP_FILE).exists()
    assert CONFIG_KEY not in json.loads((tmp_path / "plain-mlx" / "config.json").read_text())
    assert load_mtp(tmp_path / "plain-mlx") is None
    assert load_mtp(tmp_path / "plain") is None


def test_quantized_conversion_keeps_quantized_mtp(tmp_path, converted):
    import mlx.nn as nn

    src, _, _ = converted("qwen3_5")
    assert convert(src, tmp_path / "q", "-q") == 0
    info = json.loads((tmp_path / "q" / "config.json").read_text())[CONFIG_KEY]
    assert info["quantization"]["bits"] == 4 and info["sha256"] == sha256_file(tmp_path / "q" / MTP_FILE)
    mtp = load_mtp(tmp_path / "q")
    assert isinstance(mtp.fc, nn.QuantizedLinear)
    fb, normed = mtp(mx.ones((1, 3, 64)), mx.ones((1, 3, 64)), mtp.make_cache())
    assert fb.shape == normed.shape == (1, 3, 64) and bool(mx.all(mx.isfinite(normed)))


# ---------------------------------------------------------------------------
# errors


def test_corrupt_file_and_missing_key(converted, tmp_path):
    import shutil

    _, out, hf = converted("qwen3_5")
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    data = bytearray((bad / MTP_FILE).read_bytes())
    data[-5] ^= 0xFF
    (bad / MTP_FILE).write_bytes(bytes(data))
    with pytest.raises(MTPError) as e:
        load_mtp(bad)
    msg = str(e.value)
    assert str(bad / MTP_FILE) in msg and "corrupt" in msg and "\n" not in msg

    (bad / MTP_FILE).unlink()
    with pytest.raises(MTPError, match="missing"):
        load_mtp(bad)

    args = text_args_from_config(FAMILY_CFG["qwen3_5"])
    raw = {k: mx.array(v) for k, v in hf.items() if k.startswith("mtp.")}
    with pytest.raises(MTPError, match="cannot tell"):
        load_mtp_weights(raw, args)  # MTP tensors alone: the norm offset must be stated
    raw.pop("mtp.fc.weight")
    with pytest.raises(MTPError) as e:
        load_mtp_weights(raw, args, norm_offset=True)
    assert "missing mtp.fc.weight" in str(e.value) and "\n" not in str(e.value)
    raw["mtp.fc.weight"] = mx.zeros((64, 128))
    raw["mtp.layers.0.self_attn.extra.weight"] = mx.zeros((4,))
    with pytest.raises(MTPError, match="unexpected mtp.layers.0.self_attn.extra.weight"):
        load_mtp_weights(raw, args, norm_offset=True)


def test_support_problem():
    for mt, name in (("deepseek_v3", "DeepSeek-V3"), ("glm4_moe", "glm4_moe"), ("mimo", "MiMo")):
        msg = mtp_support_problem({"model_type": mt, "num_nextn_predict_layers": 1})
        assert msg.startswith("MTP drafting for") and name in msg and "not supported yet" in msg
        assert "\n" not in msg
    assert "not supported yet" in mtp_support_problem({"model_type": "some_new", "num_nextn_predict_layers": 2})
    assert mtp_support_problem(FAMILY_CFG["qwen3_5"]) is None
    assert mtp_support_problem({"model_type": "qwen3_5", "text_config": {"mtp_num_hidden_layers": 1}}) is None
    assert "no MTP layers" in mtp_support_problem(dict(FAMILY_CFG["qwen3_5"], mtp_num_hidden_layers=0))
    assert "pre-quantized (fp8)" in mtp_support_problem(dict(FAMILY_CFG["qwen3_5"],
                                                             quantization_config={"quant_method": "fp8"}))
    assert "no MTP module" in mtp_support_problem({"model_type": "llama"})


# ---------------------------------------------------------------------------
# qwen3_next: the module straight from qwen3_next.ModelArgs and raw HF tensors

NEXT = FAMILY_CFG["qwen3_next"]


def test_qwen3_next_module_parity(capsys):
    from mlx_lm.models.qwen3_next import ModelArgs

    args = text_args_from_config(NEXT)
    assert isinstance(args, ModelArgs)
    hf = hf_mtp_tensors(NEXT, seed=4, experts="per_expert")
    mtp = load_mtp_weights(hf, args, norm_offset=True)
    r, _ = _rng(7)
    embed, lm_head = r(NEXT["vocab_size"], 64, s=0.5), r(NEXT["vocab_size"], 64)
    hidden = r(len(IDS), 64, s=1.0)
    d1, d2, scale = _parity(mtp, hf, NEXT, embed, lm_head, hidden, theta=50000.0, partial=0.25)
    with capsys.disabled():
        print(f"\n[parity] MTP qwen3_next (per-expert MoE) fp32 vs NumPy reference: depth 1 {d1:.2e}, "
              f"depth 2 {d2:.2e} (max |logit| {scale:.2f})")
    assert d1 <= 1e-5 and d2 <= 1e-5

    # vLLM picks dense vs MoE from the MTP layer's own index (mtp.layers.0 -> 0)
    dense = MTPModule(text_args_from_config(dict(NEXT, mlp_only_layers=[0])))
    assert type(dense.layers[0].mlp).__name__ == "Qwen3NextMLP" and not dense.layers[0].is_linear
    assert type(MTPModule(args).layers[0].mlp).__name__ == "Qwen3NextSparseMoeBlock"


def test_module_api():
    args = text_args_from_config(FAMILY_CFG["qwen3_5"])
    m = MTPModule(args, num_layers=2, feedback="prenorm")
    assert len(m.make_cache()) == 2 and m.quant_predicate is None
    x = mx.random.normal((1, 2, 64))
    fb, normed = m(x, x, m.make_cache(), step=3)  # step 3 -> layers[1]
    assert not np.allclose(np.array(fb), np.array(normed))  # prenorm feedback is the layer output
    assert MTPModule(text_args_from_config(FAMILY_CFG["qwen3_5_moe"])).quant_predicate is not None
    with pytest.raises(ValueError):
        MTPModule(args, feedback="other")
