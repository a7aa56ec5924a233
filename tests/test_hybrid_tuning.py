"""Hybrid drafting as the default: per-source calibration, the online tuner's
head-only accounting, bench comparing sources against one plain run, and the
chat without a head."""

import json
import random
from types import SimpleNamespace

import pytest

from eagle3_mlx import bench
from eagle3_mlx.hybrid import NgramAcceptance
from eagle3_mlx.tree import TreeSpec
from eagle3_mlx.tuning.acceptance import AcceptanceModel
from eagle3_mlx.tuning.cache import Calibration
from eagle3_mlx.tuning.costs import CostModel
from eagle3_mlx.tuning.measure import measure_ngram_acceptance
from eagle3_mlx.tuning.tuner import OnlineTuner


def test_calibration_measures_ngram_acceptance_per_match_length():
    rng = random.Random(0)
    span = [rng.randrange(100, 200) for _ in range(40)]
    # the continuation copies a span of the prompt: long matches, accepted to the end
    copied = measure_ngram_acceptance([([1, 2] + span + [3], span[:30])], max_len=8)
    # a continuation that keeps starting like the prompt and then differs: proposals, all wrong
    fresh = measure_ngram_acceptance([([5, 6, 7] * 10, [t for k in range(10) for t in (5, 6, 300 + k)])],
                                       max_len=8)
    long_ = {n: c for n, c in copied.items() if n >= 4}
    assert long_, copied
    acc, rej = map(sum, zip(*long_.values()))
    assert acc / (acc + rej) > 0.9
    f_acc, f_rej = map(sum, zip(*fresh.values()))
    assert f_rej >= 10 and f_acc / (f_acc + f_rej) < 0.25
    # the counts are NgramAcceptance's own: replaying them gives the same rates
    a = NgramAcceptance()
    for n, (k, r) in copied.items():
        a.accepted[n], a.rejected[n] = k, r
    assert a.counts() == copied


def test_measured_prior_seeds_the_rate_and_live_counts_take_over():
    a = NgramAcceptance.from_measured({4: [900, 100], 2: [5, 95]})
    assert a.rate(4) > 0.85 and a.rate(2) < 0.2
    assert a.rate(7) == pytest.approx(NgramAcceptance().rate(7))     # unmeasured: generic prior
    for _ in range(40):                                              # this conversation disagrees
        a.update(4, (1, 2, 3), (9, 9, 9))
    assert a.rate(4) < 0.5


def test_calibration_round_trips_ngram_counts():
    cal = Calibration(key={"k": 1}, costs=CostModel({1: 10.0, 2: 11.0}, {1: (0.5, 0.3)}),
                        acceptance=AcceptanceModel.prior(), ngram={3: [10, 2]})
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.ngram == {3: [10, 2]}


def _step(index, sources):
    """The responses of one engine step: accepted drafts with their sources, then the bonus."""
    toks = list(sources) + [""]
    return [SimpleNamespace(speculative=True, new_step=j == 0, step_index=index, step_tokens=len(toks),
                            source=s, from_draft=bool(s)) for j, s in enumerate(toks)]


def test_online_tuner_credits_the_head_only_with_its_own_tokens():
    eng = SimpleNamespace(spec=TreeSpec(2, 3, 8))
    cal = Calibration(key={}, costs=CostModel({1: 10.0, 2: 11.0}, {2: (0.5, 0.3)}),
                        acceptance=AcceptanceModel.prior())
    tuner = OnlineTuner(eng, cal, save=False)
    for r in (_step(1, ["eagle", "ngram", "ngram", "ngram"])     # head right once, then the n-gram ran on
              + _step(2, ["both", "eagle"])                       # head right twice
              + _step(3, ["ngram", "ngram"])                      # head wrong at once
              + _step(4, [])):                                    # nothing accepted
        tuner.observe(r)
    # head tokens per step: 2, 3, 1, 1 (the target's own token plus the head's leading run)
    assert tuner.observed() == (4, 7)


