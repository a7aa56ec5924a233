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
is refused with its reason (see ``_REFUSED``).

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
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

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
]

from eagle3_mlx.convert.errors import GGUFError
from eagle3_mlx.convert.gguf_hybrid import HYBRID_ARCHS, hybrid_config, hybrid_layer, hybrid_top

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3", *HYBRID_ARCHS)

# Architectures the gguf package knows that we refuse with a reason.
_REFUSED = {
    "gemma4": "gemma4 GGUF files are not supported yet (its 'gemma4' tokenizer model, per-layer "
              "KV heads and proportional-RoPE frequency tensor are not rebuilt); convert the "
              "Hugging Face checkpoint instead",
}

_DTYPES = ("float32", "float16", "bfloat16")

# tokenizer.ggml.token_type values (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #


class _Truncated(Exception):
    pass


def _checked_reader_class():
    """``GGUFReader`` that checks every tensor's byte range against the file size
    before mapping it, so a truncated file is reported as such (the stock reader
    fails later with a reshape error).  The check uses the reader's private
    ``_build_tensors`` hook; if that ever changes shape, it quietly steps aside."""
    import gguf

    class CheckedReader(gguf.GGUFReader):
        def _build_tensors(self, start_offs, fields):
            try:
                size = int(self.data.shape[0])
                for field in fields:
                    _nlen, name_data, _ndims, dims, raw_dtype, offset_tensor = field.parts
                    qtype = gguf.GGMLQuantizationType(int(raw_dtype[0]))
                    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                    n_bytes = int(np.prod(dims.astype(np.int64))) * type_size // block
                    end = int(start_offs) + int(offset_tensor[0]) + n_bytes
                    if end > size:
                        name = bytes(name_data).decode("utf-8", "replace")
                        raise _Truncated(
                            f"truncated: tensor {name!r} needs bytes up to {end:,} but the "
                            f"file has {size:,} bytes"
                        )
            except _Truncated:
                raise
            except Exception:
                pass
            return super()._build_tensors(start_offs, fields)

    return CheckedReader


