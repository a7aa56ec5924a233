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


def _pooled(cells: dict) -> float:
    acc, rej = map(sum, zip(*cells.values()))
    return acc / (acc + rej)


def test_calibration_measures_ngram_acceptance_per_match_length():
    rng = random.Random(0)
    span = [rng.randrange(100, 200) for _ in range(40)]
    # the continuation copies a span of the prompt: long matches, accepted to the end
    copied = measure_ngram_acceptance([([1, 2] + span + [3], span[:30])], max_len=8)
    # a continuation that keeps starting like the prompt and then differs: proposals, all wrong
    fresh = measure_ngram_acceptance([([5, 6, 7] * 10, [t for k in range(10) for t in (5, 6, 300 + k)])],
                                       max_len=8)
    assert _pooled({n: c for n, c in copied["later"].items() if n >= 4}) > 0.9
    assert _pooled({n: c for n, c in copied["first"].items() if n >= 4}) > 0.9
    f_acc, f_rej = map(sum, zip(*fresh["first"].values(), *fresh["later"].values()))
    assert f_rej >= 10 and f_acc / (f_acc + f_rej) < 0.25
    # the counts are NgramAcceptance's own: replaying them gives the same counts
    a = NgramAcceptance()
    for kind, cells in copied.items():
        for n, c in cells.items():
            a.live[kind][n] = list(c)
    assert a.counts() == copied


def test_first_and_later_tokens_are_counted_apart():
    a = NgramAcceptance()
    a.update(3, (1, 2, 3, 4), (1, 2, 9))        # first right, one later right, then a miss
    a.update(3, (5, 6), (7,))                   # first wrong: nothing later was reached
    assert a.counts() == {"first": {3: [1, 1]}, "later": {3: [1, 1]}}
    # candidates whose first token is usually wrong but which run on once right:
    # the first token's rate falls, the later tokens' rises
    for _ in range(30):
        a.update(2, (1, 2, 3, 4), (9,))
        a.update(2, (1, 2, 3, 4), (1, 2, 3, 4))
    assert a.rate(2) < 0.55 < 0.9 < a.rate(2, later=True)


def test_measured_prior_seeds_the_rate_and_live_counts_take_over():
    a = NgramAcceptance.from_measured({"first": {4: [900, 100], 2: [5, 95]}, "later": {4: [80, 20]}})
    assert a.rate(4) > 0.85 and a.rate(2) < 0.2
    assert 0.7 < a.rate(4, later=True) < 0.85
    assert a.rate(7) == pytest.approx(NgramAcceptance().rate(7))     # unmeasured: generic prior
    for _ in range(40):                                              # this conversation disagrees
        a.update(4, (1, 2, 3), (9, 9, 9))
    assert a.rate(4) < 0.5


def test_calibration_round_trips_ngram_counts():
    cal = Calibration(key={"k": 1}, costs=CostModel({1: 10.0, 2: 11.0}, {1: (0.5, 0.3)}),
                        acceptance=AcceptanceModel.prior(),
                        ngram={"first": {3: [10, 2]}, "later": {3: [30, 1]}})
    back = Calibration.from_dict(json.loads(json.dumps(cal.to_dict())))
    assert back.ngram == {"first": {3: [10, 2]}, "later": {3: [30, 1]}}


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
                     "--plot", str(tmp_path / "r.png"), "--no-progress", "--no-warmup", "--dtype", "float32"])
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
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


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
    acc = NgramAcceptance(measured_prior={k: {4: (99.0, 1.0), 2: (3.0, 7.0)}  # rate 0.99 and 0.3
                                          for k in ("first", "later")})
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


def test_tree_scores_a_candidate_by_its_first_token_then_its_later_ones():
    from eagle3_mlx.hybrid import merge_tree
    from eagle3_mlx.ngram import Candidate

    cand = [Candidate(4, (11, 12, 13, 14, 15, 16))]
    # a first token right 1 time in 10, but a run that holds once it starts
    runs_on = NgramAcceptance(measured_prior={"first": {4: (1.0, 9.0)}, "later": {4: (99.0, 1.0)}})
    assert merge_tree(5, cand, runs_on, 16, 0.09).tree.size == 1 + 6    # 0.1 * 0.99^5 > 0.09
    # the same first token with later tokens at 0.3: 0.1 * 0.3 < 0.09 stops after one node
    fades = NgramAcceptance(measured_prior={"first": {4: (1.0, 9.0)}, "later": {4: (3.0, 7.0)}})
    assert merge_tree(5, cand, fades, 16, 0.09).tree.tokens.tolist() == [5, 11]


def _head_tree(tokens, parents, probs):
    import mlx.core as mx
    from eagle3_mlx.tree import tree_from_parents

    t = tree_from_parents(tokens, parents)
    t.scores = mx.log(mx.array(probs, dtype=mx.float32))
    return t


def test_a_confident_copy_takes_the_head_siblings_verify_width():
    from eagle3_mlx.hybrid import EAGLE, NGRAM, NodeCosts, merge_tree
    from eagle3_mlx.ngram import Candidate

    # the head: three guesses for the next token, one with a child
    head = _head_tree([5, 21, 22, 23, 24], [0, 0, 0, 0, 1], [1.0, 0.5, 0.2, 0.1, 0.3])
    costs = NodeCosts({1: 100.0, 4: 110.0, 8: 130.0, 16: 170.0}, token_ms=50.0)
    sure = NgramAcceptance(measured_prior={k: {6: (98.0, 2.0)} for k in ("first", "later")})
    copy = merge_tree(5, [Candidate(6, (31, 32, 33, 34, 35, 36))], sure, 16, 0.1, head, costs)
    toks = copy.tree.tokens.tolist()
    # at most 2% is left for the head's siblings: worth less than their verify width
    assert toks == [5, 31, 32, 33, 34, 35, 36]
    assert copy.sources == [0] + [NGRAM] * 6
    # a doubtful n-gram leaves the head's tree as the head drafted it
    doubt = NgramAcceptance(measured_prior={k: {2: (3.0, 7.0)} for k in ("first", "later")})
    kept = merge_tree(5, [Candidate(2, (31, 32))], doubt, 16, 0.1, head, costs)
    got = dict(zip(kept.tree.tokens.tolist(), kept.sources))
    assert got == {5: 0, 21: EAGLE, 22: EAGLE, 23: EAGLE, 24: EAGLE, 31: NGRAM}
