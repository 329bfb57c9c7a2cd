"""The run directory's layout: metrics reading and truncation, checkpoint lookup, pruning."""

from __future__ import annotations

import json

import pytest

from gmt_mlx.errors import UserError
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run import final, rundir
from gmt_mlx.run.checkpoint import STATE_FILE

RECORDS = [
    {"type": "setup", "step": 0},
    {"type": "train", "step": 1, "loss": 2.0},
    {"type": "train", "step": 2, "loss": 1.5},
    {"type": "eval", "step": 2, "val_loss": 1.7},
    {"type": "train", "step": 3, "loss": 1.2},
]


def write_metrics(run, records=RECORDS, tail=""):
    run.mkdir(parents=True, exist_ok=True)
    (run / rundir.METRICS_FILE).write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def fake_checkpoint(path, step):
    """A checkpoint folder that verifies: its files and their checksums (contents do not matter here)."""
    path.mkdir(parents=True)
    for name in ckpt.FILES:
        (path / name).write_bytes(f"{name} {step}".encode())
    sums = {name: ckpt.sha256(path / name) for name in ckpt.FILES}
    (path / STATE_FILE).write_text(json.dumps({"step": step, "sha256": sums}))
    return path


def test_run_and_finished_markers(tmp_path):
    assert not rundir.is_run_dir(tmp_path) and not rundir.is_finished(tmp_path)
    (tmp_path / rundir.CONFIG_FILE).write_text("seed: 0\n")
    assert rundir.is_run_dir(tmp_path) and not rundir.is_finished(tmp_path)
    rundir.model_dir(tmp_path).mkdir()
    (rundir.model_dir(tmp_path) / "config.json").write_text("{}")
    # model/ is written but the run has not said it is done: not finished (a resume completes it)
    assert rundir.has_model(tmp_path) and not rundir.is_finished(tmp_path)
    final.write_finished(tmp_path, 4)
    assert rundir.is_finished(tmp_path) and final.finished_step(tmp_path) == 4
    assert final.model_damage(tmp_path) is None
    (rundir.model_dir(tmp_path) / "config.json").write_text("{ }")
    assert final.model_damage(tmp_path) == "model/config.json is not the file the run wrote (its sha256 differs)"
    (rundir.model_dir(tmp_path) / "config.json").unlink()
    assert final.model_damage(tmp_path) == "model/config.json is missing"
    (tmp_path / rundir.FINISHED_FILE).write_text("{")
    assert not rundir.is_finished(tmp_path)


def test_read_metrics_filters_by_kind_and_skips_blank_lines(tmp_path):
    assert rundir.read_metrics(tmp_path) == [] and rundir.last_step(tmp_path) is None
    write_metrics(tmp_path, RECORDS[:2] + RECORDS[2:], tail="\n\n")
    assert rundir.read_metrics(tmp_path) == RECORDS
    assert [r["step"] for r in rundir.read_metrics(tmp_path, "train")] == [1, 2, 3]
    assert rundir.read_metrics(tmp_path, "eval") == [RECORDS[3]]
    assert rundir.last_step(tmp_path) == 3


def test_a_damaged_line_is_named_and_skipped(tmp_path):
    # A record of the run's past must not stop a resume or an export: readers skip it, callers warn.
    (tmp_path / rundir.METRICS_FILE).write_bytes(b'{"type": "train", "step": 1}\nnot json\n\xff\xfe\n{"step": 2}\n')
    assert rundir.read_metrics(tmp_path) == [{"type": "train", "step": 1}, {"step": 2}]
    assert rundir.damaged_metrics(tmp_path).endswith(
        "metrics.jsonl:2: not a metrics record (damaged line, skipped) (and 1 more damaged line)"
    )
    rundir.truncate_metrics(tmp_path, 5)
    assert rundir.damaged_metrics(tmp_path) is None and len(rundir.read_metrics(tmp_path)) == 2


def test_a_last_line_cut_by_a_kill_is_skipped_then_dropped_on_resume(tmp_path):
    write_metrics(tmp_path, tail='{"type": "train", "st')
    assert rundir.read_metrics(tmp_path) == RECORDS
    rundir.truncate_metrics(tmp_path, 2)
    assert rundir.read_metrics(tmp_path) == RECORDS[:4]
    assert (tmp_path / rundir.METRICS_FILE).read_text().endswith("}\n")


def test_checkpoint_lookup_and_pruning(tmp_path):
    assert rundir.latest_checkpoint(tmp_path) is None and rundir.step_checkpoints(tmp_path) == []
    for step in (2, 10, 4):
        fake_checkpoint(rundir.step_dir(tmp_path, step), step)
    rundir.step_dir(tmp_path, 12).mkdir()  # incomplete (no state.json): never used
    assert rundir.step_dir(tmp_path, 4).name == "step-000004"
    assert [p.name for p in rundir.step_checkpoints(tmp_path)] == ["step-000002", "step-000004", "step-000010"]
    assert rundir.latest_checkpoint(tmp_path) == rundir.step_dir(tmp_path, 10)
    fake_checkpoint(rundir.best_dir(tmp_path), 10)
    assert rundir.latest_checkpoint(tmp_path) == rundir.step_dir(tmp_path, 10)  # a tie goes to step-N
    assert rundir.find_checkpoint(tmp_path, "best") == rundir.best_dir(tmp_path)
    assert rundir.find_checkpoint(tmp_path, "last") == rundir.step_dir(tmp_path, 10)
    assert rundir.find_checkpoint(tmp_path, "step-4") == rundir.find_checkpoint(tmp_path, "step4")
    with pytest.raises(UserError, match="no checkpoint step-5; checkpoints: best, step-2, step-4, step-10"):
        rundir.find_checkpoint(tmp_path, "step-5")
    with pytest.raises(UserError, match="must be best, last or step-N"):
        rundir.find_checkpoint(tmp_path, "newest")
    rundir.prune(tmp_path, 1)
    assert rundir.step_checkpoints(tmp_path) == [rundir.step_dir(tmp_path, 10)]
    assert rundir.best_dir(tmp_path).is_dir()


def test_find_checkpoint_without_any(tmp_path):
    with pytest.raises(UserError, match="no 'best' checkpoint .*checkpoints: none"):
        rundir.find_checkpoint(tmp_path, "best")
    with pytest.raises(UserError, match="no checkpoint and no final model"):
        rundir.find_checkpoint(tmp_path, "last")


def test_a_run_with_tracker_folders_and_no_config_is_still_a_run(tmp_path):
    from gmt_mlx.run import rundir

    (tmp_path / rundir.METRICS_FILE).write_text("")
    (tmp_path / rundir.TENSORBOARD_DIR).mkdir()
    (tmp_path / rundir.WANDB_DIR).mkdir()
    assert rundir.is_run_dir(tmp_path)
    (tmp_path / "notes.txt").write_text("mine")  # a user's own file: not a run's
    assert not rundir.is_run_dir(tmp_path)
