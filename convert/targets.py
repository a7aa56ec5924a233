"""PyTorch target models (safetensors or ``pytorch_model.bin``, single or
sharded) -> an MLX directory that ``mlx_lm.load`` opens.

The model itself is mlx-lm's: its classes, ``sanitize`` name mapping,
``quantize_model``, ``save_model`` and ``save_config`` do the work, exactly as
``mlx_lm.convert`` would. What this module adds is reading pickled ``.bin``
weights safely (no torch, no code execution), integrity checks, and carrying
the tokenizer files verbatim (chat template included).

Qwen3.5 / Qwen3-Next checkpoints also ship a multi-token-prediction block
(``mtp.*``) that mlx-lm's ``sanitize`` drops: it is kept in ``mtp.safetensors``
beside the model (norms shifted by 1 like the model's, cast and quantized like
it) and recorded under ``"mtp"`` in ``config.json`` with its sha256; see
:mod:`eagle3_mlx.mtp`. A checkpoint without ``mtp.*`` tensors converts exactly
as before (no file, no key).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from eagle3_mlx.convert.errors import ConvertError, short
from eagle3_mlx.convert.sources import WeightFiles

DTYPES = ("float16", "bfloat16", "float32")

# Copied verbatim so the tokenizer (and its chat template) is exactly the source's.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "chat_template.jinja",
    "chat_template.json", "generation_config.json", "tiktoken.model",
)


def target_description(config: dict, weights: WeightFiles) -> str:
    return f"target model ({config.get('model_type', '?')}, {weights.describe()})"


def copy_tokenizer(src: Path, dst: Path, log=print) -> list:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    for f in src.glob("*.tiktoken"):
        shutil.copy2(f, dst / f.name)
        copied.append(f.name)
    if not any(n.startswith("tokenizer") or n in ("vocab.json", "tiktoken.model") for n in copied):
        log(f"warning: no tokenizer files in {src}; mlx_lm.load will need them")
    return copied


def rope_overrides(config: dict) -> dict:
    """Lift transformers-5 ``rope_parameters`` to the top-level ``rope_theta`` /
    ``rope_scaling`` most mlx-lm model classes read. Without this a re-saved
    Qwen2 silently gets mlx-lm's default base (1e6) and a Llama-3.1 loses its
    500000 base and llama3 scaling."""
    out = {}
    for cfg, prefix in ((config, None), (config.get("text_config"), "text_config")):
        rp = cfg.get("rope_parameters") if isinstance(cfg, dict) else None
        if not isinstance(rp, dict) or "rope_theta" not in rp:
            continue  # absent, or per-layer-type dicts that their model classes read themselves
        fix = {}
        if cfg.get("rope_theta") is None:
            fix["rope_theta"] = rp["rope_theta"]
        kind = rp.get("rope_type") or rp.get("type") or "default"
        if kind != "default" and not cfg.get("rope_scaling"):
            fix["rope_scaling"] = dict(rp)
        if fix and prefix:
            out[prefix] = {**cfg, **fix}
        else:
            out.update(fix)
    return out


def _build_model(src: Path, config: dict, weights: WeightFiles):
    """The mlx-lm model with the source weights loaded (lazily where possible)."""
    from mlx_lm.utils import _get_classes, load_config, load_model

    if weights.kind == "safetensors":
        # mlx-lm's own loader: also handles pre-quantized checkpoints
        # (AWQ/GPTQ, mxfp4, fp8, compressed-tensors) via quantization_config.
        try:
            model, config = load_model(src, lazy=True, model_config=rope_overrides(config))
        except ConvertError:
            raise
        except Exception as e:
            raise ConvertError(src, f"mlx-lm cannot load this model ({short(e)})") from None
        return model, config

    if config.get("quantization_config") or config.get("quantization"):
        raise ConvertError(src / "config.json", "pre-quantized .bin checkpoints are not supported")
    try:
        config = load_config(src)  # as load_model does: picks up generation_config eos ids
        config.update(rope_overrides(config))
        model_cls, args_cls = _get_classes(config)
        model = model_cls(args_cls.from_dict(config))
    except Exception as e:
        raise ConvertError(src / "config.json", f"mlx-lm cannot build this model ({short(e)})") from None
    w = weights.load()
    if hasattr(model, "sanitize"):
        w = model.sanitize(w)
    try:
        model.load_weights(list(w.items()), strict=True)
    except ValueError as e:
        raise ConvertError(weights.files[0], f"weights do not match the {config.get('model_type')} model ({short(e)})") from None
    model.eval()
    return model, config


_TOP_LEVEL_KEYS = ("eos_token_id", "bos_token_id", "pad_token_id", "torch_dtype", "dtype",
                   "tie_word_embeddings", "quantization", "quantization_config")


def _text_tower(model, config: dict, log):
    """A multimodal Gemma 4 checkpoint (``gemma4``) keeps its text model in
    ``language_model``; the target is that text model alone (``gemma4_text``),
    which the target adapter supports. mlx-lm's sanitize already dropped the
    vision and audio towers."""
    if config.get("model_type") != "gemma4" or not hasattr(model, "language_model"):
        return model, config
    text = dict(config.get("text_config") or {})
    text.update(model_type="gemma4_text", architectures=["Gemma4ForCausalLM"],
                vocab_size=model.language_model.args.vocab_size)
    for k in _TOP_LEVEL_KEYS:
        if k in config and k not in text:
            text[k] = config[k]
    log("note: multimodal gemma4 checkpoint: converting its text model (gemma4_text)")
    return model.language_model, text


def _cast(model, dtype: str):
    """Cast floating parameters like mlx_lm.convert does (respecting cast_predicate)."""
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    dt = getattr(mx, dtype)
    keep = getattr(model, "cast_predicate", lambda _: True)

    def cast(k, v):
        return v.astype(dt) if keep(k) and mx.issubdtype(v.dtype, mx.floating) else v

    model.update(tree_map_with_path(cast, model.parameters()))


def _materialize(model, desc: str):
    """Evaluate the (lazy) parameters block by block, with a progress bar."""
    import mlx.core as mx
    from tqdm import tqdm

    blocks = []
    inner = getattr(model, "model", None) or getattr(model, "language_model", None)
    layers = getattr(inner, "layers", None) if inner is not None else getattr(model, "layers", None)
    if isinstance(layers, list) and layers:
        blocks = list(layers)
    for b in tqdm(blocks, desc=desc, unit="layer", disable=None, leave=False):
        mx.eval(b.parameters())
    mx.eval(model.parameters())


def _mtp_names(config: dict, weights: WeightFiles) -> list:
    """The source's MTP tensors (Qwen3.5 / Qwen3-Next ``mtp.*``), if they can be kept."""
    from eagle3_mlx.mtp import FAMILIES, mtp_name

    names = [k for k in weights.shapes if mtp_name(k) is not None]
    if not names or config.get("model_type") not in FAMILIES:
        return []
    return names


