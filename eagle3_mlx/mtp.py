"""The multi-token-prediction (MTP) module of Qwen3.5 / Qwen3.6 / Qwen3-Next
targets, in MLX, and the weights it needs kept through conversion.

These checkpoints ship one extra decoder block, ``mtp.*``, trained to predict
the token after next. mlx-lm's ``sanitize`` drops it; ``eagle3-mlx convert``
keeps it beside the model (``mtp.safetensors``, recorded in ``config.json``,
see :data:`CONFIG_KEY`) and :func:`load_mtp` brings it back.

Reference (facts only, code written here): vLLM, repository
``vllm-project/vllm``, files ``vllm/model_executor/models/qwen3_next_mtp.py``
(commit 055e47c28003156421365af985d676fc921cb075),
``vllm/model_executor/models/qwen3_5_mtp.py`` (commit
01d99805d1ef3d21d30e21a0ae387643fe0cd45a), ``vllm/model_executor/models/
qwen3_next.py`` (commit 002d6073aa034d4f5545d45021b0e56d1f3c3593) and
``vllm/v1/spec_decode/eagle.py`` (commit
008603a39fff2a383a293c62eec0c752c42199f2); cross-checked against SGLang
``python/sglang/srt/models/qwen3_next_mtp.py`` (sgl-project/sglang, commit
00534216c5ba1c56b088343a45955aaba2c1700f).

One MTP step, for the row that pairs token t with token t+1::

    x      = fc(concat(pre_fc_norm_embedding(embed(t+1)),    # embedding FIRST
                       pre_fc_norm_hidden(hidden(t))))        # fc: [H, 2H]
    out    = layers[step % num_layers](x)                     # full attention
    normed = norm(out)                                        # mtp.norm
    logits = target lm_head(normed)   (or the tied embedding)

* ``hidden(t)`` at depth 1 is the **target's final-normed** last-layer output
  (vLLM's ``Qwen3NextModel.forward`` returns ``norm(hidden)``, and that is what
  the proposer hands the MTP); in mlx-lm terms, ``model.model(tokens)``.
* At depth > 1 the MTP is fed back **its own mtp.norm'ed output** (vLLM's
  proposer, method ``"mtp"``: ``hidden_states = ret_hidden_states``, the value
  the model returns after ``self.norm``); the same state goes to the lm_head.
* The MTP layer is a full-attention layer of the target's own layout
  (gated q_proj, q_norm/k_norm, partial NeoX RoPE, dense MLP or the sparse MoE
  with shared expert); it has its own KV cache. Row t sits at position t (the
  position of the hidden's token, not of t+1), so with an mlx-lm ``KVCache``
  filled from position 0 the RoPE offset is simply the cache offset.
* Every RMSNorm of the module (``pre_fc_norm_embedding``,
  ``pre_fc_norm_hidden``, ``norm``, and the layer's ``input_layernorm``,
  ``post_attention_layernorm``, ``self_attn.q_norm``, ``self_attn.k_norm``) is
  the zero-centred ``x * (1 + w)`` kind (vLLM ``Qwen3NextRMSNorm`` /
  ``Qwen3_5RMSNorm``, SGLang ``GemmaRMSNorm``); HF checkpoints store ``w``, MLX
  uses ``nn.RMSNorm``, so 1 is added once (``norm_offset``), as mlx-lm's
  ``sanitize`` does for the main model.
* Several MTP layers (none published so far) are used one per step,
  ``layers[step % num_layers]``, as in vLLM.

Public API::

    MTPModule(text_args, num_layers=1, *, feedback="normed")
    MTPModule.__call__(embeds, hidden, cache=None, mask=None, step=0) -> (feedback, normed)
    MTPModule.make_cache() -> list[KVCache]
    load_mtp_weights(weights, text_args, *, norm_offset=None, quantization=None) -> MTPModule
    load_mtp(model_dir, text_args=None) -> Optional[MTPModule]
    mtp_support_problem(config) -> Optional[str]
    text_args_from_config(config) -> mlx-lm text args
    lm_head_logits(model, normed) -> logits

``config.json`` of a converted target with MTP weights carries::

    "mtp": {"file": "mtp.safetensors", "num_layers": 1, "sha256": "<hex of the file>",
            "norm_offset_applied": true,      # the file's norms are already 1 + w
            "feedback": "normed",             # the reference's depth > 1 input
            "dtype": "bfloat16",              # when all floating tensors share one
            "quantization": {...}}            # only for quantized conversions (mlx-lm's dict)

The file holds the module's parameters under ``mtp.<parameter path>`` (experts
stacked as ``switch_mlp``, norms already shifted by 1); it is never matched by
mlx-lm's ``model*.safetensors`` glob, so ``mlx_lm.load`` ignores it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

MTP_FILE = "mtp.safetensors"
CONFIG_KEY = "mtp"
FAMILIES = ("qwen3_5", "qwen3_5_moe", "qwen3_next")

# Families whose MTP is the DeepSeek-V3 "nextn" layout (extra decoder layers
# numbered after the last one, num_nextn_predict_layers): refused for now.
_NEXTN_FAMILIES = {
    "deepseek_v3": "DeepSeek-V3 (deepseek_v3)",
    "deepseek_v32": "DeepSeek-V3.2 (deepseek_v32)",
    "kimi_k2": "Kimi-K2 (kimi_k2)",
    "glm4_moe": "GLM-4.5/4.6 (glm4_moe)",
    "glm4_moe_lite": "GLM-4.7-Flash (glm4_moe_lite)",
    "mimo": "MiMo (mimo)",
    "mimo_v2_flash": "MiMo-V2-Flash (mimo_v2_flash)",
    "ernie4_5_moe": "ERNIE-4.5 (ernie4_5_moe)",
    "longcat_flash": "LongCat-Flash (longcat_flash)",
}

# HF checkpoints: "mtp.*" at the top level (text and vision-language layouts
# alike; transformers ignores r"^mtp.*"); other prefixes are accepted too.
_MTP_NAME = re.compile(r"^(?:model\.)?(?:language_model\.)?mtp\.(.+)$")
_NORM_SUFFIXES = (".input_layernorm.weight", ".post_attention_layernorm.weight",
                  ".q_norm.weight", ".k_norm.weight")
_TOP_NORMS = ("pre_fc_norm_embedding.weight", "pre_fc_norm_hidden.weight", "norm.weight")
_PER_EXPERT = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class MTPError(ValueError):
    """A one-line reason the MTP weights cannot be used (names the file or key)."""

    def __init__(self, msg: str):
        super().__init__(" ".join(str(msg).split()))


def _names(keys, limit: int = 6) -> str:
    keys = sorted(keys)
    s = ", ".join(keys[:limit])
    return s + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# ---------------------------------------------------------------------------
# configuration


def _family(args) -> str:
    from mlx_lm.models import qwen3_5, qwen3_next

    if isinstance(args, qwen3_5.TextModelArgs):
        return "qwen3_5"
    if isinstance(args, qwen3_next.ModelArgs):
        return "qwen3_next"
    raise MTPError(f"MTP needs qwen3_5 / qwen3_5_moe / qwen3_next text args, got {type(args).__name__}")


def text_args_from_config(config: dict):
    """The mlx-lm text-model args for a target ``config.json`` dict, built the way
    ``mlx_lm.load`` builds them (``qwen3_5.TextModelArgs`` for qwen3_5 /
    qwen3_5_moe, flat or with ``text_config``; ``qwen3_next.ModelArgs``)."""
    from mlx_lm.utils import _get_classes

    mt = config.get("model_type")
    if mt not in FAMILIES:
        raise MTPError(f"MTP drafting needs a qwen3_5, qwen3_5_moe or qwen3_next target, not {mt!r}")
    _, args_cls = _get_classes(config)
    args = args_cls.from_dict(config)
    if hasattr(args, "text_config"):
        from mlx_lm.models.qwen3_5 import TextModelArgs

        return TextModelArgs.from_dict(args.text_config)
    return args


def _text_config(config: dict) -> dict:
    tc = config.get("text_config")
    return tc if isinstance(tc, dict) else config


def mtp_support_problem(config: dict) -> Optional[str]:
    """None when this target config can use MTP drafting (weights permitting),
    else a one-line reason naming the family."""
    mt = config.get("model_type", "?")
    tc = _text_config(config)
    if mt in FAMILIES:
        qc = config.get("quantization_config") or tc.get("quantization_config")
        if qc and "quantization" not in config:  # a pre-quantized source, not an MLX -q conversion
            method = qc.get("quant_method", "?") if isinstance(qc, dict) else "?"
            return (f"MTP drafting from a pre-quantized ({method}) {mt} checkpoint is not supported yet; "
                    "convert an unquantized one (eagle3-mlx convert can quantize it)")
        if tc.get("mtp_use_dedicated_embeddings"):
            return f"MTP drafting for {mt} with dedicated MTP embeddings is not supported yet"
        for key in ("mtp_num_hidden_layers", "num_nextn_predict_layers"):
            if key in tc and not tc[key]:
                return f"this {mt} model has no MTP layers ({key} = {tc[key]})"
        return None
    if mt in _NEXTN_FAMILIES or (tc.get("num_nextn_predict_layers") or 0) > 0:
        family = _NEXTN_FAMILIES.get(mt, mt)
        return (f"MTP drafting for {family} is not supported yet (only the Qwen3.5 / Qwen3-Next "
                f"MTP layout: {', '.join(FAMILIES)})")
    return f"model type {mt!r} has no MTP module (MTP drafting needs {', '.join(FAMILIES)})"


# ---------------------------------------------------------------------------
# the module


def _decoder_layer(args, family: str, idx: int):
    """mlx-lm's own decoder layer, built full-attention (mlx-lm makes layer i
    full attention iff (i + 1) % full_attention_interval == 0)."""
    interval = max(1, int(args.full_attention_interval))
    full_idx = interval - 1
    if family == "qwen3_5":
        from mlx_lm.models.qwen3_5 import DecoderLayer

        layer = DecoderLayer(args, layer_idx=full_idx)  # MoE iff num_experts > 0, for any index
    else:
        from mlx_lm.models.qwen3_next import Qwen3NextDecoderLayer, Qwen3NextMLP, Qwen3NextSparseMoeBlock

        layer = Qwen3NextDecoderLayer(args, layer_idx=full_idx)
        # vLLM decides dense vs MoE from the MTP layer's own index ("mtp.layers.N" -> N).
        moe = (idx not in (args.mlp_only_layers or []) and args.num_experts > 0
               and (idx + 1) % args.decoder_sparse_step == 0)
        if moe != isinstance(layer.mlp, Qwen3NextSparseMoeBlock):
            layer.mlp = Qwen3NextSparseMoeBlock(args) if moe else Qwen3NextMLP(args.hidden_size, args.intermediate_size)
    assert not layer.is_linear, "MTP layers are full attention"
    return layer


class MTPModule(nn.Module):
    """The ``mtp.*`` block of a Qwen3.5 / Qwen3-Next target.

    ``text_args``: the target's mlx-lm text args (``qwen3_5.TextModelArgs`` or
    ``qwen3_next.ModelArgs``; see :func:`text_args_from_config`).
    ``feedback``: which state ``__call__`` returns first, to be fed back as
    ``hidden`` at depth > 1: ``"normed"`` (after ``mtp.norm``, what vLLM does)
    or ``"prenorm"`` (the layer output; for experiments only).
    """

    def __init__(self, text_args, num_layers: int = 1, *, feedback: str = "normed"):
        super().__init__()
        if feedback not in ("normed", "prenorm"):
            raise ValueError(f"feedback must be 'normed' or 'prenorm', not {feedback!r}")
        if num_layers < 1:
            raise ValueError("an MTP module has at least one layer")
        family = _family(text_args)
        self.args = text_args
        self.family = family
        self.feedback = feedback
        H, eps = text_args.hidden_size, text_args.rms_norm_eps
        self.pre_fc_norm_embedding = nn.RMSNorm(H, eps=eps)
        self.pre_fc_norm_hidden = nn.RMSNorm(H, eps=eps)
        self.fc = nn.Linear(2 * H, H, bias=False)
        self.layers = [_decoder_layer(text_args, family, i) for i in range(num_layers)]
        self.norm = nn.RMSNorm(H, eps=eps)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def make_cache(self) -> list:
        """One mlx-lm ``KVCache`` per MTP layer (pass the list as ``cache``)."""
        from mlx_lm.models.cache import KVCache

        return [KVCache() for _ in self.layers]

    def __call__(self, embeds: mx.array, hidden: mx.array, cache=None, mask=None, step: int = 0):
        """One MTP step over S rows.

        embeds: [B, S, H] the target's embedding of tokens t+1.
        hidden: [B, S, H] the target's final-normed hidden state of tokens t
            (depth 1), or this module's previous ``feedback`` output (depth > 1).
        cache: the list from :meth:`make_cache` (or one ``KVCache``); RoPE
            positions come from its offset, as in mlx-lm's attention.
        mask: as mlx-lm attention takes it; default causal over the cache.
        step: the draft depth minus one; picks ``layers[step % num_layers]``.

        Returns ``(feedback, normed)``: the state to feed back as ``hidden`` at the
        next depth (the same array as ``normed`` by default, see ``feedback``)
        and the ``mtp.norm``'ed state for the target's lm_head
        (:func:`lm_head_logits`).
        """
        from mlx_lm.models.base import create_attention_mask

        if embeds.shape != hidden.shape:
            raise ValueError(f"embeds {embeds.shape} and hidden {hidden.shape} must have the same shape")
        x = mx.concatenate([self.pre_fc_norm_embedding(embeds), self.pre_fc_norm_hidden(hidden)], axis=-1)
        x = self.fc(x)
        i = step % len(self.layers)
        c = cache[i] if isinstance(cache, (list, tuple)) else cache
        if mask is None:
            mask = create_attention_mask(x, c)
        out = self.layers[i](x, mask=mask, cache=c)
        normed = self.norm(out)
        return (normed if self.feedback == "normed" else out), normed

    @property
    def quant_predicate(self):
        """As mlx-lm's qwen3_5 / qwen3_next: MoE router gates stay 8-bit."""
        if self.args.num_experts <= 0:
            return None

        def predicate(path, _):
            if path.endswith("mlp.gate") or path.endswith("shared_expert_gate"):
                return {"group_size": 64, "bits": 8}
            return True

        return predicate


