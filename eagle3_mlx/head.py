"""The EAGLE-3 draft head as an MLX module, and its on-disk MLX format.

Forward pass (per position, see docs/head-format.md):

    h    = fc(features)            if fed 3*Ht target features, else own hidden
    res  = h                       (norm_before_residual: hidden_norm(h))
    a    = concat(input_layernorm(embedding), hidden_norm(h))      # width 2H
    h1   = res + attn(a)           q/k/v read the 2H input
    h2   = h1 + mlp(post_attention_layernorm(h1))
    out  = h2                      pre-norm: fed back as `hidden` at the next draft step
    logits = lm_head(norm(h2))     over the draft vocabulary
    target_id = draft_id + d2t[draft_id]

The MLX head directory holds ``config.json`` (the fields of :class:`HeadConfig`)
and ``model.safetensors`` with the names below (``layers.{i}.`` prefixes; d2t
stored as int32 offsets).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope

FORMAT_VERSION = 1
#: Aux layer ids are stored as HF ``output_hidden_states`` indices: id k is the
#: residual stream *entering* decoder layer k (0 = embedding output), no final norm.
AUX_CONVENTION = "hf_hidden_states_index"


class HeadError(ValueError):
    """A head checkpoint or config that cannot be used; the message says why."""


@dataclass
class HeadConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    head_dim: Optional[int] = None
    num_hidden_layers: int = 1
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: Optional[dict] = None
    rope_traditional: bool = False
    max_position_embeddings: int = 2048
    norm_before_residual: bool = False
    norm_before_fc: bool = False
    fc_bias: bool = False
    has_embedding: bool = False
    aux_layer_ids: Optional[list] = None
    aux_layer_convention: str = AUX_CONVENTION
    source_format: str = "eagle3-mlx"
    quantization: Optional[dict] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.aux_layer_convention != AUX_CONVENTION:
            raise HeadError(
                f"aux_layer_convention {self.aux_layer_convention!r} is not "
                f"{AUX_CONVENTION!r}; convert the head with `eagle3-mlx convert`"
            )

    @classmethod
    def from_dict(cls, d: dict) -> "HeadConfig":
        """Read an official-style flat config (LlamaForCausalLMEagle3) or this
        package's own MLX head config. Missing RoPE fields mean base 10000 and no
        scaling, as in the official heads."""
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in d.items() if k in names and k != "extra"}
        for req in ("hidden_size", "intermediate_size", "num_attention_heads"):
            if req not in kw:
                raise HeadError(f"head config is missing {req!r}")
        kw.setdefault("num_key_value_heads", kw["num_attention_heads"])
        if "vocab_size" not in kw:
            raise HeadError("head config is missing 'vocab_size'")
        kw.setdefault("draft_vocab_size", kw["vocab_size"])
        kw.setdefault("target_hidden_size", d.get("target_hidden_size") or kw["hidden_size"])
        if kw.get("target_hidden_size") is None:
            kw["target_hidden_size"] = kw["hidden_size"]
        if kw.get("rope_theta") is None:
            kw["rope_theta"] = 10000.0
        if "bias" in d and "fc_bias" not in d:
            kw["fc_bias"] = bool(d["bias"])
        eagle_cfg = d.get("eagle_config") or {}
        if kw.get("aux_layer_ids") is None and eagle_cfg.get("eagle_aux_hidden_state_layer_ids"):
            kw["aux_layer_ids"] = list(eagle_cfg["eagle_aux_hidden_state_layer_ids"])
        if kw.get("aux_layer_ids") is None and d.get("eagle_aux_hidden_state_layer_ids"):
            kw["aux_layer_ids"] = list(d["eagle_aux_hidden_state_layer_ids"])
        return cls(**kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["eagle3_mlx_format"] = FORMAT_VERSION
        d["model_type"] = "eagle3"
        if d["quantization"] is None:
            d.pop("quantization")
        return d


class DraftAttention(nn.Module):
    def __init__(self, cfg: HeadConfig, input_dim: int):
        super().__init__()
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, hd
        self.scale = hd**-0.5
        self.q_proj = nn.Linear(input_dim, nh * hd, bias=False)
        self.k_proj = nn.Linear(input_dim, nkv * hd, bias=False)
        self.v_proj = nn.Linear(input_dim, nkv * hd, bias=False)
        self.o_proj = nn.Linear(nh * hd, cfg.hidden_size, bias=False)
        # The draft has its own RoPE (base 10000 unless the head config says
        # otherwise); it never inherits the target's.
        self.rope = initialize_rope(
            hd,
            cfg.rope_theta,
            cfg.rope_traditional,
            cfg.rope_scaling,
            cfg.max_position_embeddings,
        )

    def __call__(self, x, mask=None, cache=None, positions=None):
        B, T, _ = x.shape
        q = self.q_proj(x).reshape(B, T, self.n_heads, -1).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if positions is None:
            positions = cache.offset if cache is not None else 0
        q = apply_rope(self.rope, q, positions)
        k = apply_rope(self.rope, k, positions)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))


def apply_rope(rope, x, positions):
    """RoPE with a scalar start offset, or per-token positions (an int array of
    length T, or [B, T]): the token axis is folded into the batch axis so the
    per-batch offset of ``mx.fast.rope`` becomes a per-token position."""
    if isinstance(positions, int) or (isinstance(positions, mx.array) and positions.ndim == 0):
        return rope(x, offset=positions)
    B, H, T, D = x.shape
    pos = positions.reshape(-1).astype(mx.int32)
    y = x.transpose(0, 2, 1, 3).reshape(B * T, H, 1, D)
    y = rope(y, offset=pos)
    return y.reshape(B, T, H, D).transpose(0, 2, 1, 3)


class DraftMLP(nn.Module):
    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def __call__(self, x):
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3Layer(nn.Module):
    """The EAGLE-3 decoder layer: q/k/v read concat(norm(embedding), norm(hidden))."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.norm_before_residual = cfg.norm_before_residual
        self.input_layernorm = nn.RMSNorm(H, eps=eps)
        self.hidden_norm = nn.RMSNorm(H, eps=eps)
        self.self_attn = DraftAttention(cfg, 2 * H)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=eps)
        self.mlp = DraftMLP(cfg)

    def __call__(self, embeddings, h, mask=None, cache=None, positions=None):
        hn = self.hidden_norm(h)
        residual = hn if self.norm_before_residual else h
        a = mx.concatenate([self.input_layernorm(embeddings), hn], axis=-1)
        h1 = residual + self.self_attn(a, mask, cache, positions)
        return h1 + self.mlp(self.post_attention_layernorm(h1))


