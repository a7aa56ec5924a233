"""`eagle3-mlx bench` end to end on a tiny model, and the prompt sets."""

import json
import sys

import pytest

from eagle3_mlx import bench, prompts, testing
from eagle3_mlx.head import save_head


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    d = tmp_path_factory.mktemp("bench")
    testing.make_tiny_target(d / "target", "qwen2")
    model, _ = testing.load_tiny_target(d / "target")
    save_head(testing.make_random_head(model), d / "head")
    return d / "target", d / "head"


def _check_consistent(res):
    for r in res["prompts"]:
        for f in ("id", "category", "turn", "tokens", "target_forwards", "tau", "spec_tps", "plain_tps",
                  "speedup", "identical", "spec_decode_tokens", "spec_decode_s", "plain_decode_tokens",
                  "plain_decode_s"):
            assert f in r, f
        assert r["tau"] == pytest.approx(r["tokens"] / r["target_forwards"])
        assert r["spec_tps"] == pytest.approx(r["spec_decode_tokens"] / r["spec_decode_s"])
        assert r["plain_tps"] == pytest.approx(r["plain_decode_tokens"] / r["plain_decode_s"])
        assert r["speedup"] == pytest.approx(r["spec_tps"] / r["plain_tps"])
        assert r["tokens"] == r["spec_decode_tokens"] + 1
        assert 1.0 <= r["tau"]
        assert r["identical"] is True         # greedy fp32: lossless
    t = res["total"]
    rows = res["prompts"]
    assert t["prompts"] == len(rows)
    assert t["tokens"] == sum(r["tokens"] for r in rows)
    assert t["target_forwards"] == sum(r["target_forwards"] for r in rows)
    assert t["tau"] == pytest.approx(t["tokens"] / t["target_forwards"])
    assert t["spec_tps"] == pytest.approx(sum(r["spec_decode_tokens"] for r in rows)
                                          / sum(r["spec_decode_s"] for r in rows))
    assert t["plain_tps"] == pytest.approx(sum(r["plain_decode_tokens"] for r in rows)
                                           / sum(r["plain_decode_s"] for r in rows))
    assert t["speedup"] == pytest.approx(t["spec_tps"] / t["plain_tps"])
    assert t["identical"] == t["compared"] == len(rows)
    cats = res["categories"]
    assert set(cats) == {r["category"] for r in rows}
    assert sum(c["prompts"] for c in cats.values()) == len(rows)
    for c in cats.values():
        assert c["speedup"] == pytest.approx(c["spec_tps"] / c["plain_tps"])
    for f in ("platform", "cpu", "backend", "mlx", "mlx_lm", "openblas_preloaded"):
        assert f in res["machine"]


