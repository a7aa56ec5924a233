"""Tiny offline models and tokenizers for tests, examples and micro-benchmarks.

Everything here is built locally (no hub access): a tokenizer trained on a fixed
corpus, a random mlx-lm target of a chosen family, a random EAGLE-3 head sized
for it, an *oracle* head that mostly drafts what such a target will say
(:func:`make_oracle_head`), and :func:`build_tiny_demo`, a target + head pair
for trying the chat:

    python -m eagle3_mlx.testing DIR      # writes DIR/target and DIR/head

The demo's target is random (its answers are gibberish); its head is random
too, but its draft vocabulary is restricted to the tokens the target emits most
often, so a fair share of drafts are accepted and the chat shows multi-token
steps. Needs the test extras (``tokenizers``, ``transformers``).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .head import Eagle3Head
from .target import TargetModel

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "speculative decoding drafts a tree of tokens and verifies them in one pass",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n    print(i * i)\n",
    "Hello! How can I help you today? Write a poem about the sea.",
    "MLX runs on Apple silicon, CUDA and the CPU with unified memory.",
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20",
    "import numpy as np\nx = np.zeros((3, 4))\n",
] * 4

PROMPTS = [
    "Write a short story about a robot.",
    "What is the capital of France?",
    "def fibonacci(n):",
    "Explain speculative decoding in one sentence.",
    "List three colors:",
    "print('hello world')",
    "The quick brown fox",
    "1 2 3 4 5",
    "How do I sort a list in Python?",
    "Translate to French: good morning",
    "A haiku about autumn:",
    "import numpy as np",
    "Why is the sky blue?",
    "for i in range(10):",
    "Name a prime number.",
    "Summarize: MLX runs on Apple silicon.",
    "What does a compiler do?",
    "Give me a recipe for tea.",
    "class Stack:",
    "The lazy dog sleeps",
    "Count down from ten:",
    "return a + b",
]


def make_tokenizer(path, vocab_size: int = 384, kind: str = "bpe"):
    """Save a HF fast tokenizer with a ChatML template into ``path``.

    ``kind="bpe"``: byte-level BPE trained on a fixed corpus (``vocab_size`` >= 260).
    ``kind="word"``: a word-level vocabulary of exactly ``vocab_size`` tokens
    (``w0 .. w{n-4}`` plus the specials), for tests that need a tiny vocabulary.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_CORPUS, trainer)
    elif kind == "word":
        words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
        vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS + words)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|endoftext|>"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(path))
    return fast


_GDN = dict(linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
            linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=4,
            tie_word_embeddings=False)

FAMILY_DEFAULTS = {
    "llama": dict(model_type="llama", rope_theta=10000.0),
    "mistral": dict(model_type="mistral", rope_theta=1000000.0),
    # qwen2 derives head_dim = hidden / heads; 2 heads keep it at 32 (KV quantization groups)
    "qwen2": dict(model_type="qwen2", rope_theta=1000000.0, tie_word_embeddings=True,
                  num_attention_heads=2, num_key_value_heads=1),
    "qwen3": dict(model_type="qwen3", rope_theta=1000000.0, tie_word_embeddings=True),
    "gemma3": dict(
        model_type="gemma3_text",
        rope_theta=1000000.0,
        rope_local_base_freq=10000.0,
        query_pre_attn_scalar=16,
        sliding_window=12,
        sliding_window_pattern=2,
    ),
    # Mixture of experts: 8 experts, 2 per token, every layer sparse.
    "qwen3_moe": dict(model_type="qwen3_moe", rope_theta=1000000.0, tie_word_embeddings=False,
                      num_experts=8, num_experts_per_tok=2, decoder_sparse_step=1,
                      mlp_only_layers=[], moe_intermediate_size=32, norm_topk_prob=True),
    # gpt-oss: attention sinks, YaRN RoPE (mscale != 1), alternating sliding /
    # full layers. The window is shrunk from 128 so short prompts pass it.
    "gpt_oss": dict(model_type="gpt_oss", rope_theta=150000.0, num_hidden_layers=4,
                    num_local_experts=8, num_experts_per_tok=2, intermediate_size=32,
                    sliding_window=16,
                    rope_scaling=dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0,
                                      original_max_position_embeddings=4096)),
    # Gated DeltaNet hybrids: three linear-attention layers per full-attention
    # layer (4 layers: 3 linear, 1 attention), partial RoPE, gated attention.
    "qwen3_5": dict(model_type="qwen3_5", num_hidden_layers=4, **_GDN),
    "qwen3_5_moe": dict(model_type="qwen3_5_moe", num_hidden_layers=4, num_experts=8,
                        num_experts_per_tok=2, moe_intermediate_size=32,
                        shared_expert_intermediate_size=32, **_GDN),
    "qwen3_next": dict(model_type="qwen3_next", num_hidden_layers=4, rope_theta=100000.0,
                       partial_rotary_factor=0.25, num_experts=8, num_experts_per_tok=2,
                       decoder_sparse_step=1, mlp_only_layers=[], moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, norm_topk_prob=True,
                       **_GDN),
    # Gemma 4: per-layer input embeddings, the last 2 of 6 layers share KV,
    # sliding (window 8) and full layers, final logit soft-capping.
    "gemma4": dict(model_type="gemma4_text", num_hidden_layers=6, head_dim=16, global_head_dim=32,
                   num_key_value_heads=1, num_kv_shared_layers=2, hidden_size_per_layer_input=8,
                   vocab_size_per_layer_input=384, sliding_window=8, sliding_window_pattern=3,
                   final_logit_softcapping=30.0, tie_word_embeddings=True),
    "gemma4_moe": dict(model_type="gemma4_text", num_hidden_layers=6, head_dim=16,
                       global_head_dim=32, num_key_value_heads=1, num_kv_shared_layers=2,
                       hidden_size_per_layer_input=8, vocab_size_per_layer_input=384,
                       sliding_window=8, sliding_window_pattern=3, final_logit_softcapping=30.0,
                       tie_word_embeddings=True, enable_moe_block=True, num_experts=4,
                       top_k_experts=2, moe_intermediate_size=32),
}


