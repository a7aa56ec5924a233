"""Greedy losslessness with the 2026 head kinds on a tiny fp32 target: an
EAGLE-3.1 head (fc_norm, normed feedback) and a Qwen3-style head (q/k norms,
attention bias), both with a draft sliding window short enough to bite."""

import pytest

from eagle3_mlx.engine import Engine
from eagle3_mlx.testing import PROMPTS, make_oracle_head
from test_engine_lossless import reference_greedy

N_PROMPTS, N_TOKENS = 5, 40
HEADS = {
    "eagle3.1": dict(fc_norm=True, norm_output=True, sliding_window=8),
    "qwen3-style": dict(qk_norm=True, attention_bias=True, sliding_window=6),
}


@pytest.mark.parametrize("kind", list(HEADS))
def test_greedy_equals_target(kind, tiny):
    model, tok = tiny("llama")
    head = make_oracle_head(model, **HEADS[kind])
    assert head.config.uses_2026_features()
    refs = [reference_greedy(model, tok.encode(p), N_TOKENS) for p in PROMPTS[:N_PROMPTS]]
    taus = []
    for top_k, depth, total in [(1, 5, 7), (4, 4, 16)]:
        eng = Engine(model, tok, head, top_k=top_k, depth=depth, total_tokens=total, draft_source="eagle")
        eng.tokenizer.eos_token_ids = set()
        steps = tokens = 0
        for p, ref in zip(PROMPTS[:N_PROMPTS], refs):
            eng.reset()
            rs = list(eng.stream_generate(tok.encode(p), max_tokens=N_TOKENS))
            assert [r.token for r in rs] == ref, f"{kind} tree {(top_k, depth, total)} prompt {p!r}"
            steps += rs[-1].steps
            tokens += rs[-1].generation_tokens
        taus.append(tokens / steps)
    print(f"\n{kind}: tau " + ", ".join(f"{t:.2f}" for t in taus))
    assert max(taus) > 2.0  # long acceptances happened: compaction past the window is exercised
