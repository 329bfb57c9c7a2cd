"""Kill a training run with SIGKILL, resume it, and check the result is bit-for-bit.

    python -m gmt_mlx.run.killcheck --model PATH --data DIR [--method gmt] [--iters 8]

runs `gmt-mlx finetune` as subprocesses: once uninterrupted, and once killed
right after a step, killed again half-way through writing a checkpoint, then
resumed to the end. It then compares the two final models entry by entry.
The tests run it on a tiny model; users can run it on their own model/data.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np

from gmt_mlx.config import Config
from gmt_mlx.run.checkpoint import FAULT_ENV


def run_finetune(args: Sequence[str], fault: Optional[str] = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """`python -m gmt_mlx finetune ARGS` in a subprocess, optionally with a fault injected."""
    env = dict(os.environ)
    env.pop(FAULT_ENV, None)
    if fault:
        env[FAULT_ENV] = fault
    return subprocess.run(
        [sys.executable, "-m", "gmt_mlx", "finetune", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def final_weights(run_dir: Path) -> Dict[str, np.ndarray]:
    import mlx.core as mx

    weights = {}
    for file in sorted((run_dir / "model").glob("*.safetensors")):
        # bfloat16 has no numpy dtype; its float32 values are exact, so bit-for-bit still holds.
        weights.update(
            {k: np.array(v.astype(mx.float32) if v.dtype == mx.bfloat16 else v) for k, v in mx.load(str(file)).items()}
        )
    return weights


def kill_and_resume(
    model: str,
    data: str,
    workdir: Path,
    *,
    method: str = Config.method,
    iters: int = 8,
    save_every: int = 3,
    extra: Sequence[str] = (),
) -> List[str]:
    """Return a list of problems (empty when the resumed run matches bit for bit)."""
    common = [
        "--model",
        model,
        "--data",
        data,
        "--method",
        method,
        "--iters",
        str(iters),
        "--steps-per-save",
        str(save_every),
        "--steps-per-eval",
        str(save_every),
        "--steps-per-report",
        "1",
        *extra,
    ]
    reference, killed = workdir / "reference", workdir / "killed"
    problems: List[str] = []

    def expect(result: subprocess.CompletedProcess, code: int, what: str) -> None:
        if result.returncode != code:
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            problems.append(f"{what}: exit {result.returncode}, expected {code}: {' | '.join(tail)}")

    expect(run_finetune([*common, "--out", str(reference)]), 0, "uninterrupted run")
    kill_step, save_kill = save_every + 1, 2 * save_every
    expect(
        run_finetune([*common, "--out", str(killed)], fault=f"after-step:{kill_step}"),
        -signal.SIGKILL,
        f"run killed after step {kill_step}",
    )
    # Same command again: resumes automatically from the newest complete checkpoint.
    expect(
        run_finetune([*common, "--out", str(killed)], fault=f"during-save:{save_kill}"),
        -signal.SIGKILL,
        f"resumed run killed while saving step {save_kill}",
    )
    if not list((killed / "checkpoints").glob("*.tmp")):
        problems.append("the kill during a save left no partial checkpoint behind (the fault did not hit a save)")
    expect(run_finetune(["--resume", str(killed), *common]), 0, "final resume")
    if problems:
        return problems
    a, b = final_weights(reference), final_weights(killed)
    if a.keys() != b.keys():
        return [f"different weight names: {sorted(set(a) ^ set(b))[:5]}"]
    for name in a:
        if a[name].shape != b[name].shape or not np.array_equal(a[name], b[name]):
            diff = np.abs(a[name].astype(np.float64) - b[name].astype(np.float64)).max()
            problems.append(f"{name} differs (max abs diff {diff:.3g})")
    return problems


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--method", default="gmt")
    parser.add_argument("--iters", type=int, default=8)
    parser.add_argument("--save-every", type=int, default=3)
    parser.add_argument("--workdir", default=None, help="keep the runs here (default: a temporary folder)")
    args, extra = parser.parse_known_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="gmt-killcheck-"))
    try:
        problems = kill_and_resume(
            args.model,
            args.data,
            workdir,
            method=args.method,
            iters=args.iters,
            save_every=args.save_every,
            extra=extra,
        )
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    if problems:
        print("FAIL:\n  " + "\n  ".join(problems))
        return 1
    print(
        f"OK: {args.method} killed twice (after a step, during a checkpoint write) and resumed: "
        "final weights equal the uninterrupted run bit for bit"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
