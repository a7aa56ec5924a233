"""OpenBLAS re-exec decision (pure function) and platform defaults; nothing here
re-executes the test process."""

from __future__ import annotations

import os
import sys

import pytest

from eagle3_mlx import platform as plat

LIB = plat.OPENBLAS_PATHS["x86_64"]
ARGV = ["/venv/bin/python", "/venv/bin/eagle3-mlx", "chat", "--x", "y z"]


def decide(**kw):
    args = dict(system="Linux", machine="x86_64", backend="cpu", env={}, argv=ARGV,
                exists=lambda p: True, loaded_maps="")
    args.update(kw)
    return plat.decide_openblas(**args)


def test_reexec_on_linux_cpu_keeps_argv_and_sets_guard():
    d = decide(env={"PATH": "/bin"})
    assert d.action == "reexec" and d.library == LIB
    assert d.argv == ARGV
    assert d.env["LD_PRELOAD"] == LIB and d.env[plat.GUARD_ENV] == "1"
    assert d.env["PATH"] == "/bin"


def test_existing_ld_preload_is_kept():
    d = decide(env={"LD_PRELOAD": "/opt/libfoo.so"})
    assert d.action == "reexec"
    assert d.env["LD_PRELOAD"] == f"{LIB}:/opt/libfoo.so"


def test_aarch64_path():
    d = decide(machine="aarch64")
    assert d.action == "reexec"
    assert d.library == "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0"


@pytest.mark.parametrize(
    "kw, action, words",
    [
        (dict(env={plat.OPT_OUT_ENV: "1"}), "skip", plat.OPT_OUT_ENV),
        (dict(env={plat.OPT_OUT_ENV: "true"}), "skip", plat.OPT_OUT_ENV),
        (dict(system="Darwin", backend="metal"), "skip", "not Linux"),
        (dict(backend="cuda"), "skip", "cuda"),
        (dict(machine="riscv64"), "skip", "riscv64"),
        (dict(env={"LD_PRELOAD": LIB}), "active", "already"),
        (dict(env={"LD_PRELOAD": "/x/a.so " + LIB}), "active", "already"),
        (dict(loaded_maps="7f00-7f10 r-xp 0 08:01 1 "
                          "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so\n"),
         "active", "already"),
        (dict(env={plat.GUARD_ENV: "1"}), "skip", "already re-executed"),
        (dict(exists=lambda p: False), "missing", "not found"),
        (dict(env={"PYTEST_CURRENT_TEST": "t.py::t"}), "skip", "pytest"),
        (dict(argv=["python"]), "skip", "interactive"),
    ],
)
def test_decisions(kw, action, words):
    d = decide(**kw)
    assert d.action == action, d
    assert words in d.reason
    if action != "reexec":
        assert d.env is None


def test_numpy_bundled_openblas_does_not_count():
    maps = "7f00-7f10 r-xp 0 08:01 1 /venv/lib/numpy.libs/libscipy_openblas64_-ff651d7f.so\n" \
           "7f00-7f10 r-xp 0 08:01 1 /venv/lib/numpy.libs/libopenblas64_p-r0-2f7c42d4.3.18.so\n"
    assert decide(loaded_maps=maps).action == "reexec"


def test_default_dtype():
    assert plat.default_dtype("cpu") == "float32"
    assert plat.default_dtype("metal") == "float16"
    assert plat.default_dtype("cuda") == "float16"
    assert plat.default_dtype() in ("float32", "float16")


def test_maybe_reexec_execs_with_decision(monkeypatch, capsys):
    """The wrapper hands the decision to os.execve (mocked) and prints one line."""
    calls = []

    def fake_execve(path, argv, env):
        calls.append((path, argv, env))
        raise SystemExit(0)  # execve never returns

    monkeypatch.setattr(plat, "mlx_backend", lambda: "cpu")
    monkeypatch.setattr(os, "execve", fake_execve)
    monkeypatch.setattr(os.path, "exists", lambda p: True)
    monkeypatch.setattr(sys, "orig_argv", ["python", "-m", "eagle3_mlx", "chat"], raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(plat.GUARD_ENV, raising=False)
    monkeypatch.delenv(plat.OPT_OUT_ENV, raising=False)
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)
    monkeypatch.setattr("platform.system", lambda: "Linux")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    real_open = open

    def fake_open(path, *a, **kw):  # pretend nothing is loaded yet
        if path == "/proc/self/maps":
            raise OSError("no maps")
        return real_open(path, *a, **kw)

    monkeypatch.setattr("builtins.open", fake_open)
    with pytest.raises(SystemExit):
        plat.maybe_reexec_with_openblas()
    (path, argv, env), = calls
    assert path == sys.executable and argv == ["python", "-m", "eagle3_mlx", "chat"]
    assert env["LD_PRELOAD"].startswith(LIB) and env[plat.GUARD_ENV] == "1"
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "OpenBLAS" in err and plat.OPT_OUT_ENV in err


def test_opt_out_does_not_touch_mlx(monkeypatch):
    monkeypatch.setenv(plat.OPT_OUT_ENV, "1")
    monkeypatch.setattr(plat, "mlx_backend", lambda: pytest.fail("must not query MLX"))
    assert plat.maybe_reexec_with_openblas().action == "skip"