def open_gguf(path):
    """Open ``path`` with ``gguf.GGUFReader`` and check it is complete.

    Raises :class:`GGUFError` for a missing, non-GGUF, corrupt or truncated file.
    """
    path = Path(path)
    if not path.is_file():
        raise GGUFError(path, "no such file")
    size = path.stat().st_size
    if size < 24:
        raise GGUFError(path, f"truncated: only {size} bytes, too short for a GGUF header")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(path, f"not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reader = _checked_reader_class()(path, "r")
    except _Truncated as e:
        raise GGUFError(path, str(e)) from None
    except Exception as e:  # the reader raises ValueError/IndexError/... on bad headers
        raise GGUFError(
            path, f"corrupt or truncated GGUF header ({type(e).__name__}: {e})"
        ) from None
    for t in reader.tensors:
        end = int(t.data_offset) + int(t.n_bytes)
        if end > size or t.data.nbytes != int(t.n_bytes):
            raise GGUFError(
                path,
                f"truncated: tensor {t.name!r} needs bytes up to {end:,} but the file "
                f"has {size:,} bytes",
            )
    return reader


def _field_value(field):
    from gguf import GGUFValueType

    if not field.types:
        return None
    if field.types[0] == GGUFValueType.ARRAY:
        return field.contents()
    return field.contents()


def gguf_metadata(reader, keys_prefixes=None) -> dict:
    """All key/value metadata of an open reader as plain Python values."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        if keys_prefixes and not key.startswith(tuple(keys_prefixes)):
            continue
        meta[key] = _field_value(field)
    return meta


def _f32(x) -> float:
    """A float read from a float32 field, as the shortest decimal that rounds
    back to it (1e-06 rather than 9.999999974752427e-07)."""
    return float(np.format_float_scientific(np.float32(x), unique=True))


def _scalar(value, what, path):
    """Per-layer arrays (some GGUFs store head counts per layer) -> one value."""
    if isinstance(value, (list, tuple)):
        vals = sorted(set(int(v) for v in value))
        if len(vals) != 1:
            raise GGUFError(path, f"{what} differs between layers ({vals}); not supported")
        return vals[0]
    return value


# --------------------------------------------------------------------------- #
# Config
# --------------------------------------------------------------------------- #

_ARCH_INFO = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}


def _tensor_shapes(reader) -> dict:
    # GGUF dims are innermost first; reverse to the NumPy / Hugging Face order.
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


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


def gguf_to_hf_config(meta: dict, shapes: dict, path="<gguf>", rope_freqs=None) -> dict:
    """Build the Hugging Face / mlx-lm ``config.json`` dict from GGUF metadata."""
    arch = meta.get("general.architecture")
    if arch in _REFUSED:
        raise GGUFError(path, _REFUSED[arch])
    if arch in HYBRID_ARCHS:
        try:
            return hybrid_config(arch, meta, shapes, path)
        except (TypeError, ValueError) as e:
            if isinstance(e, GGUFError):
                raise
            raise GGUFError(path, f"invalid {arch} metadata ({type(e).__name__}: {e})") from None
    if arch not in _ARCH_INFO:
        raise GGUFError(
            path,
            f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})",
        )
    model_type, hf_arch = _ARCH_INFO[arch]

    def get(key, default=None, required=False):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required:
            raise GGUFError(path, f"missing metadata key {full!r}")
        return default

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
    eps = _f32(get("attention.layer_norm_rms_epsilon", 1e-6 if arch != "llama" else 1e-5))
    ctx = int(get("context_length", 4096))
    theta = _f32(get("rope.freq_base", 10000.0))
    tied = "output.weight" not in shapes

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
        rope_scaling = _infer_llama3_rope(rope_freqs, theta, head_dim, orig_ctx, path)

    config: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_arch],
        "hidden_size": hidden,
        "num_hidden_layers": n_layers,
        "intermediate_size": ffn,
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv,
        "head_dim": head_dim,
        "rms_norm_eps": eps,
        "vocab_size": vocab_size,
        "max_position_embeddings": ctx,
        "rope_theta": theta,
        "tie_word_embeddings": tied,
    }
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling

    if arch == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
        config["mlp_bias"] = "blk.0.ffn_up.bias" in shapes
    elif arch == "qwen2":
        if head_dim != hidden // n_heads:
            raise GGUFError(path, f"qwen2 with head_dim {head_dim} != hidden/heads not supported")
    elif arch == "gemma3":
        pattern = get("attention.sliding_window_pattern", 6)
        if isinstance(pattern, (list, tuple)):  # per-layer booleans (True = sliding)
            flags = [bool(x) for x in pattern]
            period = next((i + 1 for i, f in enumerate(flags) if not f), len(flags))
            if any(flags[i] != ((i + 1) % period != 0) for i in range(len(flags))):
                raise GGUFError(path, "irregular gemma3 sliding_window_pattern not supported")
            pattern = period
        scale = get("attention.scale")
        if scale:
            qpas = float(scale) ** -2
        elif n_layers == 62:  # gemma-3-27b scales by hidden/heads (as llama.cpp does)
            qpas = hidden / n_heads
        else:
            qpas = float(head_dim)
        config.update(
            {
                "rope_local_base_freq": _f32(get("rope.freq_base_swa", 10000.0)),
                # transformers' strict Gemma3TextConfig (read by AutoTokenizer) wants an int
                "query_pre_attn_scalar": int(qpas) if float(qpas).is_integer() else qpas,
                "sliding_window": int(get("attention.sliding_window", 4096)),
                "sliding_window_pattern": int(pattern),
                "hidden_activation": "gelu_pytorch_tanh",
            }
        )
        if get("final_logit_softcapping"):
            raise GGUFError(path, "gemma3 final_logit_softcapping not supported")
        config["rope_scaling"] = rope_scaling  # gemma3_text expects the key
    return config


# --------------------------------------------------------------------------- #
# Tensor names
# --------------------------------------------------------------------------- #

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


# --------------------------------------------------------------------------- #
# Tokenizer
# --------------------------------------------------------------------------- #

# Pre-tokenizer split patterns, keyed by tokenizer.ggml.pre.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "gpt-2": None,  # the GPT-2 pattern built into the ByteLevel pre-tokenizer
    "default": None,
}
_NFC_PRES = {"qwen2", "deepseek-r1-qwen"}


def _tok_meta(meta, key, default=None):
    return meta.get(f"tokenizer.ggml.{key}", default)


def _byte_level_bpe(meta, tokens, path):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    merges_raw = _tok_meta(meta, "merges")
    if merges_raw is None:
        raise GGUFError(path, "gpt2-style tokenizer without tokenizer.ggml.merges")
    merges = []
    for m in merges_raw:
        a, sep, b = m.partition(" ")
        if not sep:
            raise GGUFError(path, f"malformed BPE merge {m!r}")
        merges.append((a, b))
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                   ignore_merges=False)
    )
    pre = _tok_meta(meta, "pre", "default")
    if pre not in _PRE_SPLITS:
        warnings.warn(
            f"{path}: unknown tokenizer.ggml.pre {pre!r}; using the GPT-2 pre-tokenizer",
            stacklevel=3,
        )
    split = _PRE_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _NFC_PRES:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens, scores, types):
    """BPE merges equivalent to SentencePiece BPE scoring: a merge's rank is the
    score of the piece it produces (higher first), ties broken by piece ids."""
    index = {}
    for i, t in enumerate(tokens):
        if types[i] in (_NORMAL, _USER_DEFINED):
            index.setdefault(t, i)
    merges = []
    for piece, pid in index.items():
        if types[pid] != _NORMAL or len(piece) < 2:
            continue
        local = []
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            li, ri = index.get(left), index.get(right)
            if li is not None and ri is not None:
                local.append((li, ri, left, right))
        local.sort()
        score = float(scores[pid]) if scores is not None else -float(pid)
        merges.extend((-score, pid, n, left, right) for n, (_, _, left, right) in enumerate(local))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _spm_bpe(meta, tokens, types, path):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _tok_meta(meta, "scores")
    unk_id = _tok_meta(meta, "unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == _UNKNOWN), None)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = _spm_merges(tokens, scores, types)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    # llama.cpp semantics: with add_space_prefix, every text fragment that starts
    # the input or follows a special token gets a leading space (as HF's legacy
    # Llama tokenizer does through its Prepend normalizer).
    add_space = _tok_meta(meta, "add_space_prefix", True)
    steps = [normalizers.Replace(" ", "\u2581")]
    if add_space:
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def build_tokenizer(meta: dict, path="<gguf>"):
    """Hugging Face fast tokenizer (``PreTrainedTokenizerFast``) from GGUF metadata."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    model = _tok_meta(meta, "model")
    tokens = _tok_meta(meta, "tokens")
    if model is None or tokens is None:
        raise GGUFError(path, "no tokenizer in the GGUF metadata (tokenizer.ggml.model/tokens)")
    tokens = list(tokens)
    types = list(_tok_meta(meta, "token_type") or [_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(path, f"{len(tokens)} tokens but {len(types)} token types")
    if model == "gpt2":
        tok = _byte_level_bpe(meta, tokens, path)
    elif model == "llama":
        tok = _spm_bpe(meta, tokens, types, path)
    else:
        raise GGUFError(
            path, f"tokenizer model {model!r} not supported (supported: 'gpt2' BPE, 'llama' SentencePiece)"
        )

    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == _CONTROL:
            added.append(AddedToken(t, special=True, normalized=False))
        elif ty == _USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False))
    if added:
        tok.add_tokens(added)

    def tok_str(key):
        i = _tok_meta(meta, key)
        if i is None or not (0 <= int(i) < len(tokens)):
            return None
        return tokens[int(i)]

    kwargs = dict(
        tokenizer_object=tok,
        bos_token=tok_str("bos_token_id"),
        eos_token=tok_str("eos_token_id"),
        unk_token=tok_str("unknown_token_id") if model == "llama" else None,
        pad_token=tok_str("padding_token_id"),
        add_bos_token=bool(_tok_meta(meta, "add_bos_token", model == "llama")),
        add_eos_token=bool(_tok_meta(meta, "add_eos_token", False)),
        clean_up_tokenization_spaces=False,
    )
    arch = meta.get("general.architecture")
    ctx = meta.get(f"{arch}.context_length")
    if ctx:
        kwargs["model_max_length"] = int(ctx)
    template = meta.get("tokenizer.chat_template")
    named = {
        k[len("tokenizer.chat_template."):]: v
        for k, v in meta.items()
        if k.startswith("tokenizer.chat_template.") and isinstance(v, str)
    }
    if named:
        template = dict(named, **({"default": template} if template else {}))
    if template:
        kwargs["chat_template"] = template
    else:
        warnings.warn(f"{path}: the GGUF carries no chat template", stacklevel=2)
    hf = PreTrainedTokenizerFast(**{k: v for k, v in kwargs.items() if v is not None})
    return hf


def _eos_ids(meta) -> list:
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = _tok_meta(meta, key)
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    return ids


# --------------------------------------------------------------------------- #
# Conversion
# --------------------------------------------------------------------------- #


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
    from mlx_lm.utils import _get_classes, quantize_model, save_config, save_model
    from tqdm import tqdm

    src_path = Path(src_path)
    out_dir = Path(out_dir)
    if log is None:
        log = (lambda msg: print(msg, file=sys.stderr)) if progress else (lambda msg: None)
    say = log
    if dtype is None:
        from eagle3_mlx.platform import default_dtype

        dtype = default_dtype()
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
    mx_dtype = getattr(mx, dtype)

    reader = open_gguf(src_path)
    try:
        meta = gguf_metadata(reader)
        shapes = _tensor_shapes(reader)
        arch = meta.get("general.architecture")
        rope_freqs = None
        for t in reader.tensors:
            if t.name == "rope_freqs.weight":
                rope_freqs = _dequantize(t, src_path)
        config = gguf_to_hf_config(meta, shapes, src_path, rope_freqs=rope_freqs)
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

    name = meta.get("general.name") or src_path.name
    types = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    say(
        f"GGUF target: {name} (architecture {arch}, {config['num_hidden_layers']} layers, "
        f"hidden {config['hidden_size']}, vocab {config['vocab_size']}; tensor types "
        + ", ".join(f"{k}x{v}" for k, v in sorted(types.items()))
        + f") -> MLX {dtype}"
        + (f", {q_mode} {q_bits}-bit g{q_group_size}" if quantize else "")
    )

    try:  # fail early, before the heavy part
        tokenizer = build_tokenizer(meta, src_path)
    except GGUFError:
        raise
    except Exception as e:  # tokenizers raises plain Exceptions for inconsistent vocabularies
        raise GGUFError(src_path, f"cannot build the tokenizer ({type(e).__name__}: {e})") from None

    load = _load_hybrid_weights if arch in HYBRID_ARCHS else _load_weights
    weights = load(reader, arch, config, mx_dtype, src_path, progress)
    del reader

    try:
        model_cls, args_cls = _get_classes(config)
        model = model_cls(args_cls.from_dict(config))
        weights = model.sanitize(weights)
        model.load_weights(list(weights.items()), strict=True)
    except (ValueError, TypeError, KeyError) as e:
        raise GGUFError(src_path, f"tensors do not fit the {arch} model: {e}") from None
    del weights
    # keep every parameter in the requested float type (sanitize/init may add float32 ones)
    from mlx.utils import tree_map

    model.update(
        tree_map(
            lambda p: p.astype(mx_dtype) if mx.issubdtype(p.dtype, mx.floating) else p,
            model.parameters(),
        )
    )

    if quantize:
        model, config = quantize_model(model, config, q_group_size, q_bits, mode=q_mode)

    from mlx.utils import tree_flatten

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
    return config
