"""Public API, prompt-cache reuse, stop conditions and bad input."""

import mlx.core as mx
import pytest
from mlx_lm import generate as mlx_generate

import eagle3_mlx
from eagle3_mlx import ContextLimitError, Engine, HeadError
from eagle3_mlx.cli import main as cli_main
from eagle3_mlx.head import save_head
from eagle3_mlx.testing import make_random_head, make_tiny_target


@pytest.fixture(scope="module")
def pair(tiny, oracle_head):
    model, tok = tiny("llama")
    return model, tok, oracle_head("llama")


def test_generate_matches_mlx_lm_text(pair):
    model, tok, head = pair
    eng = Engine(model, tok, head, top_k=3, depth=3, total_tokens=10)
    prompt = "Write a short story about a robot."
    ours = eagle3_mlx.generate(eng, prompt, max_tokens=40)
    ref = mlx_generate(model, tok, prompt, max_tokens=40)
    assert ours == ref
    plain = eagle3_mlx.generate(eng, prompt, max_tokens=40, speculative=False)
    assert plain == ref


def test_stream_fields_and_stats(pair):
    model, tok, head = pair
    eng = Engine(model, tok, head, top_k=2, depth=4, total_tokens=8)
    rs = list(eagle3_mlx.stream_generate(eng, "1 2 3 4 5", max_tokens=30))
    last = rs[-1]
    assert last.generation_tokens == len(rs)
    assert last.finish_reason in ("length", "stop")
    assert last.tokens_per_step == pytest.approx(len(rs) / last.steps)
    # tokens of one step: step_tokens of the step equals how many responses share it
    by_step = {}
    for r in rs:
        by_step.setdefault(r.step_index, []).append(r)
    for group in by_step.values():
        assert group[0].new_step and group[0].step_tokens >= len(group)
        assert [g.from_draft for g in group[:-1]] == [True] * (len(group) - 1) or len(group) == 1
    assert any(r.from_draft for r in rs)


def test_chat_messages_and_prompt_cache_reuse(pair):
    model, tok, head = pair
    eng = Engine(model, tok, head, top_k=2, depth=3, total_tokens=8)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    a1 = eng.generate(msgs, max_tokens=20)
    first = eng.prompt_tokens_processed
    msgs += [{"role": "assistant", "content": a1}, {"role": "user", "content": "And of Spain?"}]
    full = len(eng.encode(msgs))
    a2 = eng.generate(msgs, max_tokens=20)
    second = eng.prompt_tokens_processed - first
    assert second < full - first + 2, (second, full)  # only the new turn (plus a margin)
    fresh = Engine(model, tok, head, top_k=2, depth=3, total_tokens=8)
    assert fresh.generate(msgs, max_tokens=20) == a2


def test_stop_strings_and_eos(pair):
    model, tok, head = pair
    eng = Engine(model, tok, head)
    full = eng.generate("The quick brown fox", max_tokens=40)
    stop = full[10:13]
    out = eng.generate("The quick brown fox", max_tokens=40, stop=[stop])
    assert out == full[: full.index(stop)]
    rs = list(eng.stream_generate("The quick brown fox", max_tokens=40, stop=[stop]))
    assert rs[-1].finish_reason == "stop"


def test_context_limit(pair):
    model, tok, head = pair
    eng = Engine(model, tok, head, top_k=2, depth=3, total_tokens=8, max_context=40)
    ids = tok.encode("Write a short story about a robot.")
    rs = list(eng.stream_generate(ids, max_tokens=200))
    assert rs[-1].finish_reason == "context"
    assert len(ids) + len(rs) <= 40
    with pytest.raises(ContextLimitError, match="context limit is 40"):
        list(eng.stream_generate(list(range(3, 50)), max_tokens=5))


def test_bad_input(pair, tmp_path):
    model, tok, head = pair
    eng = Engine(model, tok, head)
    with pytest.raises(ValueError, match="prompt is empty"):
        list(eng.stream_generate("", max_tokens=5))
    assert list(eng.stream_generate("hi", max_tokens=0)) == []
    with pytest.raises(ValueError, match="max_tokens"):
        list(eng.stream_generate("hi", max_tokens=-1))
    with pytest.raises(ValueError, match="top_p"):
        list(eng.stream_generate("hi", max_tokens=3, temp=1.0, top_p=0))
    with pytest.raises(ValueError, match="repetition_penalty"):
        list(eng.stream_generate("hi", max_tokens=3, repetition_penalty=1.2))
    with pytest.raises(ValueError, match="total_tokens"):
        Engine(model, tok, head, total_tokens=1)
    with pytest.raises(ValueError, match="top_k"):
        eng.set_tree(top_k=0)
    with pytest.raises(ValueError, match="draft vocabulary size 384"):
        eng.set_tree(top_k=400)


