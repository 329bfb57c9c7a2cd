"""The damage campaign: truncate, byte-flip or delete every file of a run directory, then resume and export.

Every case must end without a traceback; a resume must end with exactly the
weights of the uninterrupted run (a damaged file is detected and an older good
state used, never a wrong one), and an export must succeed from what is left.
"""

from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import pytest

from gmt_mlx.cli import app
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run.killcheck import final_weights
from tests.helpers import resumable_run_args, runner, write_chat_data

STEP2, STEP4, BEST = "checkpoints/step-000002", "checkpoints/step-000004", "checkpoints/best"
FILES = ["config.yaml", "metrics.jsonl", "samples_before.json"] + [
    f"{folder}/{name}" for folder in (STEP2, STEP4, BEST) for name in (ckpt.STATE_FILE, *ckpt.FILES)
]
CASES = [(file, damage) for file in FILES for damage in ("truncate", "flip", "delete")] + [
    (STEP4, "delete"),
    (BEST, "delete"),
    ("checkpoints", "delete"),
]


def args(model, data, out):
    """The resumable run's arguments (tests/helpers.py), one sample answered."""
    return resumable_run_args(model, data, out, "--samples", 1)


FINISHED = [f"model/{name}" for name in ("model.safetensors", "config.json", "tokenizer.json")] + ["samples.json"]
FINISHED_CASES = [(file, damage) for file in FINISHED for damage in ("truncate", "flip", "delete")]


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """(reference run, the same run stopped by Ctrl-C after step 4: step-2, step-4 and best at step 3)."""
    root = tmp_path_factory.mktemp("damage")
    data = write_chat_data(root / "data")
    reference, stopped = root / "reference", root / "stopped"
    assert runner.invoke(app, args(tiny_model_dir, data, reference)).exit_code == 0
    mp = pytest.MonkeyPatch()
    mp.setattr(ckpt, "fault", lambda point: os.kill(os.getpid(), signal.SIGINT) if point == "after-step:4" else None)
    try:
        assert runner.invoke(app, args(tiny_model_dir, data, stopped)).exit_code == 130
    finally:
        mp.undo()
    assert sorted(p.name for p in (stopped / "checkpoints").iterdir()) == ["best", "step-000002", "step-000004"]
    assert ckpt.read_state(stopped / BEST)["step"] == 3
    return reference, stopped


def damage(path, how):
    if how == "delete":
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        return
    data = bytearray(path.read_bytes())
    if how == "truncate":
        path.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))


def run_on_damaged_copy(stopped, tmp_path, file, how, *command):
    """Copy the stopped run, damage one file of it, run ``command`` on it: (copy, result); never a traceback."""
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    damage(out / file, how)
    result = runner.invoke(app, [arg if arg != "RUN" else str(out) for arg in command])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return out, result


@pytest.mark.slow
@pytest.mark.parametrize("file,how", CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_damaged_run_resumes_bit_for_bit(runs, tmp_path, file, how):
    reference, stopped = runs
    out, result = run_on_damaged_copy(stopped, tmp_path, file, how, "finetune", "--resume", "RUN")
    assert result.exit_code == 0, result.output
    a, b = final_weights(reference), final_weights(out)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    if file.startswith(STEP4 + "/"):  # the newest one is damaged: which and why, in one line
        warnings = [line for line in result.output.splitlines() if "the newest checkpoint that verifies" in line]
        assert len(warnings) == 1 and "step-000004" in warnings[0] and "resuming from best" in warnings[0]


@pytest.mark.parametrize("file,how", CASES, ids=[f"{f}-{d}" for f, d in CASES])
def test_damaged_run_exports(runs, tmp_path, file, how):
    out, result = run_on_damaged_copy(runs[1], tmp_path, file, how, "export", "RUN", "--out", str(tmp_path / "export"))
    if file == "checkpoints":  # no state left at all: said in one line
        assert result.exit_code == 2 and result.output.strip().splitlines() == [
            f"error: {out} has no checkpoint and no final model (model/)"
        ]
        return
    assert result.exit_code == 0, result.output
    assert (tmp_path / "export" / "config.json").is_file()


@pytest.mark.parametrize("file,how", FINISHED_CASES, ids=[f"{f}-{d}" for f, d in FINISHED_CASES])
def test_damaged_finished_run_exports_and_is_left_alone_by_resume(runs, tmp_path, file, how):
    """model/ and samples.json of a finished run: export falls back on the final checkpoint; resume changes nothing."""
    reference, _ = runs
    out, result = run_on_damaged_copy(
        reference, tmp_path, file, how, "export", "RUN", "--out", str(tmp_path / "export")
    )
    assert result.exit_code == 0, result.output
    assert (tmp_path / "export" / "config.json").is_file()
    resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert "Traceback" not in resumed.output and resumed.exit_code == 0, resumed.output
