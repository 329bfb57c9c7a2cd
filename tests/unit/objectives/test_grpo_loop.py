"""--train-mode grpo end to end on a tiny model: bad input, GMT at ratio 0 = full, learning, exact resume."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gmt_mlx import config as cfg
from gmt_mlx.cli import app
from gmt_mlx.config import Config
from gmt_mlx.recipes.finetune import finetune
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run import rundir
from gmt_mlx.run.killcheck import final_weights, kill_and_resume
from tests.helpers import assert_clean_error as message  # checks the error, returns its line
from tests.helpers import runner, write_jsonl

# A reward the tiny random model can learn in a few steps: the share of digits in its completion.
DIGITS = "tests.unit.objectives.test_grpo_loop:digit_share"


def digit_share(prompt, completion, row):
    return sum(ch.isdigit() for ch in completion) / max(len(completion), 1)


def broken_reward(prompt, completion, row):
    raise ValueError("no reward today")


def sums(n: int, start: int = 0, answer: bool = True):
    rows = []
    for a in range(start, start + n):
        row = {
            "messages": [{"role": "user", "content": f"What is {a} + 3?"}, {"role": "assistant", "content": str(a + 3)}]
        }
        if answer:
            row["answer"] = str(a + 3)
        rows.append(row)
    return rows


@pytest.fixture()
def prompt_data(tmp_path) -> Path:
    folder = tmp_path / "data"
    write_jsonl(folder / "train.jsonl", sums(8))
    write_jsonl(folder / "valid.jsonl", sums(4, 100))
    return folder


def grpo_args(model, data, out, *extra):
    return [
        "finetune",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--train-mode",
        "grpo",
        "--batch-size",
        "2",
        "--num-generations",
        "4",
        "--max-completion-length",
        "6",
        "--iters",
        "4",
        "--steps-per-report",
        "1",
        "--samples",
        "0",
        "--steps-per-save",
        "0",
        "--val-batches",
        "1",
        *map(str, extra),
    ]


@pytest.mark.parametrize(
    "flags, expected",
    [
        (["--num-generations", "1"], "--num-generations must be at least 2"),
        (["--reward", "nonsense"], "unknown reward 'nonsense'"),
        (["--reward", "exact,format", "--reward-weights", "1"], "--reward-weights has 1 weight but --reward names 2"),
        (["--num-iterations", "0"], "--num-iterations must be at least 1"),
        (["--temperature", "0"], "--temperature must be positive"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["--top-p", "1.5"], "--top-p must be in (0, 1]"),
        (["--max-completion-length", "0"], "--max-completion-length must be at least 1"),
        (["--beta", "-0.1"], "--beta must be 0 (no KL term) or more for --train-mode grpo"),
        (["--scale-rewards", "sometimes"], "--scale-rewards must be one of group, batch, none"),
        (["--loss-type", "ppo"], "--loss-type must be one of grpo, dr_grpo, dapo, bnpo"),
    ],
)
def test_bad_grpo_options_are_one_line_errors(tiny_model_dir, prompt_data, tmp_path, flags, expected):
    assert expected in message(runner.invoke(app, grpo_args(tiny_model_dir, prompt_data, tmp_path / "o", *flags)))
    assert not (tmp_path / "o").exists()  # refused before anything was written


def test_rows_the_rewards_cannot_score_name_the_file_and_row(tiny_model_dir, tmp_path):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", sums(3) + sums(1, 50, answer=False))
    line = message(runner.invoke(app, grpo_args(tiny_model_dir, data, tmp_path / "o", "--reward", "exact")))
    assert f"{data / 'train.jsonl'}, row 4: no answer, which --reward exact needs" in line
    write_jsonl(data / "train.jsonl", [{"text": "no prompt here"}] * 4)
    line = message(runner.invoke(app, grpo_args(tiny_model_dir, data, tmp_path / "o")))
    assert "train.jsonl, row 1: no prompt" in line


def test_long_prompts_are_kept_whole_with_a_warning(tiny_model_dir, prompt_data, tmp_path):
    result = runner.invoke(
        app,
        grpo_args(
            tiny_model_dir,
            prompt_data,
            tmp_path / "o",
            "--max-seq-length",
            "16",
            "--iters",
            "1",
            "--steps-per-eval",
            "0",
            "--reward",
            DIGITS,
        ),
    )
    assert result.exit_code == 0, result.output
    assert (
        "warning: 8 train prompts leave less than --max-completion-length 6 tokens within --max-seq-length 16"
        in result.output
    )


def test_a_reward_function_that_raises_stops_the_run_in_one_line(tiny_model_dir, prompt_data, tmp_path):
    broken = DIGITS.replace("digit_share", "broken_reward")
    line = message(runner.invoke(app, grpo_args(tiny_model_dir, prompt_data, tmp_path / "o", "--reward", broken)))
    # The step-0 validation scores first: the valid file's first row.
    assert f"valid.jsonl, row 1: --reward {broken} raised ValueError: no reward today" in line


def test_grpo_options_do_not_tell_other_modes_apart():
    sft, other = cfg.Config().to_dict(), cfg.Config(num_generations=8, reward="number", loss_type="grpo").to_dict()
    assert cfg.diff(sft, other) == {}
    grpo = cfg.Config(train_mode="grpo").to_dict()
    assert grpo["beta"] == 0.0 and cfg.Config(train_mode="dpo").beta == 0.1
    assert "num_generations" in cfg.diff(grpo, {**grpo, "num_generations": 8})


def records(out: Path, kind: str):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["type"] == kind]


def test_gmt_at_ratio_zero_is_full_bit_for_bit(tiny_model_dir, prompt_data, tmp_path):
    common = ("--reward", DIGITS, "--learning-rate", "3e-3", "--steps-per-eval", "0")
    full = runner.invoke(app, grpo_args(tiny_model_dir, prompt_data, tmp_path / "full", "--method", "full", *common))
    assert full.exit_code == 0, full.output
    gmt = runner.invoke(
        app, grpo_args(tiny_model_dir, prompt_data, tmp_path / "gmt", "--method", "gmt", "--mask-ratio", "0", *common)
    )
    assert gmt.exit_code == 0, gmt.output
    a, b = final_weights(tmp_path / "full"), final_weights(tmp_path / "gmt")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # The rollouts were the same too, and they taught something (a non-zero update).
    assert [r["reward"] for r in records(tmp_path / "full", "train")] == [
        r["reward"] for r in records(tmp_path / "gmt", "train")
    ]
    assert all(r["grad_norm"] > 0 for r in records(tmp_path / "full", "train"))


def test_mean_reward_rises_on_a_reward_the_model_can_learn(tiny_model_dir, prompt_data, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        grpo_args(
            tiny_model_dir,
            prompt_data,
            out,
            "--reward",
            DIGITS,
            "--method",
            "gmt",
            "--mask-ratio",
            "0.5",
            "--learning-rate",
            "1e-2",
            "--iters",
            "12",
            "--steps-per-eval",
            "12",
            "--max-completion-length",
            "8",
        ),
    )
    assert result.exit_code == 0, result.output
    train = records(out, "train")
    rewards = [r["reward"] for r in train]
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.3, rewards
    for key in (
        "reward_std",
        f"rewards/{DIGITS}/mean",
        "frac_reward_zero_std",
        "completion_length",
        "clip_ratio/region_mean",
        "rollout_seconds",
        "update_seconds",
    ):
        assert key in train[-1], key
    evals = records(out, "eval")
    assert [e["step"] for e in evals] == [0, 12]  # greedy validation from step 0
    assert evals[-1]["val_reward"] > evals[0]["val_reward"]
    card = (out / "model" / "README.md").read_text()
    assert f"on the GRPO (dapo loss), reward {DIGITS}" in card and "- grpo\n" in card


@pytest.mark.parametrize("temperature", [pytest.param("1.0", marks=pytest.mark.slow), "0.7"])
def test_reused_rollouts_and_accumulation_run(tiny_model_dir, prompt_data, tmp_path, temperature):
    """--num-iterations 2: the second step on a round has a ratio away from 1 (old log-probs are the sampler's).
    At a temperature other than 1 the first step's ratio is still exactly 1: the old log-probs and the loss's
    are both taken at the sampling temperature (TRL's), not one of them at 1."""
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        grpo_args(
            tiny_model_dir,
            prompt_data,
            out,
            "--reward",
            DIGITS,
            "--learning-rate",
            "3e-2",
            "--num-iterations",
            "2",
            "--grad-accumulation-steps",
            "2",
            "--temperature",
            temperature,
            "--batch-size",
            "1",
            "--epsilon",
            "0.01",
            "--steps-per-eval",
            "0",
        ),
    )
    assert result.exit_code == 0, result.output
    train = records(out, "train")
    assert [r["rollout_seconds"] > 0 for r in train] == [True, False, True, False]
    assert train[0]["reward"] == train[1]["reward"]  # the same rollouts, trained on twice
    assert train[0]["clip_ratio/region_mean"] == 0 and train[1]["clip_ratio/region_mean"] > 0


def test_update_per_layer_trains_grpo_like_the_fused_step(tiny_model_dir, prompt_data, tmp_path):
    common = (
        "--reward",
        DIGITS,
        "--learning-rate",
        "1e-2",
        "--iters",
        "2",
        "--grad-clip",
        "0",
        "--steps-per-eval",
        "0",
    )
    fused = runner.invoke(app, grpo_args(tiny_model_dir, prompt_data, tmp_path / "fused", *common))
    assert fused.exit_code == 0, fused.output
    layered = runner.invoke(
        app, grpo_args(tiny_model_dir, prompt_data, tmp_path / "layer", "--update-per-layer", *common)
    )
    assert layered.exit_code == 0, layered.output
    a, b = records(tmp_path / "fused", "train"), records(tmp_path / "layer", "train")
    np.testing.assert_allclose([r["grad_norm"] for r in a], [r["grad_norm"] for r in b], rtol=1e-4)
    wa, wb = final_weights(tmp_path / "fused"), final_weights(tmp_path / "layer")
    assert all(np.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.parametrize("masked", [False, True])
def test_truncated_completions_leave_the_loss_when_asked(tiny_model_dir, prompt_data, tmp_path, masked):
    """At 2 completion tokens every completion of the tiny model is cut short: --mask-truncated-completions
    leaves them all out of the loss, so no gradient and weights bit-equal to the step-0 model's; without it they
    train."""
    out = tmp_path / "run"
    flags = ["--mask-truncated-completions"] if masked else []
    result = runner.invoke(
        app,
        grpo_args(
            tiny_model_dir,
            prompt_data,
            out,
            "--reward",
            DIGITS,
            "--iters",
            "2",
            "--max-completion-length",
            "2",
            "--learning-rate",
            "1e-2",
            "--steps-per-eval",
            "0",
            "--scale-rewards",
            "none",
            *flags,
        ),
    )
    assert result.exit_code == 0, result.output
    train = records(out, "train")
    assert all(r["truncated_fraction"] == 1.0 for r in train)
    import mlx.core as mx

    base = {
        k: np.array(v) for f in sorted(Path(tiny_model_dir).glob("*.safetensors")) for k, v in mx.load(str(f)).items()
    }
    tuned = final_weights(out)
    assert set(tuned) <= set(base)
    if masked:
        assert all(r["grad_norm"] == 0 for r in train)
        assert all(np.array_equal(tuned[k], base[k]) for k in tuned)
    else:
        assert any(r["grad_norm"] > 0 for r in train)
        assert not all(np.array_equal(tuned[k], base[k]) for k in tuned)


@pytest.mark.parametrize("loss_type", cfg.GRPO_LOSS_TYPES)
def test_every_loss_type_trains_in_the_loop(tiny_model_dir, prompt_data, tmp_path, loss_type):
    out = tmp_path / "run"
    result = runner.invoke(
        app,
        grpo_args(
            tiny_model_dir,
            prompt_data,
            out,
            "--reward",
            DIGITS,
            "--iters",
            "2",
            "--loss-type",
            loss_type,
            "--scale-rewards",
            "batch",
            "--learning-rate",
            "1e-2",
            "--steps-per-eval",
            "0",
        ),
    )
    assert result.exit_code == 0, result.output
    assert all(r["grad_norm"] > 0 and np.isfinite(r["loss"]) for r in records(out, "train"))


@pytest.mark.parametrize("beta", ["0", pytest.param("0.05", marks=pytest.mark.slow)])
def test_ctrl_c_inside_a_round_saves_it_and_resume_matches(tiny_model_dir, prompt_data, tmp_path, monkeypatch, beta):
    """In-process and fast: Ctrl-C after step 3 of --num-iterations 2 (inside a round), resume, compare
    (with a KL term too: the resumed run's reference is the step-0 model again)."""
    common = (
        "--reward",
        DIGITS,
        "--learning-rate",
        "1e-2",
        "--iters",
        "6",
        "--num-iterations",
        "2",
        "--steps-per-eval",
        "0",
        "--beta",
        beta,
    )
    reference = tmp_path / "reference"
    assert runner.invoke(app, grpo_args(tiny_model_dir, prompt_data, reference, *common)).exit_code == 0
    real_fault = ckpt.fault
    monkeypatch.setattr(
        ckpt, "fault", lambda point: os.kill(os.getpid(), signal.SIGINT) if point == "after-step:3" else None
    )
    out = tmp_path / "run"
    stopped = runner.invoke(app, grpo_args(tiny_model_dir, prompt_data, out, *common))
    assert stopped.exit_code == 130, stopped.output
    state = ckpt.read_state(rundir.step_dir(out, 3))["rollouts"]
    assert len(state["key"]) == 2 and state["round"] is not None  # step 4 trains on step 3's rollouts
    monkeypatch.setattr(ckpt, "fault", real_fault)
    resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    a, b = final_weights(reference), final_weights(out)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [r["reward"] for r in records(reference, "train")] == [r["reward"] for r in records(out, "train")]


@pytest.mark.parametrize("method", [pytest.param("full", marks=pytest.mark.slow), "lora"])
def test_a_kl_term_to_the_step_0_model(tiny_model_dir, prompt_data, tmp_path, method):
    """--beta > 0: "kl" starts at 0 (the policy is the reference) and grows as the policy moves; a larger
    beta keeps it smaller."""
    kls = {}
    for beta in ("0.01", "1"):
        out = tmp_path / beta
        result = runner.invoke(
            app,
            grpo_args(
                tiny_model_dir,
                prompt_data,
                out,
                "--reward",
                DIGITS,
                "--method",
                method,
                "--learning-rate",
                "3e-2",
                "--iters",
                "6",
                "--beta",
                beta,
                "--steps-per-eval",
                "0",
            ),
        )
        assert result.exit_code == 0, result.output
        kls[beta] = [r["kl"] for r in records(out, "train")]
        assert abs(kls[beta][0]) < 1e-5 and kls[beta][-1] > 1e-4, kls
    assert kls["1"][-1] < kls["0.01"][-1], kls


@pytest.mark.slow
@pytest.mark.parametrize("iterations", [1, 2])
def test_grpo_sigkill_and_resume_is_bit_for_bit(tiny_model_dir, prompt_data, tmp_path, iterations):
    """Killed after step 4 and during the save of step 6, then resumed from step 3's checkpoint: the
    sampling key comes back exactly, and with --num-iterations 2 the round step 3 was inside of too."""
    problems = kill_and_resume(
        str(tiny_model_dir),
        str(prompt_data),
        tmp_path,
        method="gmt",
        iters=8,
        save_every=3,
        extra=[
            "--train-mode",
            "grpo",
            "--reward",
            DIGITS,
            "--batch-size",
            "2",
            "--num-generations",
            "4",
            "--max-completion-length",
            "6",
            "--learning-rate",
            "1e-2",
            "--mask-ratio",
            "0.5",
            "--num-iterations",
            str(iterations),
            "--samples",
            "0",
            "--val-batches",
            "1",
        ],
    )
    assert problems == []


LAUNCH = shutil.which("mlx.launch") or str(Path(sys.executable).parent / "mlx.launch")
ROOT = Path(__file__).resolve().parents[3]  # tests/unit/objectives/ -> the repository


@pytest.mark.slow
@pytest.mark.skipif(not Path(LAUNCH).exists(), reason="mlx.launch not installed")
def test_two_ranks_train_grpo_like_one(tiny_model_dir, prompt_data, tmp_path):
    """mlx.launch -n 2: every rank samples the whole batch and trains on its half of the groups; the step's
    sums are all-reduced, so the weights equal one process's to float32 rounding (another summing order).
    SGD, because Adam turns a rounding-size gradient (GRPO's advantages cancel) into a whole step of lr."""
    values = dict(
        model=str(tiny_model_dir),
        data=str(prompt_data),
        train_mode="grpo",
        reward=DIGITS,
        iters=4,
        batch_size=2,
        num_generations=4,
        max_completion_length=6,
        learning_rate=0.3,
        optimizer="sgd",
        method="gmt",
        mask_ratio=0.5,
        steps_per_eval=4,
        val_batches=1,
        samples=0,
        steps_per_report=1,
        beta=0.05,
    )
    jobs = tmp_path / "jobs.json"
    jobs.write_text(json.dumps([{"config": {**values, "out": str(tmp_path / "two")}}]))
    launched = subprocess.run(
        [
            LAUNCH,
            "-n",
            "2",
            "--backend",
            "ring",
            "--",
            sys.executable,
            str(ROOT / "tests" / "dist_driver.py"),
            str(jobs),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    two = tmp_path / "two"
    assert (two / "model").is_dir(), launched.stdout[-2000:] + launched.stderr[-2000:]
    assert (two / "rank-0.sha256").read_text() == (two / "rank-1.sha256").read_text()
    finetune(Config(**values, out=str(tmp_path / "one")), log=lambda *_: None)
    a, b = final_weights(tmp_path / "one"), final_weights(two)
    assert max(np.abs(a[k] - b[k]).max() for k in a) <= 1e-5
    one_rewards = [r["reward"] for r in records(tmp_path / "one", "train")]
    assert one_rewards == [r["reward"] for r in records(two, "train")]  # the same rollouts
    assert len(set(one_rewards)) > 1  # ... from weights that moved
