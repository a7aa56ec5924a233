"""Synthetic checkpoints for the converter tests, written without PyTorch:
a minimal PyTorch-zip writer, one tiny random EAGLE-3 head written in every
published layout, and a NumPy reference of the draft forward pass."""

from __future__ import annotations

import json
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# ---------------------------------------------------------------------------
# PyTorch zip checkpoints, byte for byte what torch.save writes for a state
# dict of dense CPU tensors (protocol-2 pickle + one raw buffer per storage).

_STORAGE = {
    np.dtype("float32"): "FloatStorage", np.dtype("float64"): "DoubleStorage",
    np.dtype("float16"): "HalfStorage", np.dtype("int64"): "LongStorage",
    np.dtype("int32"): "IntStorage", np.dtype("int16"): "ShortStorage",
    np.dtype("int8"): "CharStorage", np.dtype("uint8"): "ByteStorage",
    np.dtype("bool"): "BoolStorage",
}


@dataclass
class View:
    """A tensor that is a strided view into a (possibly shared) 1-D storage."""
    base: np.ndarray
    offset: int
    shape: tuple
    stride: tuple
    bf16: bool = False  # base holds bfloat16 bits as uint16


def _global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def _str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _int(i):
    return b"J" + struct.pack("<i", i) if -(2**31) <= i < 2**31 else b"\x8a\x08" + struct.pack("<q", i)


def _tuple(items):
    return b"(" + b"".join(_int(i) for i in items) + b"t"