def lm_head_logits(model, normed: mx.array) -> mx.array:
    """Logits from the MTP's ``normed`` state through the target's own lm_head
    (or tied embedding). ``model``: the mlx-lm model (or its ``language_model``)."""
    lm = getattr(model, "language_model", model)
    if lm.args.tie_word_embeddings:
        return lm.model.embed_tokens.as_linear(normed)
    return lm.lm_head(normed)


# ---------------------------------------------------------------------------
# weights


def mtp_name(name: str) -> Optional[str]:
    """``"mtp.<rest>"`` for a checkpoint tensor name of the MTP block, else None."""
    m = _MTP_NAME.match(name)
    return f"mtp.{m.group(1)}" if m else None


def detect_norm_offset(shapes: dict) -> Optional[bool]:
    """mlx-lm's rule for "this checkpoint is unsanitized HF (norms stored as
    offsets from 1)": a Gated DeltaNet ``conv1d.weight`` in HF shape
    [C, 1, K] (qwen3_5), or per-expert ``mlp.experts.<e>.*`` tensors
    (qwen3_next). None when the names/shapes cannot tell (e.g. MTP tensors only).
    ``shapes``: name -> shape tuple (or array)."""
    conv = [tuple(getattr(v, "shape", v)) for k, v in shapes.items() if k.endswith("conv1d.weight")]
    if conv:
        return any(s[-1] != 1 for s in conv)
    if any(".mlp.experts.0.up_proj.weight" in k for k in shapes):
        return True
    return None