class PlainLayer(nn.Module):
    """Extra Llama layers of multi-layer drafts (H-wide q/k/v)."""

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = nn.RMSNorm(H, eps=eps)
        self.self_attn = DraftAttention(cfg, H)
        self.post_attention_layernorm = nn.RMSNorm(H, eps=eps)
        self.mlp = DraftMLP(cfg)

    def __call__(self, h, mask=None, cache=None, positions=None):
        h1 = h + self.self_attn(self.input_layernorm(h), mask, cache, positions)
        return h1 + self.mlp(self.post_attention_layernorm(h1))


class Eagle3Head(nn.Module):
    """EAGLE-3 draft head.

    ``head(embeddings, hidden, cache=None, mask=None, positions=None)
    -> (hidden_out, draft_logits)``

    * ``embeddings``: [B, T, H] token embeddings (the target's embedding table
      unless the head ships its own ``embed_tokens``; see :meth:`embed`).
    * ``hidden``: either the raw [B, T, 3*Ht] target features (``fc`` is then
      applied) or the head's own previous ``hidden_out`` [B, T, H]. Pass
      ``from_target=True/False`` to say which explicitly.
    * ``cache``: list of per-layer KV caches (:meth:`make_cache`) or None.
    * ``mask``: None, ``"causal"`` or a boolean/additive array broadcastable to
      [B, heads, T, cached + T].
    * ``positions``: RoPE start position (int) or per-token positions (int
      array of length T); defaults to the cache offset.
    * ``logits_rows``: optional index/slice of the rows that need logits.
    """

    def __init__(self, cfg: HeadConfig):
        super().__init__()
        self.config = cfg
        H, Ht = cfg.hidden_size, cfg.target_hidden_size
        if cfg.norm_before_fc:
            self.input_norm = nn.RMSNorm(3 * Ht, eps=cfg.rms_norm_eps)
        self.fc = nn.Linear(3 * Ht, H, bias=cfg.fc_bias)
        self.layers = [Eagle3Layer(cfg)] + [
            PlainLayer(cfg) for _ in range(cfg.num_hidden_layers - 1)
        ]
        self.norm = nn.RMSNorm(H, eps=cfg.rms_norm_eps)
        self.lm_head = nn.Linear(H, cfg.draft_vocab_size, bias=False)
        if cfg.has_embedding:
            self.embed_tokens = nn.Embedding(cfg.vocab_size, H)
        # Offsets: target id = draft id + d2t[draft id]. Identity when Vd == V.
        self.d2t = mx.zeros((cfg.draft_vocab_size,), dtype=mx.int32)
        self.freeze(keys=["d2t"], recurse=False)

    @classmethod
    def from_config(cls, config: dict | HeadConfig) -> "Eagle3Head":
        cfg = config if isinstance(config, HeadConfig) else HeadConfig.from_dict(config)
        return cls(cfg)

    @property
    def fc_input_dim(self) -> int:
        return 3 * self.config.target_hidden_size

    def make_cache(self) -> list:
        return [KVCache() for _ in self.layers]

    def embed(self, tokens, target_embed=None):
        """Token embeddings for the head: its own table if it has one, else the
        target's (``target_embed``: the target's ``embed_tokens`` module)."""
        if "embed_tokens" in self:
            return self.embed_tokens(tokens)
        if target_embed is None:
            raise HeadError("this head has no embed_tokens; pass the target's embedding")
        return target_embed(tokens)

    def __call__(self, embeddings, hidden, cache=None, mask=None, positions=None, from_target=None,
                 logits_rows=None):
        if from_target is None:
            width = hidden.shape[-1]
            if width == self.fc_input_dim and width != self.config.hidden_size:
                from_target = True
            elif width == self.config.hidden_size and width != self.fc_input_dim:
                from_target = False
            else:
                raise HeadError(
                    f"hidden width {width} matches neither 3*target_hidden_size "
                    f"({self.fc_input_dim}) nor hidden_size ({self.config.hidden_size})"
                )
        if from_target:
            if self.config.norm_before_fc:
                hidden = self.input_norm(hidden)
            hidden = self.fc(hidden)
        if cache is None:
            cache = [None] * len(self.layers)
        elif not isinstance(cache, (list, tuple)):
            cache = [cache]
        h = self.layers[0](embeddings, hidden, mask, cache[0], positions)
        for layer, c in zip(self.layers[1:], cache[1:]):
            h = layer(h, mask, c, positions)
        # logits_rows: compute the (draft-vocabulary wide) logits only where used.
        return h, self.lm_head(self.norm(h if logits_rows is None else h[:, logits_rows]))

    def to_target_ids(self, draft_ids):
        """Map draft-vocabulary ids to target-vocabulary ids (d + d2t[d])."""
        return draft_ids + self.d2t[draft_ids]

    def set_vocab_mapping(self, d2t):
        d2t = mx.array(d2t).astype(mx.int32)
        if d2t.shape != (self.config.draft_vocab_size,):
            raise HeadError(
                f"d2t has shape {tuple(d2t.shape)}, expected ({self.config.draft_vocab_size},)"
            )
        check_d2t(d2t, self.config.vocab_size)
        self.d2t = d2t
        self.freeze(keys=["d2t"], recurse=False)


