"""Save and load the full training state, atomically and verifiably.

A checkpoint is one folder (rundir.py names and finds them:
``RUN_DIR/checkpoints/step-000120``, ``best``):

    weights.safetensors     trainable parameters (adapters only for LoRA)
    optimizer.safetensors   the optimizer state tree (step, moments, lr)
    rng.safetensors         MLX's global RNG state (LoRA dropout draws from it)
    state.json              step, data position, metrics, resolved config,
                            loss normalisation, versions, the sha256 of
                            every file above, and its own (state_sha256)

It is written to a temporary sibling folder, fsynced, then renamed into
place, and `state.json` is written last: a kill during a save leaves either
the previous checkpoint or a ``*.tmp`` folder that is never loaded. On load
every file is checked against its sha256, so a corrupt or truncated
checkpoint is refused instead of silently loaded. GMT/random masks need no
RNG of their own: they derive from (seed, optimizer step).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import threading
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from gmt_mlx.config import Config, field_types
from gmt_mlx.errors import UserError

STATE_FILE = "state.json"
STATE_SUM = "state_sha256"  # state.json's own checksum, over the rest of it (state_digest)
FILES = ("weights.safetensors", "optimizer.safetensors", "rng.safetensors")
FAULT_ENV = "GMT_MLX_FAULT"
# How a step's loss and gradient are normalised: by the step's total target tokens
# (docs/design.md decision 8). Checkpoints of gmt-mlx < 0.2 lack the field: they averaged
# micro-batch means, and finetune refuses to resume them where that differs.
LOSS_NORMALISATION = "step_tokens"


def fault(point: str) -> None:
    """Fault injection for the kill-and-resume tests: SIGKILL this process at ``point``.

    ``GMT_MLX_FAULT=during-save:6`` kills the save of step 6 half-way;
    ``after-step:4`` kills right after step 4. Unset in normal use.
    """
    if os.environ.get(FAULT_ENV) == point:
        os.kill(os.getpid(), signal.SIGKILL)


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


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _no_sigint():
    """Hold Ctrl-C back (it is delivered on exit) where an interruption would lose a checkpoint."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _replace_dir(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``, replacing an old ``path`` with no window where neither is complete.

    A SIGKILL between the two renames leaves ``path.old`` and ``tmp``, both
    ignored by the lookup (an older checkpoint is resumed) and removed by the next save.
    """
    old = path.with_name(path.name + ".old")
    with _no_sigint():  # a second Ctrl-C here must not leave the checkpoint renamed away
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        _fsync(path.parent)
        if old.exists():
            shutil.rmtree(old)


def save_arrays(path: str | Path, arrays: Dict[str, mx.array], metadata: Optional[Dict[str, str]] = None) -> None:
    """mx.save_safetensors, with MLX's failed write (a RuntimeError "[write] Unable to write ...",
    e.g. on a full disk) raised as the OSError it is, so every caller's disk-error handling sees it."""
    try:
        mx.save_safetensors(str(path), arrays, **({"metadata": metadata} if metadata else {}))
    except RuntimeError as err:
        if "[write]" not in str(err) and "Unable to" not in str(err):
            raise
        raise OSError(errno.EIO, f"could not write {path} (is the disk full?)", str(path)) from None