def sanitize_mtp_weights(weights: dict, text_args, *, norm_offset: bool) -> dict:
    """``mtp.*`` tensors (HF names, or as :func:`save_mtp` writes them) ->
    MTPModule parameter paths: experts stacked into ``switch_mlp`` (per-expert
    qwen3_next layout, or the fused ``experts.gate_up_proj`` / ``down_proj`` of
    transformers-5 Qwen3.5-MoE), and 1 added to every RMSNorm weight when
    ``norm_offset``. Tensors that are not MTP are ignored."""
    w = {}
    for k, v in weights.items():
        n = mtp_name(k)
        if n is not None and not n.endswith("rotary_emb.inv_freq"):
            w[n[len("mtp."):]] = v if isinstance(v, mx.array) else mx.array(v)

    per_expert = {}
    for k in list(w):
        m = _PER_EXPERT.match(k)
        if m:
            per_expert.setdefault((int(m.group(1)), m.group(3)), {})[int(m.group(2))] = w.pop(k)
    E = int(getattr(text_args, "num_experts", 0) or 0)
    for (layer, proj), experts in sorted(per_expert.items()):
        missing = [e for e in range(E) if e not in experts]
        if missing or len(experts) != E:
            raise MTPError(f"mtp.layers.{layer}.mlp.experts.*.{proj}: expected {E} experts, got {len(experts)} "
                           f"(missing mtp.layers.{layer}.mlp.experts.{missing[0] if missing else '?'}.{proj}.weight)")
        w[f"layers.{layer}.mlp.switch_mlp.{proj}.weight"] = mx.stack([experts[e] for e in range(E)])
    for k in [k for k in w if k.endswith(".mlp.experts.gate_up_proj")]:
        gate_up = w.pop(k)
        mid = gate_up.shape[-2] // 2
        base = k[: -len("experts.gate_up_proj")]
        w[base + "switch_mlp.gate_proj.weight"] = gate_up[..., :mid, :]
        w[base + "switch_mlp.up_proj.weight"] = gate_up[..., mid:, :]
    for k in [k for k in w if k.endswith(".mlp.experts.down_proj")]:
        w[k[: -len("experts.down_proj")] + "switch_mlp.down_proj.weight"] = w.pop(k)

    if norm_offset:
        for k, v in w.items():
            if (k in _TOP_NORMS or k.endswith(_NORM_SUFFIXES)) and v.ndim == 1:
                w[k] = v + 1.0
    return w