def test_mismatched_head_is_refused(tiny, tmp_path):
    model, tok = tiny("llama")
    other = make_tiny_target(tmp_path / "wide", "llama", hidden_size=96)
    from mlx_lm import load

    wide_model, _ = load(str(other))
    head = make_random_head(wide_model)
    with pytest.raises(HeadError, match="target hidden size 96.*hidden_size is 64"):
        Engine(model, tok, head)
    head_v = make_random_head(model)
    head_v.config.vocab_size = 999
    with pytest.raises(HeadError, match="vocab_size 999 != target vocab_size 384"):
        Engine(model, tok, head_v)


def test_load_and_cli_generate(tiny_dir, tiny, tmp_path, capsys):
    model, _ = tiny("llama")
    save_head(make_random_head(model), tmp_path / "head")
    eng = eagle3_mlx.load(str(tiny_dir("llama")), str(tmp_path / "head"), top_k=2, depth=2,
                          total_tokens=5)
    assert eng.spec.num_nodes == 5
    rc = cli_main(["generate", "--model", str(tiny_dir("llama")), "--draft", str(tmp_path / "head"),
                   "--prompt", "hello", "--max-tokens", "12"])
    out = capsys.readouterr()
    assert rc == 0
    assert "tokens/step" in out.err and "tok/s" in out.err
    rc = cli_main(["generate", "--model", str(tmp_path / "nope"), "--draft", str(tmp_path / "head"),
                   "--prompt", "hello"])
    assert rc == 1
    assert "error" in capsys.readouterr().err


def test_load_takes_a_tree_like_the_cli(tiny_dir, tiny, tmp_path, monkeypatch):
    from eagle3_mlx.tuning.choose import calibrate

    monkeypatch.setenv("EAGLE3_MLX_HOME", str(tmp_path / "home"))
    model, _ = tiny("llama")
    save_head(make_random_head(model), tmp_path / "head")
    target, head = str(tiny_dir("llama")), str(tmp_path / "head")
    eng = eagle3_mlx.load(target, head, tree="3,2,7")
    assert (eng.spec.top_k, eng.spec.depth, eng.spec.num_nodes) == (3, 2, 7)
    assert eng.node_costs is None                       # no calibration cached yet
    with pytest.raises(ValueError, match="either tree= or top_k="):
        eagle3_mlx.load(target, head, tree="auto", top_k=2)
    with pytest.raises(ValueError, match="TOP_K,DEPTH,TOTAL_TOKENS"):
        eagle3_mlx.load(target, head, tree="3,2")
    # without a head the tree does not apply: nothing is calibrated
    assert eagle3_mlx.load(target, tree="auto").head is None
    assert not list((tmp_path / "home").rglob("calibration/*.json"))
    # "auto" takes the calibrated tree (cached here first) and seeds hybrid ranking with it
    cal = calibrate(eng, quick=True)
    assert len(list((tmp_path / "home").rglob("calibration/*.json"))) == 1
    auto = eagle3_mlx.load(target, head, tree="auto", log=lambda m: None)
    assert (auto.spec.top_k, auto.spec.depth, auto.spec.num_nodes) == \
        (cal.spec.top_k, cal.spec.depth, cal.spec.num_nodes)
    assert auto.node_costs is not None
    assert auto.node_costs.verify_ms == pytest.approx(cal.costs.verify_ms, abs=1e-3)   # as cached


def test_float16_head_runs_in_target_dtype(pair, tmp_path):
    """A head saved in float16 (as shipped, for size) is cast to the float32
    target's dtype when the engine is built, and the output stays lossless."""
    from mlx.utils import tree_flatten

    from eagle3_mlx.api import cast_floating
    from eagle3_mlx.head import load_head

    model, tok, _ = pair
    head = make_random_head(model, seed=3)
    cast_floating(head, "float16")
    save_head(head, tmp_path / "h16")
    h16 = load_head(tmp_path / "h16")
    assert h16.fc.weight.dtype == mx.float16
    eng = Engine(model, tok, h16, top_k=2, depth=3, total_tokens=6)
    floats = [v.dtype for _, v in tree_flatten(eng.head.parameters()) if mx.issubdtype(v.dtype, mx.floating)]
    assert floats and all(d == mx.float32 for d in floats)
    prompt = "count: 1 2 3"
    assert eagle3_mlx.generate(eng, prompt, max_tokens=20) == mlx_generate(model, tok, prompt, max_tokens=20)
