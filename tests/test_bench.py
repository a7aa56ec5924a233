"""`eagle3-mlx bench` end to end on a tiny model, and the prompt sets."""

import json
import sys

import pytest

from eagle3_mlx import bench, bench_report, prompts, testing
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
    bench_report.write_plot(out, cats, {"speedup": 1.8, "tau": 2.9}, "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_of_a_saved_multi_source_run_has_a_bar_per_source(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    def summary(tau, speedup):
        return {"tau": tau, "speedup": speedup}

    result = {
        "config": {"model": "/m/target", "draft": "/h/head/", "draft_source": "hybrid,eagle,ngram",
                   "tree": {"top_k": 1, "depth": 1, "total_tokens": 3, "source": "auto"}},
        "machine": {"backend": "cpu", "device": "AMD EPYC", "mlx": "0.32.4"},
        "categories": {"bug": summary(4.0, 2.6)}, "total": summary(6.8, 4.0),
        "sources": {src: {"summary": summary(t, x), "categories": {"bug": summary(t, x), "rename": summary(t, x)}}
                    for src, t, x in (("hybrid", 6.8, 4.0), ("eagle", 1.4, 1.0), ("ngram", 5.6, 3.9))},
    }
    bars = []
    real_bar = matplotlib.axes.Axes.bar
    monkeypatch.setattr(matplotlib.axes.Axes, "bar",
                        lambda self, x, h, *a, **kw: bars.append((kw.get("label"), list(h)))
                        or real_bar(self, x, h, *a, **kw))
    out = tmp_path / "p.png"
    bench_report.plot_result(result, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # two panels x three sources, each over bug, rename and overall
    assert [b[0] for b in bars] == ["hybrid", "eagle", "ngram"] * 2
    assert bars[1][1] == [1.0, 1.0, 1.0] and bars[3][1] == [6.8, 6.8, 6.8]
    title = bench_report.plot_title(result)
    assert "target + head" in title and "tree 1,1,3 (auto)" in title and "hybrid / eagle / ngram" in title


def test_plot_of_a_grid_run_has_a_bar_per_tree_and_source(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    def entry(label, tau, speedup):
        return {"tree": label, "summary": {"tau": tau, "speedup": speedup}}

    result = {
        "config": {"model": "/m/target", "draft": "/h/head", "draft_source": "hybrid,eagle",
                   "tree": {"top_k": 1, "depth": 1, "total_tokens": 3, "source": "auto"}},
        "machine": {"backend": "cpu", "device": "AMD EPYC", "mlx": "0.32.4"},
        "categories": {"coding": {"tau": 1.7, "speedup": 1.4}}, "total": {"tau": 1.7, "speedup": 1.4},
        # bench lists the chosen tree first, then the grid in the order given
        "grid": [entry("1,1,3 hybrid", 1.7, 1.4), entry("1,1,3 eagle", 1.5, 1.3),
                 entry("8,6,48 hybrid", 2.4, 0.7), entry("8,6,48 eagle", 2.3, 0.6),
                 entry("2,1,4 hybrid", 1.9, 1.36), entry("2,1,4 eagle", 1.7, 1.28)],
    }
    bars, ticks = [], []
    real_bar, real_ticks = matplotlib.axes.Axes.bar, matplotlib.axes.Axes.set_xticks
    monkeypatch.setattr(matplotlib.axes.Axes, "bar",
                        lambda self, x, h, *a, **kw: bars.append((kw.get("label"), list(h)))
                        or real_bar(self, x, h, *a, **kw))
    monkeypatch.setattr(matplotlib.axes.Axes, "set_xticks",
                        lambda self, pos, labels=None, **kw: ticks.append(list(labels or []))
                        or real_ticks(self, pos, labels, **kw))
    out = tmp_path / "grid.png"
    bench_report.plot_result(result, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # trees in order of size, one bar per source on each panel; the auto tree starred
    assert bars == [("hybrid", [1.4, 1.36, 0.7]), ("eagle", [1.3, 1.28, 0.6]),
                    ("hybrid", [1.7, 1.9, 2.4]), ("eagle", [1.5, 1.7, 2.3])]
    assert ticks[-1] == ["1,1,3 *", "2,1,4", "8,6,48"]


def test_interrupted_run_resumes_to_the_same_result(pair, tmp_path, monkeypatch, capsys):
    target, head = pair
    pf = tmp_path / "p.jsonl"
    pf.write_text("\n".join(json.dumps(o) for o in [
        {"turns": ["Write a haiku about rain.", "Now one about snow."], "category": "writing", "id": "a"},
        {"turns": ["def fibonacci(n):", "Add a docstring."], "category": "coding", "id": "b"},
    ]) + "\n")
    argv = ["--model", str(target), "--draft", str(head), "--prompts", str(pf), "--turns", "2",
            "--max-tokens", "8", "--tree", "2,2,6", "--no-progress", "--no-warmup", "--dtype", "float32"]
    ref = tmp_path / "ref.json"
    assert bench.main(argv + ["--json", str(ref)]) == 0
    ref_rows = json.loads(ref.read_text())["prompts"]

    # Kill the run in the plain decode of its 4th turn: 3 turns are finished.
    calls = []
    real_plain = bench.run_plain

    def plain(*a, **k):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real_plain(*a, **k)

    out = tmp_path / "r.json"
    side = bench.sidecar_path(out)
    monkeypatch.setattr(bench, "run_plain", plain)
    assert bench.main(argv + ["--json", str(out)]) == 130
    assert not out.exists()
    lines = [json.loads(x) for x in side.read_text().splitlines()]
    assert lines[0]["settings"]["max_tokens"] == 8
    assert [(r["row"]["id"], r["turn"], r["tree"]) for r in lines[1:]] == [("a", 1, "2,2,6"), ("a", 2, "2,2,6"),
                                                                           ("b", 1, "2,2,6")]
    assert all(r["mode"] == {"tree": "fixed", "grid": False} for r in lines[1:])

    # Resume runs only the last turn (whose history needs turn 1's answer from the sidecar);
    # the progress bar starts at the 3 finished turns x (plain + 1 tree).
    calls.clear()
    monkeypatch.setattr(bench, "run_plain", lambda *a, **k: calls.append(1) or real_plain(*a, **k))
    capsys.readouterr()
    resumed = [a for a in argv if a != "--no-progress"]
    assert bench.main(resumed + ["--json", str(out), "--resume"]) == 0
    assert len(calls) == 1
    assert "6/8" in capsys.readouterr().err
    res = json.loads(out.read_text())
    rows = res["prompts"]
    assert [(r["id"], r["turn"]) for r in rows] == [("a", 1), ("a", 2), ("b", 1), ("b", 2)]
    assert rows[:3] == [r["row"] for r in lines[1:]]          # old rows reported as they were
    assert [set(r) for r in rows] == [set(r) for r in ref_rows]
    # deterministic fields (greedy fp32) match the uninterrupted run, the resumed 2nd turn included
    det = ("id", "turn", "prompt_tokens", "tokens", "target_forwards", "plain_tokens", "identical")
    assert [[r[f] for f in det] for r in rows] == [[r[f] for f in det] for r in ref_rows]
    _check_consistent(res)                                     # totals and categories from all 4 rows
    assert len(side.read_text().splitlines()) == 1 + 4         # sidecar kept, one line per row


def test_resume_with_other_settings_is_refused(pair, tmp_path, capsys):
    target, head = pair
    out = tmp_path / "r.json"
    argv = ["--model", str(target), "--draft", str(head), "--limit", "1", "--tree", "1,1,3", "--no-progress",
            "--no-warmup", "--quiet", "--dtype", "float32", "--json", str(out)]
    assert bench.main(argv + ["--max-tokens", "4"]) == 0
    side = bench.sidecar_path(out)
    before, result = side.read_bytes(), out.read_bytes()
    capsys.readouterr()
    assert bench.main(argv + ["--max-tokens", "5", "--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--max-tokens 4" in err and "5" in err
    assert side.read_bytes() == before and out.read_bytes() == result
    assert bench.main(["--model", str(target), "--draft", str(head), "--resume"]) == 2
    assert "--json" in capsys.readouterr().err
    # the same settings resume a finished run without running anything
    assert bench.main(argv + ["--max-tokens", "4", "--resume"]) == 0
    assert json.loads(out.read_text())["prompts"] == json.loads(result)["prompts"]


def test_resume_checks_the_seed_only_when_sampling():
    base = dict(model="m", draft="d", dtype="float32", prompts="mtbench", turns=1, max_tokens=8,
                system=None)
    greedy = lambda seed: dict(base, temp=0.0, seed=seed)  # noqa: E731
    sampled = lambda seed: dict(base, temp=0.7, seed=seed)  # noqa: E731
    assert bench.settings_mismatch(greedy(0), greedy(1)) == []
    assert bench.settings_mismatch(sampled(0), sampled(0)) == []
    diff = bench.settings_mismatch(sampled(0), sampled(1))
    assert len(diff) == 1 and diff[0].startswith("--seed 0")
    assert [d.split()[0] for d in bench.settings_mismatch(greedy(0), sampled(1))] == ["--temp", "--seed"]
