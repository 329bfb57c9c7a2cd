"""Where an optimized BLAS is on this machine, and the environment that preloads it (blas.py decides and checks).

Searched in order: Debian/Ubuntu ``libopenblas0-pthread``/``-openmp``, Fedora
``openblas``, then in this Python environment the PyPI ``mkl`` and
``cmeel-openblas`` wheels (the last one needs ``libgfortran.so.5``: MLX's
bundled copy is linked in through an ``LD_LIBRARY_PATH`` shim when the system
has none). Nothing here runs at import time or loads MLX.
"""

from __future__ import annotations

import glob
import hashlib
import os
import platform
import sys
import sysconfig
from pathlib import Path
from typing import Mapping

from gmt_mlx.paths import cache_root

#: Opt-out / override variable (blas.py's docstring has its values).
ENV_VAR = "GMT_MLX_BLAS"
OPT_OUT_VALUES = frozenset({"reference", "ref", "off", "0", "no", "none", "false"})


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
    base = cache_root()
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
