"""Tests for gmt_mlx.platform.blas: BLAS detection, the re-exec decision and the check.

Offline and fast. Both paths are checked numerically in subprocesses: the
reference BLAS forced with GMT_MLX_BLAS=reference, and the optimized one that
`.ci/run` installs (Debian's libopenblas0-pthread). Without one, the tests that
need it skip locally but fail under CI (CI=true), where it must be installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gmt_mlx.platform import blas, blas_check, blas_find

LINUX = sys.platform.startswith("linux")
REPO = Path(__file__).resolve().parents[3]  # tests/unit/platform/ -> the repository


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # Shim dirs and the check cache must not land in the real ~/.cache.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(blas.ENV_VAR, raising=False)
    monkeypatch.delenv(blas.MARKER_VAR, raising=False)


# ---------------------------------------------------------------- pure parts


@pytest.mark.parametrize(
    "path, kind",
    [
        ("/v/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0", "reference"),
        ("/usr/lib/x86_64-linux-gnu/blas/libblas.so.3", "reference"),
        ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libblas.so.3", "openblas"),
        ("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so", "openblas"),
        ("/v/cmeel.prefix/lib/libopenblas.so.0", "openblas"),
        ("/v/lib/libmkl_rt.so.3", "mkl"),
        ("/usr/lib/libblis.so.4", "blis"),
        ("/System/Library/Frameworks/Accelerate.framework/Accelerate", "accelerate"),
        ("/usr/lib/libfoo.so", "unknown"),
        (None, "unknown"),
    ],
)
def test_classify_library(path, kind):
    assert blas.classify_library(path) == kind


CAND = Path("/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0")


@pytest.mark.parametrize(
    "plat, kind, cand, env, action, needle",
    [
        ("darwin", "accelerate", None, {}, "keep", "darwin"),
        ("win32", "unknown", CAND, {}, "keep", "win32"),
        ("linux", "reference", CAND, {"GMT_MLX_BLAS": "reference"}, "keep", "on request"),
        ("linux", "reference", CAND, {"GMT_MLX_BLAS": "OFF"}, "keep", "on request"),
        ("linux", "reference", CAND, {"GMT_MLX_BLAS_REEXEC": str(CAND)}, "keep", "already re-executed"),
        ("linux", "openblas", CAND, {}, "keep", "non-reference"),
        ("linux", "mkl", None, {}, "keep", "non-reference"),
        ("linux", "reference", None, {}, "keep", "no optimized BLAS"),
        ("linux", "reference", CAND, {}, "check", str(CAND)),
        ("linux", "reference", CAND, {"GMT_MLX_BLAS": "auto"}, "check", str(CAND)),
        ("linux", "reference", "/x/libmkl_rt.so.3", {"GMT_MLX_BLAS": "/x/libmkl_rt.so.3"}, "check", "mkl"),
    ],
)
def test_decide_branches(plat, kind, cand, env, action, needle):
    got_action, reason = blas.decide(plat, kind, cand, env)
    assert got_action == action
    assert needle in reason


def test_decide_no_candidate_reason_carries_install_hint():
    _, reason = blas.decide("linux", "reference", None, {})
    assert blas.install_hint() in reason


def test_install_hint_is_one_line():
    h = blas.install_hint()
    assert h and "\n" not in h


def test_find_optimized_blas_forced_path(tmp_path, monkeypatch):
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"\x7fELF")
    monkeypatch.setattr(sys, "platform", "linux")
    assert blas_find.find_optimized_blas({blas.ENV_VAR: str(lib)}) == lib
    assert blas_find.find_optimized_blas({blas.ENV_VAR: str(tmp_path / "missing.so")}) is None


def test_find_optimized_blas_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert blas_find.find_optimized_blas({}) is None


def test_find_optimized_blas_returns_existing_candidate_or_none():
    found = blas_find.find_optimized_blas({})
    if not LINUX:
        assert found is None
    elif found is not None:
        assert found.is_file()
        assert str(found) in {str(p) for p, _ in blas_find.candidate_paths()}


def test_preload_environment_prepends_and_keeps_user_preload(tmp_path):
    lib = tmp_path / "libfast.so"
    lib.write_bytes(b"\x7fELF no fortran here")
    env = blas_find.preload_environment(lib, {"LD_PRELOAD": "/a.so /b.so", "X": "1"})
    assert env["LD_PRELOAD"] == f"{lib}:/a.so:/b.so"
    assert env["X"] == "1" and "LD_LIBRARY_PATH" not in env
    assert blas.MARKER_VAR not in env


def test_preload_environment_gfortran_shim(tmp_path, monkeypatch):
    # A cmeel-like library that needs libgfortran.so.5 on a system without it,
    # with mlx-cpu's renamed copy available: a shim dir must name it.
    lib = tmp_path / "libopenblas.so.0"
    lib.write_bytes(b"\x7fELF...libgfortran.so.5\x00...")
    libs = tmp_path / "mlx_cpu.libs"
    libs.mkdir()
    gf = libs / "libgfortran-f7379c93.so.5.0.0"
    qm = libs / "libquadmath-a962d038.so.0.0.0"
    gf.write_bytes(b"gf")
    qm.write_bytes(b"qm")
    monkeypatch.setattr(blas_find, "system_library", lambda soname: None)
    monkeypatch.setattr(blas_find, "_mlx_bundled_gfortran", lambda: gf)
    env = blas_find.preload_environment(lib, {"LD_LIBRARY_PATH": "/keep"})
    shim = Path(env["LD_LIBRARY_PATH"].split(":")[0])
    assert env["LD_LIBRARY_PATH"].endswith(":/keep")
    assert (shim / "libgfortran.so.5").resolve() == gf.resolve()
    assert (shim / qm.name).resolve() == qm.resolve()
    # Idempotent (second call reuses the links).
    assert blas_find.preload_environment(lib, {})["LD_LIBRARY_PATH"] == str(shim)
    # No libgfortran anywhere: cannot preload.
    monkeypatch.setattr(blas_find, "_mlx_bundled_gfortran", lambda: None)
    assert blas_find.preload_environment(lib, {}) is None


# ------------------------------------------------------------ this process


def test_blas_info_sane():
    info = blas.blas_info(measure=True)
    for key in (
        "platform",
        "machine",
        "mlx_version",
        "library",
        "kind",
        "is_reference",
        "reexecuted",
        "gflops",
        "error",
    ):
        assert key in info
    assert info["kind"] in {"reference", "openblas", "mkl", "blis", "accelerate", "unknown"}
    assert info["is_reference"] == (info["kind"] == "reference")
    assert info["mlx_version"]
    assert info["gflops"] is not None and info["gflops"] > 0
    if LINUX:
        assert info["library"] and Path(info["library"]).exists(), info
        assert info["kind"] != "unknown", info


# -------------------------------------------------- maybe_reexec, in process


class _Exec:
    def __init__(self):
        self.calls = []

    def __call__(self, path, args, env):
        self.calls.append((path, list(args), dict(env)))


def _fake_linux(monkeypatch, kind="reference", cand=CAND, check=(True, "ok", {})):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(
        blas, "blas_info", lambda measure=False: {"kind": kind, "library": "/x/libblas.so.3", "error": None}
    )
    monkeypatch.setattr(blas, "find_optimized_blas", lambda env=None: cand)
    monkeypatch.setattr(blas, "check_blas", lambda lib, env=None, timeout=0: check)
    monkeypatch.setattr(blas, "preload_environment", lambda lib, env=None: {"LD_PRELOAD": str(lib)})
    ex = _Exec()
    monkeypatch.setattr(os, "execve", ex)
    return ex


def test_reexec_happens_after_passed_check(monkeypatch):
    ex = _fake_linux(monkeypatch)
    blas.maybe_reexec_with_blas(["python", "-m", "gmt_mlx.cli", "train"], use_cache=False)
    assert len(ex.calls) == 1
    path, args, env = ex.calls[0]
    assert path == sys.executable
    assert args == ["python", "-m", "gmt_mlx.cli", "train"]
    assert env["LD_PRELOAD"] == str(CAND) and env[blas.MARKER_VAR] == str(CAND)


def test_no_reexec_when_check_fails(monkeypatch):
    ex = _fake_linux(monkeypatch, check=(False, "max relative error 3 > 1e-4", {}))
    reason = blas.maybe_reexec_with_blas(["x"], use_cache=False)
    assert not ex.calls and "reference" in reason and "max relative error" in reason


@pytest.mark.parametrize(
    "env, kind, cand, needle",
    [
        ({blas.ENV_VAR: "reference"}, "reference", CAND, "on request"),
        ({blas.MARKER_VAR: "1"}, "reference", CAND, "already re-executed"),
        ({}, "openblas", CAND, "non-reference"),
        ({}, "reference", None, "no optimized BLAS"),
        ({blas.ENV_VAR: "/no/such/lib.so"}, "reference", None, "not a usable file"),
    ],
)
def test_no_reexec_branches(monkeypatch, env, kind, cand, needle):
    ex = _fake_linux(monkeypatch, kind=kind, cand=cand)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    reason = blas.maybe_reexec_with_blas(["x"], use_cache=False)
    assert not ex.calls
    assert needle in reason


def test_reexec_is_noop_on_macos(monkeypatch):
    ex = _fake_linux(monkeypatch)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert "darwin" in blas.maybe_reexec_with_blas(["x"])
    assert not ex.calls


def test_reexec_never_raises(monkeypatch):
    ex = _fake_linux(monkeypatch)

    def boom(measure=False):
        raise RuntimeError("broken")

    monkeypatch.setattr(blas, "blas_info", boom)
    reason = blas.maybe_reexec_with_blas(["x"])
    assert "broken" in reason and not ex.calls


def test_exec_failure_is_swallowed(monkeypatch):
    _fake_linux(monkeypatch)

    def fail(*a):
        raise OSError("exec format error")

    monkeypatch.setattr(os, "execve", fail)
    assert "exec format error" in blas.maybe_reexec_with_blas(["x"], use_cache=False)


# ------------------------------------------------- real subprocess checks


@pytest.mark.skipif(not LINUX, reason="LD_PRELOAD mechanism is Linux-only")
def test_check_rejects_a_library_mlx_does_not_bind(tmp_path):
    # ld.so ignores an unloadable preload; MLX stays on its own BLAS, and the
    # check must notice instead of trusting the environment variable.
    bogus = tmp_path / "libnotblas.so"
    bogus.write_text("not an ELF file")
    ok, reason, _ = blas_check.check_blas(bogus, env=dict(os.environ), timeout=120)
    assert not ok and reason


ON_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _optimized_or_skip() -> Path:
    if not LINUX:
        pytest.skip("Linux only")
    lib = blas_find.find_optimized_blas()
    if lib is None:
        why = "no optimized BLAS on this machine (" + blas.install_hint() + ")"
        if ON_CI:  # .ci/run installs one: its absence there is a broken CI, not a reason to skip
            pytest.fail(why + "; .ci/run should have installed libopenblas0-pthread")
        pytest.skip(why)
    return lib


def test_check_passes_with_optimized_blas():
    lib = _optimized_or_skip()
    ok, reason, details = blas_check.check_blas(lib, env=dict(os.environ), timeout=120)
    assert ok, reason
    assert details["kind"] != "reference"
    assert details["max_err"] < blas_check.CHECK_TOLERANCE


# A fresh process that chooses its BLAS the way the gmt-mlx command does
# (maybe_reexec_with_blas first), then checks MLX matmuls against numpy.
_MATMUL_CHECK = textwrap.dedent(
    """
    import json, numpy as np
    from gmt_mlx.platform.blas import blas_info, maybe_reexec_with_blas
    why = maybe_reexec_with_blas()
    import mlx.core as mx
    rng = np.random.default_rng(1)
    err = 0.0
    for m, k, n in [(300, 517, 129), (64, 1, 80), (1, 256, 33)]:
        a = rng.standard_normal((m, k)).astype(np.float32)
        b = rng.standard_normal((k, n)).astype(np.float32)
        got = np.array(mx.matmul(mx.array(a), mx.array(b), stream=mx.cpu))
        ref = a.astype(np.float64) @ b.astype(np.float64)
        err = max(err, float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))))
    print(json.dumps({"kind": blas_info(measure=False)["kind"], "err": err, "why": why}))
    """
)


@pytest.mark.parametrize("path", ["optimized", "reference"])
def test_matmul_equals_numpy_on_each_blas(path, tmp_path):
    """The optimized BLAS (found, checked and preloaded by the re-exec) and the
    reference one (GMT_MLX_BLAS=reference) both compute MLX's matmuls right."""
    if not LINUX:
        pytest.skip("Linux only")
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.MARKER_VAR, blas.ENV_VAR)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["GMT_MLX_CACHE"] = str(tmp_path / "cache")  # no remembered check: run it
    if path == "optimized":
        _optimized_or_skip()
    else:
        env[blas.ENV_VAR] = "reference"
    r = subprocess.run([sys.executable, "-c", _MATMUL_CHECK], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert (out["kind"] == "reference") == (path == "reference"), out
    assert out["err"] < 1e-5, out


@pytest.mark.skipif(not LINUX, reason="LD_PRELOAD mechanism is Linux-only")
def test_end_to_end_reexec_in_subprocess(tmp_path):
    # A tiny "CLI" calls maybe_reexec_with_blas first, like gmt-mlx does.
    script = tmp_path / "cli.py"
    script.write_text(
        textwrap.dedent(
            """
            import json, os, sys
            from gmt_mlx.platform.blas import maybe_reexec_with_blas, blas_info, MARKER_VAR
            why = maybe_reexec_with_blas()
            print(json.dumps({"why": why, "kind": blas_info(measure=False)["kind"],
                              "argv": sys.argv[1:], "marker": os.environ.get(MARKER_VAR)}))
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", blas.MARKER_VAR, blas.ENV_VAR)}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")

    def run(e):
        return json.loads(
            subprocess.run(
                [sys.executable, str(script), "a", "b c"],
                env=e,
                capture_output=True,
                text=True,
                timeout=180,
                check=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )

    out = run(env)
    assert out["argv"] == ["a", "b c"]
    if blas_find.find_optimized_blas(env) is None:
        assert not ON_CI, ".ci/run should have installed libopenblas0-pthread"
        assert out["kind"] == "reference" and out["marker"] is None
        assert "no optimized BLAS" in out["why"]
    else:
        assert out["kind"] != "reference", out
        assert out["marker"] and "already re-executed" in out["why"]
    # The opt-out keeps the bundled reference BLAS.
    out = run({**env, blas.ENV_VAR: "reference"})
    assert out["kind"] == "reference" and out["marker"] is None and "on request" in out["why"]
