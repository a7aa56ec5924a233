"""GGUF tensors -> Hugging Face-named float arrays: names, llama.cpp's
permutations and offsets undone, dequantization."""

from __future__ import annotations

import re
import sys
from typing import Optional

import numpy as np

from eagle3_mlx.convert.errors import GGUFError
from eagle3_mlx.convert.gguf_hybrid import hybrid_layer, hybrid_top

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z0-9_]+)\.(weight|bias)$")

_LAYER_MAP = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_norm": "post_attention_layernorm",
}
_GEMMA3_LAYER_MAP = dict(
    _LAYER_MAP,
    ffn_norm="pre_feedforward_layernorm",
    post_attention_norm="post_attention_layernorm",
    post_ffw_norm="post_feedforward_layernorm",
)
_TOP_MAP = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_name(arch: str, gguf_name: str) -> Optional[str]:
    """Hugging Face / mlx-lm parameter name for a GGUF tensor name (None: unknown)."""
    if gguf_name in _TOP_MAP:
        return _TOP_MAP[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if not m:
        return None
    layer, part, kind = m.groups()
    table = _GEMMA3_LAYER_MAP if arch == "gemma3" else _LAYER_MAP
    if part not in table:
        return None
    return f"model.layers.{layer}.{table[part]}.{kind}"


def permute_llama_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face -> llama.cpp row order of a llama q/k projection (or bias)."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def unpermute_llama_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp -> Hugging Face row order (inverse of :func:`permute_llama_qk`)."""
    rows = w.shape[0]
    return (
        w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _dequantize(t, path) -> np.ndarray:
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    if t.tensor_type in (Q.I8, Q.I16, Q.I32, Q.I64):
        raise GGUFError(path, f"tensor {t.name!r} has integer type {t.tensor_type.name}")
    try:
        if t.tensor_type == Q.F64:
            out = np.asarray(t.data, dtype=np.float32)
        else:
            out = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise GGUFError(
            path, f"tensor {t.name!r}: dequantizing {t.tensor_type.name} is not supported"
        ) from None
    shape = tuple(int(d) for d in reversed(t.shape.tolist()))
    return np.asarray(out, dtype=np.float32).reshape(shape)


def _load_weights(reader, arch: str, config: dict, dtype, path, progress: bool) -> dict:
    import mlx.core as mx
    from tqdm import tqdm

    n_heads = config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]
    weights = {}
    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    unknown = [t.name for t in tensors if hf_name(arch, t.name) is None]
    if unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise GGUFError(
            path, f"unexpected tensors for architecture {arch!r}: {', '.join(unknown[:5])}{more}"
        )
    total = sum(int(t.n_elements) for t in tensors)
    with tqdm(
        total=total, unit="par", unit_scale=True, desc="dequantizing", disable=not progress,
        file=sys.stderr, leave=False,
    ) as bar:
        for t in tensors:
            name = hf_name(arch, t.name)
            w = _dequantize(t, path)
            if arch == "llama":
                if name.endswith("self_attn.q_proj.weight") or name.endswith("self_attn.q_proj.bias"):
                    w = unpermute_llama_qk(w, n_heads)
                elif name.endswith("self_attn.k_proj.weight") or name.endswith("self_attn.k_proj.bias"):
                    w = unpermute_llama_qk(w, n_kv)
            elif arch == "gemma3" and t.name.endswith("norm.weight"):
                w = w - 1.0
            weights[name] = mx.array(w).astype(dtype)
            mx.eval(weights[name])
            del w
            bar.update(int(t.n_elements))
    return weights


def _load_hybrid_weights(reader, arch: str, config: dict, dtype, path, progress: bool) -> dict:
    """qwen3next / qwen35 / qwen35moe: one decoder layer at a time, since
    undoing llama.cpp's layout needs a layer's tensors together."""
    import mlx.core as mx
    from tqdm import tqdm

    n_layers = config["num_hidden_layers"]
    top, layers, unknown = [], {}, []
    for t in reader.tensors:
        m = re.match(r"^blk\.(\d+)\.", t.name)
        if m is None:
            (top if t.name in ("token_embd.weight", "output_norm.weight", "output.weight")
             else unknown).append(t)
        elif int(m.group(1)) < n_layers:  # later blocks are MTP layers: not the target's
            layers.setdefault(int(m.group(1)), []).append(t)
    if unknown:
        raise GGUFError(path, f"unexpected tensors for architecture {arch!r}: "
                              + ", ".join(t.name for t in unknown[:5]))
    weights = {}

    def keep(hf: dict):
        for name, w in hf.items():
            weights[name] = mx.array(np.ascontiguousarray(w, dtype=np.float32)).astype(dtype)
            mx.eval(weights[name])

    total = sum(int(t.n_elements) for t in top) + sum(
        int(t.n_elements) for ts in layers.values() for t in ts)
    with tqdm(total=total, unit="par", unit_scale=True, desc="dequantizing",
              disable=not progress, file=sys.stderr, leave=False) as bar:
        for t in top:
            keep(dict([hybrid_top(t.name, _dequantize(t, path))]))
            bar.update(int(t.n_elements))
        for i in sorted(layers):
            parts = {t.name: _dequantize(t, path) for t in layers[i]}
            keep(hybrid_layer(arch, config, i, parts, path))
            bar.update(sum(int(t.n_elements) for t in layers[i]))
    return weights
