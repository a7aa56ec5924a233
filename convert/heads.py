"""Read every published EAGLE-3 head layout into the one MLX head format
(:mod:`eagle3_mlx.head`).

Layouts (the table in docs/convert.md lists what is read from
each and the published heads known to use it):

* official (``yuhuili/EAGLE3-*``): ``pytorch_model.bin``, ``midlayer.*``, d2t/t2d,
  no ``embed_tokens``;
* SpecForge HF export: the same names in safetensors, with ``embed_tokens``;
* SGLang: ``model.`` prefix, possibly fused ``qkv_proj`` / ``gate_up_proj``;
* speculators / vLLM (``Eagle3Speculator``): nested ``transformer_layer_config``,
  ``layers.{i}.*``, explicit ``norm_before_residual``;
* ModelOpt / NVIDIA: ``layers.{i}.*`` with a flat config, optionally
  ``norm_before_fc`` with an ``input_norm.weight`` over the 3*Ht features.

Features of the 2026 heads, read in any of these layouts:

* EAGLE-3.1: ``fc_norm.{i}.weight`` (one RMSNorm per aux state before ``fc``)
  and ``norm_output`` (the fed-back state is the final-normed one);
* Qwen3-architecture draft layers: ``self_attn.{q,k}_norm.weight`` and
  attention biases (``*_proj.bias``);
* draft sliding windows (``sliding_window`` / ``layer_types`` /
  ``use_sliding_window``) and RoPE scaling (``rope_scaling`` /
  ``rope_parameters``: YaRN, llama3, linear);
* aux ids and widths from every spelling (see ``compat.AUX_ID_TABLE``).

Shapes come from the weights (the layer count always; the config's
``num_hidden_layers`` is known to be wrong on some hubs); the config supplies
head counts, eps, RoPE and flags.
"""

from __future__ import annotations

import re
from pathlib import Path

from eagle3_mlx.convert.errors import ConvertError, short

# LlamaConfig defaults: speculators serialises its nested layer config with
# ``to_diff_dict``, which omits every field equal to these.
_LLAMA_DEFAULTS = dict(
    vocab_size=32000,
    num_attention_heads=32,
    rms_norm_eps=1e-6,
    max_position_embeddings=2048,
)

LAYOUT_NAMES = {
    "official": "official layout",
    "specforge": "SpecForge HF export layout",
    "sglang": "SGLang layout",
    "speculators": "speculators layout",
    "modelopt": "ModelOpt layout",
    "nvidia_norm_before_fc": "NVIDIA norm_before_fc layout",
}

_LAYER_RE = re.compile(r"^(midlayers|midlayer|layers)(?:\.(\d+))?\.(.+)$")
_LAYER_PARTS = {
    "input_layernorm.weight", "hidden_norm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
    "self_attn.o_proj.weight", "self_attn.qkv_proj.weight",
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias",
    "self_attn.o_proj.bias", "self_attn.qkv_proj.bias",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight", "mlp.gate_up_proj.weight",
}
_TOP = {"fc.weight", "fc.bias", "norm.weight", "lm_head.weight", "embed_tokens.weight",
        "input_norm.weight", "d2t", "t2d"}
_FC_NORM = re.compile(r"^fc_norm\.(\d+)\.weight$")

# Config defaults of the nested layer config by model type: speculators writes
# it with ``to_diff_dict``, which omits every field equal to these.
_QWEN3_DEFAULTS = dict(vocab_size=151936, num_attention_heads=32, num_key_value_heads=32,
                       head_dim=128, rms_norm_eps=1e-6, max_position_embeddings=32768,
                       use_sliding_window=False, attention_bias=False)


def normalize_name(name: str):
    """Map a checkpoint tensor name to the MLX head name, or None to drop it."""
    n = name
    changed = True
    while changed:  # prefixes may stack ("model.eagle_module.")
        changed = False
        for p in ("eagle_module.", "model."):
            if n.startswith(p):
                n, changed = n[len(p):], True
    if n.endswith("rotary_emb.inv_freq"):
        return None
    m = _LAYER_RE.match(n)
    if m:
        kind, idx, rest = m.groups()
        if idx is None and kind != "midlayer":
            return n  # rejected later as unexpected
        return f"layers.{int(idx or 0)}.{rest}"
    return n