def tiny_target_config(family: str = "llama", vocab_size: int = 384, **overrides) -> dict:
    cfg = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        vocab_size=vocab_size,
        rms_norm_eps=1e-5,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    cfg.update(FAMILY_DEFAULTS[family])
    cfg.update(overrides)
    return cfg


def _init_weights(model: nn.Module, seed: int, scale: float, layer_scale: float | None = None):
    """Deterministic random weights with a larger spread than mlx's defaults so
    tiny random models have peaked (non-uniform) next-token distributions."""
    mx.random.seed(seed)
    params = tree_flatten(model.parameters())
    new = []
    for name, p in params:
        if name.endswith("norm.weight") or "layernorm" in name or name.endswith("layer_scalar"):
            # gemma3 stores RMSNorm weights as offsets from 1; gemma4 does not
            gemma3 = "gemma3" in type(model).__module__
            new.append((name, mx.zeros_like(p) if gemma3 else mx.ones_like(p)))
        elif name.endswith(".sinks"):
            # Attention-sink logits of order one, so the sink takes a real share
            # of each attention row (gpt_oss) and tests see it.
            new.append((name, mx.random.normal(p.shape)))
        else:
            s = layer_scale if (layer_scale is not None and ".layers." in f".{name}") else scale
            new.append((name, mx.random.normal(p.shape) * s))
    model.load_weights(new)
    mx.eval(model.parameters())


def make_tiny_target(path, family: str = "llama", *, seed: int = 0, tokenizer_kind: str = "bpe",
                     vocab_size: int = 384, weight_scale: float = 0.08,
                     layer_scale: float | None = None, **overrides):
    """Write a random tiny mlx-lm model plus tokenizer to ``path``; returns path.

    ``layer_scale`` (default: ``weight_scale``) sets the spread of the decoder
    layers' weights; a small value makes the next token depend mostly on the
    current one, which oracle heads in tests can then predict."""
    from mlx_lm.utils import _get_classes, save_config

    path = Path(path)
    make_tokenizer(path, vocab_size=vocab_size, kind=tokenizer_kind)
    cfg = tiny_target_config(family, vocab_size=vocab_size, **overrides)
    model_cls, args_cls = _get_classes(cfg)
    model = model_cls(args_cls.from_dict(cfg))
    _init_weights(model, seed, weight_scale, layer_scale)
    weights = dict(tree_flatten(model.parameters()))
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    cfg["eos_token_id"] = 2  # <|im_end|>
    save_config(cfg, path / "config.json")
    return path


def load_tiny_target(path):
    from mlx_lm import load

    return load(str(path))


