"""Gemma 4 Hugging Face checkpoints -> ``eagle3-mlx convert`` -> a target.

A tiny random checkpoint of the text model (``gemma4_text``) and of the
multimodal wrapper (``gemma4``, text tower under ``model.language_model``,
vision tensors dropped) converts, loads as a speculative-decoding target and
gives the logits of the mlx-lm model built directly from the same weights.
"""

from __future__ import annotations

import json
import os

import mlx.core as mx
import numpy as np
import pytest

from eagle3_mlx.convert.cli import main
from eagle3_mlx.target import TargetModel
from eagle3_mlx.testing import make_tokenizer, tiny_target_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 384
TOKENS = [5, 17, 42, 7, 99, 3, 250, 64, 11, 8, 300, 21]


def text_tensors(cfg, seed=0):
    """Random gemma4_text tensors under their HF names (mlx-lm keeps the HF names;
    Gemma 4 RMSNorm weights are plain scales, not offsets from 1)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    rng = np.random.default_rng(seed)
    model_cls, args_cls = _get_classes(cfg)
    out = {}
    for name, p in tree_flatten(model_cls(args_cls.from_dict(cfg)).parameters()):
        shape = tuple(p.shape)
        if name.endswith("norm.weight") or name.endswith("layer_scalar"):
            out[name] = (1.0 + rng.standard_normal(shape) * 0.1).astype(np.float32)
        else:
            s = 0.5 if "embed_tokens" in name else 0.08
            out[name] = (rng.standard_normal(shape) * s).astype(np.float32)
    return out


def reference(cfg, weights):
    """The mlx-lm model built straight from the HF-named weights."""
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    w = model.sanitize({k: mx.array(v) for k, v in weights.items()})
    model.load_weights(list(w.items()), strict=True)
    return model


def write_checkpoint(path, config, weights):
    path.mkdir(parents=True)
    make_tokenizer(path, vocab_size=VOCAB)
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"),
                        {k: mx.array(v) for k, v in weights.items()}, metadata={"format": "pt"})


def wrapper(text_cfg, text_w):
    """The multimodal Gemma4ForConditionalGeneration layout around a text model."""
    cfg = {"model_type": "gemma4", "architectures": ["Gemma4ForConditionalGeneration"],
           "text_config": dict(text_cfg), "vision_config": {"hidden_size": 8},
           "vocab_size": VOCAB, "tie_word_embeddings": True, "eos_token_id": 2,
           "torch_dtype": "float32"}
    w = {k.replace("model.", "model.language_model.", 1): v for k, v in text_w.items()}
    w["model.vision_tower.patch_embedder.input_proj.weight"] = np.zeros((8, 12), np.float32)
    w["model.embed_vision.embedding_projection.weight"] = np.zeros((64, 8), np.float32)
    return cfg, w


@pytest.mark.parametrize("layout", ["text", "multimodal"])
def test_gemma4_converts_and_loads_as_target(tmp_path, layout):
    from mlx_lm import load

    cfg = tiny_target_config("gemma4", vocab_size=VOCAB)
    cfg.update(eos_token_id=2, torch_dtype="float32")
    weights = text_tensors(cfg)
    ref = reference(cfg, weights)
    src_cfg, src_w = (cfg, weights) if layout == "text" else wrapper(cfg, weights)
    write_checkpoint(tmp_path / "hf", src_cfg, src_w)

    assert main([str(tmp_path / "hf"), "--mlx-path", str(tmp_path / "out")]) == 0
    out_cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert out_cfg["model_type"] == "gemma4_text"
    model, _ = load(str(tmp_path / "out"))
    target = TargetModel(model)
    toks = mx.array([TOKENS])
    want = ref(toks)
    got, _ = target.forward(toks, target.make_cache())
    diff = float(mx.abs(want - got).max())
    print(f"gemma4 {layout}: max |logit diff| {diff:.2e}")
    assert got.dtype == mx.float32 and diff <= 1e-5
