"""The numerical check of a candidate BLAS (in a child process that preloads it), and its cache.

Before `blas.maybe_reexec_with_blas` re-executes with a library preloaded, a
child process with the same preload must show that MLX really binds it and
that MLX matmuls (several shapes, transposes) and a LAPACK call agree with
numpy (float64) to float32 tolerance. A library that passed is remembered by
(path, size, mtime, MLX version), so later starts skip the check.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Mapping

from gmt_mlx.paths import cache_root
from gmt_mlx.platform.blas_find import preload_environment

#: Set in the re-executed process; its presence forbids another re-exec (no loops).
MARKER_VAR = "GMT_MLX_BLAS_REEXEC"
#: Max relative error (vs a float64 numpy product, normalised by max |ref|)
#: accepted in the numerical check. float32 gemm with k<=1024 lands ~1e-6.
CHECK_TOLERANCE = 1e-4
CHECK_TIMEOUT_S = 120.0


# Runs in the child: proves the preload is what MLX binds and is correct.
_CHECK_CODE = r"""
import json, sys
import numpy as np
from gmt_mlx.platform.blas import blas_info
from gmt_mlx.platform.blas_check import CHECK_TOLERANCE
import mlx.core as mx
info = blas_info(measure=False)
out = {"library": info["library"], "kind": info["kind"], "ok": False, "max_err": None}
if info["is_reference"] or info["library"] is None:
    out["why"] = "preloaded library was not bound by MLX"
else:
    rng = np.random.default_rng(0)
    worst = 0.0
    # Shapes cover odd sizes, k=1, tall/skinny, batched and transposed operands.
    for (m, k, n, batch, ta, tb) in [(256, 384, 192, 1, False, False), (97, 131, 61, 1, True, False),
                                     (64, 1, 80, 1, False, True), (1, 512, 300, 1, False, False),
                                     (33, 65, 17, 3, True, True), (1024, 256, 128, 1, False, False)]:
        a = rng.standard_normal((batch, k, m) if ta else (batch, m, k)).astype(np.float32)
        b = rng.standard_normal((batch, n, k) if tb else (batch, k, n)).astype(np.float32)
        A, B = mx.array(a), mx.array(b)
        if ta: A, a = mx.swapaxes(A, -1, -2), np.swapaxes(a, -1, -2)
        if tb: B, b = mx.swapaxes(B, -1, -2), np.swapaxes(b, -1, -2)
        got = np.array(mx.matmul(A, B, stream=mx.cpu))
        ref = a.astype(np.float64) @ b.astype(np.float64)
        worst = max(worst, float(np.max(np.abs(got - ref)) / max(float(np.max(np.abs(ref))), 1e-30)))
    # addmm (alpha/beta path of gemm)
    c = rng.standard_normal((128, 96)).astype(np.float32)
    a = rng.standard_normal((128, 64)).astype(np.float32); b = rng.standard_normal((64, 96)).astype(np.float32)
    got = np.array(mx.addmm(mx.array(c), mx.array(a), mx.array(b), alpha=0.5, beta=2.0, stream=mx.cpu))
    ref = 2.0 * c.astype(np.float64) + 0.5 * (a.astype(np.float64) @ b.astype(np.float64))
    worst = max(worst, float(np.max(np.abs(got - ref)) / float(np.max(np.abs(ref)))))
    # One LAPACK call (inverse: getrf/getri), MLX binds those symbols too.
    m = (rng.standard_normal((48, 48)) + 8 * np.eye(48)).astype(np.float32)
    inv = np.array(mx.linalg.inv(mx.array(m), stream=mx.cpu))
    worst = max(worst, float(np.max(np.abs(inv.astype(np.float64) @ m - np.eye(48)))))
    out["max_err"] = worst
    out["ok"] = bool(np.isfinite(worst) and worst <= CHECK_TOLERANCE)
    if not out["ok"]:
        out["why"] = f"max relative error {worst:.3g} > {CHECK_TOLERANCE}"
print("GMT_MLX_BLAS_CHECK " + json.dumps(out))
"""


def check_blas(
    lib: Path, env: Mapping[str, str] | None = None, timeout: float = CHECK_TIMEOUT_S
) -> tuple[bool, str, dict]:
    """Numerical check of ``lib`` in a subprocess; ``(ok, reason, details)``.

    The child preloads ``lib`` (via :func:`preload_environment`), confirms MLX
    binds it and compares MLX matmuls and an inverse with numpy. A crash, a
    loader error or a timeout in the child is a failed check, not ours.
    """
    penv = preload_environment(lib, env)
    if penv is None:
        return False, f"cannot satisfy libgfortran.so.5 for {lib}", {}
    penv[MARKER_VAR] = "check"  # the child must never re-exec itself
    # The child imports gmt_mlx; make sure it finds this copy of the package: the folder that holds gmt_mlx/
    # (this file is gmt_mlx/platform/blas_check.py). Never gmt_mlx/ itself: there, this package's platform/
    # would shadow the standard library's `platform`, which numpy imports.
    pkg_root = str(Path(__file__).resolve().parents[2])
    penv["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in penv.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        r = subprocess.run(
            [sys.executable, "-c", _CHECK_CODE],
            env=penv,
            capture_output=True,
            text=True,
            timeout=timeout,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return False, f"numerical check with {lib} timed out after {timeout:.0f}s", {}
    except OSError as exc:
        return False, f"numerical check could not start: {exc}", {}
    for line in r.stdout.splitlines():
        if line.startswith("GMT_MLX_BLAS_CHECK "):
            details = json.loads(line.split(" ", 1)[1])
            details["env"] = {k: penv[k] for k in ("LD_PRELOAD", "LD_LIBRARY_PATH") if k in penv}
            if details.get("ok"):
                return True, f"{lib} passed the numerical check (max rel err {details['max_err']:.2e})", details
            return False, f"{lib} failed the numerical check: {details.get('why')}", details
    tail = (r.stderr or r.stdout).strip().splitlines()[-1:] or ["no output"]
    return False, f"numerical check with {lib} failed (exit {r.returncode}): {tail[0][:300]}", {}


def check_cache_key(lib: Path) -> str | None:
    try:
        st = Path(lib).resolve().stat()
        import mlx.core as mx

        raw = f"{Path(lib).resolve()}|{st.st_size}|{st.st_mtime_ns}|{sys.executable}|{getattr(mx, '__version__', '')}"
        return hashlib.sha256(raw.encode()).hexdigest()[:24]
    except Exception:
        return None


def cache_file() -> Path:
    return cache_root() / "blas_check.json"


def cached_ok(key: str | None) -> bool:
    if key is None:
        return False
    try:
        return json.loads(cache_file().read_text()).get(key) is True
    except Exception:
        return False


def remember_ok(key: str | None) -> None:
    if key is None:
        return
    try:
        f = cache_file()
        f.parent.mkdir(parents=True, exist_ok=True)
        try:
            data = json.loads(f.read_text())
        except Exception:
            data = {}
        data[key] = True
        tmp = f.with_name(f"{f.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, f)
    except Exception:
        pass
