"""The EAGLE-3 draft head as an MLX module, and its on-disk MLX format.

Forward pass (per position):

    g    = features                N aux states of width Ht (N = 3), concatenated
    g    = input_norm(g)           norm_before_fc (NVIDIA): one RMSNorm over all N*Ht
    g_i  = fc_norm[i](g_i)         fc_norm (EAGLE-3.1): one RMSNorm per aux state
    h    = fc(g)                   if fed target features, else own fed-back state
    res  = h                       (norm_before_residual: hidden_norm(h))
    a    = concat(input_layernorm(embedding), hidden_norm(h))      # width 2H
    h1   = res + attn(a)           q/k/v read the 2H input; Qwen3-style layers RMS-norm
                                   q and k per head (q_norm/k_norm) before RoPE; keys
                                   more than sliding_window - 1 positions back are masked
    h2   = h1 + mlp(post_attention_layernorm(h1))
    out  = h2 (feedback "prenorm") or norm(h2) (feedback "normed", EAGLE-3.1 norm_output):
                                   fed back as `hidden` at the next draft step
    logits = lm_head(norm(h2))     over the draft vocabulary, whatever the feedback
    target_id = draft_id + d2t[draft_id]

``feedback`` is what the head was trained with. It defaults to "normed" when
``norm_output`` is set, but SpecForge heads trained before its 2026-09 fix set
``norm_output`` and fed back the pre-norm state, so the two are stored apart.

The MLX head directory holds ``config.json`` (the fields of :class:`HeadConfig`)
and ``model.safetensors`` with the names below (``layers.{i}.`` prefixes; d2t
stored as int32 offsets).

Why one module of ~550 lines: the config fields, the forward above and the
file format are one contract that the converter, the trainer and the engine
all read; splitting them would scatter each field's meaning over files.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import initialize_rope

#: Heads using none of the 2026 features are written as format 1 (readable by
#: older eagle3-mlx); fc_norm, feedback, q/k norms, biases, windows make it 2.
FORMAT_VERSION = 2
FEEDBACK = ("prenorm", "normed")
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
    num_aux_hidden_states: int = 3
    fc_norm: bool = False
    norm_output: bool = False
    feedback: Optional[str] = None
    qk_norm: bool = False
    attention_bias: bool = False
    sliding_window: Optional[int] = None
    layer_types: Optional[list] = None
    aux_layer_convention: str = AUX_CONVENTION
    source_format: str = "eagle3-mlx"
    quantization: Optional[dict] = None
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.feedback is None:
            self.feedback = "normed" if self.norm_output else "prenorm"
        if self.feedback not in FEEDBACK:
            raise HeadError(f"feedback {self.feedback!r} is not one of {', '.join(FEEDBACK)}")
        if self.fc_norm and self.norm_before_fc:
            raise HeadError("fc_norm (one RMSNorm per aux state) and norm_before_fc (one over "
                            "their concatenation) are exclusive")
        if self.layer_types is not None and len(self.layer_types) < self.num_hidden_layers:
            raise HeadError(f"layer_types has {len(self.layer_types)} entries for "
                            f"{self.num_hidden_layers} layers")

    def window(self, layer: int) -> Optional[int]:
        """The sliding window of draft layer ``layer`` (None: full attention)."""
        if not self.sliding_window:
            return None
        if self.layer_types is None:
            return int(self.sliding_window)
        return int(self.sliding_window) if self.layer_types[layer] == "sliding_attention" else None

    def uses_2026_features(self) -> bool:
        return bool(self.fc_norm or self.feedback != "prenorm" or self.norm_output or self.qk_norm
                    or self.attention_bias or self.sliding_window or self.num_aux_hidden_states != 3)
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
        if kw.get("aux_layer_ids") is None:
            from .compat import aux_ids_from_config  # the one table of id conventions

            kw["aux_layer_ids"] = aux_ids_from_config(d)[0]
        if "eagle3_mlx_format" not in d:
            # A published config: whether its window applies (use_sliding_window,
            # layer_types) and what it feeds back are the converter's to decide.
            for k in ("sliding_window", "layer_types", "feedback"):
                kw.pop(k, None)
        return cls(**kw)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["eagle3_mlx_format"] = FORMAT_VERSION if self.uses_2026_features() else 1
        d["model_type"] = "eagle3"
        if d["quantization"] is None:
            d.pop("quantization")
        return d


class DraftAttention(nn.Module):
    def __init__(self, cfg: HeadConfig, input_dim: int, window: Optional[int] = None):
        super().__init__()
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = nh, nkv, hd
        self.scale = hd**-0.5
        self.window = window
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(input_dim, nh * hd, bias=bias)
        self.k_proj = nn.Linear(input_dim, nkv * hd, bias=bias)
        self.v_proj = nn.Linear(input_dim, nkv * hd, bias=bias)
        self.o_proj = nn.Linear(nh * hd, cfg.hidden_size, bias=bias)
        if cfg.qk_norm:  # Qwen3 decoder layer: per-head RMSNorm of q and k before RoPE
            self.q_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)
            self.k_norm = nn.RMSNorm(hd, eps=cfg.rms_norm_eps)
        # The draft has its own RoPE (base 10000 unless the head config says
        # otherwise); it never inherits the target's.
        self.rope = initialize_rope(
            hd,
            cfg.rope_theta,
            cfg.rope_traditional,
            cfg.rope_scaling,
            cfg.max_position_embeddings,
        )

    def heads(self, x, kind: str):
        """q, k or v of x [B, T, in] as [B, heads, T, hd], q/k normed (no RoPE)."""
        B, T, _ = x.shape
        proj = {"q": self.q_proj, "k": self.k_proj, "v": self.v_proj}[kind]
        y = proj(x).reshape(B, T, self.n_heads if kind == "q" else self.n_kv_heads, -1)
        if kind != "v" and "q_norm" in self:
            y = (self.q_norm if kind == "q" else self.k_norm)(y)
        return y.transpose(0, 2, 1, 3)

    def __call__(self, x, mask=None, cache=None, positions=None):
        B, T, _ = x.shape
        q, k, v = self.heads(x, "q"), self.heads(x, "k"), self.heads(x, "v")
        if positions is None:
            positions = cache.offset if cache is not None else 0
        q = apply_rope(self.rope, q, positions)
        k = apply_rope(self.rope, k, positions)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        if self.window is not None:
            mask = window_mask(mask, positions, T, k.shape[2], self.window)
        o = scaled_dot_product_attention(q, k, v, cache=cache, scale=self.scale, mask=mask)
        return self.o_proj(o.transpose(0, 2, 1, 3).reshape(B, T, -1))


def window_mask(mask, positions, T: int, Tk: int, window: int):
    """``mask`` (None, "causal", bool or additive array) restricted to keys less
    than ``window`` positions behind each query (HF/mlx-lm: q - k < window).

    Keys are indexed by their cache row, which is their position for every
    committed row (the draft cache is trimmed back to the committed rows after
    each tree). Tree rows sit at a row >= their position, so they are never
    masked by mistake; they are within ``depth`` of their queries anyway. The
    cache itself keeps every row: a rotating cache could not be trimmed back
    after a tree once it wrapped."""
    if isinstance(positions, int) or (isinstance(positions, mx.array) and positions.ndim == 0):
        if isinstance(positions, int) and positions + T <= window:
            return mask  # no key can be `window` behind any query
        qpos = mx.arange(T) + positions
    else:
        qpos = positions.reshape(-1, positions.shape[-1])[0] if positions.ndim > 1 else positions
    krow = mx.arange(Tk)
    keep = (qpos[:, None] - krow[None, :]) < window
    if mask is None:
        return keep
    if isinstance(mask, str):  # "causal": query i is cache row Tk - T + i
        return keep & (krow[None, :] <= (mx.arange(T) + Tk - T)[:, None])
    if mask.dtype == mx.bool_:
        return mask & keep
    return mx.where(keep, mask, mx.array(mx.finfo(mask.dtype).min, dtype=mask.dtype))


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
        self.self_attn = DraftAttention(cfg, 2 * H, cfg.window(0))
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

    def __init__(self, cfg: HeadConfig, index: int):
        super().__init__()
        H, eps = cfg.hidden_size, cfg.rms_norm_eps
        self.input_layernorm = nn.RMSNorm(H, eps=eps)
        self.self_attn = DraftAttention(cfg, H, cfg.window(index))
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
    * ``hidden``: either the raw [B, T, N*Ht] target features (``fc`` is then
      applied) or the head's own previous ``hidden_out`` [B, T, H] (the state
      to feed back, already normed when ``config.feedback`` is "normed"). Pass
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
        H, Ht, N = cfg.hidden_size, cfg.target_hidden_size, cfg.num_aux_hidden_states
        if cfg.norm_before_fc:
            self.input_norm = nn.RMSNorm(N * Ht, eps=cfg.rms_norm_eps)
        if cfg.fc_norm:
            self.fc_norm = [nn.RMSNorm(Ht, eps=cfg.rms_norm_eps) for _ in range(N)]
        self.fc = nn.Linear(N * Ht, H, bias=cfg.fc_bias)
        self.layers = [Eagle3Layer(cfg)] + [
            PlainLayer(cfg, i) for i in range(1, cfg.num_hidden_layers)
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
        return self.config.num_aux_hidden_states * self.config.target_hidden_size

    def project_features(self, features):
        """Target features [.., N*Ht] -> the first hidden state [.., H]."""
        g = features
        if self.config.norm_before_fc:
            g = self.input_norm(g)
        if self.config.fc_norm:
            parts = mx.split(g, self.config.num_aux_hidden_states, axis=-1)
            g = mx.concatenate([n(p) for n, p in zip(self.fc_norm, parts)], axis=-1)
        return self.fc(g)

    def outputs(self, h, logits_rows=None):
        """(state fed back, draft logits) from the last layer's output ``h``."""
        if self.config.feedback == "normed":
            hn = self.norm(h)
            return hn, self.lm_head(hn if logits_rows is None else hn[:, logits_rows])
        return h, self.lm_head(self.norm(h if logits_rows is None else h[:, logits_rows]))

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
            hidden = self.project_features(hidden)
        if cache is None:
            cache = [None] * len(self.layers)
        elif not isinstance(cache, (list, tuple)):
            cache = [cache]
        h = self.layers[0](embeddings, hidden, mask, cache[0], positions)
        for layer, c in zip(self.layers[1:], cache[1:]):
            h = layer(h, mask, c, positions)
        # logits_rows: compute the (draft-vocabulary wide) logits only where used.
        return self.outputs(h, logits_rows)

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


def load_head(path, *, rope_theta: float | None = None, feedback: str | None = None) -> Eagle3Head:
    """Load an MLX head directory written by :func:`save_head` or
    ``eagle3-mlx convert``. ``rope_theta`` overrides the stored RoPE base;
    ``feedback`` ("prenorm" or "normed") the state fed back between draft steps."""
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
    if feedback is not None:
        if feedback not in FEEDBACK:
            raise HeadError(f"feedback {feedback!r} is not one of {', '.join(FEEDBACK)}")
        cfg.feedback = feedback
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