def looks_like_head(config: dict, names) -> bool:
    """An EAGLE-3 head rather than a target model?"""
    if "transformer_layer_config" in config or config.get("speculators_model_type"):
        return True
    archs = config.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if any("eagle" in a.lower() or "speculator" in a.lower() for a in archs):
        return True
    if "draft_vocab_size" in config:
        return True
    norm = {normalize_name(n) for n in names}
    return "fc.weight" in norm and any(
        n and (n.endswith("hidden_norm.weight") or n == "d2t") for n in norm
    )


def detect_layout(config: dict, names) -> str:
    names = list(names)
    if "transformer_layer_config" in config or config.get("speculators_model_type"):
        return "speculators"
    if _flag(config, "norm_before_fc") or any(normalize_name(n) == "input_norm.weight" for n in names):
        return "nvidia_norm_before_fc"
    if any(n.startswith("model.") for n in names) or any(
        "qkv_proj" in n or "gate_up_proj" in n for n in names
    ):
        return "sglang"
    if any(re.match(r"^(eagle_module\.)?layers\.\d+\.", n) for n in names):
        return "modelopt"
    if any(normalize_name(n) == "embed_tokens.weight" for n in names):
        return "specforge"
    return "official"


def _flag(config: dict, key: str):
    if key in config:
        return config[key]
    return (config.get("eagle_config") or {}).get(key)


def merged_config(raw: dict) -> dict:
    """One flat dict of head settings for any layout."""
    if "transformer_layer_config" not in raw:
        return dict(raw)
    layer = raw.get("transformer_layer_config") or {}
    cfg = dict(_QWEN3_DEFAULTS if layer.get("model_type") == "qwen3" else _LLAMA_DEFAULTS)
    cfg.update(layer)
    for k, v in raw.items():
        if k != "transformer_layer_config" and v is not None:
            cfg[k] = v
    return cfg


def _rope(cfg: dict):
    """(theta, scaling). Absent means base 10000, no scaling (official heads).
    Transformers 5 keeps both under ``rope_parameters``."""
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or None
    theta = params.get("rope_theta") or (scaling or {}).get("rope_theta") or cfg.get("rope_theta") or 10000.0
    if scaling is None and params:
        scaling = params
    if scaling:
        scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        kind = scaling.get("rope_type") or scaling.get("type") or "default"
        if kind == "default":
            scaling = None
    return float(theta), scaling


def _window(cfg: dict):
    """(sliding_window, layer_types) of the draft layers, or (None, None).

    ``layer_types`` (transformers >= 4.53) says per layer; else a Qwen3-style
    ``use_sliding_window: false`` switches a configured window off; else a
    ``sliding_window`` applies to every draft layer (speculators: 2048)."""
    w = cfg.get("sliding_window")
    types = cfg.get("layer_types")
    if not w:
        return None, None
    if types:
        types = list(types)
        return (int(w), types) if "sliding_attention" in types else (None, None)
    if cfg.get("use_sliding_window") is False:
        return None, None
    return int(w), None


def _feedback(cfg: dict, layout: str, override, log):
    """The state fed back between draft steps: "normed" or "prenorm".

    ``norm_output`` true means "normed" in speculators, vLLM and SpecForge from
    its 2026-09 fix on; SpecForge before the fix wrote ``norm_output: true``
    and fed back the pre-norm state. A flat (SpecForge/official-style) config
    carries nothing that dates the training, so such heads get "normed" with a
    note naming the override (``--draft-feedback prenorm``)."""
    norm_output = bool(_flag(cfg, "norm_output"))
    if override is not None:
        return override
    if not norm_output:
        return "prenorm"
    if cfg.get("eagle3_feedback") in ("prenorm", "normed"):  # written by eagle3-mlx's exporter
        return cfg["eagle3_feedback"]
    if layout not in ("speculators",):
        log("note: norm_output is set: feeding back the final-normed state; a SpecForge head "
            "trained before 2026-09 fed back the pre-norm one (pass --draft-feedback prenorm)")
    return "normed"


