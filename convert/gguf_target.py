"""GGUF (llama.cpp) target models -> MLX directories loadable by ``mlx_lm.load``.

Everything here runs on NumPy and MLX: the ``gguf`` package reads the file and
dequantizes every tensor type it knows (F32/F16/BF16, the legacy Q4_0..Q8_0
quants, the K-quants and the IQ quants), the tensors are renamed to the Hugging
Face / mlx-lm layout, and mlx-lm's own model classes, quantizer and writers
produce the output.  The Hugging Face tokenizer (``tokenizer.json`` + chat
template) is rebuilt from the ``tokenizer.ggml.*`` metadata.  No PyTorch.

Supported architectures (``general.architecture``): ``llama``, ``qwen2``,
``qwen3``, ``gemma3``, and the Gated-DeltaNet hybrids ``qwen3next``, ``qwen35``
and ``qwen35moe`` (their layout is undone in :mod:`.gguf_hybrid`).  ``gemma4``
is refused with its reason (``_REFUSED`` in :mod:`.gguf_config`).

The work is split by job: :mod:`.gguf_reader` (open, validate, metadata),
:mod:`.gguf_config` (metadata -> ``config.json``), :mod:`.gguf_weights` (tensor
names, permutations, dequantization), :mod:`.gguf_tokenizer` and
:mod:`.gguf_hybrid` (the qwen3next / qwen35 layouts); this module runs them.

llama.cpp conventions undone here:

* ``llama``: the converter permutes the rows of ``attn_q`` / ``attn_k`` so that
  GGML's interleaved ("normal") RoPE reproduces the Hugging Face rotate-half RoPE;
  we apply the inverse permutation (per head: ``(2, d/2) <- (d/2, 2)``).
  Llama-3 RoPE scaling survives only as the ``rope_freqs`` tensor, from which the
  ``llama3`` scaling parameters are recovered (and checked).
* ``gemma3``: every ``*norm.weight`` is stored as ``1 + w`` (Gemma's RMSNorm
  multiplies by ``1 + w``); we subtract the 1 again.  The ``sqrt(hidden)``
  embedding scale is applied by the model code on both sides, so the embedding is
  copied as is.  Sliding-window pattern 6 and local RoPE base 10000 are the
  llama.cpp defaults when the file does not say otherwise.
* a missing ``output.weight`` means tied embeddings (``tie_word_embeddings``).

The public entry point is :func:`convert_gguf`; ``eagle3_mlx.convert.cli``
dispatches ``.gguf`` sources to it and owns the temporary directory, the atomic
rename and ``--force``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional

# The public names (and a few private ones tests use) are re-exported from the
# modules that do each job: reader, config, weights, tokenizer.
from eagle3_mlx.convert.errors import GGUFError
from eagle3_mlx.convert.gguf_config import (
    SUPPORTED_ARCHITECTURES,
    _infer_llama3_rope,
    gguf_to_hf_config,
)
from eagle3_mlx.convert.gguf_hybrid import HYBRID_ARCHS
from eagle3_mlx.convert.gguf_reader import gguf_metadata, open_gguf, tensor_shapes
from eagle3_mlx.convert.gguf_tokenizer import _eos_ids, _tok_meta, build_tokenizer
from eagle3_mlx.convert.gguf_weights import (
    _dequantize,
    _load_hybrid_weights,
    _load_weights,
    hf_name,
    permute_llama_qk,
    unpermute_llama_qk,
)

__all__ = [
    "GGUFError",
    "SUPPORTED_ARCHITECTURES",
    "convert_gguf",
    "open_gguf",
    "gguf_metadata",
    "gguf_to_hf_config",
    "build_tokenizer",
    "unpermute_llama_qk",
    "permute_llama_qk",
    "hf_name",
    "_infer_llama3_rope",
]


_DTYPES = ("float32", "float16", "bfloat16")


def _read_config(reader, src_path, dtype: str):
    """(metadata, config.json dict) of an open GGUF, with eos/bos ids and dtype."""
    try:
        meta = gguf_metadata(reader)
        rope_freqs = None
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                rope_freqs = _dequantize(t, src_path)
        config = gguf_to_hf_config(meta, tensor_shapes(reader), src_path, rope_freqs=rope_freqs)
    except GGUFError:
        raise
    except (KeyError, TypeError, ValueError, IndexError, UnicodeDecodeError) as e:
        raise GGUFError(src_path, f"invalid metadata ({type(e).__name__}: {e})") from None
    eos = _eos_ids(meta)
    if eos:
        config["eos_token_id"] = eos if len(eos) > 1 else eos[0]
    bos = _tok_meta(meta, "bos_token_id")
    if bos is not None:
        config["bos_token_id"] = int(bos)
    config["torch_dtype"] = dtype
    return meta, config


def _describe(reader, meta, config, src_path, dtype, quant) -> str:
    types = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    name = meta.get("general.name") or src_path.name
    return (
        f"GGUF target: {name} (architecture {meta.get('general.architecture')}, "
        f"{config['num_hidden_layers']} layers, hidden {config['hidden_size']}, vocab "
        f"{config['vocab_size']}; tensor types "
        + ", ".join(f"{k}x{v}" for k, v in sorted(types.items()))
        + f") -> MLX {dtype}"
        + (f", {quant[2]} {quant[1]}-bit g{quant[0]}" if quant else "")
    )


def _tokenizer(meta, src_path):
    try:  # built before the heavy part, so a bad vocabulary fails early
        return build_tokenizer(meta, src_path)
    except GGUFError:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions for inconsistent vocabularies
        raise GGUFError(src_path, f"cannot build the tokenizer ({type(e).__name__}: {e})") from None


def _build_model(config: dict, weights: dict, mx_dtype, arch, src_path):
    """The mlx-lm model with ``weights`` loaded, every float parameter in ``mx_dtype``."""
    import mlx.core as mx
    from mlx.utils import tree_map
    from mlx_lm.utils import _get_classes

    try:
        model_cls, args_cls = _get_classes(config)
        model = model_cls(args_cls.from_dict(config))
        weights = model.sanitize(weights)
        model.load_weights(list(weights.items()), strict=True)
    except (ValueError, TypeError, KeyError) as e:
        raise GGUFError(src_path, f"tensors do not fit the {arch} model: {e}") from None
    del weights
    # keep every parameter in the requested float type (sanitize/init may add float32 ones)
    model.update(tree_map(
        lambda p: p.astype(mx_dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
        model.parameters(),
    ))
    return model


def _save(model, config: dict, tokenizer, out_dir: Path, progress: bool) -> None:
    from mlx.utils import tree_flatten
    from mlx_lm.utils import save_config, save_model
    from tqdm import tqdm

    nbytes = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    with tqdm(
        total=nbytes, unit="B", unit_scale=True, desc="writing", disable=not progress,
        file=sys.stderr, leave=False,
    ) as bar:
        save_model(out_dir, model, donate_model=True)
        bar.update(nbytes)
    save_config(dict(config), out_dir / "config.json")
    tokenizer.save_pretrained(str(out_dir))
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if k in config}
    with open(out_dir / "generation_config.json", "w") as f:
        json.dump(gen, f, indent=2)


def convert_gguf(
    src_path,
    out_dir,
    *,
    dtype: Optional[str] = "float32",
    quantize: bool = False,
    q_bits: int = 4,
    q_group_size: int = 64,
    q_mode: str = "affine",
    progress: bool = True,
    log: Optional[Callable[[str], None]] = None,
) -> dict:
    """Convert the GGUF file ``src_path`` into the existing directory ``out_dir``.

    Writes ``config.json``, ``model.safetensors`` (+ index), the tokenizer files
    (with the chat template) and ``generation_config.json``; the result loads
    with ``mlx_lm.load(out_dir)``.  ``dtype`` is the float type of the
    dequantized weights (``None``: :func:`eagle3_mlx.platform.default_dtype`);
    ``quantize`` re-quantizes with mlx-lm (``q_bits``, ``q_group_size``,
    ``q_mode``).  Returns the saved config.  Raises :class:`GGUFError` (a
    ``ValueError``) naming the file for corrupt, truncated or unsupported input.
    """
    import mlx.core as mx
    from mlx_lm.utils import quantize_model

    src_path, out_dir = Path(src_path), Path(out_dir)
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    if dtype is None:
        from eagle3_mlx.platform import default_dtype

        dtype = default_dtype()
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    mx_dtype = getattr(mx, dtype)

    reader = open_gguf(src_path)
    meta, config = _read_config(reader, src_path, dtype)
    arch = meta.get("general.architecture")
    log(_describe(reader, meta, config, src_path, dtype,
                  (q_group_size, q_bits, q_mode) if quantize else None))
    tokenizer = _tokenizer(meta, src_path)

    load = _load_hybrid_weights if arch in HYBRID_ARCHS else _load_weights
    # passed on directly so no reference outlives sanitize (peak memory)
    model = _build_model(config, load(reader, arch, config, mx_dtype, src_path, progress),
                         mx_dtype, arch, src_path)
    del reader
    if quantize:
        model, config = quantize_model(model, config, q_group_size, q_bits, mode=q_mode)
    _save(model, config, tokenizer, out_dir, progress)
    return config