def test_bench_tiny_model_jsonl_end_to_end(pair, tmp_path, capsys):
    target, head = pair
    pf = tmp_path / "p.jsonl"
    pf.write_text("\n".join(json.dumps(o) for o in [
        {"prompt": "Write a short story about a robot.", "category": "writing"},
        {"turns": ["def fibonacci(n):"], "category": "coding", "id": "fib"},
        {"prompt": "What is the capital of France?", "category": "writing"},
    ]) + "\n")
    out = tmp_path / "r.json"
    rc = bench.main(["--model", str(target), "--draft", str(head), "--prompts", str(pf), "--max-tokens", "10",
                     "--tree", "2,2,6", "--json", str(out), "--no-progress", "--dtype", "float32"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert len(res["prompts"]) == 3
    assert res["config"]["tree"] == {"top_k": 2, "depth": 2, "total_tokens": 6, "source": "fixed"}
    assert {r["category"] for r in res["prompts"]} == {"writing", "coding"}
    assert all(r["tokens"] <= 10 for r in res["prompts"])
    _check_consistent(res)
    text = capsys.readouterr().out
    assert "overall" in text and "speedup" in text and "machine" in text and "backend" in text
    # a random head accepts ~nothing and the output says so
    assert any("accepts almost nothing" in n for n in res["notes"])


def test_bench_mtbench_two_turns_auto_tree_and_grid(pair, tmp_path, monkeypatch):
    target, head = pair
    monkeypatch.setenv("EAGLE3_MLX_HOME", str(tmp_path / "home"))
    out = tmp_path / "r.json"
    rc = bench.main(["--model", str(target), "--draft", str(head), "--limit", "2", "--turns", "2",
                     "--max-tokens", "6", "--json", str(out), "--no-progress", "--quiet",
                     "--quick-calibration", "--grid", "--grid-trees", "1,1,3 2,2,6"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert [(r["id"], r["turn"]) for r in res["prompts"]] == [("81", 1), ("81", 2), ("91", 1), ("91", 2)]
    assert res["config"]["tree"]["source"] == "auto"
    assert res["calibration"]["choice"]["total_tokens"] == res["config"]["tree"]["total_tokens"]
    assert list((tmp_path / "home" / "calibration").glob("*.json"))
    _check_consistent(res)
    trees = [g["tree"] for g in res["grid"]]
    assert "1,1,3" in trees and "2,2,6" in trees
    assert res["grid_best"] in trees
    assert 0 < res["chosen_vs_best"] <= 1.0 + 1e-9


def test_plot_without_matplotlib_is_a_clear_error(pair, monkeypatch, capsys):
    target, head = pair
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rc = bench.main(["--model", str(target), "--draft", str(head), "--plot", "x.png", "--limit", "1"])
    assert rc == 2
    assert "matplotlib" in capsys.readouterr().err


def test_bad_tree_and_prompt_file(pair, tmp_path, capsys):
    target, head = pair
    assert bench.main(["--model", str(target), "--draft", str(head), "--tree", "4,4"]) == 2
    assert "--tree" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no prompt field"}\n')
    assert bench.main(["--model", str(target), "--draft", str(head), "--prompts", str(bad)]) == 2
    assert "prompt" in capsys.readouterr().err


def test_mtbench_prompt_set():
    ps = prompts.load_prompts("mtbench")
    assert len(ps) == 80
    cats = {p.category for p in ps}
    assert cats == {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
    assert all(len(p.turns) == 2 for p in ps)
    # --limit takes categories round-robin
    eight = prompts.load_prompts("mtbench", limit=8)
    assert {p.category for p in eight} == cats
    assert [p.category for p in prompts.load_prompts("mtbench", categories=["math"])] == ["math"] * 10
    assert len(prompts.calibration_prompts(4)) == 4


def test_jsonl_prompt_formats(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"prompt": "a"}\n\n# comment\n"b"\n{"turns": ["c", "d"], "category": "k", "question_id": 7}\n')
    ps = prompts.load_prompts(str(f))
    assert [(p.turns, p.category) for p in ps] == [(["a"], "all"), (["b"], "all"), (["c", "d"], "k")]
    assert ps[2].id == "7"
    f.write_text('{"prompt": ""}\n')
    with pytest.raises(prompts.PromptSetError):
        prompts.load_prompts(str(f))
    with pytest.raises(prompts.PromptSetError):
        prompts.load_prompts(str(tmp_path / "missing.jsonl"))


def test_summary_math():
    rows = [
        {"category": "a", "tokens": 11, "target_forwards": 5, "spec_decode_tokens": 10, "spec_decode_s": 1.0,
         "plain_decode_tokens": 10, "plain_decode_s": 2.0, "identical": True, "speedup": 2.0,
         "draft_ms": 1, "verify_ms": 2},
        {"category": "b", "tokens": 21, "target_forwards": 15, "spec_decode_tokens": 20, "spec_decode_s": 4.0,
         "plain_decode_tokens": 20, "plain_decode_s": 2.0, "identical": False, "speedup": 0.5,
         "draft_ms": 1, "verify_ms": 2},
    ]
    s = bench.summarize(rows)
    assert s["tau"] == pytest.approx(32 / 20)
    assert s["spec_tps"] == pytest.approx(30 / 5.0)
    assert s["plain_tps"] == pytest.approx(30 / 4.0)
    assert s["speedup"] == pytest.approx(0.8)
    assert s["identical"] == 1 and s["compared"] == 2
    assert bench.first_mismatch([1, 2, 3], [1, 2, 4]) == 2
    assert bench.first_mismatch([1, 2], [1, 2, 3]) == 2
    assert bench.first_mismatch([1, 2], [1, 2]) is None


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    cats = {"math": {"speedup": 1.5, "tau": 2.5}, "coding": {"speedup": 2.1, "tau": 3.2}}
    out = tmp_path / "p.png"
    bench.write_plot(out, cats, {"speedup": 1.8, "tau": 2.9}, "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
