"""Nothing lost: exact resume, atomic/verified checkpoints, guards, memory check."""

from __future__ import annotations

import json
import os
import signal

import mlx.core as mx
import numpy as np
import pytest
import yaml

from gmt_mlx.cli import app
from gmt_mlx.config import METHODS
from gmt_mlx.core.trainer import NonFiniteError, train
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run import rundir
from gmt_mlx.run.killcheck import final_weights, kill_and_resume
from tests.helpers import last_line, resumable_run_args, runner


def args(model, data, out, *extra):
    """The resumable run's arguments (tests/helpers.py), EXTRA appended."""
    return resumable_run_args(model, data, out, *extra)


@pytest.mark.slow
@pytest.mark.parametrize("method", [m for m in ("gmt", "sft", "random", "lora") if m in METHODS])
def test_sigkill_and_resume_is_bit_for_bit(tiny_model_dir, chat_data, tmp_path, method):
    """Subprocesses: SIGKILL after a step, SIGKILL during a checkpoint write, resume, compare."""
    problems = kill_and_resume(
        str(tiny_model_dir),
        str(chat_data),
        tmp_path,
        method=method,
        iters=8,
        save_every=3,
        extra=["--learning-rate", "1e-3", "--mask-ratio", "0.5"],
    )
    assert problems == []