def check_d2t(d2t, vocab_size: int, name: str = "d2t"):
    """d2t holds non-negative, non-decreasing offsets with d + d2t[d] < V."""
    import numpy as np

    a = np.array(d2t, dtype=np.int64)
    ids = np.arange(len(a)) + a
    if len(a) and (a.min() < 0 or np.any(np.diff(a) < 0) or ids[-1] >= vocab_size):
        raise HeadError(
            f"{name} is not an offset table (needs d2t[d] >= 0, non-decreasing, "
            f"d + d2t[d] < vocab_size {vocab_size}); absolute ids or a corrupt file?"
        )


def d2t_from_used(used) -> "mx.array":
    """Offsets from the ascending list of target ids that form the draft vocab."""
    import numpy as np

    used = np.sort(np.asarray(used, dtype=np.int64))
    return mx.array((used - np.arange(len(used))).astype(np.int32))


def t2d_from_d2t(d2t, vocab_size: int):
    """Boolean membership mask of the draft vocabulary over the target vocab."""
    import numpy as np

    d = np.asarray(d2t, dtype=np.int64)
    mask = np.zeros((vocab_size,), dtype=bool)
    mask[np.arange(len(d)) + d] = True
    return mask


# ----------------------------------------------------------------------------
# MLX head directory: config.json + model.safetensors


