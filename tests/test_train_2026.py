"""Trainer and exporter with the 2026 head options: the fast TTT unroll equals
its definition with fc_norm, normed feedback, a Qwen3-style layer and a draft
window; both exports (official and speculators layouts) convert back to the
same head."""

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from eagle3_mlx.convert.cli import main
from eagle3_mlx.head import load_head
from eagle3_mlx.target import TargetModel
from eagle3_mlx.testing import make_random_head
from eagle3_mlx.train.export import export_official, export_speculators
from eagle3_mlx.train.trainer import head_config_for
from eagle3_mlx.train.ttt import ttt_forward, ttt_forward_reference

OPTIONS = {
    "eagle3.1": dict(fc_norm=True, norm_output=True),
    "qwen3-window": dict(qk_norm=True, sliding_window=3),
    "all": dict(fc_norm=True, norm_output=True, qk_norm=True, sliding_window=4),
}


@pytest.mark.parametrize("name", list(OPTIONS))
def test_ttt_unroll_matches_definition(name, tiny):
    model, _ = tiny("llama")
    head = make_random_head(model, seed=3, weight_scale=0.3, **OPTIONS[name])
    B, T, S = 2, 7, 4
    mx.random.seed(0)
    feats = mx.random.normal((B, T, 3 * head.config.target_hidden_size))
    emb = mx.random.normal((B, T + S, head.config.hidden_size))
    fast = list(ttt_forward(head, feats, emb, S))
    ref = ttt_forward_reference(head, feats, emb, S)
    for s in range(S):
        for a, b in zip(fast[s], ref[s]):
            np.testing.assert_allclose(np.array(a), np.array(b), rtol=2e-4, atol=2e-4)
    # the trainer's sparse path (explicit rows) computes the same unroll
    rows = mx.broadcast_to(mx.arange(T)[None], (B, T))
    sparse = list(ttt_forward(head, feats, emb, S, rows=rows, emb_rows=emb))
    for s in range(S):
        np.testing.assert_allclose(np.array(sparse[s][1]), np.array(fast[s][1]), rtol=1e-5, atol=1e-5)
    if OPTIONS[name].get("sliding_window"):
        # a head without the window differs, so the window is really applied
        plain = make_random_head(model, seed=3, weight_scale=0.3,
                                 **{k: v for k, v in OPTIONS[name].items() if k != "sliding_window"})
        other = list(ttt_forward(plain, feats, emb, S))
        assert not np.allclose(np.array(other[-1][1]), np.array(fast[-1][1]), atol=1e-4)


def test_head_config_for_takes_the_flags(tiny):
    model, _ = tiny("llama")
    cfg = head_config_for(TargetModel(model), draft_vocab_size=64, fc_norm=True, norm_output=True,
                          qwen3_layer=True, draft_window=2048)
    assert cfg.fc_norm and cfg.feedback == "normed" and cfg.qk_norm and cfg.window(0) == 2048


@pytest.mark.parametrize("name", list(OPTIONS))
def test_exports_convert_back_to_the_same_head(name, tiny, tmp_path):
    model, _ = tiny("llama")
    head = make_random_head(model, seed=5, draft_vocab_size=200, **OPTIONS[name])
    want = dict(tree_flatten(head.parameters()))
    emb = mx.random.normal((1, 9, head.config.hidden_size))
    feats = mx.random.normal((1, 9, 3 * head.config.target_hidden_size))
    ref = head(emb, feats, mask="causal", from_target=True)
    for export in (export_official, export_speculators):
        src = export(head, tmp_path / export.__name__)
        out = tmp_path / (export.__name__ + "-mlx")
        assert main([str(src), "--mlx-path", str(out)]) == 0
        back = load_head(out)
        for k in ("fc_norm", "norm_output", "feedback", "qk_norm", "sliding_window"):
            assert getattr(back.config, k) == getattr(head.config, k), (export.__name__, k)
        got = dict(tree_flatten(back.parameters()))
        assert set(got) == set(want)
        for k, v in want.items():
            assert mx.array_equal(got[k], v).item(), (export.__name__, k)
        for a, b in zip(back(emb, feats, mask="causal", from_target=True), ref):
            assert mx.array_equal(a, b).item()
