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
    n_aux = _get(head_config, "num_aux_hidden_states") or 3
    problems = []

    th, tv, tl = t["hidden_size"], t["vocab_size"], t["num_hidden_layers"]
    if th is not None and Ht != th:
        problems.append(
            f"head expects target hidden size {Ht} (fc input {n_aux}x{Ht}={n_aux * Ht}) but the target's hidden_size is {th}"
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
        if len(ids) != n_aux:
            problems.append(f"{where} has {len(ids)} entries; this head reads {n_aux} target layers")
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


# ----------------------------------------------------------------------------
# Aux layer ids: where each source keeps them and what an id means there.
#
# "hf"  = Hugging Face ``output_hidden_states`` index k: the residual stream
#         entering decoder layer k (0 = embedding output; k = L is the last
#         layer's output before the final norm). eagle3-mlx stores this.
# "out" = the output of decoder layer k, i.e. hf index k + 1.
#
# | config spelling                                   | written by                        | convention |
# |---------------------------------------------------|-----------------------------------|------------|
# | aux_layer_ids (MLX head config)                   | eagle3-mlx                        | hf         |
# | eagle_aux_hidden_state_layer_ids (top level)      | speculators, vLLM-native configs  | hf (vLLM reads it as is; k = L allowed) |
# | eagle_config.eagle_aux_hidden_state_layer_ids     | SpecForge, ModelOpt/NVIDIA        | out when the first id is 1 (their default [1, L//2-1, L-4] = hf [2, L//2, L-3]); |
# |                                                   |                                   | else hf (ModelOpt gpt-oss v3 [24, 30, 36], L = 36: 36 = L is the last layer's output) |
# | none                                              | official EAGLE-3, SpecForge default | hf default [2, L//2, L-3] (chosen at load time from the target's L) |
# | num_aux_hidden_states                             | speculators / SGLang variants     | the number of aux states N (fc reads N x target_hidden_size) |
# | target_hidden_size                                | speculators, SpecForge            | Ht, the width of one aux state |
#
# An "out" id that would land past L (an "out" id of L) cannot be an output of
# a layer, so when the target's L is known such ids are read as hf.
AUX_ID_TABLE = (
    ("aux_layer_ids", "eagle3-mlx", "hf"),
    ("eagle_aux_hidden_state_layer_ids", "speculators, vLLM", "hf"),
    ("eagle_config.eagle_aux_hidden_state_layer_ids", "SpecForge, ModelOpt", "out if ids[0] == 1 else hf"),
)


def aux_ids_from_config(config: dict, num_layers=None):
    """(aux ids as hf indices or None for the default, where they were read
    from) for any head config spelling in :data:`AUX_ID_TABLE`."""
    eagle = config.get("eagle_config") or {}
    for key, _who, conv in AUX_ID_TABLE:
        ids = eagle.get(key.split(".", 1)[1]) if key.startswith("eagle_config.") else config.get(key)
        if not ids:
            continue
        ids = [int(i) for i in ids]
        if conv.startswith("out") and ids[0] == 1:
            shifted = [i + 1 for i in ids]
            if num_layers is None or max(shifted) <= num_layers:
                return shifted, f"{key} (output-of-layer ids, +1)"
        return ids, key
    return None, None


def num_aux_states(config: dict, fc_in: int, aux_ids=None):
    """(N aux states, target hidden size Ht) from the config's
    ``num_aux_hidden_states`` / ``target_hidden_size`` / aux ids and the width
    ``fc_in`` of ``fc``; raises ValueError naming the disagreement."""
    eagle = config.get("eagle_config") or {}
    n = config.get("num_aux_hidden_states") or eagle.get("num_aux_hidden_states")
    ht = config.get("target_hidden_size")
    if n is None and aux_ids:
        n = len(aux_ids)
    if n is None and ht:
        if fc_in % int(ht):
            raise ValueError(f"fc input width {fc_in} is not a multiple of target_hidden_size {ht}")
        n = fc_in // int(ht)
    n = int(n or 3)
    if fc_in % n:
        raise ValueError(f"fc input width {fc_in} is not {n} x target_hidden_size")
    if ht is not None and int(ht) * n != fc_in:
        raise ValueError(f"config target_hidden_size {ht} x {n} aux states != fc input width {fc_in}")
    if aux_ids is not None and len(aux_ids) != n:
        raise ValueError(f"{len(aux_ids)} aux layer ids {list(aux_ids)} but fc reads {n} aux states")
    return n, fc_in // n