def quantize_head(head: Eagle3Head, bits: int = 4, group_size: int = 64, mode: str = "affine"):
    """Quantize the head's linear layers (fc, attention, MLP, lm_head) in place."""

    def predicate(path, module):
        return isinstance(module, nn.Linear) and module.weight.shape[-1] % group_size == 0

    nn.quantize(head, group_size=group_size, bits=bits, mode=mode, class_predicate=predicate)
    head.config.quantization = {"group_size": group_size, "bits": bits, "mode": mode}
    return head


def save_head(head: Eagle3Head, path, *, include_embedding: bool | None = None):
    """Write config.json + model.safetensors into an existing directory."""
    from mlx.utils import tree_flatten

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(head.parameters()))
    if include_embedding is False:
        weights = {k: v for k, v in weights.items() if not k.startswith("embed_tokens.")}
    weights["d2t"] = head.d2t.astype(mx.int32)
    cfg = dataclasses.replace(head.config)
    cfg.has_embedding = any(k.startswith("embed_tokens.") for k in weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    with open(path / "config.json", "w") as f:
        json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)


def is_mlx_head_dir(path) -> bool:
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return "eagle3_mlx_format" in json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return False


def load_head(path, *, rope_theta: float | None = None) -> Eagle3Head:
    """Load an MLX head directory written by :func:`save_head` or
    ``eagle3-mlx convert``. ``rope_theta`` overrides the stored RoPE base."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise HeadError(f"{cfg_path}: not found (is {path} an MLX EAGLE-3 head?)")
    try:
        raw = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise HeadError(f"{cfg_path}: invalid JSON ({e})") from None
    if "eagle3_mlx_format" not in raw:
        raise HeadError(
            f"{path} is not an MLX EAGLE-3 head; convert it first: "
            f"eagle3-mlx convert {path} --mlx-path OUT"
        )
    if raw["eagle3_mlx_format"] > FORMAT_VERSION:
        raise HeadError(f"{cfg_path}: head format {raw['eagle3_mlx_format']} is newer than this eagle3-mlx")
    cfg = HeadConfig.from_dict(raw)
    if rope_theta is not None:
        cfg.rope_theta = float(rope_theta)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise HeadError(f"{path}: no .safetensors weights")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:  # mlx raises RuntimeError/ValueError on corrupt files
            raise HeadError(f"{f}: cannot read safetensors ({e})") from None
    n_layers = 1 + max(
        (int(k.split(".")[1]) for k in weights if k.startswith("layers.")), default=0
    )
    cfg.num_hidden_layers = n_layers
    cfg.has_embedding = "embed_tokens.weight" in weights
    head = Eagle3Head(cfg)
    q = cfg.quantization
    if q:
        nn.quantize(
            head,
            group_size=q["group_size"],
            bits=q["bits"],
            mode=q.get("mode", "affine"),
            class_predicate=lambda p, m: f"{p}.scales" in weights,
        )
    if "d2t" not in weights:
        if cfg.draft_vocab_size != cfg.vocab_size:
            raise HeadError(f"{path}: no d2t although draft_vocab_size {cfg.draft_vocab_size} != vocab_size {cfg.vocab_size}")
        weights["d2t"] = mx.zeros((cfg.draft_vocab_size,), dtype=mx.int32)
    weights["d2t"] = weights["d2t"].astype(mx.int32)
    check_d2t(weights["d2t"], cfg.vocab_size, name=f"{path}: d2t")
    try:
        head.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise HeadError(f"{path}: weights do not match config.json ({e})") from None
    head.freeze(keys=["d2t"], recurse=False)
    mx.eval(head.parameters())
    return head