def _num_layers(keys) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(r"^layers\.(\d+)\.", k))}
    return max(idx) + 1 if idx else 0


def _quantize_structure(module: nn.Module, quantization: dict, keys) -> None:
    """Swap in quantized layers where the weights have scales (as mlx_lm.load does)."""
    keys = set(keys)

    def class_predicate(p, m):
        if p in quantization:
            return quantization[p]
        if not hasattr(m, "to_quantized"):
            return False
        return f"{p}.scales" in keys

    nn.quantize(module, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=class_predicate)


def load_mtp_weights(weights: dict, text_args, *, norm_offset: Optional[bool] = None,
                     quantization: Optional[dict] = None, feedback: str = "normed") -> MTPModule:
    """An :class:`MTPModule` with ``weights`` loaded strictly.

    weights: tensor name -> mx.array; the ``mtp.*`` ones are used (HF names, with
        ``mtp.`` at the top level or under ``model.`` / ``model.language_model.``);
        a whole checkpoint may be passed.
    norm_offset: add 1 to the RMSNorm weights (True for HF checkpoints, False for
        what :func:`save_mtp` wrote). None: mlx-lm's rule on the other tensors of
        ``weights`` (:func:`detect_norm_offset`); an error if they cannot tell.
    quantization: mlx-lm's ``quantization`` dict when the tensors are quantized.

    Missing, unexpected or misshapen tensors raise :class:`MTPError` naming them.
    """
    mtp_keys = [k for k in weights if mtp_name(k) is not None]
    if not mtp_keys:
        raise MTPError("no mtp.* tensors in the weights")
    if norm_offset is None:
        norm_offset = detect_norm_offset({k: v for k, v in weights.items() if mtp_name(k) is None})
        if norm_offset is None:
            raise MTPError("cannot tell whether the mtp.* norms are stored as offsets from 1: pass "
                           "norm_offset=True (Hugging Face checkpoint) or False (already shifted)")
    w = sanitize_mtp_weights(weights, text_args, norm_offset=norm_offset)
    n = _num_layers(w)
    if n == 0:
        raise MTPError(f"no mtp.layers.* tensors among {_names(mtp_keys)}")
    module = MTPModule(text_args, n, feedback=feedback)
    if quantization:
        _quantize_structure(module, quantization, w)
    expected = dict(tree_flatten(module.parameters()))
    missing = set(expected) - set(w)
    unexpected = set(w) - set(expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_names('mtp.' + k for k in missing)}")
        if unexpected:
            parts.append(f"unexpected {_names('mtp.' + k for k in unexpected)}")
        raise MTPError(f"MTP weights do not match the {text_args.model_type} MTP module: " + "; ".join(parts))
    for k, v in expected.items():
        if tuple(w[k].shape) != tuple(v.shape):
            raise MTPError(f"mtp.{k}: shape {tuple(w[k].shape)} does not match the module's {tuple(v.shape)}")
    module.load_weights(list(w.items()), strict=True)
    module.eval()
    return module


