"""What the evidence studies' scripts share (studies/ceiling_*.py, studies/grpo_study*.py).

The scripts run as `python studies/NAME.py`, so this folder is on sys.path and they import it
as ``study_tools``. Reading rows, copying raw results into docs/, and the "mean ± sample std"
and paired-difference cells of their tables.
"""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path


def read_rows(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect(out: Path, dest: Path) -> None:
    """Copy every run's study.json under ``out``, and its base.json and rates.json, to ``dest``."""
    for src in sorted(out.rglob("study.json")) + [out / "base.json", out / "rates.json"]:
        target = dest / src.relative_to(out)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, target)
    print(f"copied to {dest}")


def rate_of(rates: dict, label: str):
    return rates.get("lora" if label == "lora" else "full")  # gmt and random use full's rate


def stat(values: list, scale: float = 1.0, digits: int = 1, sign: bool = False) -> str:
    """Mean ± sample std of the values (None left out), scaled; "-" for none, the mean alone for one."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    fmt = f"{{:+.{digits}f}}" if sign else f"{{:.{digits}f}}"
    mean = statistics.mean(values)
    if len(values) == 1:
        return fmt.format(mean)
    return f"{fmt.format(mean)} ± {statistics.stdev(values):.{digits}f}"


def paired(runs: dict, full: dict, key) -> list:
    """Per-seed differences key(run) - key(full run of the same seed), for the seeds both have."""
    return [key(runs[s]) - key(full[s]) for s in sorted(runs) if s in full]
