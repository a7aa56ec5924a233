"""Export a trained head: the engine's MLX head directory (``save_head``), the
official EAGLE-3 layout (``config.json`` + ``model.safetensors`` with ``fc`` /
``midlayer.*`` / ``norm`` / ``lm_head`` / ``d2t`` (int64) / ``t2d`` (bool), no
``embed_tokens``), readable by SGLang, the EAGLE code and ``eagle3-mlx
convert``, and the speculators layout (``Eagle3Speculator``: nested
``transformer_layer_config``, ``layers.0.*``) that vLLM reads natively.

The 2026 options travel in both: ``fc_norm.{i}.weight`` + ``fc_norm``,
``norm_output`` (plus ``eagle3_feedback`` when the fed-back state differs from
what ``norm_output`` implies), q/k norms + a qwen3 layer type, ``sliding_window``."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..head import Eagle3Head, quantize_head, save_head, t2d_from_d2t


def official_tensors(head: Eagle3Head, dtype=np.float32, layer_prefix: str = "midlayer.") -> dict:
    if len(head.layers) != 1:
        raise ValueError("official export supports one-layer heads")
    if head.config.quantization:
        raise ValueError("export the unquantized head to the official layout")
    out = {}
    for name, w in tree_flatten(head.parameters()):
        if name == "d2t" or name.startswith("embed_tokens."):
            continue
        if name.startswith("layers.0."):
            name = layer_prefix + name[len("layers.0."):]
        out[name] = np.array(w.astype(mx.float32)).astype(dtype)
    d2t = np.array(head.d2t, dtype=np.int64)
    out["d2t"] = d2t
    out["t2d"] = t2d_from_d2t(d2t, head.config.vocab_size)
    return out


def official_config(head: Eagle3Head, torch_dtype: str = "float32") -> dict:
    c = head.config
    cfg = {
        "architectures": ["LlamaForCausalLMEagle3"],
        "model_type": "llama",
        "hidden_size": c.hidden_size,
        "intermediate_size": c.intermediate_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "head_dim": c.head_dim,
        "num_hidden_layers": 1,
        "vocab_size": c.vocab_size,
        "draft_vocab_size": c.draft_vocab_size,
        "max_position_embeddings": c.max_position_embeddings,
        "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "attention_bias": c.attention_bias,
        "bias": c.fc_bias,
        "torch_dtype": torch_dtype,
    }
    cfg.update(_features(c))
    if c.rope_scaling:
        cfg["rope_scaling"] = c.rope_scaling
    if c.target_hidden_size != c.hidden_size:
        cfg["target_hidden_size"] = c.target_hidden_size
    if c.aux_layer_ids:
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(c.aux_layer_ids)}
    return cfg


def _features(c) -> dict:
    """The 2026 config fields, only where they are switched on."""
    out = {}
    if c.fc_norm:
        out["fc_norm"] = True
    if c.norm_output:
        out["norm_output"] = True
    if c.feedback != ("normed" if c.norm_output else "prenorm"):
        out["eagle3_feedback"] = c.feedback
    if c.norm_before_fc:
        out["norm_before_fc"] = True
    if c.sliding_window:
        out["sliding_window"] = c.sliding_window
        if c.layer_types:
            out["layer_types"] = list(c.layer_types)
    return out


def speculators_config(head: Eagle3Head, torch_dtype: str = "float32", ttt_steps=None) -> dict:
    c = head.config
    layer = {k: v for k, v in official_config(head, torch_dtype).items()
             if k not in ("architectures", "draft_vocab_size", "eagle_config", "target_hidden_size", "bias")
             and k not in _features(c)}
    layer["model_type"] = "qwen3" if c.qk_norm else "llama"
    layer["architectures"] = ["Qwen3ForCausalLM" if c.qk_norm else "LlamaForCausalLM"]
    if c.sliding_window:
        layer["sliding_window"] = c.sliding_window
        layer["use_sliding_window"] = True
        layer["layer_types"] = list(c.layer_types or ["sliding_attention"])
    elif c.qk_norm:
        layer["use_sliding_window"] = False
    cfg = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": layer,
        "draft_vocab_size": c.draft_vocab_size,
        "target_hidden_size": c.target_hidden_size,
        "norm_before_residual": c.norm_before_residual,
        "eagle_aux_hidden_state_layer_ids": list(c.aux_layer_ids) if c.aux_layer_ids else None,
        "speculators_config": {
            "algorithm": "eagle3",
            "default_proposal_method": "greedy",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": int(ttt_steps or 3)}],
            "verifier": {"name_or_path": None, "architectures": []},
        },
        "torch_dtype": torch_dtype,
    }
    cfg.update({k: v for k, v in _features(c).items() if k not in ("sliding_window", "layer_types")})
    return cfg


def export_speculators(head: Eagle3Head, path, dtype: str = "float32", ttt_steps=None):
    """The speculators layout (vLLM's native EAGLE-3 format)."""
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    save_file(official_tensors(head, np_dtype, layer_prefix="layers.0."), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(speculators_config(head, dtype, ttt_steps), indent=2))
    return path


def export_official(head: Eagle3Head, path, dtype: str = "float32"):
    from safetensors.numpy import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    np_dtype = {"float32": np.float32, "float16": np.float16}[dtype]
    save_file(official_tensors(head, np_dtype), str(path / "model.safetensors"),
              metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(official_config(head, dtype), indent=2))
    return path


def export_mlx(head: Eagle3Head, path, *, bits: int | None = None, group_size: int = 64,
               dtype: str | None = None):
    """MLX head directory; optionally cast (e.g. float16) and/or quantized."""
    h = head
    if bits or dtype:
        h = clone_head(head)
        if dtype:
            from ..api import cast_floating

            cast_floating(h, dtype)
        if bits:
            quantize_head(h, bits=bits, group_size=group_size)
    save_head(h, path, include_embedding=False)
    return Path(path)


def clone_head(head: Eagle3Head) -> Eagle3Head:
    import dataclasses

    h = Eagle3Head(dataclasses.replace(head.config))
    h.load_weights(tree_flatten(head.parameters()), strict=False)
    h.set_vocab_mapping(head.d2t)
    mx.eval(h.parameters())
    return h


def dir_size_bytes(path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())
