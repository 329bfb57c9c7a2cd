"""The final model a run leaves, verified: finished.json holds model/'s sha256 sums and is written last.

A finished run is one whose finished.json exists (rundir.is_finished); every
use of its model/ (eval, generate, push, export, resume) checks the sums
first (`check_model`, `model_damage`). A damaged model/ is never used: the
final step's checkpoint (`final_checkpoint`) holds the same weights, so
export reads that instead and a resume rebuilds model/ from it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

from gmt_mlx.errors import UserError
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run import rundir


def _model_sums(run_dir: Path) -> Dict[str, str]:
    folder = rundir.model_dir(run_dir)
    return {p.relative_to(folder).as_posix(): ckpt.sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}


def write_finished(run_dir: str | Path, step: int) -> None:
    """Mark the run finished (last of all its writes), with the sha256 of every file of model/."""
    record = {"step": step, "model": _model_sums(Path(run_dir))}
    rundir.write_json_atomically(Path(run_dir) / rundir.FINISHED_FILE, record, indent=1)


def model_damage(run_dir: str | Path) -> Optional[str]:
    """Why the final model of a finished run is not what the run wrote (None when it verifies, or has no sums)."""
    run_dir = Path(run_dir)
    record = rundir.read_json(run_dir / rundir.FINISHED_FILE)
    if record is None:
        return f"{rundir.FINISHED_FILE} is damaged" if (run_dir / rundir.FINISHED_FILE).exists() else None
    sums = record.get("model") if isinstance(record, dict) else None
    if not isinstance(sums, dict) or not sums:
        return f"{rundir.FINISHED_FILE} is damaged"
    folder = rundir.model_dir(run_dir)
    for name, digest in sums.items():
        path = folder / name
        if not path.is_file():
            return f"{rundir.MODEL_DIR}/{name} is missing"
        if ckpt.sha256(path) != digest:
            return f"{rundir.MODEL_DIR}/{name} is not the file the run wrote (its sha256 differs)"
    return None


def check_model(run_dir: str | Path) -> None:
    """Refuse, in one line saying how to rebuild it, a model/ that is not what the run wrote (eval, generate, push)."""
    damage = model_damage(run_dir)
    if damage is not None:
        raise UserError(f"{run_dir}: {damage}; rebuild it with: gmt-mlx finetune --resume {run_dir}")


def finished_step(run_dir: str | Path) -> Optional[int]:
    """The step finished.json records (the run's last)."""
    record = rundir.read_json(Path(run_dir) / rundir.FINISHED_FILE)
    step = record.get("step") if isinstance(record, dict) else None
    return step if isinstance(step, int) else None


def final_checkpoint(run_dir: str | Path) -> Tuple[Optional[Path], Optional[dict]]:
    """The newest checkpoint that verifies, with its state, when it holds the run's final step; else (None, None).

    The final step is finished.json's; where that file is damaged, the run's step count that the
    (verified) checkpoint itself records: a damaged finished.json must not hide a good final checkpoint.
    """
    latest, meta, _ = rundir.newest_verified(run_dir)
    if latest is None:
        return None, None
    last = finished_step(run_dir)
    if last is None:
        last = meta.get("total_steps")
    if meta.get("step") != last:
        return None, None
    return latest, meta
