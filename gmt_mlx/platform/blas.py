"""Which BLAS MLX uses on Linux CPU, and the opt-in-by-default switch to a fast one.

Why this module exists
----------------------
MLX's Linux CPU wheel (``mlx-cpu``) links the *reference* (netlib) BLAS and
LAPACK it bundles in ``site-packages/mlx_cpu.libs`` (``libblas-<hash>.so.3``).
``libmlx.so`` imports ``cblas_sgemm``/``cblas_dgemm``/``cblas_cgemm`` plus a
handful of LAPACK routines (``sgetrf_``, ``ssyevd_``, ...) from it. Every
matmul MLX does on CPU goes through ``cblas_sgemm``, and the reference one is
unblocked, single-threaded Fortran: measured here (2 cores, x86_64) a 1024^2
float32 matmul runs at ~6 GFLOP/s against ~330 with OpenBLAS, and a small
MLP ``value_and_grad`` step is ~17x slower.

``libmlx.so`` is loaded by Python with ``RTLD_LOCAL``, but the dynamic linker
still resolves its undefined symbols in the *global* scope first (the
executable, its dependencies and everything in ``LD_PRELOAD``) and only then
in its own dependencies. So preloading any library that exports the
unprefixed ``cblas_sgemm`` (OpenBLAS, MKL) makes MLX use it, without touching
the wheel. ``LD_PRELOAD`` is only read when a process starts, hence the
re-exec.

The mechanism (documented for users in the README)
--------------------------------------------------
:func:`maybe_reexec_with_blas`, called by the CLI entry point before any
work, does on Linux only:

1. if MLX is bound to the reference BLAS, the user did not opt out
   (``GMT_MLX_BLAS=reference``) and this process is not already the result
   of a re-exec (marker ``GMT_MLX_BLAS_REEXEC``);
2. and an optimized BLAS is found (:func:`find_optimized_blas`: Debian/Ubuntu
   ``libopenblas0-pthread``/``-openmp``, Fedora ``openblas``, then in this
   Python environment the PyPI ``mkl`` wheel and the ``cmeel-openblas`` wheel
   (CPU-specific build, last resort), or the path given in ``GMT_MLX_BLAS``);
3. a **subprocess** with that library preloaded must show that MLX really
   binds it and that MLX matmuls (several shapes, transposes) and a LAPACK
   call agree with numpy (float64) to float32 tolerance;
4. then the same command is ``os.execve``'d with ``LD_PRELOAD`` (and, for
   ``cmeel-openblas`` without a system ``libgfortran.so.5``, an
   ``LD_LIBRARY_PATH`` shim, see :func:`preload_environment`).

Anything unexpected leaves the process on the reference BLAS and returns a
reason string; it never raises. ``GMT_MLX_BLAS`` values:

* unset / ``auto``: the behaviour above;
* ``reference`` (also ``off``, ``0``, ``no``, ``none``): opt out, never re-exec;
* a path to a shared library: use that one instead of searching (still checked).

Nothing here runs at import time.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
import time
from pathlib import Path
from typing import Mapping, Sequence

from gmt_mlx.platform.blas_check import MARKER_VAR, cached_ok, check_blas, check_cache_key, remember_ok
from gmt_mlx.platform.blas_find import ENV_VAR, OPT_OUT_VALUES, find_optimized_blas, preload_environment

# --------------------------------------------------------------------------
# Which library is MLX bound to?
# --------------------------------------------------------------------------


def classify_library(path: str | os.PathLike | None) -> str:
    """Kind of a BLAS shared library from its (resolved) file name.

    Returns one of ``openblas``, ``mkl``, ``blis``, ``accelerate``,
    ``reference`` (netlib ``libblas.so*``, including MLX's bundled,
    hash-renamed ``libblas-<hash>.so``), or ``unknown``.
    """
    if path is None:
        return "unknown"
    p = str(path)
    try:
        real = os.path.realpath(p)
    except OSError:  # pragma: no cover - realpath practically never fails
        real = p
    names = (os.path.basename(real).lower(), os.path.basename(p).lower())
    dirs = (p.lower(), real.lower())
    if any("openblas" in n for n in names) or any("openblas" in d for d in dirs):
        return "openblas"
    if any("mkl" in n for n in names):
        return "mkl"
    if any("blis" in n for n in names):
        return "blis"
    if "accelerate" in real.lower() or "veclib" in real.lower():
        return "accelerate"
    if any(re.match(r"^(lib)?c?blas([-.]|$)", n) for n in names):
        return "reference"
    return "unknown"


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _dladdr():
    # glibc >= 2.34 has dladdr in libc; older ones in libdl.so.2.
    for name in (None, "libdl.so.2", "libc.so.6"):
        try:
            f = ctypes.CDLL(name).dladdr
        except (OSError, AttributeError):
            continue
        f.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        f.restype = ctypes.c_int
        return f
    return None


def _libmlx_path() -> Path | None:
    try:
        import mlx
        import mlx.core as mx  # noqa: F401  (loads libmlx.so)
    except Exception:
        return None
    for base in list(getattr(mlx, "__path__", [])):
        cand = Path(base) / "lib" / "libmlx.so"
        if cand.exists():
            return cand
    return None


def _symbol_file(symbol: str, libmlx: Path | None) -> str | None:
    """File that provides ``symbol`` to libmlx.so, following ld.so's order.

    Global scope first (``dlsym(RTLD_DEFAULT)``: executable, LD_PRELOAD,
    RTLD_GLOBAL libraries); if absent there, libmlx's own dependency tree.
    """
    dladdr = _dladdr()
    if dladdr is None:
        return None
    addr = None
    try:
        addr = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p).value
    except (AttributeError, OSError):
        addr = None
    if addr is None and libmlx is not None:
        try:
            # RTLD_NOLOAD: only a handle to the already loaded copy.
            h = ctypes.CDLL(str(libmlx), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            addr = ctypes.cast(getattr(h, symbol), ctypes.c_void_p).value
        except (AttributeError, OSError):
            addr = None
    if not addr:
        return None
    info = _DlInfo()
    if dladdr(ctypes.c_void_p(addr), ctypes.byref(info)) and info.dli_fname:
        # normpath: libmlx's RPATH yields ".../mlx/lib/../../mlx_cpu.libs/..."
        return os.path.normpath(info.dli_fname.decode(errors="replace"))
    return None


def measure_matmul_gflops(n: int = 512, budget_s: float = 0.2) -> float:
    """Float32 n x n MLX CPU matmul throughput in GFLOP/s (about ``budget_s``)."""
    import mlx.core as mx

    a = mx.random.normal((n, n), key=mx.random.key(0))
    b = mx.random.normal((n, n), key=mx.random.key(1))
    mx.eval(a, b)
    mx.eval(mx.matmul(a, b, stream=mx.cpu))  # warm-up (thread pools, pages)
    k, t0 = 0, time.perf_counter()
    while True:
        mx.eval(mx.matmul(a, b, stream=mx.cpu))
        k += 1
        dt = time.perf_counter() - t0
        if dt >= budget_s or k >= 50:
            break
    return 2.0 * n**3 * k / dt / 1e9


def blas_info(measure: bool = True) -> dict:
    """What BLAS MLX uses in *this* process (imports ``mlx.core``).

    Keys: ``platform``, ``machine``, ``mlx_version``, ``library`` (the file
    whose ``cblas_sgemm`` MLX binds, or ``"Accelerate"`` on macOS),
    ``kind`` (see :func:`classify_library`), ``is_reference``, ``reexecuted``,
    ``gflops`` (float32 512^2 matmul, None when ``measure`` is False or it
    failed), ``error`` (None, or why something could not be found out).
    """
    info: dict = {
        "platform": sys.platform,
        "machine": platform.machine(),
        "mlx_version": None,
        "library": None,
        "kind": "unknown",
        "is_reference": False,
        "reexecuted": bool(os.environ.get(MARKER_VAR)),
        "gflops": None,
        "error": None,
    }
    try:
        import mlx.core as mx

        info["mlx_version"] = getattr(mx, "__version__", None)
    except Exception as exc:  # no backend (plain `mlx` on Linux), broken install...
        info["error"] = f"cannot import mlx.core: {exc}"
        return info

    if sys.platform == "darwin":
        # MLX on macOS links Apple's Accelerate framework (optimized).
        info.update(library="Accelerate", kind="accelerate")
    elif sys.platform.startswith("linux"):
        try:
            info["library"] = _symbol_file("cblas_sgemm", _libmlx_path())
            info["kind"] = classify_library(info["library"])
        except Exception as exc:  # pragma: no cover - defensive
            info["error"] = f"symbol lookup failed: {exc}"
        if info["library"] is None and info["error"] is None:
            info["error"] = "cblas_sgemm not found (GPU-only MLX build?)"
    info["is_reference"] = info["kind"] == "reference"
    if measure:
        try:
            info["gflops"] = round(measure_matmul_gflops(), 2)
        except Exception as exc:
            info["error"] = info["error"] or f"matmul failed: {exc}"
    return info


def arithmetic() -> dict:
    """What decides this process's float results besides the code and the data: the device and the BLAS library.

    Checkpoints record it; a resume under another one would not end bit for bit
    where the interrupted run would have (a different BLAS sums in another order).
    """
    import mlx.core as mx

    info = blas_info(measure=False)
    device = mx.default_device().type
    return {"device": getattr(device, "name", str(device)), "blas": info["library"] or info["kind"]}


def select_hint(blas: str) -> str:
    """How a user gets ``blas`` (a recorded ``arithmetic()["blas"]``) back: the GMT_MLX_BLAS setting that selects it."""
    if blas in ("Accelerate", "unknown") or blas is None:
        return "the machine that ran it"
    return f"{ENV_VAR}=reference" if classify_library(blas) == "reference" else f"{ENV_VAR}={blas}"


# --------------------------------------------------------------------------
# The decision, the check, the re-exec
# --------------------------------------------------------------------------


def decide(
    platform_name: str,
    current_kind: str | None,
    candidate: Path | str | None,
    env: Mapping[str, str],
) -> tuple[str, str]:
    """Pure decision: ``("check", reason)`` to verify and re-exec, else ``("keep", reason)``.

    ``platform_name`` is ``sys.platform``; ``current_kind`` the ``kind`` of
    :func:`blas_info` (``"reference"`` triggers); ``candidate`` what
    :func:`find_optimized_blas` returned; ``env`` the environment.
    """
    if not platform_name.startswith("linux"):
        return "keep", f"{platform_name}: MLX uses the platform BLAS, nothing to do"
    setting = (env.get(ENV_VAR) or "auto").strip().lower()
    if setting in OPT_OUT_VALUES:
        return "keep", f"{ENV_VAR}={env.get(ENV_VAR)}: reference BLAS kept on request"
    if env.get(MARKER_VAR):
        return "keep", f"already re-executed with {env.get(MARKER_VAR)} ({MARKER_VAR} set)"
    if current_kind != "reference":
        return "keep", f"MLX already uses a non-reference BLAS ({current_kind or 'unknown'})"
    if candidate is None:
        return "keep", "MLX uses the slow reference BLAS and no optimized BLAS was found; " + install_hint()
    return "check", f"reference BLAS in use; trying {candidate}"


def maybe_reexec_with_blas(argv: Sequence[str] | None = None, *, use_cache: bool = True) -> str:
    """Re-exec this command with an optimized BLAS preloaded, when safe; else return why not.

    Call it first thing in the console entry point (not from library code or
    tests: on success it replaces the process and never returns). ``argv`` is
    the full interpreter command line to re-run, default ``sys.orig_argv``
    (keeps ``-m module`` and interpreter flags); it is executed with
    ``sys.executable``. See the module docstring for the rules and the
    ``GMT_MLX_BLAS`` opt-out. A passed check is remembered in
    ``~/.cache/gmt-mlx/blas_check.json`` (keyed by library file, size,
    mtime, interpreter and MLX version) unless ``use_cache`` is False.

    Never raises: any problem keeps the current (reference) BLAS and the
    returned string says what happened.
    """
    try:
        if not sys.platform.startswith("linux"):
            return decide(sys.platform, None, None, os.environ)[1]
        # Cheap exits before importing MLX.
        pre_action, pre_reason = decide(sys.platform, "reference", "?", os.environ)
        if pre_action != "check":
            return pre_reason
        info = blas_info(measure=False)
        if info.get("error") and info.get("library") is None:
            return f"BLAS unknown, nothing changed: {info['error']}"
        cand = find_optimized_blas()
        action, reason = decide(sys.platform, info["kind"], cand, os.environ)
        forced = (os.environ.get(ENV_VAR) or "").strip()
        if cand is None and info["kind"] == "reference" and forced and forced.lower() != "auto":
            return f"kept the reference BLAS: {ENV_VAR}={forced} is not a usable file"
        if action != "check" or cand is None:
            return reason
        key = check_cache_key(cand) if use_cache else None
        if not cached_ok(key):
            ok, why, _ = check_blas(cand)
            if not ok:
                return f"kept the reference BLAS: {why}"
            remember_ok(key)
        new_env = preload_environment(cand)
        if new_env is None:
            return f"kept the reference BLAS: cannot satisfy the dependencies of {cand}"
        new_env[MARKER_VAR] = str(cand)
        args = list(argv) if argv is not None else list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
        if not args:
            return "kept the reference BLAS: empty argv"
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os.execve(sys.executable, args, new_env)
        return "unreachable"  # pragma: no cover
    except Exception as exc:  # must never break the command
        return f"kept the current BLAS: {type(exc).__name__}: {exc}"


def install_hint() -> str:
    """One line: what to install to give MLX a fast BLAS on this machine."""
    if sys.platform == "darwin":
        return "macOS: MLX already uses Accelerate; nothing to install."
    if not sys.platform.startswith("linux"):
        return "no BLAS advice for this platform."
    tail = f"gmt-mlx then uses it automatically ({ENV_VAR}=reference opts out)."
    # The pip route: only `mkl` is portable (x86_64 only, ~1 GB); cmeel-openblas
    # is built for one CPU model, so it is not advertised.
    pip = ""
    if platform.machine().lower() in ("x86_64", "amd64"):
        pip = f" (without root: `{Path(sys.executable).name} -m pip install mkl`, ~1 GB)"
    if Path("/etc/debian_version").exists() or Path("/usr/bin/apt-get").exists():
        return f"for a fast BLAS run `sudo apt-get install libopenblas0-pthread`{pip}; {tail}"
    if Path("/usr/bin/dnf").exists():
        return f"for a fast BLAS run `sudo dnf install openblas-pthreads`{pip}; {tail}"
    return f"for a fast BLAS install your distribution's OpenBLAS{pip}; {tail}"
