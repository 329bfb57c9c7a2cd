"""`gmt-mlx doctor`: what MLX runs on here, and how to make it faster."""

from __future__ import annotations

from gmt_mlx.cli.common import echo, user_errors


@user_errors
def doctor() -> None:
    """Print the MLX version, device, BLAS in use (measured), memory and advice."""
    import os
    import platform

    import mlx.core as mx

    from gmt_mlx.platform.blas import ENV_VAR, MARKER_VAR, blas_info, install_hint

    info = blas_info(measure=True)
    echo(f"mlx        {info.get('mlx_version')} on {platform.system()} {platform.machine()}")
    echo(f"device     {mx.default_device()}")
    echo(f"blas       {info.get('kind')} ({info.get('library')})")
    gflops = info.get("gflops")
    if gflops:
        echo(f"matmul     {gflops:.1f} GFLOP/s (float32, measured)")
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        echo(f"memory     {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 1e9:.1f} GB")
    if os.environ.get(MARKER_VAR):
        echo(f"note       this process was re-executed with {os.environ[MARKER_VAR]} preloaded")
    if info.get("is_reference"):
        echo(f"advice     MLX uses the slow reference BLAS: {install_hint()}")
    elif os.environ.get(ENV_VAR):
        echo(f"note       {ENV_VAR}={os.environ[ENV_VAR]}")
