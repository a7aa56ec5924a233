"""The Hugging Face fast tokenizer (with chat template) rebuilt from a GGUF's
``tokenizer.ggml.*`` metadata: byte-level BPE (``gpt2``) or SentencePiece BPE
(``llama``)."""

from __future__ import annotations

import warnings

from eagle3_mlx.convert.errors import GGUFError

# tokenizer.ggml.token_type values (gguf.TokenType)
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6


# Pre-tokenizer split patterns, keyed by tokenizer.ggml.pre.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_SPLITS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
    "gpt-2": None,  # the GPT-2 pattern built into the ByteLevel pre-tokenizer
    "default": None,
}
_NFC_PRES = {"qwen2", "deepseek-r1-qwen"}


def _tok_meta(meta, key, default=None):
    return meta.get(f"tokenizer.ggml.{key}", default)


def _byte_level_bpe(meta, tokens, path):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    merges_raw = _tok_meta(meta, "merges")
    if merges_raw is None:
        raise GGUFError(path, "gpt2-style tokenizer without tokenizer.ggml.merges")
    merges = []
    for m in merges_raw:
        a, sep, b = m.partition(" ")
        if not sep:
            raise GGUFError(path, f"malformed BPE merge {m!r}")
        merges.append((a, b))
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                   ignore_merges=False)
    )
    pre = _tok_meta(meta, "pre", "default")
    if pre not in _PRE_SPLITS:
        warnings.warn(
            f"{path}: unknown tokenizer.ggml.pre {pre!r}; using the GPT-2 pre-tokenizer",
            stacklevel=3,
        )
    split = _PRE_SPLITS.get(pre)
    if split is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre in _NFC_PRES:
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    return tok


def _spm_merges(tokens, scores, types):
    """BPE merges equivalent to SentencePiece BPE scoring: a merge's rank is the
    score of the piece it produces (higher first), ties broken by piece ids."""
    index = {}
    for i, t in enumerate(tokens):
        if types[i] in (_NORMAL, _USER_DEFINED):
            index.setdefault(t, i)
    merges = []
    for piece, pid in index.items():
        if types[pid] != _NORMAL or len(piece) < 2:
            continue
        local = []
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            li, ri = index.get(left), index.get(right)
            if li is not None and ri is not None:
                local.append((li, ri, left, right))
        local.sort()
        score = float(scores[pid]) if scores is not None else -float(pid)
        merges.extend((-score, pid, n, left, right) for n, (_, _, left, right) in enumerate(local))
    merges.sort()
    return [(left, right) for *_, left, right in merges]


def _spm_bpe(meta, tokens, types, path):
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores = _tok_meta(meta, "scores")
    unk_id = _tok_meta(meta, "unknown_token_id")
    if unk_id is None:
        unk_id = next((i for i, t in enumerate(types) if t == _UNKNOWN), None)
    vocab = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    merges = _spm_merges(tokens, scores, types)
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    tok = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    # llama.cpp semantics: with add_space_prefix, every text fragment that starts
    # the input or follows a special token gets a leading space (as HF's legacy
    # Llama tokenizer does through its Prepend normalizer).
    add_space = _tok_meta(meta, "add_space_prefix", True)
    steps = [normalizers.Replace(" ", "\u2581")]
    if add_space:
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def build_tokenizer(meta: dict, path="<gguf>"):
    """Hugging Face fast tokenizer (``PreTrainedTokenizerFast``) from GGUF metadata."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    model = _tok_meta(meta, "model")
    tokens = _tok_meta(meta, "tokens")
    if model is None or tokens is None:
        raise GGUFError(path, "no tokenizer in the GGUF metadata (tokenizer.ggml.model/tokens)")
    tokens = list(tokens)
    types = list(_tok_meta(meta, "token_type") or [_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise GGUFError(path, f"{len(tokens)} tokens but {len(types)} token types")
    if model == "gpt2":
        tok = _byte_level_bpe(meta, tokens, path)
    elif model == "llama":
        tok = _spm_bpe(meta, tokens, types, path)
    else:
        raise GGUFError(
            path, f"tokenizer model {model!r} not supported (supported: 'gpt2' BPE, 'llama' SentencePiece)"
        )

    added = []
    for i, (t, ty) in enumerate(zip(tokens, types)):
        if ty == _CONTROL:
            added.append(AddedToken(t, special=True, normalized=False))
        elif ty == _USER_DEFINED:
            added.append(AddedToken(t, special=False, normalized=False))
    if added:
        tok.add_tokens(added)

    def tok_str(key):
        i = _tok_meta(meta, key)
        if i is None or not (0 <= int(i) < len(tokens)):
            return None
        return tokens[int(i)]

    kwargs = dict(
        tokenizer_object=tok,
        bos_token=tok_str("bos_token_id"),
        eos_token=tok_str("eos_token_id"),
        unk_token=tok_str("unknown_token_id") if model == "llama" else None,
        pad_token=tok_str("padding_token_id"),
        add_bos_token=bool(_tok_meta(meta, "add_bos_token", model == "llama")),
        add_eos_token=bool(_tok_meta(meta, "add_eos_token", False)),
        clean_up_tokenization_spaces=False,
    )
    arch = meta.get("general.architecture")
    ctx = meta.get(f"{arch}.context_length")
    if ctx:
        kwargs["model_max_length"] = int(ctx)
    template = meta.get("tokenizer.chat_template")
    named = {
        k[len("tokenizer.chat_template."):]: v
        for k, v in meta.items()
        if k.startswith("tokenizer.chat_template.") and isinstance(v, str)
    }
    if named:
        template = dict(named, **({"default": template} if template else {}))
    if template:
        kwargs["chat_template"] = template
    else:
        warnings.warn(f"{path}: the GGUF carries no chat template", stacklevel=2)
    hf = PreTrainedTokenizerFast(**{k: v for k, v in kwargs.items() if v is not None})
    return hf


def _eos_ids(meta) -> list:
    ids = []
    for key in ("eos_token_id", "eot_token_id", "eom_token_id"):
        v = _tok_meta(meta, key)
        if v is not None and int(v) not in ids:
            ids.append(int(v))
    return ids
