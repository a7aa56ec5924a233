"""Export a trained head: the engine's MLX head directory (``save_head``) and
the official EAGLE-3 layout (``config.json`` + ``model.safetensors`` with
``fc`` / ``midlayer.*`` / ``norm`` / ``lm_head`` / ``d2t`` (int64) / ``t2d``
(bool), no ``embed_tokens``), readable by SGLang, vLLM, the EAGLE code and
``eagle3-mlx convert``."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..head import Eagle3Head, quantize_head, save_head, t2d_from_d2t


def official_tensors(head: Eagle3Head, dtype=np.float32) -> dict:
    if len(head.layers) != 1:
        raise ValueError("official export supports one-layer heads")
    if head.config.quantization:
        raise ValueError("export the unquantized head to the official layout")
    out = {}
    for name, w in tree_flatten(head.parameters()):
        if name == "d2t" or name.startswith("embed_tokens."):
            continue
        if name.startswith("layers.0."):
            name = "midlayer." + name[len("layers.0."):]
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
        "attention_bias": False,
        "bias": False,
        "torch_dtype": torch_dtype,
    }
    if c.rope_scaling:
        cfg["rope_scaling"] = c.rope_scaling
    if c.target_hidden_size != c.hidden_size:
        cfg["target_hidden_size"] = c.target_hidden_size
    if c.aux_layer_ids:
        cfg["eagle_config"] = {"eagle_aux_hidden_state_layer_ids": list(c.aux_layer_ids)}
    return cfg


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
