"""Save and load training state, atomically.

A checkpoint is a folder:

    weights.safetensors     trainable parameters
    optimizer.safetensors   the optimizer state tree (step, moments, lr)
    state.json              step, metrics, the resolved config, versions

It is written to a temporary sibling folder, fsynced, then renamed into place,
so a kill during a save never leaves a folder that looks complete but is not:
a checkpoint without `state.json` (written last) is never loaded.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

STATE_FILE = "state.json"


def versions() -> Dict[str, str]:
    """Versions of the packages that decide what a checkpoint means."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("mlx", "mlx-lm", "gmt-mlx"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for file in path.iterdir():
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer,
    *,
    step: int,
    config: Dict[str, Any],
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write the trainable weights, optimizer state and metadata to ``path`` atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = dict(tree_flatten(model.trainable_parameters()))
    mx.save_safetensors(str(tmp / "weights.safetensors"), weights)
    opt_state = dict(tree_flatten(optimizer.state))
    mx.save_safetensors(str(tmp / "optimizer.safetensors"), opt_state)
    meta = {"step": step, "config": config, "versions": versions(), **(extra or {})}
    (tmp / STATE_FILE).write_text(json.dumps(meta, indent=2))
    _fsync_tree(tmp)
    old = path.with_name(path.name + ".old")
    if path.exists():
        if old.exists():
            shutil.rmtree(old)
        path.rename(old)
    tmp.rename(path)
    _fsync_dir(path.parent)
    if old.exists():
        shutil.rmtree(old)
    return path


def is_complete(path: str | Path) -> bool:
    return (Path(path) / STATE_FILE).is_file()


def load_checkpoint(path: str | Path, model: nn.Module, optimizer) -> Dict[str, Any]:
    """Restore weights and optimizer state from ``path``; return its metadata."""
    path = Path(path)
    meta = json.loads((path / STATE_FILE).read_text())
    weights = mx.load(str(path / "weights.safetensors"))
    model.load_weights(list(weights.items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(path / "optimizer.safetensors")).items()))
    mx.eval(model.parameters(), optimizer.state)
    return meta
