"""The run directory's one owner: its file names, its metrics and its checkpoints.

A run directory (``gmt-mlx finetune --out RUN_DIR``) holds:

    config.yaml             the resolved config (what a resume compares against)
    metrics.jsonl           one JSON record per line: "setup", "train", "eval"
    samples_before.json     answers of the untrained model (reused on resume)
    samples.json            prompts with their answers before and after training
    model/                  the final model in Hugging Face layout
    checkpoints/step-NNNNNN full training states (checkpoint.py writes one)
    checkpoints/best        the best-validation checkpoint (never pruned)

Every module that reads or writes these goes through the names and functions
here; checkpoint.py knows only what is inside one checkpoint folder.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

from . import checkpoint as ckpt
from .errors import UserError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.json"
SAMPLES_BEFORE_FILE = "samples_before.json"
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
BEST = "best"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def is_run_dir(path: str | Path) -> bool:
    """A gmt-mlx run (finished or not): its config.yaml is written before training starts."""
    return (Path(path) / CONFIG_FILE).is_file()


def is_finished(path: str | Path) -> bool:
    """The run saved its final model (model/config.json is written with the weights)."""
    return (Path(path) / MODEL_DIR / "config.json").is_file()


def model_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / MODEL_DIR


# ---------------------------------------------------------------- metrics


def _metric_lines(run_dir: str | Path) -> Iterator[Tuple[str, dict]]:
    """(line, record) for every record of metrics.jsonl, in file order.

    A final line without its newline is a write cut short by a kill and is
    skipped; any other line that is not a JSON object is a damaged file.
    """
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    text = path.read_text()
    lines = text.split("\n")
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict):
            if number == len(lines):  # no newline after it: cut short by a kill
                continue
            raise UserError(f"{path}:{number}: not a metrics record (damaged file?)")
        yield line, record


def read_metrics(run_dir: str | Path, kind: Optional[str] = None) -> List[dict]:
    """The records of RUN_DIR/metrics.jsonl ([] if absent); ``kind`` keeps one ``type`` ("train", "eval")."""
    return [record for _, record in _metric_lines(run_dir) if kind is None or record.get("type") == kind]


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records after ``step`` so a resumed run's metrics read like an uninterrupted one."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for line, record in _metric_lines(run_dir) if record.get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def last_step(run_dir: str | Path) -> Optional[int]:
    """The last optimizer step the run reported (its final model's step), or None."""
    steps = [r["step"] for r in read_metrics(run_dir, "train") if isinstance(r.get("step"), int)]
    return max(steps) if steps else None


# ---------------------------------------------------------------- checkpoints


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


def best_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / BEST


def _steps(run_dir: str | Path) -> Dict[int, Path]:
    """Complete ``step-N`` checkpoints by step, oldest first."""
    folder = Path(run_dir) / CHECKPOINTS_DIR
    found = {}
    for child in folder.iterdir() if folder.is_dir() else []:
        match = _STEP_DIR.match(child.name)
        if match and ckpt.is_complete(child):
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def step_checkpoints(run_dir: str | Path) -> List[Path]:
    """Complete ``step-N`` checkpoints of a run, oldest first."""
    return list(_steps(run_dir).values())


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The complete checkpoint with the highest step (``step-N`` or ``best``; a tie goes to ``step-N``)."""
    candidates = step_checkpoints(run_dir)
    if ckpt.is_complete(best_dir(run_dir)):
        candidates.append(best_dir(run_dir))
    if not candidates:
        return None
    return max(candidates, key=lambda p: (ckpt.read_state(p)["step"], p.name != BEST))


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (``best`` is never pruned)."""
    if keep <= 0:
        return
    for old in step_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: str | Path, name: str) -> Path:
    """The checkpoint folder for ``best``, ``last`` (the newest one) or ``step-N``."""
    run_dir = Path(run_dir)
    best = best_dir(run_dir)
    steps = _steps(run_dir)
    have = ", ".join([BEST] * ckpt.is_complete(best) + [f"step-{n}" for n in steps]) or "none"
    if name == BEST:
        if ckpt.is_complete(best):
            return best
        raise UserError(f"{run_dir} has no 'best' checkpoint (it is saved at validation, which needs "
                        f"valid.jsonl); checkpoints: {have}")
    if name == "last":
        last = run_dir / CHECKPOINTS_DIR / "last"
        if ckpt.is_complete(last):  # a "last" folder or link, where a version writes one
            return last
        found = latest_checkpoint(run_dir)
        if found is None:
            raise UserError(f"{run_dir} has no checkpoint and no final model ({MODEL_DIR}/)")
        return found
    match = re.match(r"^step-?(\d+)$", name)
    if not match:
        raise UserError(f"--checkpoint must be best, last or step-N, got {name!r}")
    if int(match.group(1)) in steps:
        return steps[int(match.group(1))]
    raise UserError(f"{run_dir} has no checkpoint {name}; checkpoints: {have}")