def test_ctrl_c_saves_and_resume_matches(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    reference = tmp_path / "reference"
    assert runner.invoke(app, args(tiny_model_dir, chat_data, reference)).exit_code == 0

    # Press Ctrl-C right after step 3 (a step that is not a checkpoint step).
    real_fault = ckpt.fault
    monkeypatch.setattr(
        ckpt, "fault", lambda point: os.kill(os.getpid(), signal.SIGINT) if point == "after-step:3" else None
    )
    out = tmp_path / "run"
    stopped = runner.invoke(app, args(tiny_model_dir, chat_data, out))
    assert stopped.exit_code == 130, stopped.output
    assert f"gmt-mlx finetune --resume {out}" in stopped.output
    assert ckpt.is_complete(rundir.step_dir(out, 3)) and not (out / "model").exists()
    monkeypatch.setattr(ckpt, "fault", real_fault)

    resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert "resuming" in resumed.output
    a, b = final_weights(reference), final_weights(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    ref_steps = [json.loads(line)["step"] for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert steps == ref_steps  # no duplicated records after the resume


def test_checkpoint_holds_the_full_state(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    assert runner.invoke(app, args(tiny_model_dir, chat_data, out, "--keep-checkpoints", "2")).exit_code == 0
    names = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert names == ["best", "step-000004", "step-000006"]  # pruned to 2, best kept
    state = ckpt.read_state(out / "checkpoints" / "step-000006")
    assert state["step"] == 6 and state["micro_batches"] == 6 and state["config"]["mask_ratio"] == 0.5
    assert state["loss_normalisation"] == "step_tokens"  # steps divide by their total target tokens
    assert set(state["versions"]) == {"mlx", "mlx-lm", "gmt-mlx"} and set(state["sha256"]) == set(ckpt.FILES)
    opt = mx.load(str(out / "checkpoints" / "step-000006" / "optimizer.safetensors"))
    assert int(opt["step"].item()) == 6 and any(k.endswith(".m") for k in opt)


def test_different_config_is_refused_with_the_keys(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    out = tmp_path / "run"
    monkeypatch.setattr(
        ckpt, "fault", lambda point: os.kill(os.getpid(), signal.SIGINT) if point == "after-step:2" else None
    )
    assert runner.invoke(app, args(tiny_model_dir, chat_data, out)).exit_code == 130
    monkeypatch.setattr(ckpt, "fault", lambda point: None)
    refused = runner.invoke(app, args(tiny_model_dir, chat_data, out, "--mask-ratio", "0.3", "--seed", "4"))
    assert refused.exit_code == 2
    assert "mask_ratio: 0.5 -> 0.3" in last_line(refused) and "seed: 0 -> 4" in last_line(refused)
    assert "--force" in last_line(refused)
    forced = runner.invoke(app, args(tiny_model_dir, chat_data, out, "--mask-ratio", "0.3", "--force"))
    assert forced.exit_code == 0, forced.output
    assert yaml.safe_load((out / "config.yaml").read_text())["mask_ratio"] == 0.3


def corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_checkpoint_is_never_loaded(tiny_model_dir, chat_data, tmp_path, monkeypatch, damage):
    out = tmp_path / "run"
    monkeypatch.setattr(
        ckpt, "fault", lambda point: os.kill(os.getpid(), signal.SIGINT) if point == "after-step:2" else None
    )
    assert runner.invoke(app, args(tiny_model_dir, chat_data, out)).exit_code == 130
    weights = rundir.step_dir(out, 2) / "weights.safetensors"
    if damage == "flip":
        corrupt(weights)
    else:
        weights.write_bytes(weights.read_bytes()[:100])
    result = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert result.exit_code == 2
    assert "corrupt" in last_line(result) and "weights.safetensors" in last_line(result)


def test_disk_full_while_saving_keeps_the_previous_checkpoint(tiny_model_dir, tmp_path, monkeypatch):
    from mlx_lm import load

    from gmt_mlx.config import MaskOptions, OptimizerOptions
    from gmt_mlx.core.optim import build_optimizer
    from gmt_mlx.errors import UserError

    model, _ = load(str(tiny_model_dir))
    opt = build_optimizer(OptimizerOptions(), 1e-3, seed=0, mask=MaskOptions(mask_ratio=0.5))
    opt.init(model.trainable_parameters())
    path = tmp_path / "ckpt"
    ckpt.save_checkpoint(path, model, opt, step=1, config={})
    before = ckpt.sha256(path / "weights.safetensors")

    def full(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", full)
    with pytest.raises(UserError, match="No space left on device"):
        ckpt.save_checkpoint(path, model, opt, step=2, config={})
    assert ckpt.read_state(path)["step"] == 1 and ckpt.sha256(path / "weights.safetensors") == before
    assert not (tmp_path / "ckpt.tmp").exists()
    ckpt.verify(path)


def test_non_finite_steps_are_skipped_then_stop(tiny_model_dir):
    from mlx_lm import load

    from gmt_mlx.config import MaskOptions, OptimizerOptions
    from gmt_mlx.core.losses import sft_loss
    from gmt_mlx.core.optim import build_optimizer

    model, _ = load(str(tiny_model_dir))
    opt = build_optimizer(OptimizerOptions(), 1e-3, seed=0, mask=MaskOptions(mask_ratio=0.5))
    calls = {"n": 0}

    def loss_fn(m, tokens, mask):
        loss, ntoks = sft_loss(m, tokens, mask)
        # Steps 2 and 4-6 are poisoned (one trace per step: the flag is read at trace time).
        return loss * (mx.array(float("nan")) if calls["n"] in (1, 3, 4, 5) else 1.0), ntoks

    tokens = mx.array(np.random.default_rng(0).integers(0, 384, (2, 12)), mx.int32)
    results = []

    def on_step(r):
        results.append(r)
        calls["n"] += 1

    grad_fn_batches = iter([(tokens, mx.ones(tokens.shape))] * 10)
    # Disable compilation so the poison flag is re-read every step.
    mx.disable_compile()
    try:
        with pytest.raises(NonFiniteError, match="3 consecutive"):
            train(model, opt, grad_fn_batches, iters=8, loss_fn=loss_fn, on_step=on_step, max_bad_steps=3)
    finally:
        mx.enable_compile()
    assert [r.skipped for r in results] == [False, True, False, True, True, True]
    assert int(opt.state["step"].item()) == 2  # only the two finite steps were applied


def test_diverging_run_stops_with_a_message(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        args(
            tiny_model_dir,
            chat_data,
            out,
            "--learning-rate",
            "1e38",
            "--optimizer",
            "sgd",
            "--grad-clip",
            "0",
            "--steps-per-save",
            "1",
            "--iters",
            "12",
        ),
    )
    assert result.exit_code == 2, result.output
    assert "non-finite" in last_line(result) and "last good checkpoint" in last_line(result)
    latest = rundir.latest_checkpoint(out)
    ckpt.verify(latest)


def test_memory_check_refuses_then_can_be_overridden(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    import gmt_mlx.recipes.setup as run_setup

    monkeypatch.setattr(run_setup, "available_bytes", lambda: 1000)
    refused = runner.invoke(app, args(tiny_model_dir, chat_data, tmp_path / "a"))
    assert refused.exit_code == 2 and "exceeds" in last_line(refused) and "--batch-size" in last_line(refused)
    assert "--low-memory (estimated ~" in last_line(refused)  # the one switch, with what it would need
    assert not (tmp_path / "a").exists()
    allowed = runner.invoke(app, args(tiny_model_dir, chat_data, tmp_path / "b", "--no-memory-check"))
    assert allowed.exit_code == 0, allowed.output
    record = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()][-2]
    assert record["memory_estimate_gb"] > 0 and record["peak_memory_gb"] > 0


@pytest.mark.slow
def test_grad_checkpoint_gives_the_same_training(tiny_model_dir, chat_data, tmp_path):
    losses = []
    for flag in ("--no-grad-checkpoint", "--grad-checkpoint"):
        out = tmp_path / flag
        assert runner.invoke(app, args(tiny_model_dir, chat_data, out, flag)).exit_code == 0
        train = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
        losses.append([record["loss"] for record in train])
    assert np.allclose(losses[0], losses[1], rtol=1e-4)


def test_mlx_write_failure_is_one_line_and_resumable(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    """MLX reports a failed write (a full disk) as RuntimeError("[write] Unable to write ..."), not OSError."""
    real = mx.save_safetensors
    calls = {"n": 0}

    def flaky(path, *a, **k):
        calls["n"] += 1
        if calls["n"] > 3:  # the first checkpoint (3 files) is written, the second fails
            raise RuntimeError("[write] Unable to write 3234769 bytes to file.")
        return real(path, *a, **k)

    monkeypatch.setattr(mx, "save_safetensors", flaky)
    out = tmp_path / "run"
    result = runner.invoke(app, args(tiny_model_dir, chat_data, out, "--samples", "0"))
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output and "is the disk full?" in last_line(result)
    monkeypatch.setattr(mx, "save_safetensors", real)
    resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
