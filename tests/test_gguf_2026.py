"""GGUF targets of the 2026 hybrid families (qwen3next, qwen35, qwen35moe).

Each test builds a tiny random Hugging Face checkpoint, writes it as GGUF the
way llama.cpp's converter lays it out (the forward transforms below are this
file's own, independent of the reader's inverse), converts both with
``eagle3-mlx convert`` and checks the two MLX models give the same fp32 logits
(max |diff| <= 1e-5) and the same greedy tokens.  A GGUF architecture the
``gguf`` package knows but we do not convert gets a one-line refusal.
"""

from __future__ import annotations

import json
import os

import gguf
import mlx.core as mx
import numpy as np
import pytest

from eagle3_mlx.convert.cli import main
from eagle3_mlx.testing import CHAT_TEMPLATE, make_tokenizer, tiny_target_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

VOCAB = 384
TOKENS = [5, 17, 42, 7, 99, 3, 250, 64, 11, 8, 300, 21]
# family -> (GGUF architecture, family in eagle3_mlx.testing.FAMILY_DEFAULTS)
FAMILIES = {"qwen3_next": "qwen3next", "qwen3_5": "qwen35", "qwen3_5_moe": "qwen35moe"}
OFFSET_NORMS = (".input_layernorm.weight", ".post_attention_layernorm.weight", "model.norm.weight",
                ".q_norm.weight", ".k_norm.weight")


# --------------------------------------------------------------------------- #
# A tiny HF checkpoint
# --------------------------------------------------------------------------- #


def exact_a_log(x):
    """llama.cpp stores ``-exp(A_log)`` in float32, which loses about one ulp of
    ``A``; that alone moves these tiny models' logits by ~2e-5. Use ``A_log``
    values that survive the float32 round trip, so the parity check measures
    the converter rather than the file format."""
    for _ in range(50):
        x = np.log(np.exp(x))
    return np.where(np.log(np.exp(x)) == x, x, np.float32(0.0)).astype(np.float32)


