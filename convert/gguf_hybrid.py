"""GGUF -> Hugging Face layout for the Gated-DeltaNet hybrids of 2026:
``qwen3next`` (mlx-lm ``qwen3_next``), ``qwen35`` (``qwen3_5``) and
``qwen35moe`` (``qwen3_5_moe``).

llama.cpp's converter rewrites these checkpoints (read in ggml-org/llama.cpp
``conversion/qwen.py`` at commit 32e9e0448790: ``Qwen3NextModel``,
``_LinearAttentionVReorderBase``, ``Qwen3_5TextModel`` /
``Qwen3_5MoeTextModel``; later versions also append the MTP block as extra
layers). This module undoes each step so mlx-lm's own ``sanitize`` sees an HF
checkpoint:

* RMSNorm weights (all but ``linear_attn.norm``) are HF offsets from 1 and are
  stored as ``1 + w``: subtract 1.
* ``A_log`` is stored as ``ssm_a = -exp(A_log)``: take ``log(-ssm_a)``.
* ``dt_bias`` is stored as ``ssm_dt.bias``; the depthwise ``conv1d`` weight
  ``[C, 1, K]`` is stored squeezed ``[C, K]``.
* qwen3next: the fused ``in_proj_qkvz`` (per key-head groups ``[q, k, v, z]``)
  is split into ``attn_qkv`` (all q, all k, all v) and ``attn_gate`` (z);
  ``in_proj_ba`` is kept as ``ssm_ba``.
* qwen35 / qwen35moe with fewer key than value heads: every value-head axis
  (the v rows of ``in_proj_qkv``, ``in_proj_z``/``a``/``b``, ``A_log``,
  ``dt_bias``, the v channels of ``conv1d``, the columns of ``out_proj``) is
  reordered from grouped-by-key-head to tiled order; we regroup it.
* MoE experts are stacked ``[E, ...]`` (``ffn_{gate,up,down}_exps``):
  qwen3next wants them per expert, qwen3_5_moe as ``gate_up_proj`` +
  ``down_proj``.
* MTP blocks (``nextn_predict_layers``) sit after the decoder layers; they are
  not part of the target and are skipped.
"""

from __future__ import annotations

import re

import numpy as np

from eagle3_mlx.convert.errors import GGUFError
from eagle3_mlx.convert.gguf_reader import metadata_getter

HYBRID_ARCHS = {"qwen3next": "qwen3_next", "qwen35": "qwen3_5", "qwen35moe": "qwen3_5_moe"}
_HF_ARCH = {
    "qwen3next": "Qwen3NextForCausalLM",
    "qwen35": "Qwen3_5ForCausalLM",
    "qwen35moe": "Qwen3_5MoeForCausalLM",
}


def _tensor_table() -> dict:
    """GGUF per-layer tensor base name (``attn_qkv``) -> HF module path, via the
    ``gguf`` package's own names so a rename there cannot drift silently."""
    from gguf import TENSOR_NAMES, MODEL_TENSOR as T

    hf = {
        T.ATTN_NORM: "input_layernorm", T.ATTN_POST_NORM: "post_attention_layernorm",
        T.ATTN_Q: "self_attn.q_proj", T.ATTN_K: "self_attn.k_proj", T.ATTN_V: "self_attn.v_proj",
        T.ATTN_OUT: "self_attn.o_proj", T.ATTN_Q_NORM: "self_attn.q_norm",
        T.ATTN_K_NORM: "self_attn.k_norm",
        T.ATTN_QKV: "linear_attn.in_proj_qkv", T.ATTN_GATE: "linear_attn.in_proj_z",
        T.SSM_ALPHA: "linear_attn.in_proj_a", T.SSM_BETA: "linear_attn.in_proj_b",
        T.SSM_BETA_ALPHA: "linear_attn.in_proj_ba", T.SSM_CONV1D: "linear_attn.conv1d",
        T.SSM_NORM: "linear_attn.norm", T.SSM_OUT: "linear_attn.out_proj",
        T.SSM_A: "linear_attn.A_log", T.SSM_DT: "linear_attn.dt",
        T.FFN_GATE: "mlp.gate_proj", T.FFN_UP: "mlp.up_proj", T.FFN_DOWN: "mlp.down_proj",
        T.FFN_GATE_INP: "mlp.gate", T.FFN_GATE_INP_SHEXP: "mlp.shared_expert_gate",
        T.FFN_GATE_SHEXP: "mlp.shared_expert.gate_proj",
        T.FFN_UP_SHEXP: "mlp.shared_expert.up_proj",
        T.FFN_DOWN_SHEXP: "mlp.shared_expert.down_proj",
        T.FFN_GATE_EXP: "experts.gate", T.FFN_UP_EXP: "experts.up",
        T.FFN_DOWN_EXP: "experts.down", T.FFN_GATE_UP_EXP: "experts.gate_up",
    }
    return {TENSOR_NAMES[k].split(".", 2)[-1]: v for k, v in hf.items()}