# ---------------------------------------------------------------------------
# files


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_mtp(out_dir, module: MTPModule, *, dtype: Optional[str] = None, quantize=None) -> dict:
    """Write ``module`` to ``out_dir/mtp.safetensors`` and return the
    ``config.json`` entry (:data:`CONFIG_KEY`). ``dtype``: cast floating
    parameters (float16 / bfloat16 / float32); ``quantize``: ``(group_size,
    bits, mode)`` to quantize like mlx-lm's ``quantize_model``."""
    from mlx.utils import tree_map

    if dtype is not None:
        dt = getattr(mx, dtype)
        module.update(tree_map(lambda v: v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v,
                               module.parameters()))
    info = {"file": MTP_FILE, "num_layers": module.num_layers, "norm_offset_applied": True,
            "feedback": "normed"}
    if quantize:
        from mlx_lm.utils import quantize_model

        gs, bits, mode = quantize
        module, qcfg = quantize_model(module, {}, gs, bits, mode=mode)
        info["quantization"] = qcfg["quantization"]
    params = dict(tree_flatten(module.parameters()))
    mx.eval(params)
    floats = {str(v.dtype).split(".")[-1] for v in params.values() if mx.issubdtype(v.dtype, mx.floating)}
    if len(floats) == 1:
        info["dtype"] = floats.pop()
    path = Path(out_dir) / MTP_FILE
    mx.save_safetensors(str(path), {f"mtp.{k}": v for k, v in params.items()}, metadata={"format": "mlx"})
    info["sha256"] = sha256_file(path)
    return info


