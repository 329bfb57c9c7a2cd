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
import glob
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Mapping, Sequence

#: Opt-out / override variable, see module docstring.
ENV_VAR = "GMT_MLX_BLAS"
#: Set in the re-executed process; its presence forbids another re-exec (no loops).
MARKER_VAR = "GMT_MLX_BLAS_REEXEC"
OPT_OUT_VALUES = frozenset({"reference", "ref", "off", "0", "no", "none", "false"})

#: Max relative error (vs a float64 numpy product, normalised by max |ref|)
#: accepted in the numerical check. float32 gemm with k<=1024 lands ~1e-6.
CHECK_TOLERANCE = 1e-4
CHECK_TIMEOUT_S = 120.0


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
        import mlx.core as mx  # noqa: F401  (loads libmlx.so)
        import mlx
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


# --------------------------------------------------------------------------
# Where is an optimized one?
# --------------------------------------------------------------------------

def _triplet() -> str:
    m = platform.machine()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m.lower(), m) + "-linux-gnu"


def _env_lib_dirs() -> list[Path]:
    """site-packages dirs and <prefix>/lib of the running Python environment."""
    dirs: list[Path] = []
    for key in ("purelib", "platlib"):
        try:
            dirs.append(Path(sysconfig.get_paths()[key]))
        except Exception:
            pass
    dirs.append(Path(sys.prefix) / "lib")
    out: list[Path] = []
    for d in dirs:
        if d not in out:
            out.append(d)
    return out


def candidate_paths() -> list[tuple[Path, str]]:
    """Where optimized BLAS libraries are looked for, best first, with a source label.

    System packages first (the distribution keeps them consistent with its
    libgfortran), then wheels in this Python environment.
    """
    t = _triplet()
    c: list[tuple[Path, str]] = []
    for variant in ("openblas-pthread", "openblas-openmp", "openblas-serial"):
        for root in ("/usr/lib", "/lib"):
            c.append((Path(root) / t / variant / "libopenblas.so.0", f"apt:libopenblas0-{variant.split('-')[1]}"))
    # Fedora/RHEL/openSUSE (untested here; the numerical check still gates them).
    for name in ("libopenblasp.so.0", "libopenblas.so.0"):
        c.append((Path("/usr/lib64") / name, "system:openblas"))
    c.append((Path("/usr/lib") / t / "libopenblas.so.0", "system:openblas"))
    # PyPI `mkl` (x86_64 only, ~1 GB installed): dispatches on the CPU at run
    # time, so it is portable across x86_64 machines.
    for d in _env_lib_dirs():
        for p in sorted(glob.glob(str(d / "libmkl_rt.so.*"))):
            c.append((Path(p), "pip:mkl"))
    # PyPI `cmeel-openblas` last: its 0.3.31 wheels are built for ONE CPU
    # (x86_64: SKYLAKEX, i.e. AVX-512; aarch64: NEOVERSEN2) without
    # DYNAMIC_ARCH and with MAX_THREADS=4, so elsewhere it dies with SIGILL
    # (the subprocess check catches that) and it caps threads at 4.
    for d in _env_lib_dirs():
        c.append((d / "cmeel.prefix" / "lib" / "libopenblas.so.0", "pip:cmeel-openblas"))
    return c


_STD_LIB_DIRS = ("/lib/{t}", "/usr/lib/{t}", "/lib64", "/usr/lib64", "/lib", "/usr/lib")


def system_library(soname: str) -> Path | None:
    """``soname`` in the standard library directories, if present."""
    t = _triplet()
    for d in _STD_LIB_DIRS:
        p = Path(d.format(t=t)) / soname
        if p.exists():
            return p
    return None


def _mlx_bundled_gfortran() -> Path | None:
    """The libgfortran that mlx-cpu bundles (auditwheel-renamed), if any."""
    for d in _env_lib_dirs():
        hits = sorted(glob.glob(str(d / "mlx_cpu.libs" / "libgfortran-*.so.5*")))
        if hits:
            return Path(hits[0])
    return None


def _needs_gfortran(lib: Path) -> bool:
    # cmeel-openblas links libgfortran.so.5 (for two LAPACK helpers,
    # _gfortran_concat_string and _gfortran_etime) but, unlike the distro
    # package, nothing installs it. Checked by reading DT_NEEDED strings
    # cheaply: the soname appears in the file's .dynstr.
    try:
        with open(lib, "rb") as f:
            head = f.read(4 << 20)
    except OSError:
        return False
    return b"libgfortran.so.5\x00" in head


def _deps_satisfiable(lib: Path) -> bool:
    if not _needs_gfortran(lib):
        return True
    return system_library("libgfortran.so.5") is not None or _mlx_bundled_gfortran() is not None


def find_optimized_blas(env: Mapping[str, str] | None = None) -> Path | None:
    """Path of an optimized BLAS to preload on this machine, or None.

    ``GMT_MLX_BLAS=<path>`` wins when that file exists. Otherwise the first
    existing entry of :func:`candidate_paths` whose dependencies can be met
    (``libgfortran.so.5`` from the system or the copy inside ``mlx_cpu.libs``).
    Linux only; returns None elsewhere.
    """
    env = os.environ if env is None else env
    if not sys.platform.startswith("linux"):
        return None
    forced = (env.get(ENV_VAR) or "").strip()
    if forced and forced.lower() not in OPT_OUT_VALUES and forced.lower() != "auto":
        p = Path(forced).expanduser()
        return p if p.is_file() else None
    for path, _src in candidate_paths():
        try:
            if path.is_file() and _deps_satisfiable(path):
                return path
        except OSError:
            continue
    return None