_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)(?:\.(weight|bias))?$")


# --------------------------------------------------------------------------- #
# Config
# --------------------------------------------------------------------------- #


def _one(value, what, path) -> int:
    """A per-layer array (0 on layers without that part) -> its one value."""
    if isinstance(value, (list, tuple)):
        vals = sorted({int(v) for v in value if int(v)})
        if len(vals) != 1:
            raise GGUFError(path, f"{what} differs between layers ({vals}); not supported")
        return vals[0]
    return int(value)


def _attention_layers(shapes: dict, n_layers: int, interval: int, path) -> None:
    """mlx-lm places full attention on every ``interval``-th layer: check the file agrees."""
    full = [i for i in range(n_layers) if f"blk.{i}.attn_q.weight" in shapes]
    expect = [i for i in range(n_layers) if (i + 1) % interval == 0]
    if full != expect:
        raise GGUFError(
            path, f"full-attention layers {full} do not follow full_attention_interval {interval}"
        )


def _linear_attention_config(get, path) -> dict:
    nv = _one(get("ssm.time_step_rank", required=True), "ssm.time_step_rank", path)
    inner = _one(get("ssm.inner_size", required=True), "ssm.inner_size", path)
    return {
        "linear_num_value_heads": nv,
        "linear_num_key_heads": _one(get("ssm.group_count", required=True), "ssm.group_count", path),
        "linear_key_head_dim": _one(get("ssm.state_size", required=True), "ssm.state_size", path),
        "linear_value_head_dim": inner // nv,
        "linear_conv_kernel_dim": _one(get("ssm.conv_kernel", required=True), "ssm.conv_kernel", path),
    }


def _moe_config(arch, get, shapes, n_layers, path) -> dict:
    moe = [i for i in range(n_layers) if f"blk.{i}.ffn_gate_inp.weight" in shapes]
    if not moe:
        if arch == "qwen35moe":
            raise GGUFError(path, "qwen35moe file without expert router tensors (ffn_gate_inp)")
        return {}
    n_exp, _ = shapes[f"blk.{moe[0]}.ffn_gate_inp.weight"]
    cfg = {
        "num_experts": int(get("expert_count", n_exp)),
        "num_experts_per_tok": int(get("expert_used_count", required=True)),
        "moe_intermediate_size": int(get("expert_feed_forward_length", required=True)),
        "shared_expert_intermediate_size": int(get("expert_shared_feed_forward_length", 0)),
        # Qwen3-Next and Qwen3.5-MoE normalise the top-k weights; llama.cpp writes it when known
        "norm_topk_prob": bool(get("expert_weights_norm", True)),
        "decoder_sparse_step": 1,
    }
    if not cfg["shared_expert_intermediate_size"] and f"blk.{moe[0]}.ffn_up_shexp.weight" in shapes:
        cfg["shared_expert_intermediate_size"] = shapes[f"blk.{moe[0]}.ffn_up_shexp.weight"][0]
    if arch == "qwen3next":
        cfg["mlp_only_layers"] = [i for i in range(n_layers) if i not in moe]
    elif len(moe) != n_layers:
        raise GGUFError(path, "qwen35moe with dense layers is not supported")
    return cfg