def _hf_mtp_tensors(model_dir: Path):
    """(mtp tensors, all names->shapes) from an unconverted HF safetensors
    directory, reading only the MTP tensors; None if it has none."""
    from .convert.sources import check_safetensors, safetensors_files

    files = safetensors_files(model_dir)
    if not files:
        return None
    shapes, where = {}, {}
    for f in files:
        for k, info in check_safetensors(f).items():
            shapes[k] = tuple(info["shape"])
            where[k] = f
    names = [k for k in shapes if mtp_name(k) is not None]
    if not names:
        return None
    out = {}
    for f in sorted({where[k] for k in names}):
        try:
            loaded = mx.load(str(f))
        except Exception as e:
            raise MTPError(f"{f}: cannot read safetensors ({type(e).__name__}: {e})") from None
        out.update({k: loaded[k] for k in names if where[k] == f})
    return out, shapes


def load_mtp(model_dir, text_args=None, *, feedback: str = "normed") -> Optional[MTPModule]:
    """The MTP module of a target directory, or None if it has none.

    A directory written by ``eagle3-mlx convert``: the file named by
    ``config.json``'s ``"mtp"`` entry, checked against its sha256. An
    unconverted Hugging Face safetensors directory: its ``mtp.*`` tensors, the
    norm offset applied by mlx-lm's rule. None when neither holds MTP weights
    or the source is pre-quantized (see :func:`mtp_support_problem`).
    ``text_args``: default built from ``config.json`` (:func:`text_args_from_config`).
    Raises :class:`MTPError` (one line naming the file) for a missing or
    corrupt file or mismatching weights.
    """
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise MTPError(f"{cfg_path}: cannot read ({type(e).__name__}: {e})") from None
    info = config.get(CONFIG_KEY)
    if config.get("model_type") not in FAMILIES:
        return None
    if text_args is None:
        text_args = text_args_from_config(config)

    if isinstance(info, dict):
        path = model_dir / str(info.get("file", MTP_FILE))
        if not path.is_file():
            raise MTPError(f"{path}: missing (config.json lists it under \"{CONFIG_KEY}\")")
        want = info.get("sha256")
        if want:
            got = sha256_file(path)
            if got != want:
                raise MTPError(f"{path}: corrupt (sha256 {got[:12]}... does not match the {want[:12]}... "
                               "recorded in config.json); re-run eagle3-mlx convert")
        try:
            weights = mx.load(str(path))
        except Exception as e:
            raise MTPError(f"{path}: corrupt ({type(e).__name__}: {e})") from None
        try:
            return load_mtp_weights(weights, text_args, norm_offset=not info.get("norm_offset_applied", True),
                                    quantization=info.get("quantization"), feedback=feedback)
        except MTPError as e:
            raise MTPError(f"{path}: {e}") from None

    if mtp_support_problem(config) is not None:
        return None
    found = _hf_mtp_tensors(model_dir)
    if found is None:
        return None
    weights, shapes = found
    offset = detect_norm_offset(shapes)
    return load_mtp_weights(weights, text_args, norm_offset=True if offset is None else offset, feedback=feedback)
