"""Online refresh of the calibrated tree's acceptance (``OnlineTuner``) in
`eagle3-mlx chat` and `eagle3-mlx generate`, on a tiny offline model.

Every test writes a synthetic calibration for the tiny pair into its own
throw-away EAGLE3_MLX_HOME: cheap verification and a head predicted to be
almost always right, so ``--tree auto`` picks a deep chain.  The tiny random
head is in fact almost never right with a chain (tau ~1.0), so once live
statistics are seen the estimated acceptance (rho) collapses and the best tree
becomes the smallest one.  With an explicit tree nothing may change.
"""

from __future__ import annotations

import json
import threading

import pytest

from _tui import ask, recording, wait_for

from eagle3_mlx.tree import TreeSpec
from eagle3_mlx.tui.app import ChatApp
from eagle3_mlx.tui.cli import make_loader
from eagle3_mlx.tui.engine_thread import AnswerDone, EngineReady, EngineThread, LoadFailed, TreeSet
from eagle3_mlx.tui.screens import ChatSettings
from eagle3_mlx.tuning.acceptance import AcceptanceModel
from eagle3_mlx.tuning.cache import Calibration, calibration_key, save_calibration
from eagle3_mlx.tuning.costs import CostModel
from eagle3_mlx.tuning.optimise import optimise
from eagle3_mlx.tuning.tuner import OnlineTuner

SIZE = (120, 40)
# Head predicted right 95% of the time at every level (ranks 2-4: 1% each).
OPTIMISTIC_Q = [[0.95, 0.01, 0.01, 0.01] for _ in range(9)]


def synthetic_costs():
    # verification: +10% of a decode step per extra tree token; top_k up to the tiny head's 4
    return CostModel({T: 10.0 * (1 + 0.1 * (T - 1)) for T in (1, 2, 4, 8, 12, 16)},
                       {k: (0.5, 0.3 * (1 + 0.1 * k)) for k in (1, 2, 3, 4)})


def shape(spec) -> tuple:
    return (spec.top_k, spec.depth, spec.total_tokens)


@pytest.fixture(scope="module")
def cal_key(demo_dirs):
    """The calibration key of the tiny pair as every command here loads it."""
    from eagle3_mlx.api import load

    model, draft = demo_dirs
    eng = load(str(model), str(draft))
    return calibration_key(eng.model, eng.head)