def make_random_head(target_model, *, seed: int = 1, draft_vocab_size: int | None = None,
                     hidden_size: int | None = None, intermediate_size: int = 128,
                     weight_scale: float = 0.08, **cfg_overrides):
    """A random EAGLE-3 head shaped for ``target_model`` (an mlx-lm model)."""
    import numpy as np

    from .head import Eagle3Head, HeadConfig, d2t_from_used
    from .target import TargetModel

    t = TargetModel(target_model) if not isinstance(target_model, TargetModel) else target_model
    V = t.vocab_size
    Vd = draft_vocab_size or V
    H = hidden_size or t.hidden_size
    cfg = HeadConfig(
        hidden_size=H,
        intermediate_size=intermediate_size,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=H // 4,
        vocab_size=V,
        draft_vocab_size=Vd,
        target_hidden_size=t.hidden_size,
        has_embedding=H != t.hidden_size,
        aux_layer_ids=list(t.aux_layer_ids),
        **cfg_overrides,
    )
    head = Eagle3Head(cfg)
    mx.random.seed(seed)
    new = []
    for name, p in tree_flatten(head.parameters()):
        if name == "d2t":
            continue
        if name.endswith("norm.weight") or "layernorm" in name:
            new.append((name, mx.ones_like(p)))
        else:
            new.append((name, mx.random.normal(p.shape) * weight_scale))
    head.load_weights(new, strict=False)
    if Vd < V:
        rng = np.random.default_rng(seed)
        used = np.sort(rng.choice(V, size=Vd, replace=False))
        head.set_vocab_mapping(d2t_from_used(used))
    mx.eval(head.parameters())
    return head


class OracleHead(Eagle3Head):
    """A head made to agree with the target often: on tokens with
    ``token % every != 0`` its draft is forced to the target's context-free
    next-token guess; elsewhere it drafts from its random weights."""

    def __call__(self, embeddings, hidden, cache=None, mask=None, positions=None, from_target=None,
                 logits_rows=None):
        out, logits = super().__call__(embeddings, hidden, cache, mask, positions, from_target,
                                       logits_rows)
        if logits_rows is not None:
            embeddings = embeddings[:, logits_rows]
        E = self._table
        d = ((embeddings[..., None, :] - E) ** 2).sum(-1)
        tok = mx.argmin(d, axis=-1)
        nxt = self._bigram[tok]
        force = (tok % self._every) != 0
        onehot = (mx.arange(logits.shape[-1]) == nxt[..., None]).astype(logits.dtype) * 40.0
        return out, mx.where(force[..., None], onehot + 0.01 * logits, logits)


def make_oracle_head(model, every=8, seed=3, **head_options):
    """A random head for ``model`` (``head_options`` as for
    :func:`make_random_head`) turned into an :class:`OracleHead` (built on a
    target with weak decoder layers, its drafts are mostly accepted)."""
    t = TargetModel(model)
    base = make_random_head(model, seed=seed, **head_options)
    head = OracleHead(base.config)
    head.update(base.parameters())
    V = t.vocab_size
    logits, _ = t.forward(mx.arange(V)[:, None], None)
    object.__setattr__(head, "_table", t.embed_tokens(mx.arange(V)))
    object.__setattr__(head, "_bigram", mx.argmax(logits[:, -1], axis=-1))
    object.__setattr__(head, "_every", every)
    mx.eval(head._table, head._bigram)
    return head


def to_float32(model: nn.Module):
    model.set_dtype(mx.float32)
    return model


def write_json(path, obj):
    Path(path).write_text(json.dumps(obj, indent=2))


PROBE_PROMPTS = ["hello there", "What is MLX?", "Write a poem about the sea."]


def build_tiny_demo(root, *, draft_vocab: int = 4, seed: int = 0,
                    reuse: bool = False) -> tuple[Path, Path]:
    """Write ``root/target`` and ``root/head``; returns both paths.

    ``reuse``: return existing directories written by an earlier call as they are."""
    from .engine import Engine
    from .head import d2t_from_used, save_head
    from .runs import collect

    root = Path(root)
    target_dir, head_dir = root / "target", root / "head"
    if reuse and (target_dir / "config.json").is_file() and (head_dir / "config.json").is_file():
        return target_dir, head_dir
    make_tiny_target(target_dir, seed=seed)
    model, tok = load_tiny_target(target_dir)
    probe = Engine(model, tok, make_random_head(model, seed=seed + 1))
    counts: Counter = Counter()
    for q in PROBE_PROMPTS:
        msgs = [{"role": "user", "content": q}]
        counts.update(collect(probe.stream_generate(msgs, max_tokens=48, speculative=False)).tokens)
    eos = set(getattr(probe.tokenizer, "eos_token_ids", ()) or ())
    frequent = [t for t, _ in counts.most_common() if t not in eos]
    vocab = int(probe.target.vocab_size)
    used = list(frequent[:draft_vocab])
    filler = iter(t for t in range(vocab) if t not in used)
    while len(used) < draft_vocab:
        used.append(next(filler))
    head = make_random_head(model, seed=seed + 1, draft_vocab_size=draft_vocab)
    head.set_vocab_mapping(d2t_from_used(sorted(used)))
    save_head(head, head_dir)
    return target_dir, head_dir


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m eagle3_mlx.testing DIR   (writes DIR/target and DIR/head)")
        return 2
    target, head = build_tiny_demo(argv[0])
    print(f"eagle3-mlx chat --model {target} --draft {head}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