def write_torch_zip(path, tensors: dict, archive: str = "archive"):
    """``tensors``: name -> np.ndarray (written contiguous) or :class:`View`."""
    storages = {}  # id(base) -> (key, base, storage name)
    body = b""
    for name, t in tensors.items():
        if not isinstance(t, View):
            a = np.ascontiguousarray(t)
            t = View(a.reshape(-1), 0, a.shape, tuple(s // a.itemsize for s in a.strides) if a.ndim else ())
        if id(t.base) not in storages:
            kind = "BFloat16Storage" if t.bf16 else _STORAGE[t.base.dtype]
            storages[id(t.base)] = (str(len(storages)), t.base, kind)
        key, base, kind = storages[id(t.base)]
        pid = b"(" + _str("storage") + _global("torch", kind) + _str(key) + _str("cpu") + _int(base.size) + b"tQ"
        body += (
            _str(name) + _global("torch._utils", "_rebuild_tensor_v2") + b"(" + pid + _int(t.offset)
            + _tuple(t.shape) + _tuple(t.stride) + b"\x89" + _global("collections", "OrderedDict") + b")R" + b"tR"
        )
    pkl = b"\x80\x02" + _global("collections", "OrderedDict") + b")R(" + body + b"u."
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{archive}/data.pkl", pkl)
        z.writestr(f"{archive}/byteorder", "little")
        for key, base, _ in storages.values():
            z.writestr(f"{archive}/data/{key}", np.ascontiguousarray(base).astype(base.dtype.newbyteorder("<")).tobytes())
        z.writestr(f"{archive}/version", "3\n")


def write_pickle_zip(path, pkl_bytes: bytes):
    """A torch-shaped zip around an arbitrary pickle (for malicious inputs)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", pkl_bytes)
        z.writestr("archive/version", "3\n")


# ---------------------------------------------------------------------------
# One random head, every layout

DIMS = dict(H=64, Ht=64, nh=4, nkv=2, hd=16, I=128, V=384, Vd=96)


def ref_head_weights(seed=0, *, H=64, Ht=64, nh=4, nkv=2, hd=16, I=128, V=384, Vd=96, fc_bias=False,
                     input_norm=False, n_layers=1):
    """Canonical (MLX-named) float32 weights + int64 d2t + bool t2d."""
    rng = np.random.default_rng(seed)

    def r(*shape, s=0.08):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    def norm(n):
        return (1.0 + rng.standard_normal(n) * 0.1).astype(np.float32)

    w = {"fc.weight": r(H, 3 * Ht), "norm.weight": norm(H), "lm_head.weight": r(Vd, H),
         "embed_tokens.weight": r(V, H, s=0.5)}
    for i in range(n_layers):
        din = 2 * H if i == 0 else H
        p = f"layers.{i}."
        w.update({
            p + "input_layernorm.weight": norm(H),
            p + "post_attention_layernorm.weight": norm(H),
            p + "self_attn.q_proj.weight": r(nh * hd, din),
            p + "self_attn.k_proj.weight": r(nkv * hd, din),
            p + "self_attn.v_proj.weight": r(nkv * hd, din),
            p + "self_attn.o_proj.weight": r(H, nh * hd),
            p + "mlp.gate_proj.weight": r(I, H),
            p + "mlp.up_proj.weight": r(I, H),
            p + "mlp.down_proj.weight": r(H, I),
        })
        if i == 0:
            w[p + "hidden_norm.weight"] = norm(H)
    if fc_bias:
        w["fc.bias"] = r(H)
    if input_norm:
        w["input_norm.weight"] = norm(3 * Ht)
    used = np.sort(rng.choice(V, size=Vd, replace=False))
    w["d2t"] = (used - np.arange(Vd)).astype(np.int64)
    t2d = np.zeros(V, dtype=bool)
    t2d[used] = True
    w["t2d"] = t2d
    return w


def flat_config(*, H=64, Ht=64, nh=4, nkv=2, hd=16, I=128, V=384, Vd=96, **extra):
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama", "hidden_size": H,
        "intermediate_size": I, "num_attention_heads": nh, "num_key_value_heads": nkv, "head_dim": hd,
        "num_hidden_layers": 1, "vocab_size": V, "draft_vocab_size": Vd, "rms_norm_eps": 1e-5,
        "max_position_embeddings": 2048, "hidden_act": "silu", "tie_word_embeddings": False,
        "torch_dtype": "float16",
    }
    if Ht != H:
        cfg["target_hidden_size"] = Ht
    cfg.update(extra)
    return cfg


def _save_st(path, tensors):
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))


def _rename(w, layer_prefix, top_prefix="", drop=()):
    out = {}
    for k, v in w.items():
        if k in drop:
            continue
        if k.startswith("layers.0."):
            out[layer_prefix + k[len("layers.0."):]] = v
        elif k.startswith("layers."):
            out[top_prefix + k] = v
        elif k in ("d2t", "t2d", "lm_head.weight", "embed_tokens.weight"):
            out[k] = v
        else:
            out[top_prefix + k] = v
    return out


def write_head(layout: str, path, w: dict, **cfg_extra) -> Path:
    """Write weights ``w`` (from :func:`ref_head_weights`) in ``layout``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    H, Ht = w["fc.weight"].shape[0], w["fc.weight"].shape[1] // 3
    dims = dict(H=H, Ht=Ht, V=w["t2d"].shape[0], Vd=w["lm_head.weight"].shape[0],
                I=w["layers.0.mlp.gate_proj.weight"].shape[0])
    if layout == "official":
        t = _rename(w, "midlayer.", drop=("embed_tokens.weight",))
        cfg = flat_config(**dims)
        cfg["architectures"] = ["LlamaForCausalLM"]
        write_torch_zip(path / "pytorch_model.bin", t)
    elif layout == "specforge":
        t = _rename(w, "midlayer.")
        cfg = flat_config(**dims)
        _save_st(path / "model.safetensors", t)
    elif layout == "sglang":
        t = _rename(w, "model.midlayer.", top_prefix="model.", drop=("embed_tokens.weight", "t2d"))
        a = "model.midlayer.self_attn."
        t[a + "qkv_proj.weight"] = np.concatenate([t.pop(a + "q_proj.weight"), t.pop(a + "k_proj.weight"),
                                                   t.pop(a + "v_proj.weight")])
        m = "model.midlayer.mlp."
        t[m + "gate_up_proj.weight"] = np.concatenate([t.pop(m + "gate_proj.weight"), t.pop(m + "up_proj.weight")])
        cfg = flat_config(**dims, bias="fc.bias" in w)
        _save_st(path / "model.safetensors", t)
    elif layout == "speculators":
        t = _rename(w, "layers.0.")
        layer_cfg = {"model_type": "llama", "hidden_size": H, "intermediate_size": dims["I"],
                     "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16,
                     "rms_norm_eps": 1e-5, "vocab_size": dims["V"], "num_hidden_layers": 1}
        cfg = {"architectures": ["Eagle3Speculator"], "speculators_model_type": "eagle3",
               "transformer_layer_config": layer_cfg, "draft_vocab_size": dims["Vd"],
               "norm_before_residual": False, "target_hidden_size": None if Ht == H else Ht,
               "eagle_aux_hidden_state_layer_ids": [2, 3, 3],
               "speculators_config": {"algorithm": "eagle3", "proposal_methods": [],
                                      "verifier": {"name_or_path": "tiny"}}}
        _save_st(path / "model.safetensors", t)
    elif layout in ("modelopt", "nvidia"):
        t = _rename(w, "layers.0.", drop=("embed_tokens.weight", "t2d"))
        cfg = flat_config(**dims)
        if layout == "nvidia":
            cfg["norm_before_fc"] = True
            cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": [1, 2, 3]}
        _save_st(path / "model.safetensors", t)
    else:
        raise ValueError(layout)
    cfg.update(cfg_extra)
    (path / "config.json").write_text(json.dumps(cfg, indent=2))
    return path


# ---------------------------------------------------------------------------
# NumPy reference of the draft forward (the forward pass in eagle3_mlx/head.py's docstring)

def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, pos, theta):
    hd = x.shape[-1]
    inv = theta ** (-np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))
    rot = np.concatenate([-x[..., hd // 2:], x[..., : hd // 2]], -1)
    return x * cos[:, None] + rot * sin[:, None]


def ref_forward(w, emb, feats, *, nh=4, nkv=2, hd=16, eps=1e-5, theta=10000.0,
                norm_before_residual=False):
    """Draft logits [T, Vd] for one causal pass over T positions (float64)."""
    w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items() if k not in ("d2t", "t2d")}
    T = emb.shape[0]
    g = feats.astype(np.float64)
    if "input_norm.weight" in w:
        g = _rms(g, w["input_norm.weight"], eps)
    h = g @ w["fc.weight"].T + w.get("fc.bias", 0.0)
    L = "layers.0."
    hn = _rms(h, w[L + "hidden_norm.weight"], eps)
    res = hn if norm_before_residual else h
    a = np.concatenate([_rms(emb.astype(np.float64), w[L + "input_layernorm.weight"], eps), hn], -1)
    pos = np.arange(T, dtype=np.float64)
    q = _rope((a @ w[L + "self_attn.q_proj.weight"].T).reshape(T, nh, hd), pos, theta)
    k = _rope((a @ w[L + "self_attn.k_proj.weight"].T).reshape(T, nkv, hd), pos, theta)
    v = (a @ w[L + "self_attn.v_proj.weight"].T).reshape(T, nkv, hd)
    k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    s = np.where(np.tril(np.ones((T, T), bool))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", p, v).reshape(T, nh * hd)
    h1 = res + o @ w[L + "self_attn.o_proj.weight"].T
    m = _rms(h1, w[L + "post_attention_layernorm.weight"], eps)
    gate = m @ w[L + "mlp.gate_proj.weight"].T
    h2 = h1 + ((gate / (1 + np.exp(-gate))) * (m @ w[L + "mlp.up_proj.weight"].T)) @ w[L + "mlp.down_proj.weight"].T
    return _rms(h2, w["norm.weight"], eps) @ w["lm_head.weight"].T