def hf_tensors(cfg, seed=0):
    """Random tensors in the HF layout (names from mlx-lm's classes, mapped back)."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    rng = np.random.default_rng(seed)

    def r(*shape, s=0.08):
        return (rng.standard_normal(shape) * s).astype(np.float32)

    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    out = {}
    for name, p in tree_flatten(model.parameters()):
        name = name.replace("language_model.lm_head.", "lm_head.").replace("language_model.model.", "model.")
        shape = tuple(p.shape)
        if name.endswith("conv1d.weight"):  # mlx [C, K, 1] -> HF [C, 1, K]
            out[name] = r(shape[0], 1, shape[1], s=0.3)
        elif name.endswith(OFFSET_NORMS):  # HF stores these RMSNorm weights as offsets from 1
            out[name] = r(*shape, s=0.2)
        elif name.endswith("linear_attn.norm.weight"):
            out[name] = 1.0 + r(*shape, s=0.2)
        elif name.endswith("embed_tokens.weight") or name.endswith("lm_head.weight"):
            out[name] = r(*shape, s=0.5)
        elif name.endswith("A_log"):
            out[name] = exact_a_log(r(*shape, s=0.5))
        elif ".switch_mlp." not in name:
            out[name] = r(*shape, s=0.5 if name.endswith("mlp.gate.weight") else 0.08)
    E, H = cfg.get("num_experts", 0), cfg["hidden_size"]
    for i in range(cfg["num_hidden_layers"] if E else 0):
        Im, p = cfg["moe_intermediate_size"], f"model.layers.{i}.mlp.experts."
        if cfg["model_type"] == "qwen3_next":
            for e in range(E):
                out.update({f"{p}{e}.gate_proj.weight": r(Im, H), f"{p}{e}.up_proj.weight": r(Im, H),
                            f"{p}{e}.down_proj.weight": r(H, Im)})
        else:  # transformers-5 Qwen3.5-MoE: fused experts
            out[p + "gate_up_proj"] = r(E, 2 * Im, H)
            out[p + "down_proj"] = r(E, H, Im)
    return out


def write_hf(path, family):
    cfg = tiny_target_config(family, vocab_size=VOCAB)
    path.mkdir(parents=True)
    make_tokenizer(path, vocab_size=VOCAB)
    w = hf_tensors(cfg)
    cfg["eos_token_id"] = 2
    (path / "config.json").write_text(json.dumps(cfg))
    mx.save_safetensors(str(path / "model.safetensors"), {k: mx.array(v) for k, v in w.items()},
                        metadata={"format": "pt"})
    return cfg, w


# --------------------------------------------------------------------------- #
# HF -> GGUF, as llama.cpp's converter does it
# --------------------------------------------------------------------------- #


def tiled(x, axis, nk, vpk, dim):
    """Value heads grouped by key head -> tiled order (llama.cpp's reorder)."""
    x = np.moveaxis(x, axis, 0)
    rest = x.shape[1:]
    x = x.reshape(nk, vpk, dim, *rest).swapaxes(0, 1).reshape(-1, *rest)
    return np.moveaxis(x, 0, axis)


def to_tiled(name, x, cfg):
    nk, nv = cfg["linear_num_key_heads"], cfg["linear_num_value_heads"]
    dk, dv, vpk = cfg["linear_key_head_dim"], cfg["linear_value_head_dim"], nv // nk
    qk = 2 * nk * dk
    if name.endswith(("in_proj_qkv.weight", "conv1d.weight")):
        return np.concatenate([x[:qk], tiled(x[qk:], 0, nk, vpk, dv)])
    if name.endswith("in_proj_z.weight"):
        return tiled(x, 0, nk, vpk, dv)
    if name.endswith(("in_proj_a.weight", "in_proj_b.weight", "A_log", "dt_bias")):
        return tiled(x, 0, nk, vpk, 1)
    if name.endswith("out_proj.weight"):
        return tiled(x, 1, nk, vpk, dv)
    return x


def split_qkvz(x, cfg):
    """qwen3next: per key head [q, k, v, z] rows -> (all q | all k | all v, all z)."""
    nk, dk = cfg["linear_num_key_heads"], cfg["linear_key_head_dim"]
    vz = cfg["linear_num_value_heads"] // nk * cfg["linear_value_head_dim"]
    g = x.reshape(nk, 2 * dk + 2 * vz, -1)
    q, k, v, z = (g[:, a:b].reshape(-1, x.shape[1]) for a, b in
                  ((0, dk), (dk, 2 * dk), (2 * dk, 2 * dk + vz), (2 * dk + vz, 2 * dk + 2 * vz)))
    return np.concatenate([q, k, v]), z


def gguf_tensors(arch, cfg, hf):
    """HF tensors -> {GGUF name: array} with llama.cpp's transforms."""
    n = cfg["num_hidden_layers"]
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n)
    out, experts = {}, {}
    for name, x in hf.items():
        if name.endswith("norm.weight") and "linear_attn" not in name:
            x = x + 1.0
        if name.endswith("A_log"):
            x = -np.exp(x)
        if "conv1d" in name:
            x = x.squeeze(1)
        if arch != "qwen3next" and cfg["linear_num_key_heads"] != cfg["linear_num_value_heads"]:
            x = to_tiled(name, x, cfg)
        if name.endswith("dt_bias"):
            name = name.replace("dt_bias", "dt_proj.bias")
        if ".mlp.experts." in name:
            experts[name] = x
            continue
        if name.endswith("in_proj_qkvz.weight"):
            bid = name.split(".")[2]
            out[f"blk.{bid}.attn_qkv.weight"], out[f"blk.{bid}.attn_gate.weight"] = split_qkvz(x, cfg)
            continue
        new = tmap.get_name(name, try_suffixes=(".weight", ".bias"))
        assert new is not None, name
        out[new] = x
    out.update(stack_experts(arch, cfg, experts))
    return out


def stack_experts(arch, cfg, experts):
    out = {}
    for i in range(cfg["num_hidden_layers"] if experts else 0):
        p = f"model.layers.{i}.mlp.experts."
        if arch == "qwen3next":
            for part in ("gate", "up", "down"):
                out[f"blk.{i}.ffn_{part}_exps.weight"] = np.stack(
                    [experts[f"{p}{e}.{part}_proj.weight"] for e in range(cfg["num_experts"])])
        else:
            gu = experts[p + "gate_up_proj"]
            half = gu.shape[1] // 2
            out[f"blk.{i}.ffn_gate_exps.weight"] = gu[:, :half]
            out[f"blk.{i}.ffn_up_exps.weight"] = gu[:, half:]
            out[f"blk.{i}.ffn_down_exps.weight"] = experts[p + "down_proj"]
    return out