def hybrid_config(arch: str, meta: dict, shapes: dict, path) -> dict:
    """The mlx-lm ``config.json`` of a qwen3next / qwen35 / qwen35moe GGUF."""
    get = metadata_getter(meta, arch, path)
    if "token_embd.weight" not in shapes:
        raise GGUFError(path, "missing tensor 'token_embd.weight'")
    vocab, hidden = shapes["token_embd.weight"]
    n_layers = int(get("block_count", required=True)) - int(get("nextn_predict_layers", 0) or 0)
    n_heads = _one(get("attention.head_count", required=True), "head_count", path)
    head_dim = int(get("attention.key_length", hidden // n_heads))
    interval = int(get("full_attention_interval", 4))
    _attention_layers(shapes, n_layers, interval, path)
    theta = float(np.float32(get("rope.freq_base", 10000.0)))
    partial = int(get("rope.dimension_count", head_dim)) / head_dim
    cfg = {
        "model_type": HYBRID_ARCHS[arch],
        "architectures": [_HF_ARCH[arch]],
        "hidden_size": int(hidden),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads,
        "num_key_value_heads": _one(get("attention.head_count_kv", n_heads), "head_count_kv", path),
        "head_dim": head_dim,
        "rms_norm_eps": float(np.format_float_scientific(
            np.float32(get("attention.layer_norm_rms_epsilon", 1e-6)), unique=True)),
        "vocab_size": int(vocab),
        "max_position_embeddings": int(get("context_length", 262144)),
        "full_attention_interval": interval,
        "tie_word_embeddings": "output.weight" not in shapes,
        "attention_bias": False,
        **_linear_attention_config(get, path),
        **_moe_config(arch, get, shapes, n_layers, path),
    }
    ffn = get("feed_forward_length")
    cfg["intermediate_size"] = _one(ffn, "feed_forward_length", path) if ffn else cfg.get(
        "moe_intermediate_size", 0)
    if get("rope.scaling.type") not in (None, "none"):
        raise GGUFError(path, f"RoPE scaling in a {arch} GGUF is not supported")
    if arch == "qwen3next":
        cfg.update(rope_theta=theta, partial_rotary_factor=partial)
    else:
        # Qwen3.5's interleaved M-RoPE sections only matter for images; on text
        # the positions of all sections are equal and it is plain RoPE.
        cfg["rope_parameters"] = {
            "rope_type": "default", "rope_theta": theta, "partial_rotary_factor": partial,
        }
    return cfg


# --------------------------------------------------------------------------- #
# Weights
# --------------------------------------------------------------------------- #


def _regroup_v_heads(x: np.ndarray, axis: int, nk: int, vpk: int, dim: int) -> np.ndarray:
    """Tiled value-head order ``[v0 of every key head, v1 of every ...]`` ->
    grouped by key head (HF), along ``axis`` of length ``nk * vpk * dim``."""
    x = np.moveaxis(x, axis, 0)
    rest = x.shape[1:]
    x = x.reshape(vpk, nk, dim, *rest).swapaxes(0, 1).reshape(nk * vpk * dim, *rest)
    return np.moveaxis(x, 0, axis)


def _rename(parts: dict, table: dict, path) -> dict:
    out = {}
    for name, arr in parts.items():
        m = _BLOCK_RE.match(name)
        base = table.get(m.group(2)) if m else None
        if base is None:
            raise GGUFError(path, f"unexpected tensor {name!r}")
        kind = m.group(3)
        if base == "linear_attn.dt":
            if kind != "bias":
                raise GGUFError(path, f"unexpected tensor {name!r}")
            out["linear_attn.dt_bias"] = arr
        elif base == "linear_attn.A_log" or base.startswith("experts."):
            out[base] = arr
        else:
            out[f"{base}.{kind or 'weight'}"] = arr
    return out


def _undo_values(w: dict) -> None:
    for k in list(w):
        if k.endswith("norm.weight") and not k.startswith("linear_attn."):
            w[k] = w[k] - 1.0  # stored as 1 + w (Qwen3-Next RMSNorm multiplies by 1 + w)
    if "linear_attn.A_log" in w:
        with np.errstate(divide="ignore", invalid="ignore"):
            w["linear_attn.A_log"] = np.log(-w["linear_attn.A_log"])
    if "linear_attn.conv1d.weight" in w:
        c = w["linear_attn.conv1d.weight"]
        w["linear_attn.conv1d.weight"] = c.reshape(c.shape[0], 1, c.shape[-1])
    if "mlp.shared_expert_gate.weight" in w:
        w["mlp.shared_expert_gate.weight"] = w["mlp.shared_expert_gate.weight"].reshape(1, -1)


def _regroup_layer(w: dict, cfg: dict) -> None:
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"]
    if nk == nv or "linear_attn.in_proj_qkv.weight" not in w:
        return
    vpk, qk = nv // nk, 2 * nk * dk

    def fix(key, axis, dim, start=0):
        if key in w:
            x = w[key]
            head, tail = np.split(x, [start], axis=axis) if start else (None, x)
            tail = _regroup_v_heads(tail, axis, nk, vpk, dim)
            w[key] = tail if head is None else np.concatenate([head, tail], axis=axis)

    fix("linear_attn.in_proj_qkv.weight", 0, dv, qk)
    fix("linear_attn.in_proj_z.weight", 0, dv)
    fix("linear_attn.in_proj_a.weight", 0, 1)
    fix("linear_attn.in_proj_b.weight", 0, 1)
    fix("linear_attn.A_log", 0, 1)
    fix("linear_attn.dt_bias", 0, 1)
    fix("linear_attn.conv1d.weight", 0, dv, qk)
    fix("linear_attn.out_proj.weight", 1, dv)


def _fuse_qkvz(w: dict, cfg: dict, path) -> None:
    """qwen3next: ``attn_qkv`` + ``attn_gate`` -> HF ``in_proj_qkvz``, whose rows
    run per key head as ``[q, k, v, z]``."""
    if "linear_attn.in_proj_qkv.weight" not in w:
        return
    if "linear_attn.in_proj_z.weight" not in w:
        raise GGUFError(path, "qwen3next layer has attn_qkv but no attn_gate")
    nk, dk = cfg["linear_num_key_heads"], cfg["linear_key_head_dim"]
    vz = cfg["linear_num_value_heads"] // nk * cfg["linear_value_head_dim"]
    qkv = w.pop("linear_attn.in_proj_qkv.weight")
    z = w.pop("linear_attn.in_proj_z.weight")
    cols = qkv.shape[1]
    q, k, v = np.split(qkv, [nk * dk, 2 * nk * dk], axis=0)
    parts = [p.reshape(nk, -1, cols) for p in (q, k, v, z)]
    if parts[2].shape[1] != vz:
        raise GGUFError(path, f"attn_qkv has {qkv.shape[0]} rows; the ssm metadata disagree")
    w["linear_attn.in_proj_qkvz.weight"] = np.concatenate(parts, axis=1).reshape(-1, cols)


def _unstack_experts(w: dict, arch: str) -> None:
    if "experts.gate_up" in w:  # llama.cpp --fuse-gate-up-exps
        gu = w.pop("experts.gate_up")
        w["experts.gate"], w["experts.up"] = np.split(gu, 2, axis=1)
    if "experts.down" not in w:
        return
    gate, up, down = w.pop("experts.gate"), w.pop("experts.up"), w.pop("experts.down")
    if arch == "qwen35moe":
        w["mlp.experts.gate_up_proj"] = np.concatenate([gate, up], axis=1)
        w["mlp.experts.down_proj"] = down
        return
    for e in range(gate.shape[0]):
        w[f"mlp.experts.{e}.gate_proj.weight"] = gate[e]
        w[f"mlp.experts.{e}.up_proj.weight"] = up[e]
        w[f"mlp.experts.{e}.down_proj.weight"] = down[e]


def hybrid_layer(arch: str, cfg: dict, layer: int, parts: dict, path) -> dict:
    """One decoder layer: ``{gguf name: array}`` -> ``{HF name: array}``."""
    w = _rename(parts, _tensor_table(), path)
    _undo_values(w)
    if arch == "qwen3next":
        _fuse_qkvz(w, cfg, path)
    else:
        _regroup_layer(w, cfg)
    _unstack_experts(w, arch)
    return {f"model.layers.{layer}.{k}": v for k, v in w.items()}


def hybrid_top(name: str, arr: np.ndarray):
    """Non-layer tensors -> (HF name, array), or None for an unknown name."""
    if name == "token_embd.weight":
        return "model.embed_tokens.weight", arr
    if name == "output_norm.weight":
        return "model.norm.weight", arr - 1.0
    if name == "output.weight":
        return "lm_head.weight", arr
    return None
