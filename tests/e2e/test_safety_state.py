"""Issue 38, cases 2 and 3: checkpoint state and the run's config carry checksums checked on every read.

A damaged or edited state.json (a key "columns" -> "colulns", "step": 4 -> 5) or
config.yaml (mask_ratio 0.5 -> 0.4, iters 6 -> 7) never gives a traceback and never
trains a different model: export, GGUF export and --resume fall back on an older
checkpoint (or the checkpoint's copy of the config) after one warning naming the
file, or refuse in one line naming it. Old runs without checksums still resume.
"""

from __future__ import annotations

import json
import os
import shutil
import signal

import numpy as np
import pytest
from typer.testing import CliRunner

from gmt_mlx.cli import app
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run import rundir
from gmt_mlx.run.killcheck import final_weights
from tests.helpers import resumable_run_args, write_chat_data

runner = CliRunner()
STEP2, STEP4, BEST = "checkpoints/step-000002", "checkpoints/step-000004", "checkpoints/best"


def args(model, data, out):
    """The resumable run's arguments (tests/helpers.py), no samples."""
    return resumable_run_args(model, data, out, "--samples", 0)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    """(reference run, the same run stopped by Ctrl-C after step 4: step-2, step-4 and best at step 3)."""
    root = tmp_path_factory.mktemp("state")
    data = write_chat_data(root / "data")
    reference, stopped = root / "reference", root / "stopped"
    assert runner.invoke(app, args(tiny_model_dir, data, reference)).exit_code == 0
    mp = pytest.MonkeyPatch()
    mp.setattr(ckpt, "fault", lambda point: os.kill(os.getpid(), signal.SIGINT) if point == "after-step:4" else None)
    try:
        assert runner.invoke(app, args(tiny_model_dir, data, stopped)).exit_code == 130
    finally:
        mp.undo()
    return reference, stopped


def copy(stopped, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(stopped, out)
    return out


def edit(path, old, new):
    text = path.read_text()
    assert old in text, (old, text[:400])
    path.write_text(text.replace(old, new, 1))


def invoke(*command):
    result = runner.invoke(app, [str(c) for c in command])
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def same_weights(a, b):
    a, b = final_weights(a), final_weights(b)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def strip_checksums(out):
    """What a run of gmt-mlx before the checksums looks like: no state_sha256, no checksum line in config.yaml."""
    for state in out.glob("checkpoints/*/state.json"):
        meta = json.loads(state.read_text())
        meta.pop(ckpt.STATE_SUM)
        state.unlink()  # best/ may share its files with a step checkpoint (hard links)
        state.write_text(json.dumps(meta, indent=2))
    config = out / rundir.CONFIG_FILE
    lines = config.read_text().splitlines(keepends=True)
    assert lines[-1].startswith("# sha256 ")
    config.write_text("".join(lines[:-1]))


STATE_EDITS = [
    ('"columns"', '"colulns"'),
    ('"step": 4', '"step": 5'),
    ('"mask_ratio": 0.5', '"mask_ratio": 0.4'),
    ('"iters": 6', '"iters": 7'),
]


# Without its checksum (a run of gmt-mlx before it) a plausible value cannot be told from the truth: only the
# unknown key.
CASES = [(old, new, True) for old, new in STATE_EDITS] + [('"columns"', '"colulns"', False)]


@pytest.mark.slow
@pytest.mark.parametrize("old,new,checksums", CASES, ids=[new + ("" if c else "-old-run") for _, new, c in CASES])
def test_an_edited_state_json_falls_back_on_resume_and_export(runs, tmp_path, old, new, checksums):
    reference, stopped = runs
    out = copy(stopped, tmp_path)
    if not checksums:
        strip_checksums(out)
    edit(out / STEP4 / ckpt.STATE_FILE, old, new)
    for command in (
        ["export", out, "--out", tmp_path / "hf"],
        ["export", out, "--format", "gguf", "--outtype", "f32", "--out", tmp_path / "gguf"],
    ):
        result = invoke(*command)
        assert result.exit_code == 0, result.output
        warning = [line for line in result.output.splitlines() if line.startswith("warning:")]
        assert len(warning) == 1 and f"{out / STEP4}" in warning[0] and "state.json" in warning[0], result.output
    resumed = invoke("finetune", "--resume", out)
    assert resumed.exit_code == 0, resumed.output
    warning = [line for line in resumed.output.splitlines() if "the newest checkpoint that verifies" in line]
    assert len(warning) == 1 and "state.json" in warning[0] and "resuming from best" in warning[0]
    assert same_weights(reference, out)


@pytest.mark.slow
def test_every_state_json_damaged_is_refused_in_one_line(runs, tmp_path):
    _, stopped = runs
    out = copy(stopped, tmp_path)
    for folder in (STEP2, STEP4, BEST):
        state = out / folder / ckpt.STATE_FILE
        text = state.read_text().replace('"columns"', '"colulns"')
        state.unlink()
        state.write_text(text)
    result = invoke("export", out, "--out", tmp_path / "hf")
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1].startswith(f"error: {out} has no checkpoint that verifies")
    resumed = invoke("finetune", "--resume", out)
    assert resumed.exit_code == 2
    line = resumed.output.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot resume {out}: no checkpoint verifies") and "state.json" in line