def save_checkpoint(
    path: str | Path,
    model: nn.Module,
    optimizer,
    *,
    step: int,
    config: Dict[str, Any],
    extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write the full training state to ``path`` atomically; return ``path``.

    Disk errors (full disk, read-only folder) become a UserError and leave the
    previous checkpoint at ``path`` untouched.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_arrays(tmp / FILES[0], dict(tree_flatten(model.trainable_parameters())))
        save_arrays(tmp / FILES[1], dict(tree_flatten(optimizer.state)))
        fault(f"during-save:{step}")
        save_arrays(tmp / FILES[2], {"rng": mx.random.state[0]})
        meta = {
            "step": step,
            "loss_normalisation": LOSS_NORMALISATION,
            "config": config,
            "versions": versions(),
            "sha256": {name: sha256(tmp / name) for name in FILES},
            **(extra or {}),
        }
        for name in FILES:
            _fsync(tmp / name)
        write_state(tmp, meta)
        _fsync(tmp / STATE_FILE)
        _fsync(tmp)
        _replace_dir(tmp, path)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not save checkpoint {path}: {err.strerror or err}") from None
    except BaseException:  # a second Ctrl-C mid-save: leave no partial folder behind
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


def link_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Make ``dst`` a copy of checkpoint ``src`` (hard links where possible: no extra disk)."""
    src, dst = Path(src), Path(dst)
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        shutil.copytree(src, tmp, copy_function=_link_or_copy)
        _replace_dir(tmp, dst)
    except OSError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not save checkpoint {dst}: {err.strerror or err}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _link_or_copy(src, dst):
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class DamagedCheckpoint(UserError):
    """A checkpoint folder that cannot be used (missing, cut short or corrupt files); str(err) says which and why."""


def state_digest(meta: Dict[str, Any]) -> str:
    """The sha256 of a checkpoint's metadata (all but the checksum itself), as canonical JSON."""
    body = {key: value for key, value in meta.items() if key != STATE_SUM}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


def write_state(path: str | Path, meta: Dict[str, Any]) -> Path:
    """Write ``path``/state.json holding ``meta`` and its own checksum (``read_state`` checks it)."""
    file = Path(path) / STATE_FILE
    file.write_text(json.dumps({**meta, STATE_SUM: state_digest(meta)}, indent=2))
    return file


def read_state(path: str | Path) -> Dict[str, Any]:
    """The metadata of a checkpoint (``state.json``); DamagedCheckpoint if it is missing or damaged.

    Only the JSON is checked here (cheap): its own checksum, then the types of
    what it holds (a checkpoint of gmt-mlx before the checksum is only type
    checked); ``verify`` also checks the other files.
    """
    file = Path(path) / STATE_FILE
    try:
        meta = json.loads(file.read_bytes().decode("utf-8"))
    except FileNotFoundError:
        raise DamagedCheckpoint(f"checkpoint {path} is incomplete: {STATE_FILE} is missing") from None
    except OSError as err:
        raise DamagedCheckpoint(f"checkpoint {path} is unreadable: {STATE_FILE}: {err.strerror or err}") from None
    except (UnicodeDecodeError, ValueError):  # JSONDecodeError is a ValueError
        raise DamagedCheckpoint(
            f"checkpoint {path} is damaged: {STATE_FILE} is not valid JSON (cut short or corrupt)"
        ) from None
    if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or isinstance(meta.get("step"), bool):
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {STATE_FILE} has no step")
    if STATE_SUM in meta and meta[STATE_SUM] != state_digest(meta):
        raise DamagedCheckpoint(f"checkpoint {path} is corrupt: {STATE_FILE} does not match its checksum")
    problem = state_problem(meta)
    if problem is not None:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {STATE_FILE}'s {problem}")
    return meta


# What the readers of state.json take from it, by type (None: may be null); the config is checked field by field.
_STATE_TYPES = {
    "step": (int,),
    "best_val_loss": (int, float, type(None)),
    "val_loss": (int, float, type(None)),
    "total_steps": (int,),
    "micro_batches": (int,),
    "loss_normalisation": (str,),
    "sha256": (dict,),
    "config": (dict,),
    "arithmetic": (dict,),
    "versions": (dict,),
}


def state_problem(meta: Dict[str, Any]) -> Optional[str]:
    """What is wrong in a checkpoint's metadata (a value of the wrong type, an unknown option), or None.

    A hand edit or a damaged checkpoint of an old version carries no checksum: this keeps its
    config from reaching ``Config(**values)`` (a traceback) or a number from being a string.
    """
    for key, kinds in _STATE_TYPES.items():
        value = meta.get(key)
        if key in meta and (not isinstance(value, kinds) or isinstance(value, bool)):
            return f"{key} is {type(value).__name__}, not {' or '.join(k.__name__ for k in kinds)}"
    kinds = field_types()
    types = {f.name: (kinds[f.name], "Optional" in str(f.type)) for f in fields(Config)}
    for name, value in (meta.get("config") or {}).items():
        if name not in types:
            return f"config has an unknown option {name!r}"
        kind, optional = types[name]
        allowed = (int, float) if kind is float else (kind,)
        if not (value is None and optional) and (
            not isinstance(value, allowed) or (isinstance(value, bool) and kind is not bool)
        ):
            return f"config's {name} is {value!r}, not a {kind.__name__}"
    return None


def is_complete(path: str | Path) -> bool:
    """A checkpoint folder whose save finished (state.json is written last); it may still be damaged."""
    return (Path(path) / STATE_FILE).is_file()


def verify(path: str | Path) -> Dict[str, Any]:
    """Check every file against the sha256 in state.json; raise DamagedCheckpoint if any differs."""
    path = Path(path)
    meta = read_state(path)
    checksums = meta.get("sha256")
    # The weights and the optimizer state must be covered: a state.json without them vouches for nothing.
    if not isinstance(checksums, dict) or any(not isinstance(checksums.get(name), str) for name in FILES[:2]):
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: {STATE_FILE} lacks the files' checksums")
    for name, digest in checksums.items():
        file = path / name
        if not file.is_file():
            raise DamagedCheckpoint(f"checkpoint {path} is incomplete: {name} is missing")
        if sha256(file) != digest:
            raise DamagedCheckpoint(f"checkpoint {path} is corrupt: {name} does not match its checksum")
    return meta


def load_checkpoint(
    path: str | Path, model: nn.Module, optimizer=None, *, verified: Optional[Dict[str, Any]] = None
) -> Dict[str, Any]:
    """Verify, then restore weights (and optimizer state and RNG); return the metadata.

    ``verified``: the metadata ``verify`` returned for this folder just before
    (finetune's plan verifies to choose the checkpoint: hashing gigabytes twice is waste).
    """
    path = Path(path)
    meta = verified if verified is not None else verify(path)
    weights = mx.load(str(path / FILES[0]))
    model.load_weights(list(weights.items()), strict=False)
    if optimizer is not None:
        optimizer.state = tree_unflatten(list(mx.load(str(path / FILES[1])).items()))
        # Restore the structure the optimizer expects (tree_unflatten drops empty containers).
        optimizer.init(model.trainable_parameters())
        mx.eval(optimizer.state)
    rng_file = path / FILES[2]
    if rng_file.is_file():
        # mx.random.state cannot be assigned to; a key is {seed >> 32, seed & 0xffffffff},
        # so reseeding with the saved key's two words restores it exactly.
        hi, lo = (int(w) for w in mx.load(str(rng_file))["rng"].tolist())
        mx.random.seed((hi << 32) | lo)
    mx.eval(model.parameters())
    return meta