class HeadSource:
    """A head checkpoint read into MLX-named tensors plus its HeadConfig."""

    def __init__(self, src: Path, raw_config: dict, weights, *, log=print):
        self.src, self.raw, self.weights, self.log = src, raw_config, weights, log
        self.layout = detect_layout(raw_config, weights.shapes)

    def describe(self) -> str:
        cfg = merged_config(self.raw)
        names = {normalize_name(n) for n in self.weights.shapes}
        extra = []
        if any(n and _FC_NORM.match(n) for n in names) or _flag(cfg, "fc_norm"):
            extra.append("EAGLE-3.1 fc_norm")
        if _flag(cfg, "norm_output"):
            extra.append("norm_output")
        if any(n and n.endswith("self_attn.q_norm.weight") for n in names):
            extra.append("Qwen3-style layer")
        if _window(cfg)[0]:
            extra.append(f"sliding window {_window(cfg)[0]}")
        return f"EAGLE-3 head ({LAYOUT_NAMES[self.layout]}{'; ' + ', '.join(extra) if extra else ''})"

    def _err(self, name, reason):
        return ConvertError(self.weights.origin.get(name, self.src), reason)

    def build(self, *, dtype=None, aux_layer_ids=None, rope_theta=None, feedback=None,
              num_target_layers=None, rope_from=None):
        """-> Eagle3Head with the checkpoint's weights. ``feedback`` overrides
        the fed-back state; ``num_target_layers`` (L, when the target is known)
        settles ambiguous aux id conventions; ``rope_from`` (a target config)
        gives the draft the verifier's RoPE base and scaling, as speculators
        trains it (its converter once dropped ``rope_scaling``)."""
        import numpy as np

        from eagle3_mlx.head import check_d2t, t2d_from_d2t

        cfg = merged_config(self.raw)
        mapping = self._map_names()
        shapes = {m: tuple(self.weights.shapes[n]) for m, n in mapping.items()}
        self._check_required(shapes)
        d = self._fc_dims(cfg, shapes, aux_layer_ids, num_target_layers)
        d.update(self._attention_dims(cfg, shapes, d["H"]))
        w = self._load_checked(mapping, d)
        d2t = self._vocab_mapping(w, d["V"], d["Vd"], mapping, check_d2t, t2d_from_d2t, np)
        opts = self._norm_options(cfg, w, d)
        opts.update(self._layer_options(cfg, w, d, mapping, rope_theta, rope_from))
        opts["feedback"] = _feedback(cfg, self.layout, feedback, self.log)
        head = self._make_head(cfg, w, d, opts)
        return self._load_into(head, w, d2t, dtype)

    def _map_names(self) -> dict:
        """MLX head name -> checkpoint tensor name; unknown or clashing names refused."""
        mapping = {}
        for n in self.weights.shapes:
            m = normalize_name(n)
            if m is None:
                continue
            parts = m.split(".", 2)
            ok = (m in _TOP or bool(_FC_NORM.match(m))
                  or (parts[0] == "layers" and len(parts) == 3 and parts[2] in _LAYER_PARTS))
            if not ok:
                raise self._err(n, f"unsupported tensor {n!r} in an EAGLE-3 head (unknown layout, "
                                   "or a draft layer this converter does not support)")
            if m in mapping:
                raise self._err(n, f"tensors {mapping[m]!r} and {n!r} both map to {m!r}")
            mapping[m] = n
        return mapping

    def _check_required(self, shapes) -> None:
        for req in ("fc.weight", "norm.weight", "layers.0.hidden_norm.weight"):
            if req not in shapes:
                raise ConvertError(self.src, f"not a usable EAGLE-3 head: no {req!r} "
                                             f"(found {len(shapes)} tensors, layout {self.layout})")
        if "lm_head.weight" not in shapes:
            raise ConvertError(self.src, "the head has no lm_head.weight (heads that share the "
                                         "target's lm_head are not supported)")

    def _fc_dims(self, cfg, shapes, aux_layer_ids, num_target_layers) -> dict:
        """fc widths, aux states (ids and count), fc_norm tensors, vocabulary sizes."""
        from eagle3_mlx.compat import aux_ids_from_config, num_aux_states

        H, fc_in = shapes["fc.weight"]
        if aux_layer_ids is not None:
            aux, aux_from = list(aux_layer_ids), "--aux-layer-ids"
        else:
            aux, aux_from = aux_ids_from_config(cfg, num_target_layers)
        try:
            n_aux, Ht = num_aux_states(cfg, fc_in, aux)
        except ValueError as e:
            raise self._err("fc.weight", f"fc.weight is [{H}, {fc_in}]: {e}") from None
        fc_norms = sorted(int(_FC_NORM.match(m).group(1)) for m in shapes if _FC_NORM.match(m))
        if fc_norms and (fc_norms != list(range(n_aux))
                         or any(shapes[f"fc_norm.{i}.weight"] != (Ht,) for i in fc_norms)):
            raise ConvertError(self.src, f"fc_norm tensors {fc_norms} do not match {n_aux} aux states "
                                         f"of width {Ht} (expected fc_norm.0..{n_aux - 1}.weight, [{Ht}] each)")
        if _flag(cfg, "fc_norm") and not fc_norms:
            raise ConvertError(self.src, "config sets fc_norm but the weights have no fc_norm.{i}.weight")
        if cfg.get("hidden_size") not in (None, H) and "transformer_layer_config" not in self.raw:
            raise self._err("fc.weight", f"config hidden_size {cfg['hidden_size']} but fc.weight has {H} rows")
        Vd = shapes["lm_head.weight"][0]
        if cfg.get("draft_vocab_size") not in (None, Vd):
            self.log(f"note: config draft_vocab_size {cfg['draft_vocab_size']} disagrees with "
                     f"lm_head.weight ({Vd} rows); using {Vd}")
        V = self._vocab_size(cfg, shapes, Vd)
        return dict(H=H, fc_in=fc_in, aux=aux, aux_from=aux_from, n_aux=n_aux, Ht=Ht,
                    fc_norms=fc_norms, Vd=Vd, V=V)

    def _attention_dims(self, cfg, shapes, H) -> dict:
        nh = int(cfg.get("num_attention_heads") or 0)
        nkv = int(cfg.get("num_key_value_heads") or nh)
        hd = int(cfg.get("head_dim") or (H // nh if nh else 0))
        n_layers = 1 + max(int(m.split(".")[1]) for m in shapes if m.startswith("layers."))
        for i in range(n_layers):
            if not any(m.startswith(f"layers.{i}.") for m in shapes):
                raise ConvertError(self.src, f"layer {i} has no tensors (layers 0..{n_layers - 1} expected)")
        return dict(nh=nh, nkv=nkv, hd=hd, n_layers=n_layers)

    def _load_checked(self, mapping, d) -> dict:
        """The tensors under MLX names, fused projections split, attention shapes
        checked; sets ``d["I"]`` (the MLP width)."""
        H, nh, nkv, hd = d["H"], d["nh"], d["nkv"], d["hd"]
        loaded = self.weights.load()
        w = {m: loaded[n] for m, n in mapping.items()}
        del loaded
        self._split_fused(w, nh, nkv, hd)
        q_rows, q_in = w["layers.0.self_attn.q_proj.weight"].shape
        if q_in != 2 * H:
            raise self._err(mapping.get("layers.0.self_attn.q_proj.weight", "layers.0.self_attn.qkv_proj.weight"),
                            f"q_proj input width {q_in} is not 2 x hidden_size ({2 * H}); not an EAGLE-3 head "
                            "(EAGLE-1/2 heads are not supported)")
        if nh * hd != q_rows or nkv * hd != w["layers.0.self_attn.k_proj.weight"].shape[0]:
            raise ConvertError(self.src, f"attention shape mismatch: q_proj has {q_rows} rows, k_proj "
                                         f"{w['layers.0.self_attn.k_proj.weight'].shape[0]}, but the config says "
                                         f"{nh} heads / {nkv} kv heads of dim {hd}")
        d["I"] = w["layers.0.mlp.gate_proj.weight"].shape[0]
        return w

    def _norm_options(self, cfg, w, d) -> dict:
        """norm_before_fc (an ``input_norm``) and norm_before_residual."""
        has_input_norm = "input_norm.weight" in w
        nbf = bool(_flag(cfg, "norm_before_fc"))
        if has_input_norm and d["fc_norms"]:
            raise ConvertError(self.src, "the head has both input_norm.weight (norm_before_fc) and "
                                         "fc_norm.{i}.weight (EAGLE-3.1 fc_norm); they are exclusive")
        if nbf and not has_input_norm:
            raise ConvertError(self.src, "config sets norm_before_fc but the weights have no input_norm.weight")
        if has_input_norm and not nbf:
            self.log("note: input_norm.weight present; applying it before fc (norm_before_fc)")
        if has_input_norm and w["input_norm.weight"].shape != (d["fc_in"],):
            raise self._err("input_norm.weight", f"input_norm.weight has shape {tuple(w['input_norm.weight'].shape)}, "
                                                 f"expected ({d['fc_in']},)")
        if "norm_before_residual" in cfg:
            nbr = bool(cfg["norm_before_residual"])
        else:
            nbr = False
            if self.layout == "speculators":
                self.log("note: norm_before_residual is not in the config; using False (the speculators "
                         "default; vLLM would assume True)")
        return dict(norm_before_fc=has_input_norm, norm_before_residual=nbr)

    def _layer_options(self, cfg, w, d, mapping, rope_theta, rope_from) -> dict:
        """Embedding, RoPE, sliding window, q/k norms and attention biases."""
        import mlx.core as mx

        H, Ht, hd = d["H"], d["Ht"], d["hd"]
        has_embed = "embed_tokens.weight" in w
        if not has_embed and Ht != H:
            raise ConvertError(self.src, f"the head has no embed_tokens.weight and its hidden_size {H} != "
                                         f"target hidden size {Ht}, so the target's embedding cannot be shared")
        theta, scaling = _rope(cfg)
        if rope_from is not None:
            theta, scaling = _rope(rope_from.get("text_config") or rope_from)
            self.log(f"note: draft RoPE from the target: base {theta:g}"
                     + (f", {scaling.get('rope_type') or scaling.get('type')} scaling" if scaling else ""))
        if rope_theta is not None:
            theta = float(rope_theta)
        aux_from = d["aux_from"]
        if aux_from and aux_from.startswith("eagle_config") and "+1" in aux_from:
            self.log(f"note: aux layer ids from {aux_from}: {d['aux']}")
        window, layer_types = _window(cfg)
        qk_norm = "layers.0.self_attn.q_norm.weight" in w
        if qk_norm and w["layers.0.self_attn.q_norm.weight"].shape != (hd,):
            raise self._err(mapping.get("layers.0.self_attn.q_norm.weight"),
                            f"q_norm.weight has shape {tuple(w['layers.0.self_attn.q_norm.weight'].shape)}, "
                            f"expected ({hd},) (one weight per head_dim)")
        attn_bias = "layers.0.self_attn.q_proj.bias" in w
        if bool(cfg.get("attention_bias")) != attn_bias and "attention_bias" in cfg:
            raise ConvertError(self.src, f"config attention_bias is {cfg['attention_bias']} but the weights "
                                         f"{'have' if attn_bias else 'have no'} q_proj.bias")
        if attn_bias and "layers.0.self_attn.o_proj.bias" not in w:
            # Qwen2-style: q/k/v biases only; o_proj gets a zero bias.
            for i in range(d["n_layers"]):
                w[f"layers.{i}.self_attn.o_proj.bias"] = mx.zeros((H,), dtype=w["fc.weight"].dtype)
        return dict(has_embedding=has_embed, rope_theta=theta, rope_scaling=scaling,
                    sliding_window=window, layer_types=layer_types, qk_norm=qk_norm,
                    attention_bias=attn_bias)

    def _make_head(self, cfg, w, d, opts):
        from eagle3_mlx.head import Eagle3Head, HeadConfig, HeadError

        try:
            hcfg = HeadConfig(
                hidden_size=d["H"], intermediate_size=d["I"], num_attention_heads=d["nh"],
                num_key_value_heads=d["nkv"], head_dim=d["hd"], vocab_size=d["V"],
                draft_vocab_size=d["Vd"], target_hidden_size=d["Ht"],
                num_hidden_layers=d["n_layers"], rms_norm_eps=float(cfg.get("rms_norm_eps") or 1e-6),
                max_position_embeddings=int(cfg.get("max_position_embeddings") or 2048),
                fc_bias="fc.bias" in w, aux_layer_ids=d["aux"], source_format=self.layout,
                num_aux_hidden_states=d["n_aux"], fc_norm=bool(d["fc_norms"]),
                norm_output=bool(_flag(cfg, "norm_output")), **opts,
            )
            return Eagle3Head(hcfg)
        except (HeadError, ValueError, KeyError, TypeError) as e:
            raise ConvertError(self.src / "config.json", f"unusable head config ({short(e)})") from None

    def _load_into(self, head, w, d2t, dtype):
        import mlx.core as mx

        if dtype is not None:
            dt = getattr(mx, dtype)
            w = {k: (v.astype(dt) if mx.issubdtype(v.dtype, mx.floating) else v) for k, v in w.items()}
        w["d2t"] = d2t
        try:
            head.load_weights(list(w.items()), strict=True)
        except ValueError as e:
            raise ConvertError(self.src, f"weights do not match the head shape ({short(e)})") from None
        head.freeze(keys=["d2t"], recurse=False)
        mx.eval(head.parameters())
        return head

    def _vocab_size(self, cfg, shapes, Vd) -> int:
        cands = {}
        if "embed_tokens.weight" in shapes:
            cands["embed_tokens.weight rows"] = shapes["embed_tokens.weight"][0]
        if "t2d" in shapes:
            cands["t2d length"] = shapes["t2d"][0]
        vals = set(cands.values())
        if len(vals) > 1:
            raise ConvertError(self.src, "inconsistent vocabulary sizes: " +
                               ", ".join(f"{k} {v}" for k, v in cands.items()))
        if vals:
            V = vals.pop()
            if "vocab_size" in (self.raw.get("transformer_layer_config") or self.raw) and cfg.get("vocab_size") != V:
                self.log(f"note: config vocab_size {cfg.get('vocab_size')} disagrees with the weights; using {V}")
            return V
        if cfg.get("vocab_size") is None:
            raise ConvertError(self.src / "config.json", "no vocab_size")
        return int(cfg["vocab_size"])

    def _split_fused(self, w, nh, nkv, hd):
        import mlx.core as mx

        for key in [k for k in w if k.endswith("self_attn.qkv_proj.weight")]:
            qkv = w.pop(key)
            pre = key[: -len("qkv_proj.weight")]
            if qkv.shape[0] != (nh + 2 * nkv) * hd:
                raise ConvertError(self.src, f"{key} has {qkv.shape[0]} rows, expected (heads {nh} + 2 x kv heads "
                                             f"{nkv}) x head_dim {hd} = {(nh + 2 * nkv) * hd}")
            q, k, v = mx.split(qkv, [nh * hd, (nh + nkv) * hd], axis=0)
            w[pre + "q_proj.weight"], w[pre + "k_proj.weight"], w[pre + "v_proj.weight"] = q, k, v
            if pre + "qkv_proj.bias" in w:
                q, k, v = mx.split(w.pop(pre + "qkv_proj.bias"), [nh * hd, (nh + nkv) * hd], axis=0)
                w[pre + "q_proj.bias"], w[pre + "k_proj.bias"], w[pre + "v_proj.bias"] = q, k, v
        for key in [k for k in w if k.endswith("mlp.gate_up_proj.weight")]:
            gu = w.pop(key)
            pre = key[: -len("gate_up_proj.weight")]
            if gu.shape[0] % 2:
                raise ConvertError(self.src, f"{key} has an odd number of rows ({gu.shape[0]})")
            w[pre + "gate_proj.weight"], w[pre + "up_proj.weight"] = mx.split(gu, 2, axis=0)

    def _vocab_mapping(self, w, V, Vd, mapping, check_d2t, t2d_from_d2t, np):
        """d2t offsets as int32 (target id = d + d2t[d]); checked against t2d."""
        import mlx.core as mx

        from eagle3_mlx.head import HeadError

        t2d = w.pop("t2d", None)
        d2t = w.pop("d2t", None)
        t2d_np = None if t2d is None else np.array(t2d.astype(mx.bool_))
        if d2t is None:
            if t2d_np is not None and t2d_np.sum() == Vd and Vd < V:
                used = np.nonzero(t2d_np)[0]
                self.log("note: no d2t in the checkpoint; derived it from t2d")
                return mx.array((used - np.arange(Vd)).astype(np.int32))
            if Vd != V:
                raise ConvertError(self.src, f"no d2t although draft_vocab_size {Vd} != vocab_size {V}")
            return mx.zeros((Vd,), dtype=mx.int32)
        d2t_np = np.array(d2t).astype(np.int64).reshape(-1)
        if d2t_np.shape != (Vd,):
            raise self._err(mapping["d2t"], f"d2t has {d2t_np.shape[0]} entries but lm_head has {Vd} rows")
        try:
            check_d2t(d2t_np, V)
        except HeadError as e:
            raise self._err(mapping["d2t"], str(e)) from None
        if t2d_np is not None:
            if t2d_np.shape != (V,) or not np.array_equal(t2d_np.astype(bool), t2d_from_d2t(d2t_np, V)):
                raise self._err(mapping["t2d"], "t2d disagrees with d2t (expected t2d[d + d2t[d]] = True for "
                                                "every draft id d and False elsewhere)")
        return mx.array(d2t_np.astype(np.int32))


def convert_head(head_src: HeadSource, stage: Path, *, dtype=None, quantize=False, q_bits=None,
                 q_group_size=None, q_mode="affine", aux_layer_ids=None, rope_theta=None,
                 target_config=None, feedback=None, rope_from_target=False, log=print):
    """Build the MLX head, check it against ``target_config`` (if given),
    quantize it (if asked) and save it into ``stage``. Returns the head."""
    from eagle3_mlx.head import quantize_head, save_head

    from eagle3_mlx.compat import HeadTargetMismatch, check_head_against_target

    from eagle3_mlx.compat import target_dims

    L = target_dims(target_config[0])["num_hidden_layers"] if target_config is not None else None
    head = head_src.build(dtype=dtype, aux_layer_ids=aux_layer_ids, rope_theta=rope_theta,
                          feedback=feedback, num_target_layers=L,
                          rope_from=target_config[0] if rope_from_target and target_config else None)
    if target_config is not None:
        cfg, where = target_config
        try:
            check_head_against_target(head.config, cfg)
        except HeadTargetMismatch as e:
            raise ConvertError(where, str(e)) from None
    if quantize:
        gs, bits = quant_defaults(q_mode, q_group_size, q_bits)
        quantize_head(head, bits=bits, group_size=gs, mode=q_mode)
        log(f"quantized the head: {bits}-bit {q_mode}, group size {gs}")
    save_head(head, stage)
    return head


def quant_defaults(mode: str, group_size, bits):
    """mlx-lm's per-mode defaults; mxfp4 only exists as 4-bit, group 32."""
    defaults = {"affine": (64, 4), "mxfp4": (32, 4)}
    if mode not in defaults:
        raise ConvertError("--q-mode", f"unsupported quantization mode {mode!r}")
    gs, b = group_size or defaults[mode][0], bits or defaults[mode][1]
    if mode == "mxfp4" and (gs, b) != (32, 4):
        raise ConvertError("--q-mode", f"mxfp4 needs 4 bits and group size 32 (got {b} bits, group {gs})")
    return gs, b
