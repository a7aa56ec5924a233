"""A tiny, offline target + EAGLE-3 head pair for trying and testing the chat.

    python -m eagle3_mlx.tui.tiny_demo DIR      # writes DIR/target and DIR/head

The target is a random tiny mlx-lm model (its answers are gibberish).  The head
is random too, but its draft vocabulary is restricted to the tokens the target
emits most often, so a fair share of its drafts are accepted and the chat shows
multi-token steps.  Needs the test extras (``tokenizers``, ``transformers``).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

PROBE_PROMPTS = ["hello there", "What is MLX?", "Write a poem about the sea."]


def build_tiny_demo(root, *, draft_vocab: int = 4, seed: int = 0,
                    reuse: bool = False) -> tuple[Path, Path]:
    """Write ``root/target`` and ``root/head``; returns both paths.

    ``reuse``: return existing directories written by an earlier call as they are."""
    from eagle3_mlx.engine import Engine
    from eagle3_mlx.head import d2t_from_used, save_head
    from eagle3_mlx.testing import load_tiny_target, make_random_head, make_tiny_target

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
        counts.update(r.token for r in probe.stream_generate(msgs, max_tokens=48, speculative=False))
    eos = set(getattr(probe.tokenizer, "eos_token_ids", ()) or ())
    frequent = [t for t, _ in counts.most_common() if t not in eos and t >= 0]
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
        print(__doc__)
        return 2
    target, head = build_tiny_demo(argv[0])
    print(f"eagle3-mlx chat --model {target} --draft {head}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
