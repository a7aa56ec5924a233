"""Does an EAGLE-3 head fit a target model? Pure Python (no MLX, no numpy) so
the engine can call it cheaply at load time, and the converter before writing.

Both configs may be dicts (``config.json`` contents, HF or MLX style, with an
optional nested ``text_config``) or objects with the same attribute names
(``HeadConfig``, mlx-lm ``ModelArgs``).
"""

from __future__ import annotations


class HeadTargetMismatch(ValueError):
    """The head cannot drive this target; the message names the numbers."""


def _get(cfg, key, default=None):
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def target_dims(target_config) -> dict:
    """hidden_size, vocab_size and num_hidden_layers of a target config (looks
    inside ``text_config`` for multimodal wrappers)."""
    cfgs = [target_config]
    text = _get(target_config, "text_config")
    if text:
        cfgs.insert(0, text)
    out = {}
    for key, alts in (
        ("hidden_size", ("hidden_size", "n_embd", "d_model")),
        ("vocab_size", ("vocab_size",)),
        ("num_hidden_layers", ("num_hidden_layers", "n_layer", "num_layers")),
    ):
        out[key] = next(
            (v for c in cfgs for a in alts if (v := _get(c, a)) is not None), None
        )
    return out


def default_aux_layer_ids(num_layers: int) -> list:
    """The official EAGLE-3 choice, as HF hidden-states indices: [2, L//2, L-3]."""
    return [2, num_layers // 2, num_layers - 3]


def head_target_problems(head_config, target_config) -> list:
    """Every reason the head does not fit the target (empty list: it fits)."""
    t = target_dims(target_config)
    H = _get(head_config, "hidden_size")
    Ht = _get(head_config, "target_hidden_size") or H
    V = _get(head_config, "vocab_size")
    Vd = _get(head_config, "draft_vocab_size") or V
    has_embed = bool(_get(head_config, "has_embedding", False))
    problems = []

    th, tv, tl = t["hidden_size"], t["vocab_size"], t["num_hidden_layers"]
    if th is not None and Ht != th:
        problems.append(
            f"head expects target hidden size {Ht} (fc input 3x{Ht}={3 * Ht}) but the target's hidden_size is {th}"
        )
    if tv is not None and V is not None and V != tv:
        problems.append(f"head vocab_size {V} != target vocab_size {tv}")
    if V is not None and Vd is not None and Vd > V:
        problems.append(f"head draft_vocab_size {Vd} > its vocab_size {V}")
    if not has_embed and th is not None and H is not None and H != th:
        problems.append(
            f"head has no embed_tokens and its hidden_size {H} != target hidden_size {th}, "
            "so it cannot share the target's embedding"
        )
    aux = _get(head_config, "aux_layer_ids")
    if tl is not None:
        ids = list(aux) if aux is not None else default_aux_layer_ids(tl)
        where = "aux_layer_ids" if aux is not None else f"default aux_layer_ids [2, L//2, L-3] for L={tl}"
        if len(ids) != 3:
            problems.append(f"{where} has {len(ids)} entries; an EAGLE-3 head reads exactly 3 target layers")
        # HF hidden-states index k = the input of decoder layer k (0 = embedding
        # output); k = L is the last layer's output before the final norm (read by
        # e.g. NVIDIA's gpt-oss heads). The engine captures all of 0..L.
        bad = [i for i in ids if not isinstance(i, int) or i < 0 or i > tl]
        if bad:
            problems.append(f"{where} {ids} out of range for a target with {tl} layers (valid: 0..{tl})")
    return problems


def check_head_against_target(head_config, target_config) -> None:
    """Raise :class:`HeadTargetMismatch` (one line, naming the numbers) if the
    head does not fit the target."""
    problems = head_target_problems(head_config, target_config)
    if problems:
        raise HeadTargetMismatch("head does not fit target: " + "; ".join(problems))
