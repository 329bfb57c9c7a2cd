"""plan_run's resume rules: unmasked runs and their mask ratio, checkpoints from before 0.2's accumulation change."""

from __future__ import annotations

import json
import os
import signal

import pytest
import yaml

import gmt_mlx.recipes.plan as plan_module
import gmt_mlx.recipes.setup as run_setup
from gmt_mlx import config as cfg
from gmt_mlx.cli import app
from gmt_mlx.config import Config
from gmt_mlx.errors import UserError
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run import rundir
from tests.helpers import runner


def interrupted_run(tmp_path, *, loss_normalisation=True, **values):
    """A run dir as a kill after step 2 leaves it: config.yaml and checkpoints/step-000002."""
    out = tmp_path / "run"
    config = Config(out=str(out), **values)
    out.mkdir()
    cfg.save_yaml(config, out / rundir.CONFIG_FILE)
    state = {"step": 2, "config": config.to_dict()}
    if loss_normalisation:
        state["loss_normalisation"] = ckpt.LOSS_NORMALISATION
    rundir.step_dir(out, 2).mkdir(parents=True)
    for name in ckpt.FILES:  # stand-ins: plan_run verifies checksums, not contents
        (rundir.step_dir(out, 2) / name).write_bytes(name.encode())
    state["sha256"] = {name: ckpt.sha256(rundir.step_dir(out, 2) / name) for name in ckpt.FILES}
    (rundir.step_dir(out, 2) / ckpt.STATE_FILE).write_text(json.dumps(state))
    return config


@pytest.mark.parametrize("method", ["sft", "full", "lora", "dora"])
def test_an_unmasked_run_resumes_whatever_the_mask_ratio(tmp_path, method):
    saved = interrupted_run(tmp_path, method=method)
    plan = plan_module.plan_run(Config(out=saved.out, method=method, mask_ratio=0.7, mask_scope="global"), resume=True)
    assert plan.checkpoint == rundir.step_dir(saved.out, 2)


def test_a_masked_run_with_another_mask_ratio_is_refused(tmp_path):
    saved = interrupted_run(tmp_path, method="gmt")
    with pytest.raises(UserError, match=r"mask_ratio: 0.2 -> 0.7.*--force"):
        plan_module.plan_run(Config(out=saved.out, method="gmt", mask_ratio=0.7))


OLD = "was started by gmt-mlx before 0.2's change to gradient accumulation"


@pytest.mark.parametrize("accumulation,ranks,refused", [(1, 1, False), (2, 1, True), (1, 2, True)])
def test_checkpoints_from_before_the_accumulation_change(tmp_path, accumulation, ranks, refused):
    saved = interrupted_run(tmp_path, loss_normalisation=False, grad_accumulation_steps=accumulation, batch_size=4)
    if refused:
        with pytest.raises(UserError, match=f"{saved.out} {OLD}.*start it over with --overwrite"):
            plan_module.plan_run(saved, resume=True, ranks=ranks)
        assert plan_module.plan_run(saved, overwrite=True, ranks=ranks).replace
    else:  # one micro-batch on one process: the gradient did not change
        assert plan_module.plan_run(saved, resume=True, ranks=ranks).checkpoint == rundir.step_dir(saved.out, 2)


def test_new_checkpoints_resume_with_accumulation(tmp_path):
    saved = interrupted_run(tmp_path, grad_accumulation_steps=2)
    assert plan_module.plan_run(saved, resume=True, ranks=2).checkpoint is not None


def test_full_run_resumes_under_a_yaml_with_another_mask_ratio(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    """End to end: --method full (stored as sft), Ctrl-C, then --resume with a YAML that sets mask_ratio."""
    out = tmp_path / "run"
    first = [
        "finetune",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(chat_data),
        "--out",
        str(out),
        "--iters",
        "4",
        "--learning-rate",
        "1e-3",
        "--steps-per-save",
        "2",
        "--steps-per-eval",
        "3",
        "--samples",
        "0",
        "--method",
        "full",
        "--optimizer",
        "sgd",
        "--momentum",
        "0.5",
    ]
    monkeypatch.setattr(
        ckpt, "fault", lambda point: os.kill(os.getpid(), signal.SIGINT) if point == "after-step:2" else None
    )
    assert runner.invoke(app, first).exit_code == 130
    monkeypatch.setattr(ckpt, "fault", lambda point: None)
    saved = yaml.safe_load((out / rundir.CONFIG_FILE).read_text())
    assert saved["method"] == "sft" and saved["momentum"] == 0.5
    assert ckpt.read_state(rundir.step_dir(out, 2))["loss_normalisation"] == "step_tokens"

    built = {}
    real = run_setup.build_optimizer
    monkeypatch.setattr(
        run_setup,
        "build_optimizer",
        lambda options, *a, **k: built.update(vars(options), **k) or real(options, *a, **k),
    )
    (tmp_path / "other.yaml").write_text("mask_ratio: 0.7\nmask_target: update\nlora_rank: 4\n")
    resumed = runner.invoke(app, ["finetune", "--resume", str(out), "-c", str(tmp_path / "other.yaml")])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output and built["momentum"] == 0.5
    assert rundir.last_step(out) == 4 and rundir.is_finished(out)
    best = ckpt.read_state(rundir.best_dir(out))  # saved at step 3 (no step checkpoint) or linked at 4
    assert best["val_loss"] == best["best_val_loss"] == min(r["val_loss"] for r in rundir.read_metrics(out, "eval"))
