"""Where gmt-mlx keeps files outside a run directory: its cache (converted models, the BLAS check)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """gmt-mlx's cache folder: cache_dir, else $GMT_MLX_CACHE, else ~/.cache/gmt-mlx."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("GMT_MLX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gmt-mlx"