def test_read_state_names_the_problem(tmp_path):
    folder = tmp_path / "c"
    folder.mkdir()
    ckpt.write_state(folder, {"step": 3, "config": {"columns": None}, "best_val_loss": 1.5})
    assert ckpt.read_state(folder)["step"] == 3
    for meta, problem in [
        ({"step": 3, "config": {"colulns": None}}, "config has an unknown option 'colulns'"),
        ({"step": 3, "config": {"mask_ratio": "0.5"}}, "config's mask_ratio is '0.5', not a float"),
        ({"step": 3, "best_val_loss": "1.5"}, "best_val_loss is str, not int or float or NoneType"),
    ]:
        (folder / ckpt.STATE_FILE).write_text(json.dumps(meta))  # no checksum: an old version's checkpoint
        with pytest.raises(ckpt.DamagedCheckpoint, match=f"state.json's {problem}$"):
            ckpt.read_state(folder)


CONFIG_EDITS = [("mask_ratio: 0.5", "mask_ratio: 0.4"), ("iters: 6", "iters: 7"), ("seed: 0", "seed: 1")]


@pytest.mark.slow
@pytest.mark.parametrize("old,new", CONFIG_EDITS, ids=[new for _, new in CONFIG_EDITS])
def test_an_edited_config_yaml_is_said_and_the_checkpoint_copy_used(runs, tmp_path, old, new):
    """The edit is reported in one line naming config.yaml; the run trains the model it started (bit for bit)."""
    reference, stopped = runs
    out = copy(stopped, tmp_path)
    edit(out / rundir.CONFIG_FILE, old, new)
    resumed = invoke("finetune", "--resume", out)
    assert resumed.exit_code == 0, resumed.output
    warning = [line for line in resumed.output.splitlines() if line.startswith("warning:")]
    assert warning == [
        f"warning: {out / rundir.CONFIG_FILE} was changed after the run wrote it (it does not match "
        f"its checksum); using the copy of the config in {STEP4}"
    ]
    assert same_weights(reference, out)
    assert rundir.read_config(out)[old.split(":")[0]] == reference_value(old)


def reference_value(line):
    return {"mask_ratio": 0.5, "iters": 6, "seed": 0}[line.split(":")[0]]


@pytest.mark.slow
def test_an_edited_config_yaml_without_a_checkpoint_copy_is_refused(runs, tmp_path):
    _, stopped = runs
    out = copy(stopped, tmp_path)
    edit(out / rundir.CONFIG_FILE, "mask_ratio: 0.5", "mask_ratio: 0.4")
    shutil.rmtree(out / "checkpoints")
    result = invoke("export", out, "--out", tmp_path / "hf")
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"error: {out / rundir.CONFIG_FILE} was changed after the run wrote it (it does not match its checksum)"
    ]


@pytest.mark.slow
def test_an_old_run_without_checksums_resumes_bit_for_bit(runs, tmp_path):
    reference, stopped = runs
    out = copy(stopped, tmp_path)
    strip_checksums(out)
    resumed = invoke("finetune", "--resume", out)
    assert resumed.exit_code == 0, resumed.output
    assert "warning" not in resumed.output
    assert same_weights(reference, out)