def _shim_dir_for(gfortran: Path) -> Path | None:
    """A directory where ``libgfortran.so.5`` names mlx-cpu's bundled copy.

    The bundled file is renamed (``libgfortran-<hash>.so.5.0.0``, soname
    too), so the loader cannot match it against cmeel-openblas's
    ``NEEDED libgfortran.so.5``; a symlink with the plain name on
    ``LD_LIBRARY_PATH`` can. Its own renamed dependencies (libquadmath on
    x86_64) are linked alongside because ``$ORIGIN`` resolves to the
    symlink's directory. Lives in the user cache dir; None if unwritable.
    """
    base = _cache_root()
    tag = hashlib.sha256(str(gfortran.resolve()).encode()).hexdigest()[:12]
    d = base / f"blas-shim-{tag}"
    try:
        d.mkdir(parents=True, exist_ok=True)
        links = {"libgfortran.so.5": gfortran}
        for sib in gfortran.parent.glob("libquadmath-*.so*"):
            links[sib.name] = sib
        for name, target in links.items():
            link = d / name
            if not (link.is_symlink() and Path(os.readlink(link)) == target):
                tmp = d / f".{name}.{os.getpid()}"
                if tmp.is_symlink() or tmp.exists():
                    tmp.unlink()
                tmp.symlink_to(target)
                os.replace(tmp, link)  # atomic: safe with concurrent runs
        return d
    except OSError:
        return None


def preload_environment(lib: Path, env: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """A copy of ``env`` that makes a new process preload ``lib``.

    Prepends ``lib`` to ``LD_PRELOAD`` (keeping the user's entries) and, if
    ``lib`` needs ``libgfortran.so.5`` that the system lacks, prepends a shim
    directory to ``LD_LIBRARY_PATH``. None when that dependency cannot be met.
    Does not set the re-exec marker.
    """
    out = dict(os.environ if env is None else env)
    out["LD_PRELOAD"] = ":".join([str(lib)] + [p for p in out.get("LD_PRELOAD", "").replace(" ", ":").split(":") if p])
    if _needs_gfortran(lib) and system_library("libgfortran.so.5") is None:
        gf = _mlx_bundled_gfortran()
        shim = _shim_dir_for(gf) if gf else None
        if shim is None:
            return None
        out["LD_LIBRARY_PATH"] = ":".join([str(shim)] + [p for p in out.get("LD_LIBRARY_PATH", "").split(":") if p])
    return out


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


# Runs in the child: proves the preload is what MLX binds and is correct.
_CHECK_CODE = r"""
import json, sys
import numpy as np
from gmt_mlx.blas import blas_info, CHECK_TOLERANCE
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


def check_blas(lib: Path, env: Mapping[str, str] | None = None, timeout: float = CHECK_TIMEOUT_S) -> tuple[bool, str, dict]:
    """Numerical check of ``lib`` in a subprocess; ``(ok, reason, details)``.

    The child preloads ``lib`` (via :func:`preload_environment`), confirms MLX
    binds it and compares MLX matmuls and an inverse with numpy. A crash, a
    loader error or a timeout in the child is a failed check, not ours.
    """
    penv = preload_environment(lib, env)
    if penv is None:
        return False, f"cannot satisfy libgfortran.so.5 for {lib}", {}
    penv[MARKER_VAR] = "check"  # the child must never re-exec itself
    # The child imports gmt_mlx; make sure it finds this copy of the package.
    pkg_root = str(Path(__file__).resolve().parent.parent)
    penv["PYTHONPATH"] = os.pathsep.join([pkg_root] + [p for p in penv.get("PYTHONPATH", "").split(os.pathsep) if p])
    try:
        r = subprocess.run(
            [sys.executable, "-c", _CHECK_CODE], env=penv, capture_output=True, text=True, timeout=timeout,
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


def _check_cache_key(lib: Path) -> str | None:
    try:
        st = Path(lib).resolve().stat()
        import mlx.core as mx

        raw = f"{Path(lib).resolve()}|{st.st_size}|{st.st_mtime_ns}|{sys.executable}|{getattr(mx, '__version__', '')}"
        return hashlib.sha256(raw.encode()).hexdigest()[:24]
    except Exception:
        return None


def _cache_root() -> Path:
    # The same cache as converted models ($GMT_MLX_CACHE or ~/.cache/gmt-mlx);
    # models.py is not imported here because this runs before MLX loads.
    env = os.environ.get("GMT_MLX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gmt-mlx"


def _cache_file() -> Path:
    return _cache_root() / "blas_check.json"


def _cached_ok(key: str | None) -> bool:
    if key is None:
        return False
    try:
        return json.loads(_cache_file().read_text()).get(key) is True
    except Exception:
        return False


def _remember_ok(key: str | None) -> None:
    if key is None:
        return
    try:
        f = _cache_file()
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
        key = _check_cache_key(cand) if use_cache else None
        if not _cached_ok(key):
            ok, why, _ = check_blas(cand)
            if not ok:
                return f"kept the reference BLAS: {why}"
            _remember_ok(key)
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
