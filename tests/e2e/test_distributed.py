"""Data-parallel training with `mlx.launch -n 2 --backend ring` on one machine."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from gmt_mlx.config import Config
from gmt_mlx.recipes.finetune import finetune

LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
DRIVER = Path(__file__).resolve().parents[1] / "dist_driver.py"  # tests/dist_driver.py
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch not installed")]

# One float32 rounding step: 2 ranks sum the batch's token losses in another order.
ATOL = 1e-5
CASES = [
    ("sft", "tensor"),
    ("gmt", "tensor"),
    ("gmt", "layer"),
    ("gmt", "global"),
    ("random", "tensor"),
    ("gmt", "per-layer"),
    ("gmt", "per-layer-clip"),
]


def case(method, scope):
    """Config values of a case; scope "per-layer" is the tensor scope updated block by block (layerwise),
    "per-layer-clip" the same with a clip that binds (its norm pass all-sums every block's gradient too)."""
    if scope.startswith("per-layer"):
        return dict(
            method=method, mask_scope="tensor", update_per_layer=True, grad_clip=0.05 if scope.endswith("clip") else 0.0
        )
    return dict(method=method, mask_scope=scope)


def base(model, data, out, **kw):
    values = dict(
        model=str(model),
        data=str(data),
        out=str(out),
        iters=5,
        batch_size=4,
        learning_rate=1e-3,
        mask_ratio=0.5,
        steps_per_eval=5,
        steps_per_save=2,
        steps_per_report=1,
        seed=3,
    )
    values.update(kw)
    return values


def launch(jobs, tmp_path, n=2, env=None, timeout=600):
    spec = tmp_path / f"jobs-{len(list(tmp_path.glob('jobs-*')))}.json"
    spec.write_text(json.dumps(jobs))
    return subprocess.run(
        [LAUNCH, "-n", str(n), "--backend", "ring", "--", sys.executable, str(DRIVER), str(spec)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def weights(run_dir):
    return {k: np.array(v) for k, v in mx.load(str(Path(run_dir) / "model" / "model.safetensors")).items()}


@pytest.fixture(scope="module")
def two_rank_runs(tiny_model_dir, tmp_path_factory):
    """Every method/scope trained by 1 process (in-process) and by 2 ranks (one mlx.launch job)."""
    from tests.helpers import write_chat_data

    tmp = tmp_path_factory.mktemp("dist")
    data = write_chat_data(tmp / "data", valid=6, test=None)
    jobs = [{"config": base(tiny_model_dir, data, tmp / f"two-{m}-{s}", **case(m, s))} for m, s in CASES]
    result = launch(jobs, tmp)
    for m, s in CASES:
        finetune(Config(**base(tiny_model_dir, data, tmp / f"one-{m}-{s}", **case(m, s))), log=lambda *_: None)
    return tmp, data, result


@pytest.mark.parametrize("method,scope", CASES)
def test_two_ranks_match_one(two_rank_runs, method, scope):
    tmp, _, launched = two_rank_runs
    two = tmp / f"two-{method}-{scope}"
    assert (two / "model" / "model.safetensors").is_file(), launched.stdout[-2000:] + launched.stderr[-2000:]
    a, b = weights(tmp / f"one-{method}-{scope}"), weights(two)
    worst = max(np.abs(a[k] - b[k]).max() for k in a)
    flipped = sum(int(((a[k] == 0) != (b[k] == 0)).sum()) for k in a)  # informational
    assert worst <= ATOL, f"max abs diff {worst:.3g} ({flipped} entries differ in zero-ness)"


@pytest.mark.parametrize("method,scope", CASES)
def test_ranks_are_bit_identical(two_rank_runs, method, scope):
    tmp, _, _ = two_rank_runs
    two = tmp / f"two-{method}-{scope}"
    assert (two / "rank-0.sha256").read_text() == (two / "rank-1.sha256").read_text()


def test_only_rank_zero_writes_metrics(two_rank_runs):
    tmp, _, _ = two_rank_runs
    lines = (tmp / "two-gmt-tensor" / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"train"' in line]
    assert steps == [1, 2, 3, 4, 5]  # one writer: no duplicated records


def test_killed_rank_stops_the_job_and_resume_matches(two_rank_runs, tiny_model_dir, tmp_path):
    tmp, data, _ = two_rank_runs
    out = tmp_path / "killed"
    job = [{"config": base(tiny_model_dir, data, out, method="gmt", mask_scope="tensor")}]
    killed = launch(job, tmp_path, env={"GMT_MLX_FAULT": "rank1:after-step:3"})
    # mlx.launch reports the dead rank and terminates the others; rank 0 may get
    # its own message out first ("lost contact ... resume from ...").
    said = (
        killed.stdout + killed.stderr + ((out / "rank-0.error").read_text() if (out / "rank-0.error").exists() else "")
    )
    assert "rank 1 exited with code -9" in said or "lost contact with another rank" in said, said[-2000:]
    assert not (out / "model").exists()
    assert (out / "checkpoints" / "step-000002" / "state.json").is_file()
    launch(job, tmp_path)  # the same command again resumes from step 2 with 2 ranks
    reference = weights(tmp / "two-gmt-tensor")
    resumed = weights(out)
    assert all(np.array_equal(reference[k], resumed[k]) for k in reference)


def test_bad_setups_fail_clearly(tiny_model_dir, tmp_path):
    from tests.helpers import arithmetic_chat, write_jsonl

    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", arithmetic_chat(12))
    jobs = [
        {"config": base(tiny_model_dir, data, tmp_path / "odd", batch_size=3)},
        {"config": base(tiny_model_dir, data, tmp_path / "mismatch"), "rank_overrides": {"1": {"seed": 99}}},
    ]
    launch(jobs, tmp_path)
    assert "must be divisible by the 2 ranks" in (tmp_path / "odd" / "rank-0.error").read_text()
    assert "different configs" in (tmp_path / "mismatch" / "rank-0.error").read_text()


def test_backend_that_cannot_start(tiny_model_dir, chat_data, tmp_path):
    env = {**os.environ, "MLX_RANK": "0", "MLX_HOSTFILE": str(tmp_path / "missing.json")}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "gmt_mlx",
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(chat_data),
            "--out",
            str(tmp_path / "o"),
            "--iters",
            "1",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 2
    assert "distributed backend could not start" in result.stderr.strip().splitlines()[-1]