def test_bench_compares_sources_against_one_plain_run(demo_dirs, tmp_path, monkeypatch, capsys):
    target, head = demo_dirs
    plain_calls = []
    real_plain = bench.run_plain
    monkeypatch.setattr(bench, "run_plain", lambda *a, **k: plain_calls.append(1) or real_plain(*a, **k))
    pf = tmp_path / "p.jsonl"
    # a prompt that repeats itself: the n-gram source has something to propose
    pf.write_text("\n".join(json.dumps(o) for o in [
        {"prompt": "abc abc abc abc abc abc abc abc", "category": "copy"},
        {"prompt": "def add(a, b):", "category": "coding"},
    ]) + "\n")
    out = tmp_path / "r.json"
    rc = bench.main(["--model", str(target), "--draft", str(head), "--prompts", str(pf), "--max-tokens", "24",
                     "--tree", "2,2,6", "--draft-source", "hybrid,eagle,ngram", "--json", str(out),
                     "--no-progress", "--no-warmup", "--dtype", "float32"])
    assert rc == 0
    res = json.loads(out.read_text())
    assert len(plain_calls) == 2                        # one plain run per prompt, shared
    assert list(res["sources"]) == ["hybrid", "eagle", "ngram"]
    assert res["config"]["draft_source"] == "hybrid,eagle,ngram"
    for src, v in res["sources"].items():
        s = v["summary"]
        assert s["identical"] == s["compared"] == 2     # lossless whatever drafts
        if src == "eagle":
            assert s["source_tokens"]["ngram"] == s["source_tokens"]["both"] == 0
        if src == "ngram":
            assert s["source_tokens"]["eagle"] == s["source_tokens"]["both"] == 0
    assert res["total"] == res["sources"]["hybrid"]["summary"]   # the first source is the headline
    text = capsys.readouterr().out
    assert "hybrid tau" in text and "ngram x" in text


def test_bench_refuses_an_unknown_source(demo_dirs, capsys):
    target, head = demo_dirs
    with pytest.raises(SystemExit) as e:
        bench.main(["--model", str(target), "--draft", str(head), "--draft-source", "eagle,magic"])
    assert e.value.code == 2
    assert "magic" in capsys.readouterr().err


def test_chat_smoke_without_a_head_speculates_from_ngrams(demo_dirs, capsys):
    from eagle3_mlx.tui import cli

    target, _ = demo_dirs
    rc = cli.main(["--model", str(target), "--max-tokens", "16", "--smoke", "abc abc abc abc abc abc"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    stats = captured.out.strip().splitlines()[-1]
    assert stats.startswith("[16 tokens · ")
    assert "accepted by source eagle 0, ngram" in stats
    assert "no draft head" in captured.err


def test_costly_verify_admits_only_ngram_nodes_that_pay():
    from eagle3_mlx.hybrid import NGRAM, NodeCosts, merge_tree
    from eagle3_mlx.ngram import Candidate

    cands = [Candidate(4, (11, 12, 13, 14, 15, 16)), Candidate(2, (21, 22, 23))]
    acc = NgramAcceptance(measured_prior={4: (99.0, 1.0), 2: (3.0, 7.0)})   # rate 0.99 and 0.3
    flat = NodeCosts({1: 100.0, 32: 100.0}, token_ms=50.0)             # wider verify is free
    steep = NodeCosts({1: 100.0, 2: 130.0, 32: 1000.0}, token_ms=50.0)  # +30 ms per node
    free = merge_tree(5, cands, acc, 16, 0.1, costs=flat)
    assert free.tree.size == 1 + 6 + 1                                  # 0.3^2 < 0.1 cuts the second
    paid = merge_tree(5, cands, acc, 16, 0.1, costs=steep)
    # 0.99^d * 50 ms > 30 ms for d <= 6 (0.99^6 = 0.94); 0.3 * 50 = 15 ms < 30 ms: dropped
    assert paid.tree.tokens.tolist() == [5, 11, 12, 13, 14, 15, 16]
    assert paid.sources == [0] + [NGRAM] * 6
    # what the engine learns from: only the tokens that stayed in the tree
    assert paid.proposals == [(4, (11, 12, 13, 14, 15, 16))]
    assert free.proposals == [(4, (11, 12, 13, 14, 15, 16)), (2, (21,))]
    assert NodeCosts({1: 10.0, 3: 30.0}, 1.0).verify(2) == 20.0