def _keep_mtp(stage: Path, names: list, text_args, weights: WeightFiles, dtype, quant, log) -> dict:
    """Write the MTP block to ``stage/mtp.safetensors``; return its config entry."""
    from eagle3_mlx.mtp import MTPError, detect_norm_offset, load_mtp_weights, save_mtp

    offset = detect_norm_offset({k: v for k, v in weights.shapes.items() if k not in set(names)})
    try:
        # HF checkpoints store the norms as offsets from 1; mlx-lm's own rule
        # decides for the model, and the MTP block follows the model.
        module = load_mtp_weights(weights.load_names(names), text_args,
                                  norm_offset=True if offset is None else offset)
    except MTPError as e:
        raise ConvertError(weights.origin[names[0]], f"MTP weights: {e}") from None
    info = save_mtp(stage, module, dtype=dtype if dtype in DTYPES else None, quantize=quant)
    log(f"kept the MTP block: {info['num_layers']} layer(s), {len(names)} tensors -> {info['file']}")
    return info


def convert_target(src: Path, stage: Path, *, config: dict, weights: WeightFiles, dtype=None,
                   quantize=False, q_bits=None, q_group_size=None, q_mode="affine", log=print):
    """Write the MLX model + config + tokenizer into ``stage`` (an empty dir);
    with ``mtp.*`` tensors in the source, also ``mtp.safetensors``."""
    from mlx_lm.utils import quantize_model, save_config, save_model

    from eagle3_mlx.convert.heads import quant_defaults

    mtp_names = _mtp_names(config, weights)
    if mtp_names and (config.get("quantization_config") or config.get("quantization")):
        log("note: the source is pre-quantized; its MTP block (mtp.*) is not kept")
        mtp_names = []
    model, config = _build_model(src, dict(config), weights)
    model, config = _text_tower(model, config, log)
    text_args = getattr(getattr(model, "language_model", model), "args", None)
    if dtype is None:
        dtype = config.get("torch_dtype") or config.get("dtype")
        if dtype is None and isinstance(config.get("text_config"), dict):
            dtype = config["text_config"].get("dtype") or config["text_config"].get("torch_dtype")
    if dtype in DTYPES:
        log(f"dtype: {dtype}")
        _cast(model, dtype)
    quant = None
    if quantize:
        gs, bits = quant_defaults(q_mode, q_group_size, q_bits)
        quant = (gs, bits, q_mode)
        log(f"quantizing: {bits}-bit {q_mode}, group size {gs}")
        model, config = quantize_model(model, config, gs, bits, mode=q_mode)
    _materialize(model, "quantizing" if quantize else "converting")
    save_model(stage, model, donate_model=True)
    del model
    if mtp_names:
        config["mtp"] = _keep_mtp(stage, mtp_names, text_args, weights, dtype, quant, log)
    save_config(config, config_path=stage / "config.json")
    copy_tokenizer(src, stage, log=log)
    return config