def add_metadata(w, arch, cfg):
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 100000.0))
    w.add_rope_dimension_count(int(cfg["head_dim"] * cfg.get("partial_rotary_factor", 0.25)))
    w.add_ssm_conv_kernel(cfg["linear_conv_kernel_dim"])
    w.add_ssm_state_size(cfg["linear_key_head_dim"])
    w.add_ssm_group_count(cfg["linear_num_key_heads"])
    w.add_ssm_time_step_rank(cfg["linear_num_value_heads"])
    w.add_ssm_inner_size(cfg["linear_value_head_dim"] * cfg["linear_num_value_heads"])
    w.add_full_attention_interval(cfg["full_attention_interval"])
    if arch != "qwen3next":
        w.add_rope_dimension_sections([11, 11, 10, 0])
    if cfg.get("num_experts"):
        w.add_expert_count(cfg["num_experts"])
        w.add_expert_used_count(cfg["num_experts_per_tok"])
        w.add_expert_feed_forward_length(cfg["moe_intermediate_size"])
        w.add_expert_shared_feed_forward_length(cfg["shared_expert_intermediate_size"])
        w.add_expert_weights_norm(cfg.get("norm_topk_prob", True))


def add_tokenizer(w, tokdir):
    state = json.loads((tokdir / "tokenizer.json").read_text())
    vocab = state["model"]["vocab"]
    for t in state["added_tokens"]:
        vocab[t["content"]] = t["id"]
    tokens = [f"[PAD{i}]" for i in range(VOCAB)]  # llama.cpp pads the list to the vocab size
    for t, i in vocab.items():
        tokens[i] = t
    specials = {t["content"] for t in state["added_tokens"]}
    types = [gguf.TokenType.CONTROL if t in specials else
             gguf.TokenType.UNUSED if t.startswith("[PAD") else gguf.TokenType.NORMAL for t in tokens]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("gpt-2")
    w.add_token_list(tokens)
    w.add_token_types([int(t) for t in types])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]])
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)


def write_gguf(path, arch, cfg, hf, tokdir, mtp=False):
    tensors = gguf_tensors(arch, cfg, hf)
    n = cfg["num_hidden_layers"]
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(n + (1 if mtp else 0))
    if mtp:  # llama.cpp appends Qwen3.5's MTP block as layer n (nextn_predict_layers)
        w.add_nextn_predict_layers(1)
        H = cfg["hidden_size"]
        tensors[f"blk.{n}.attn_norm.weight"] = np.ones(H, np.float32)
        tensors[f"blk.{n}.nextn.eh_proj.weight"] = np.zeros((H, 2 * H), np.float32)
    add_metadata(w, arch, cfg)
    add_tokenizer(w, tokdir)
    for name, x in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(x, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


def convert(src, out):
    return main([str(src), "--mlx-path", str(out), "--dtype", "float32"])


def greedy(model, tokens, n=8):
    toks = list(tokens)
    for _ in range(n):
        toks.append(int(mx.argmax(model(mx.array([toks]))[0, -1])))
    return toks[len(tokens):]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_matches_hf_conversion(tmp_path, family):
    from mlx_lm import load

    arch = FAMILIES[family]
    cfg, hf = write_hf(tmp_path / "hf", family)
    write_gguf(tmp_path / "m.gguf", arch, cfg, hf, tmp_path / "hf", mtp=arch == "qwen35")
    assert convert(tmp_path / "hf", tmp_path / "from_hf") == 0
    assert convert(tmp_path / "m.gguf", tmp_path / "from_gguf") == 0
    ref, ref_tok = load(str(tmp_path / "from_hf"))
    got, got_tok = load(str(tmp_path / "from_gguf"))
    assert json.loads((tmp_path / "from_gguf" / "config.json").read_text())["model_type"] == family
    a, b = ref(mx.array([TOKENS])), got(mx.array([TOKENS]))
    assert a.dtype == b.dtype == mx.float32
    diff = float(mx.abs(a - b).max())
    print(f"{family}: max |logit diff| {diff:.2e}")
    assert diff <= 1e-5
    assert greedy(ref, TOKENS) == greedy(got, TOKENS)
    text = "def add(a, b):\n    return a + b"
    assert ref_tok.encode(text) == got_tok.encode(text)


def test_known_but_unsupported_architecture_is_refused_in_one_line(tmp_path, capsys):
    src = tmp_path / "g.gguf"
    w = gguf.GGUFWriter(str(src), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.GEMMA4])
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert convert(src, tmp_path / "out") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "g.gguf" in err and "gemma4" in err and "not supported" in err
    assert not (tmp_path / "out").exists()
