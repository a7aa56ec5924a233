"""GGUF targets -> MLX: tiny GGUF files written here with gguf.GGUFWriter convert,
load with mlx_lm.load and give the logits of an MLX model built directly from the
dequantized reference weights (fp32, max |diff| <= 1e-4)."""

from __future__ import annotations

import json
import os

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

from eagle3_mlx.convert.gguf_target import (
    GGUFError,
    convert_gguf,
    permute_llama_qk,
    unpermute_llama_qk,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "the quick brown fox jumps over the lazy dog 12345",
    "for i in range(10):\n    print(i * i)\n",
    "Hello world! It's a test; we'll see.",
] * 4
TEXTS = ["Hello world", "def f(x):\n    return x * 2  # 2024", "it's  the\tfox\n\n", "ünï 🙂 café"]
TOKENS = [5, 17, 42, 7, 99, 3, 250, 64, 11, 8]


# --------------------------------------------------------------------------- #
# Writing tiny GGUF files
# --------------------------------------------------------------------------- #


def bpe_reference(tmp_path):
    """A small byte-level BPE (GPT-2 pre-tokenizer) as an HF fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIALS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")


def bpe_metadata(ref, pre="gpt-2"):
    state = json.loads(ref.backend_tokenizer.to_str())
    vocab = state["model"]["vocab"]
    tokens = [None] * len(vocab)
    for t, i in vocab.items():
        tokens[i] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["model"]["merges"]]
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    return dict(model="gpt2", pre=pre, tokens=tokens, merges=merges, types=types,
                bos=SPECIALS.index("<|endoftext|>"), eos=SPECIALS.index("<|im_end|>"),
                add_bos=False, template=CHATML)


def spm_metadata():
    """A tiny SentencePiece-style vocabulary (byte fallback, scores)."""
    T = gguf.TokenType
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [T.CONTROL, T.CONTROL, T.CONTROL, T.UNKNOWN, T.CONTROL, T.CONTROL]
    tokens += [f"<0x{b:02X}>" for b in range(256)]
    types += [T.BYTE] * 256
    pieces = ["\u2581", "h", "e", "l", "o", "w", "r", "d", "ll", "he", "llo", "hello",
              "\u2581w", "or", "\u2581wor", "ld", "\u2581world", "\u2581hello"]
    tokens += pieces
    types += [T.NORMAL] * len(pieces)
    scores = [0.0] * (len(tokens) - len(pieces)) + [-float(i) for i in range(len(pieces))]
    template = (
        "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n"
        "{{ m['content'] }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
    )
    return dict(model="llama", tokens=tokens, types=types, scores=scores, bos=2, eos=1,
                unk=3, pad=0, add_bos=True, add_space_prefix=False, template=template)


def _k_quant_bytes(rng, rows, cols, qtype):
    """Random but well-formed K-quant blocks (gguf can dequantize, not quantize them)."""
    block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(rows, cols // block, nbytes), dtype=np.uint8)
    d = np.frombuffer(np.float16(0.004).tobytes(), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin, scales[12], qs[128]
        raw[..., 0:2] = d
        raw[..., 2:4] = np.frombuffer(np.float16(0.002).tobytes(), dtype=np.uint8)
    elif qtype == Q.Q6_K:  # ql[128], qh[64], scales[16], d
        raw[..., -2:] = d
    return raw.reshape(rows, cols // block * nbytes)


def write_tiny_gguf(path, arch, *, qtypes=None, tied=False, seed=0, tok=None,
                    llama3_rope=False, hidden=64, ffn=256, layers=2, heads=4, kv=2, head_dim=16,
                    extra=None):
    """Write a tiny GGUF the way llama.cpp's converter lays it out.

    Returns the Hugging Face-layout reference weights (what the dequantized file
    holds) as float32 NumPy arrays.  ``qtypes``: {"default", "ffn_down", "embd",
    "output"} -> GGML type (default F32)."""
    qtypes = dict(qtypes or {})
    rng = np.random.default_rng(seed)
    vocab = len(tok["tokens"])
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    theta = 500000.0 if llama3_rope else 10000.0
    w.add_rope_freq_base(theta)
    if extra is not None:
        extra(w)
    # tokenizer
    w.add_tokenizer_model(tok["model"])
    if "pre" in tok:
        w.add_tokenizer_pre(tok["pre"])
    w.add_token_list(tok["tokens"])
    w.add_token_types([int(t) for t in tok["types"]])
    if "merges" in tok:
        w.add_token_merges(tok["merges"])
    if "scores" in tok:
        w.add_token_scores(tok["scores"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    if "unk" in tok:
        w.add_unk_token_id(tok["unk"])
    if "pad" in tok:
        w.add_pad_token_id(tok["pad"])
    w.add_add_bos_token(tok["add_bos"])
    if "add_space_prefix" in tok:
        w.add_add_space_prefix(tok["add_space_prefix"])
    w.add_chat_template(tok["template"])

    ref = {}

    def put(gguf_name, hf_name, arr, qtype=Q.F32, permute_heads=None, norm_shift=0.0):
        arr = arr.astype(np.float32)
        if qtype == Q.F32:
            ref[hf_name] = arr
            stored = arr
        elif qtype == Q.F16:
            stored = arr.astype(np.float16)
            ref[hf_name] = stored.astype(np.float32)
        elif qtype in (Q.Q4_K, Q.Q6_K):
            raw = _k_quant_bytes(rng, arr.shape[0], arr.shape[1], qtype)
            ref[hf_name] = dequantize(raw, qtype).reshape(arr.shape)
            if permute_heads:
                raw = permute_llama_qk(raw, permute_heads)
            w.add_tensor(gguf_name, raw, raw_dtype=qtype)
            return
        else:
            stored = quantize(arr, qtype)
            ref[hf_name] = dequantize(stored, qtype).reshape(arr.shape)
        if permute_heads:
            stored = permute_llama_qk(stored, permute_heads)
        if norm_shift:
            stored = stored + norm_shift  # llama.cpp stores Gemma norms as 1 + w
            ref[hf_name] = stored.astype(np.float32) - norm_shift
        w.add_tensor(gguf_name, stored, raw_dtype=qtype if qtype not in (Q.F32, Q.F16) else None)

    qd = qtypes.get("default", Q.F32)
    norm_shift = 1.0 if arch == "gemma3" else 0.0
    put("token_embd.weight", "model.embed_tokens.weight",
        rng.normal(size=(vocab, hidden)) * 0.5, qtypes.get("embd", qd))
    for i in range(layers):
        p, h = f"blk.{i}.", f"model.layers.{i}."
        perm_q = heads if arch == "llama" else None
        perm_k = kv if arch == "llama" else None
        put(p + "attn_norm.weight", h + "input_layernorm.weight",
            1 + 0.1 * rng.normal(size=hidden), norm_shift=norm_shift)
        put(p + "attn_q.weight", h + "self_attn.q_proj.weight",
            rng.normal(size=(heads * head_dim, hidden)) * 0.2, qd, perm_q)
        put(p + "attn_k.weight", h + "self_attn.k_proj.weight",
            rng.normal(size=(kv * head_dim, hidden)) * 0.2, qd, perm_k)
        put(p + "attn_v.weight", h + "self_attn.v_proj.weight",
            rng.normal(size=(kv * head_dim, hidden)) * 0.2, qd)
        put(p + "attn_output.weight", h + "self_attn.o_proj.weight",
            rng.normal(size=(hidden, heads * head_dim)) * 0.2, qd)
        if arch == "qwen2":
            put(p + "attn_q.bias", h + "self_attn.q_proj.bias", rng.normal(size=heads * head_dim) * 0.1)
            put(p + "attn_k.bias", h + "self_attn.k_proj.bias", rng.normal(size=kv * head_dim) * 0.1)
            put(p + "attn_v.bias", h + "self_attn.v_proj.bias", rng.normal(size=kv * head_dim) * 0.1)
        if arch in ("qwen3", "gemma3"):
            put(p + "attn_q_norm.weight", h + "self_attn.q_norm.weight",
                1 + 0.1 * rng.normal(size=head_dim), norm_shift=norm_shift)
            put(p + "attn_k_norm.weight", h + "self_attn.k_norm.weight",
                1 + 0.1 * rng.normal(size=head_dim), norm_shift=norm_shift)
        if arch == "gemma3":
            put(p + "post_attention_norm.weight", h + "post_attention_layernorm.weight",
                1 + 0.1 * rng.normal(size=hidden), norm_shift=norm_shift)
            put(p + "ffn_norm.weight", h + "pre_feedforward_layernorm.weight",
                1 + 0.1 * rng.normal(size=hidden), norm_shift=norm_shift)
            put(p + "post_ffw_norm.weight", h + "post_feedforward_layernorm.weight",
                1 + 0.1 * rng.normal(size=hidden), norm_shift=norm_shift)
        else:
            put(p + "ffn_norm.weight", h + "post_attention_layernorm.weight",
                1 + 0.1 * rng.normal(size=hidden))
        put(p + "ffn_gate.weight", h + "mlp.gate_proj.weight", rng.normal(size=(ffn, hidden)) * 0.2, qd)
        put(p + "ffn_up.weight", h + "mlp.up_proj.weight", rng.normal(size=(ffn, hidden)) * 0.2, qd)
        put(p + "ffn_down.weight", h + "mlp.down_proj.weight", rng.normal(size=(hidden, ffn)) * 0.1,
            qtypes.get("ffn_down", qd) if i == 0 else qtypes.get("ffn_down_1", qtypes.get("ffn_down", qd)))
    put("output_norm.weight", "model.norm.weight", 1 + 0.1 * rng.normal(size=hidden), norm_shift=norm_shift)
    if not tied:
        put("output.weight", "lm_head.weight", rng.normal(size=(vocab, hidden)) * 0.5,
            qtypes.get("output", qd))
    if llama3_rope:
        dims = head_dim
        wl = 2 * np.pi * theta ** (np.arange(0, dims, 2) / dims)
        smooth = (8192 / wl - 1.0) / (4.0 - 1.0)
        f = np.where(wl < 8192 / 4, 1.0, np.where(wl > 8192, 8.0, 1 / ((1 - smooth) / 8.0 + smooth)))
        w.add_tensor("rope_freqs.weight", f.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return ref


def reference_logits(config, ref_weights, tokens=TOKENS):
    from mlx.utils import tree_flatten
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config)
    model = model_cls(args_cls.from_dict(config))
    weights = model.sanitize({k: mx.array(v) for k, v in ref_weights.items()})
    model.load_weights(list(weights.items()), strict=True)
    assert all(p.dtype == mx.float32 for _, p in tree_flatten(model.parameters()))
    return model(mx.array([tokens]))


def converted_logits(out, tokens=TOKENS):
    from mlx_lm import load

    model, tok = load(str(out))
    return model(mx.array([tokens])), tok, model


def base_config(model_type, vocab, *, tied, hidden=64, ffn=256, layers=2, heads=4, kv=2, head_dim=16, **kw):
    cfg = dict(model_type=model_type, hidden_size=hidden, num_hidden_layers=layers,
               intermediate_size=ffn, num_attention_heads=heads, num_key_value_heads=kv,
               head_dim=head_dim, rms_norm_eps=1e-6, vocab_size=vocab,
               max_position_embeddings=2048, tie_word_embeddings=tied)
    cfg.update(kw)
    return cfg


def assert_close(a, b, tol=1e-4):
    diff = float(mx.abs(a - b).max())
    assert diff <= tol, f"max |logits diff| {diff:.3g} > {tol}"
    print(f"max |logits diff| = {diff:.3g}")
    return diff


# --------------------------------------------------------------------------- #
# Tests
# --------------------------------------------------------------------------- #


def test_llama_permutation_roundtrip():
    w = np.arange(8 * 16 * 3, dtype=np.float32).reshape(8 * 16, 3)
    p = permute_llama_qk(w, 8)
    assert not np.array_equal(p, w)
    np.testing.assert_array_equal(unpermute_llama_qk(p, 8), w)
    b = np.arange(64, dtype=np.float32)
    np.testing.assert_array_equal(unpermute_llama_qk(permute_llama_qk(b, 4), 4), b)


def test_llama_f32_llama3_rope_and_bpe_tokenizer(tmp_path):
    ref_tok = bpe_reference(tmp_path)
    meta = bpe_metadata(ref_tok, pre="gpt-2")
    src = tmp_path / "llama.gguf"
    ref = write_tiny_gguf(src, "llama", tok=meta, llama3_rope=True)
    out = tmp_path / "out"
    out.mkdir()
    cfg = convert_gguf(src, out, dtype="float32", progress=False)
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    assert cfg["rope_scaling"] == rope and cfg["tie_word_embeddings"] is False
    expect = reference_logits(
        base_config("llama", len(meta["tokens"]), tied=False, rope_theta=500000.0, rope_scaling=rope), ref)
    got, tok, _ = converted_logits(out)
    assert_close(got, expect)
    # the tokenizer rebuilt from GGUF metadata encodes exactly like the original
    for s in TEXTS + CORPUS[:4]:
        assert tok.encode(s) == ref_tok.encode(s), s
        assert tok.decode(tok.encode(s)) == s
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True)
    assert ids[0] == SPECIALS.index("<|im_start|>")
    assert SPECIALS.index("<|im_end|>") in tok.eos_token_ids


def test_llama_quantized_tied(tmp_path):
    """Q8_0 / Q5_0 / Q4_0 legacy quants and Q4_K / Q6_K K-quants, tied embeddings."""
    meta = bpe_metadata(bpe_reference(tmp_path))
    src = tmp_path / "llama-q.gguf"
    ref = write_tiny_gguf(
        src, "llama", tok=meta, tied=True, seed=1,
        qtypes={"default": Q.Q8_0, "embd": Q.Q5_0, "ffn_down": Q.Q4_K, "ffn_down_1": Q.Q6_K},
    )
    assert "lm_head.weight" not in ref
    out = tmp_path / "out"
    out.mkdir()
    cfg = convert_gguf(src, out, progress=False)
    assert cfg["tie_word_embeddings"] is True
    expect = reference_logits(base_config("llama", len(meta["tokens"]), tied=True), ref)
    got, _, model = converted_logits(out)
    assert_close(got, expect)
    assert "lm_head" not in model


def test_qwen2_biases_q4_0_and_chat(tmp_path):
    meta = bpe_metadata(bpe_reference(tmp_path), pre="qwen2")
    src = tmp_path / "qwen2.gguf"
    ref = write_tiny_gguf(src, "qwen2", tok=meta, seed=2,
                          qtypes={"default": Q.Q8_0, "output": Q.Q4_0}, head_dim=16)
    out = tmp_path / "out"
    out.mkdir()
    convert_gguf(src, out, progress=False)
    expect = reference_logits(base_config("qwen2", len(meta["tokens"]), tied=False, rope_theta=10000.0), ref)
    got, tok, _ = converted_logits(out)
    assert_close(got, expect)
    for s in TEXTS:  # qwen2 pre-tokenizer (single digits): exact round trip
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("<|im_start|>user")[0] == SPECIALS.index("<|im_start|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    from mlx_lm import generate, load

    model, tok = load(str(out))
    text = generate(model, tok, prompt, max_tokens=4)
    assert isinstance(text, str)


def test_qwen3_f16(tmp_path):
    meta = bpe_metadata(bpe_reference(tmp_path))
    src = tmp_path / "qwen3.gguf"
    ref = write_tiny_gguf(src, "qwen3", tok=meta, tied=True, seed=3, qtypes={"default": Q.F16})
    out = tmp_path / "out"
    out.mkdir()
    convert_gguf(src, out, progress=False)
    expect = reference_logits(base_config("qwen3", len(meta["tokens"]), tied=True, rope_theta=10000.0), ref)
    got, _, _ = converted_logits(out)
    assert_close(got, expect)


def test_gemma3_norm_shift_sliding_window_and_spm_tokenizer(tmp_path):
    meta = spm_metadata()
    src = tmp_path / "gemma3.gguf"

    def extra(w):
        w.add_sliding_window(4)
        w.add_sliding_window_pattern(2)
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(8.0)

    ref = write_tiny_gguf(src, "gemma3", tok=meta, tied=True, seed=4,
                          qtypes={"default": Q.Q8_0}, extra=extra)
    out = tmp_path / "out"
    out.mkdir()
    cfg = convert_gguf(src, out, progress=False)
    assert cfg["sliding_window"] == 4 and cfg["sliding_window_pattern"] == 2
    expect = reference_logits(
        base_config("gemma3_text", len(meta["tokens"]), tied=True, rope_theta=10000.0,
                    rope_local_base_freq=10000.0, query_pre_attn_scalar=16, sliding_window=4,
                    sliding_window_pattern=2, rope_scaling={"rope_type": "linear", "factor": 8.0}),
        ref)
    got, tok, _ = converted_logits(out)
    assert_close(got, expect)
    # SentencePiece-style BPE: scores -> merges, no space prefix, BOS added, byte fallback
    ids = tok.encode("hello world")
    pieces = meta["tokens"]
    assert [pieces[i] for i in ids] == ["<bos>", "hello", "\u2581world"]
    ids = tok.encode("hé")
    assert [pieces[i] for i in ids] == ["<bos>", "h", "<0xC3>", "<0xA9>"]
    assert tok.decode(ids, skip_special_tokens=True) == "hé"
    prompt = tok.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True,
                                     tokenize=False)
    assert prompt.startswith("<bos><start_of_turn>user\nhello<end_of_turn>")


def test_dtype_and_requantize(tmp_path):
    meta = bpe_metadata(bpe_reference(tmp_path))
    src = tmp_path / "m.gguf"
    write_tiny_gguf(src, "llama", tok=meta, seed=5)
    out16 = tmp_path / "f16"
    out16.mkdir()
    convert_gguf(src, out16, dtype="float16", progress=False)
    w = mx.load(str(out16 / "model.safetensors"))
    assert all(v.dtype == mx.float16 for v in w.values())
    out4 = tmp_path / "q4"
    out4.mkdir()
    cfg = convert_gguf(src, out4, quantize=True, q_bits=4, q_group_size=32, progress=False)
    assert cfg["quantization"]["bits"] == 4
    from mlx_lm import generate, load

    model, tok = load(str(out4))
    assert generate(model, tok, "Hello", max_tokens=3) is not None
    saved = json.loads((out4 / "config.json").read_text())
    assert saved["quantization"]["group_size"] == 32


def test_truncated_and_corrupt_files(tmp_path):
    meta = bpe_metadata(bpe_reference(tmp_path))
    src = tmp_path / "full.gguf"
    write_tiny_gguf(src, "qwen2", tok=meta, seed=6)
    data = src.read_bytes()
    out = tmp_path / "out"
    out.mkdir()
    cases = ((len(data) - 1, "truncated: tensor 'output.weight'"), (len(data) // 3, "truncated: tensor"),
             (100, "corrupt or truncated GGUF header"), (10, "truncated"))
    for n, what in cases:
        bad = tmp_path / f"cut{n}.gguf"
        bad.write_bytes(data[:n])
        with pytest.raises(GGUFError) as e:
            convert_gguf(bad, out, progress=False)
        msg = str(e.value)
        assert str(bad) in msg and "\n" not in msg and what in msg, msg
        assert isinstance(e.value, ValueError)
    bad = tmp_path / "corrupt.gguf"
    bad.write_bytes(data[:40] + b"\xff\xff\xff\x7f" + data[44:])
    with pytest.raises(GGUFError, match="corrupt or truncated GGUF header"):
        convert_gguf(bad, out, progress=False)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        convert_gguf(junk, out, progress=False)
    assert list(out.iterdir()) == []  # nothing written on failure


def test_unsupported_architecture(tmp_path):
    meta = bpe_metadata(bpe_reference(tmp_path))
    src = tmp_path / "m.gguf"
    w = gguf.GGUFWriter(str(src), "mamba")
    w.add_token_list(meta["tokens"])
    w.add_tensor("token_embd.weight", np.zeros((len(meta["tokens"]), 8), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(GGUFError, match="unsupported architecture 'mamba'"):
        convert_gguf(src, out, progress=False)


@pytest.mark.parametrize("factor, low, high, orig", [(8.0, 1.0, 4.0, 8192), (32.0, 1.0, 4.0, 8192)])
def test_llama3_rope_recovered_from_rope_freqs(factor, low, high, orig):
    """Llama 3.1 (factor 8) and 3.2 (factor 32) frequency factors, head_dim 128."""
    from eagle3_mlx.convert.gguf_target import _infer_llama3_rope

    base, dims = 500000.0, 128
    wl = 2 * np.pi * base ** (np.arange(0, dims, 2) / dims)
    smooth = (orig / wl - low) / (high - low)
    f = np.where(wl < orig / high, 1.0, np.where(wl > orig / low, factor, 1 / ((1 - smooth) / factor + smooth)))
    got = _infer_llama3_rope(f.astype(np.float32), base, dims, None, "x.gguf")
    assert got == {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                   "high_freq_factor": high, "original_max_position_embeddings": orig}
    assert _infer_llama3_rope(np.ones(64, np.float32), base, dims, None, "x.gguf") is None
    with pytest.raises(GGUFError, match="rope_freqs"):
        _infer_llama3_rope(np.linspace(1, 3, 64), base, dims, None, "x.gguf")
