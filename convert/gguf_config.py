"""GGUF metadata -> the Hugging Face / mlx-lm ``config.json`` of the model."""

from __future__ import annotations

from typing import Any

import numpy as np

from eagle3_mlx.convert.errors import GGUFError
from eagle3_mlx.convert.gguf_hybrid import HYBRID_ARCHS, hybrid_config
from eagle3_mlx.convert.gguf_reader import _f32, _scalar, metadata_getter

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", *HYBRID_ARCHS)

# Architectures the gguf package knows that we refuse with a reason.
_REFUSED = {
    "gemma4": "gemma4 GGUF files are not supported yet (its 'gemma4' tokenizer model, per-layer "
              "KV heads and proportional-RoPE frequency tensor are not rebuilt); convert the "
              "Hugging Face checkpoint instead",
}


_ARCH_INFO = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}


def _infer_llama3_rope(factors: np.ndarray, base: float, dims: int, meta_orig, path):
    """Recover HF ``rope_scaling`` (rope_type llama3) from llama.cpp ``rope_freqs``.

    llama.cpp divides each rotation frequency by ``factors[i]``; Llama-3 scaling
    gives 1 for short wavelengths, ``factor`` for long ones and a smooth blend in
    between.  We search the usual parameter values and check the match.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if np.allclose(factors, 1.0):
        return None
    factor = _f32(factors.max())
    wavelens = 2 * np.pi * base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    origs = [int(meta_orig)] if meta_orig else []
    origs += [8192, 4096, 16384, 32768, 2048, 65536, 131072]
    cands = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)
    for orig in origs:
        for low in cands:
            for high in cands:
                if high <= low:
                    continue
                low_wl, high_wl = orig / low, orig / high
                smooth = (orig / wavelens - low) / (high - low)
                mid = 1.0 / ((1 - smooth) / factor + smooth)
                expect = np.where(
                    wavelens < high_wl, 1.0, np.where(wavelens > low_wl, factor, mid)
                )
                if expect.shape == factors.shape and np.allclose(expect, factors, rtol=1e-4, atol=1e-5):
                    return {
                        "rope_type": "llama3",
                        "factor": factor,
                        "low_freq_factor": low,
                        "high_freq_factor": high,
                        "original_max_position_embeddings": orig,
                    }
    raise GGUFError(
        path,
        "rope_freqs tensor does not match Llama-3 RoPE scaling for any usual parameters; "
        "custom RoPE frequency factors are not supported",
    )


def _check_arch(arch, path) -> None:
    if arch in _REFUSED:
        raise GGUFError(path, _REFUSED[arch])
    if arch not in _ARCH_INFO and arch not in HYBRID_ARCHS:
        raise GGUFError(
            path,
            f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        )


def _base_config(arch, get, shapes, path) -> dict:
    """The dimensions every supported (non-hybrid) architecture shares."""
    if "token_embd.weight" not in shapes:
        raise GGUFError(path, "missing tensor 'token_embd.weight'")
    vocab_size, hidden = shapes["token_embd.weight"]
    hidden_meta = int(get("embedding_length", hidden))
    if hidden_meta != hidden:
        raise GGUFError(
            path, f"embedding_length {hidden_meta} does not match token_embd width {hidden}"
        )
    n_layers = int(get("block_count", required=True))
    n_heads = int(_scalar(get("attention.head_count", required=True), "head_count", path))
    n_kv = int(_scalar(get("attention.head_count_kv", n_heads), "head_count_kv", path))
    ffn = int(_scalar(get("feed_forward_length", required=True), "feed_forward_length", path))
    head_dim = int(get("attention.key_length", hidden // n_heads))
    v_dim = int(get("attention.value_length", head_dim))
    if v_dim != head_dim:
        raise GGUFError(path, f"key_length {head_dim} != value_length {v_dim}; not supported")
    rope_dims = int(get("rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFError(
            path, f"partial RoPE (rope.dimension_count {rope_dims} < head_dim {head_dim}) not supported"
        )
    model_type, hf_arch = _ARCH_INFO[arch]
    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_arch],
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "intermediate_size": ffn,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-6 if arch != "llama" else 1e-5)),
        "vocab_size": vocab_size,
        "max_position_embeddings": int(get("context_length", 4096)),
        "rope_theta": _f32(get("rope.freq_base", 10000.0)),
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    return config


def _rope_scaling(arch, get, config, rope_freqs, path):
    """HF ``rope_scaling`` from the ``rope.scaling.*`` keys or a ``rope_freqs`` tensor."""
    rope_scaling = None
    stype = get("rope.scaling.type")
    sfactor = get("rope.scaling.factor")
    orig_ctx = get("rope.scaling.original_context_length")
    if stype in (None, "none") and sfactor not in (None, 0, 1, 1.0) and arch != "llama":
        stype = "linear"
    if stype == "linear" and sfactor not in (None, 0, 1, 1.0):
        rope_scaling = {"rope_type": "linear", "factor": _f32(sfactor)}
    elif stype == "yarn":
        rope_scaling = {"rope_type": "yarn", "factor": _f32(sfactor or 1.0)}
        if orig_ctx:
            rope_scaling["original_max_position_embeddings"] = int(orig_ctx)
        for k_meta, k_hf in (("rope.scaling.yarn_beta_fast", "beta_fast"),
                             ("rope.scaling.yarn_beta_slow", "beta_slow")):
            if get(k_meta) is not None:
                rope_scaling[k_hf] = _f32(get(k_meta))
    elif stype not in (None, "none", "linear"):
        raise GGUFError(path, f"RoPE scaling type {stype!r} not supported")
    if rope_freqs is not None:
        if arch != "llama":
            raise GGUFError(path, f"rope_freqs tensor not supported for architecture {arch!r}")
        rope_scaling = _infer_llama3_rope(
            rope_freqs, config["rope_theta"], config["head_dim"], orig_ctx, path)
    return rope_scaling


def _sliding_pattern(pattern, path) -> int:
    if isinstance(pattern, (list, tuple)):  # per-layer booleans (True = sliding)
        flags = [bool(x) for x in pattern]
        period = next((i + 1 for i, f in enumerate(flags) if not f), len(flags))
        if any(flags[i] != ((i + 1) % period != 0) for i in range(len(flags))):
            raise GGUFError(path, "irregular gemma3 sliding_window_pattern not supported")
        pattern = period
    return int(pattern)


def _gemma3_config(get, config, path) -> dict:
    scale = get("attention.scale")
    if scale:
        qpas = float(scale) ** -2
    elif config["num_hidden_layers"] == 62:  # gemma-3-27b scales by hidden/heads (as llama.cpp does)
        qpas = config["hidden_size"] / config["num_attention_heads"]
    else:
        qpas = float(config["head_dim"])
    extra = {
        "rope_local_base_freq": _f32(get("rope.freq_base_swa", 10000.0)),
        # transformers' strict Gemma3TextConfig (read by AutoTokenizer) wants an int
        "query_pre_attn_scalar": int(qpas) if float(qpas).is_integer() else qpas,
        "sliding_window": int(get("attention.sliding_window", 4096)),
        "sliding_window_pattern": _sliding_pattern(get("attention.sliding_window_pattern", 6), path),
        "hidden_activation": "gelu_pytorch_tanh",
    }
    if get("final_logit_softcapping"):
        raise GGUFError(path, "gemma3 final_logit_softcapping not supported")
    return extra


def _hybrid(arch, meta, shapes, path) -> dict:
    try:
        return hybrid_config(arch, meta, shapes, path)
    except GGUFError:
        raise
    except (TypeError, ValueError) as e:
        raise GGUFError(path, f"invalid {arch} metadata ({type(e).__name__}: {e})") from None


def gguf_to_hf_config(meta: dict, shapes: dict, path="<gguf>", rope_freqs=None) -> dict:
    """Build the Hugging Face / mlx-lm ``config.json`` dict from GGUF metadata."""
    arch = meta.get("general.architecture")
    _check_arch(arch, path)
    if arch in HYBRID_ARCHS:
        return _hybrid(arch, meta, shapes, path)
    get = metadata_getter(meta, arch, path)
    config = _base_config(arch, get, shapes, path)
    rope_scaling = _rope_scaling(arch, get, config, rope_freqs, path)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
        config["mlp_bias"] = "blk.0.ffn_up.bias" in shapes
    elif arch == "qwen2":
        if config["head_dim"] != config["hidden_size"] // config["num_attention_heads"]:
            raise GGUFError(
                path, f"qwen2 with head_dim {config['head_dim']} != hidden/heads not supported")
    elif arch == "gemma3":
        config.update(_gemma3_config(get, config, path))
        config["rope_scaling"] = rope_scaling  # gemma3_text expects the key
    return config
