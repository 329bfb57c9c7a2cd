"""Issue 38, case 4: one writer per run directory (an exclusive lock), and a stale lock is taken over.

The campaign ran two `finetune` on one --out: one failed to save, and the
survivor's metrics.jsonl kept 2 of 9 records. Here a real second process is
refused in one line naming the first's pid, and after the first is SIGKILLed
(the kernel drops its flock) the run resumes and ends like an uninterrupted one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
from typer.testing import CliRunner

from gmt_mlx.cli import app
from gmt_mlx.errors import UserError
from gmt_mlx.run import rundir
from gmt_mlx.run.killcheck import final_weights
from gmt_mlx.run.lock import RunLock
from tests.helpers import REPO, resumable_run_args

runner = CliRunner()

# A real `gmt-mlx finetune` that pauses (holding its lock) once step 2 is saved, until it is killed.
PAUSING = """
import sys, time
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.cli import app
ckpt.fault = lambda point: (print("paused", flush=True), time.sleep(300)) if point == "after-step:2" else None
app(sys.argv[1:])
"""


def args(model, data, out):
    """The resumable run's arguments (tests/helpers.py), no samples."""
    return resumable_run_args(model, data, out, "--samples", 0)


@pytest.mark.slow
def test_a_second_writer_is_refused_and_a_killed_ones_lock_is_taken_over(tiny_model_dir, chat_data, tmp_path):
    reference, out = tmp_path / "reference", tmp_path / "run"
    assert runner.invoke(app, args(tiny_model_dir, chat_data, reference)).exit_code == 0
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen(
        [sys.executable, "-c", PAUSING, *args(tiny_model_dir, chat_data, out)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        for line in first.stdout:  # wait until it trains (its lock held, step 2 saved)
            if line.strip() == "paused":
                break
        else:
            pytest.fail(f"the first run ended early (rc {first.wait()})")
        assert (out / rundir.LOCK_FILE).read_text() == f"{first.pid}\n"
        config, metrics = (out / rundir.CONFIG_FILE).read_bytes(), (out / rundir.METRICS_FILE).read_bytes()
        for command in (
            args(tiny_model_dir, chat_data, out),
            ["finetune", "--resume", str(out)],
            [*args(tiny_model_dir, chat_data, out), "--overwrite"],
        ):
            second = runner.invoke(app, command)
            assert second.exit_code == 2, second.output
            assert second.output.strip().splitlines() == [
                f"error: {out} is being written by another gmt-mlx process (pid {first.pid}); wait for it to end, "
                f"or choose another --out"
            ]
        # The refused writers changed nothing (--overwrite included).
        assert (out / rundir.CONFIG_FILE).read_bytes() == config
        assert (out / rundir.METRICS_FILE).read_bytes() == metrics
        assert rundir.step_checkpoints(out)[-1].name == "step-000002"
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (out / rundir.LOCK_FILE).is_file()  # left by the killed process: stale, taken over below
    resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    a, b = final_weights(reference), final_weights(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (out / rundir.METRICS_FILE).read_text().splitlines()]
    ref = [json.loads(line)["step"] for line in (reference / rundir.METRICS_FILE).read_text().splitlines()]
    assert steps == ref  # every record once
    assert not (out / rundir.LOCK_FILE).exists()  # given back at the end


def test_the_lock_is_exclusive_and_given_back(tmp_path):
    first, second = RunLock(), RunLock()
    first.hold(tmp_path)
    with pytest.raises(UserError, match=rf"\(pid {os.getpid()}\)"):
        second.hold(tmp_path)
    first.release()
    second.hold(tmp_path)  # free again
    assert second.held and (tmp_path / rundir.LOCK_FILE).read_text() == f"{os.getpid()}\n"
    second.release()
    assert not (tmp_path / rundir.LOCK_FILE).exists()


@pytest.mark.slow
def test_a_folder_with_only_a_stale_lock_is_empty(tiny_model_dir, chat_data, tmp_path):
    """A run killed before it wrote anything leaves only the lock file: the command starts it like an empty folder."""
    out = tmp_path / "run"
    out.mkdir()
    (out / rundir.LOCK_FILE).write_text("99999999\n")
    assert rundir.is_empty(out) and not rundir.is_run_dir(out)
    result = runner.invoke(app, args(tiny_model_dir, chat_data, out))
    assert result.exit_code == 0, result.output
    resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert resumed.exit_code == 0 and "already finished" in resumed.output


def test_a_folder_made_while_this_run_set_up_is_refused(tmp_path):
    lock = RunLock()
    lock.hold(tmp_path / "run")  # did not exist: nothing locked yet
    assert not lock.held
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / rundir.CONFIG_FILE).write_text("seed: 0\n")  # another process started it meanwhile
    with pytest.raises(UserError, match="was started by another gmt-mlx process while this one set up"):
        lock.hold(tmp_path / "run", new=True)
    assert not lock.held and not (tmp_path / "run" / rundir.LOCK_FILE).exists()  # the refusal gave it back