@pytest.fixture
def home(monkeypatch, tmp_path):
    monkeypatch.setenv("EAGLE3_MLX_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path


@pytest.fixture
def calibration(home, cal_key):
    """A cached synthetic calibration that picks a deep chain for the tiny pair."""
    cal = Calibration(key=cal_key, costs=synthetic_costs(), acceptance=AcceptanceModel(q=OPTIMISTIC_Q))
    cal.pick()
    assert cal.spec.top_k == 1 and cal.spec.depth >= 6        # the premise: a deep chain
    path = save_calibration(cal)
    assert path.parent == home / "calibration"
    return cal, path


def cached(path) -> Calibration:
    return Calibration.from_dict(json.loads(path.read_text()))


def spec_steps(responses) -> int:
    """Speculative steps as the tuner counts them."""
    return sum(1 for r in responses if r.new_step and r.step_index >= 1)


# ----------------------------------------------------------------------------- chat


def panel_tree(spec) -> str:
    return f"k{spec[0]} d{spec[1]} n{spec[2]}" + (" (chain)" if spec[0] == 1 else "")


async def test_chat_auto_tree_is_retuned_from_live_acceptance(demo_dirs, calibration, ready_app):
    cal, path = calibration
    calibrated = shape(cal.spec)
    model, draft = demo_dirs
    holder: dict = {}
    # head-only drafting: a hybrid step may run past the head's tree on an n-gram
    loader = make_loader(str(model), str(draft), tree_arg="auto", tuner_options={"every": 4},
                         draft_source="eagle")
    assert callable(loader.make_tuner)
    app = ChatApp(recording(loader, holder), settings=ChatSettings(max_tokens=48), model_label="tiny",
                  animate_loading=False)
    notes: list[str] = []
    orig_notify = app.notify
    app.notify = lambda message, *a, **kw: (notes.append(str(message)), orig_notify(message, *a, **kw))[1]
    async with ready_app(app, SIZE, timeout=60.0) as pilot:
        rec = holder["rec"]
        tuner = app.engine_thread.tuner
        assert isinstance(tuner, OnlineTuner) and tuner.every == 4
        assert shape(rec.spec) == calibrated                       # --tree auto used the cache
        assert app.stats_panel.values["tree"] == panel_tree(calibrated)

        await ask(pilot, app, "hello there", timeout=60.0)
        steps1 = spec_steps(rec.answers[-1])
        assert steps1 >= 4
        # the acceptance estimate was refreshed from exactly this answer's steps and saved
        saved = cached(path)
        assert saved.online_steps == steps1
        assert saved.acceptance.rho < 0.2
        # ... and the tree it now predicts to be best is what the engine uses, the cache
        # keeps for the next start, and the stats panel shows
        best, _ = optimise(saved.costs, saved.acceptance)
        new = shape(best.spec)
        assert new != calibrated and best.spec.num_nodes < cal.spec.num_nodes
        await wait_for(pilot, lambda: app.stats_panel.values["tree"] == panel_tree(new), 60.0, what="new tree shown")
        assert shape(rec.spec) == new
        assert shape(saved.spec) == new
        assert app.tree() == {"top_k": new[0], "depth": new[1], "total_tokens": new[2]}
        assert any(n.startswith("Tree retuned") for n in notes)

        # tuning goes on: the next answer runs on the new tree and adds its steps
        await ask(pilot, app, "What is MLX?", timeout=60.0)
        assert all(r.step_tokens <= new[2] for r in rec.answers[-1])
        steps2 = spec_steps(rec.answers[-1])
        await wait_for(pilot, lambda: cached(path).online_steps == steps1 + steps2, 60.0, what="second refresh")

        # the user sets a tree in the settings: tuning stops for the session
        await pilot.press("ctrl+s")
        for name, value in (("top_k_tree", "4"), ("depth", "4"), ("total_tokens", "16")):
            app.screen.query_one(f"#{name}").value = value
        await pilot.press("ctrl+s")
        await wait_for(pilot, lambda: app.stats_panel.values["tree"] == "k4 d4 n16", 60.0, what="manual tree")
        assert app.engine_thread.tuner is None
        before = cached(path)
        for q in ("hello there", "Write a poem about the sea."):
            await ask(pilot, app, q, timeout=60.0)
            assert spec_steps(rec.answers[-1]) >= 4
        await pilot.pause(0.2)
        assert shape(rec.spec) == (4, 4, 16)
        assert app.stats_panel.values["tree"] == "k4 d4 n16"
        after = cached(path)
        assert after.online_steps == before.online_steps
        assert after.acceptance.rho == before.acceptance.rho


def run_thread(loader, questions, max_tokens=48):
    """Load on an EngineThread, answer ``questions`` one by one; returns
    (thread, posted messages)."""
    posted: list = []
    done = threading.Event()

    def post(msg):
        posted.append(msg)
        if isinstance(msg, (AnswerDone, LoadFailed)):
            done.set()

    th = EngineThread(loader, post)
    th.start()
    try:
        assert th.loaded.wait(60) and th.load_error is None, th.load_error
        for i, q in enumerate(questions, 1):
            done.clear()
            th.generate(i, [{"role": "user", "content": q}], {"max_tokens": max_tokens})
            assert done.wait(60), f"no answer to {q!r}"
        # whatever the thread does after an answer (tuning) is done once a call returns
        req = th.call(lambda e: None)
        assert req.done.wait(60)
    finally:
        th.close()
    return th, posted


def test_chat_explicit_tree_is_never_changed(demo_dirs, calibration):
    cal, path = calibration
    model, draft = demo_dirs
    # explicit tree options (the --top-k-tree/--depth/--total-tokens flags) with --tree auto: no tuner
    assert not hasattr(make_loader(str(model), str(draft), {"top_k": 2, "depth": 2, "total_tokens": 6},
                                   tree_arg="auto"), "make_tuner")
    holder: dict = {}
    loader = make_loader(str(model), str(draft), tree_arg="4,4,16", tuner_options={"every": 1})
    assert not hasattr(loader, "make_tuner")
    th, posted = run_thread(recording(loader, holder), ["hello there", "What is MLX?", "hi"])
    rec = holder["rec"]
    assert th.tuner is None
    assert [len(a) for a in rec.answers] and all(spec_steps(a) >= 4 for a in rec.answers)
    assert shape(rec.spec) == (4, 4, 16)
    assert any(isinstance(m, EngineReady) for m in posted)
    assert not [m for m in posted if isinstance(m, TreeSet)]
    saved = cached(path)
    assert saved.online_steps == 0 and saved.acceptance.rho == 1.0
    assert shape(saved.spec) == shape(cal.spec)


def test_engine_thread_tunes_only_speculative_answers(demo_dirs, calibration):
    """Plain-decoding answers are not acceptance statistics."""
    cal, path = calibration
    model, draft = demo_dirs
    loader = make_loader(str(model), str(draft), tree_arg="auto", tuner_options={"every": 1})
    posted: list = []
    done = threading.Event()
    th = EngineThread(loader, lambda m: (posted.append(m), isinstance(m, AnswerDone) and done.set()))
    th.start()
    try:
        assert th.loaded.wait(60) and th.tuner is not None
        th.generate(1, [{"role": "user", "content": "hello there"}], {"max_tokens": 32}, speculative=False)
        assert done.wait(60)
        assert th.call(lambda e: None).done.wait(60)
        assert cached(path).online_steps == 0 and not [m for m in posted if isinstance(m, TreeSet)]
        done.clear()
        th.generate(2, [{"role": "user", "content": "hello there"}], {"max_tokens": 32})
        assert done.wait(60)
        assert th.call(lambda e: None).done.wait(60)
    finally:
        th.close()
    saved = cached(path)
    assert saved.online_steps > 0
    retuned = [m for m in posted if isinstance(m, TreeSet)]
    assert len(retuned) == 1 and retuned[0].retuned and retuned[0].error is None
    assert (retuned[0].tree["top_k"], retuned[0].tree["depth"], retuned[0].tree["total_tokens"]) == \
        shape(saved.spec)


# ------------------------------------------------------------------------- generate


def generate(demo_dirs, capsys, *extra):
    from eagle3_mlx.cli import generate_main

    model, draft = demo_dirs
    rc = generate_main(["--model", str(model), "--draft", str(draft), "--prompt", "hello there",
                        "--max-tokens", "48", *extra])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.err


def test_generate_auto_saves_refreshed_acceptance_for_the_next_run(demo_dirs, calibration, capsys):
    cal, path = calibration
    calibrated = shape(cal.spec)
    err = generate(demo_dirs, capsys)
    assert f"draft tree: {TreeSpec(*calibrated)}" in err
    first = cached(path)
    assert first.online_steps >= 16                      # the run's speculative steps
    assert first.acceptance.rho < 0.2                    # tau ~1.0 observed, ~8 predicted
    new = shape(first.spec)
    assert new != calibrated
    assert shape(optimise(first.costs, first.acceptance)[0].spec) == new
    assert f"tree: retuned to {new[0]},{new[1]},{new[2]} for the next run" in err.splitlines()
    # the next run starts on the retuned tree and adds its steps (the tree stays: no line)
    err2 = generate(demo_dirs, capsys)
    assert f"draft tree: {TreeSpec(*new)}" in err2
    assert "retuned" not in err2
    second = cached(path)
    assert second.online_steps > first.online_steps
    assert shape(second.spec) == new


def test_generate_explicit_tree_leaves_the_calibration_alone(demo_dirs, calibration, capsys):
    cal, path = calibration
    text = path.read_text()
    err = generate(demo_dirs, capsys, "--tree", "4,4,16")
    assert f"draft tree: {TreeSpec(4, 4, 16)}" in err
    assert "retuned" not in err
    assert path.read_text() == text
    # plain decoding with --tree auto: nothing to learn from
    err = generate(demo_dirs, capsys, "--no-spec")
    assert "retuned" not in err and path.read_text() == text
