"""Preference tuning (docs/design.md decision 10): DPO and ORPO on the same loop, methods and mask."""

from __future__ import annotations

import json
import math
import os
import signal
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gmt_mlx.cli import app
from gmt_mlx.config import Config
from gmt_mlx.core.losses import dpo_loss, orpo_loss, orpo_pair_losses
from gmt_mlx.data.encoding import tokenize_split
from gmt_mlx.data.formats import detect_format
from gmt_mlx.data.sources import load_splits
from gmt_mlx.errors import UserError
from gmt_mlx.recipes.finetune import finetune
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run.killcheck import kill_and_resume
from gmt_mlx.run.rundir import REFERENCE_FILE
from tests.helpers import runner, write_jsonl

QUIET = dict(log=lambda *_: None)


def pairs(n: int, start: int = 0):
    """An easy preference set: the right sum, ending in a period, over a wrong one with a tail."""
    return [
        {"prompt": f"What is {a} + 3?", "chosen": f"{a + 3}.", "rejected": f"{a + 7} or so, I think"}
        for a in range(start, start + n)
    ]


@pytest.fixture()
def pref_data(tmp_path) -> Path:
    folder = tmp_path / "prefs"
    write_jsonl(folder / "train.jsonl", pairs(32))
    write_jsonl(folder / "valid.jsonl", pairs(8, 100))
    write_jsonl(folder / "test.jsonl", pairs(8, 200))
    return folder


def config(model, data, out, **kw) -> Config:
    values = dict(
        model=str(model),
        data=str(data),
        out=str(out),
        train_mode="dpo",
        method="gmt",
        mask_ratio=0.5,
        iters=6,
        batch_size=4,
        learning_rate=1e-3,
        steps_per_eval=3,
        steps_per_save=3,
        steps_per_report=1,
        samples=0,
        seed=1,
    )
    values.update(kw)
    return Config(**values)


def records(run_dir: Path, kind: str):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["type"] == kind]


def weights(model):
    return {k: np.array(v) for k, v in tree_flatten(model.parameters())}


# --------------------------------------------------------------------------
# The losses against TRL's, on the same log-probabilities
# --------------------------------------------------------------------------


def _policy_batch(tiny_model_dir, n_pairs=6, seed=0):
    """A tiny model, a (2B, L) batch of prompt + answer rows of different lengths, and its per-token log-probs."""
    import mlx.nn as nn
    from mlx_lm import load

    model, _ = load(str(tiny_model_dir))
    rng = np.random.default_rng(seed)
    width = 14
    tokens = rng.integers(3, 384, (2 * n_pairs, width))
    mask = np.zeros((2 * n_pairs, width), np.float32)
    for row in range(2 * n_pairs):
        prompt, answer = int(rng.integers(2, 6)), int(rng.integers(1, 8))
        mask[row, prompt : prompt + answer] = 1
    tokens, mask = mx.array(tokens, mx.int32), mx.array(mask)
    logits = model(tokens[:, :-1]).astype(mx.float32)
    per_token = -nn.losses.cross_entropy(logits, tokens[:, 1:]) * mask[:, 1:]
    reference = mx.array(rng.normal(-25, 4, 2 * n_pairs).astype(np.float32))
    return model, tokens, mask, reference, np.array(per_token)


def _trl_dpo_loss(per_token, mask, reference, *, loss_type, beta, label_smoothing=0.0):
    """TRL's own DPOTrainer._compute_loss, fed our per-token log-probs through a stand-in model."""
    import torch
    import trl

    n = per_token.shape[0] // 2
    out = SimpleNamespace(
        log_probs=torch.tensor(per_token, dtype=torch.float32),
        entropy=torch.zeros(per_token.shape),
        mean_logits=torch.zeros(per_token.shape),
        is_top1=torch.zeros(per_token.shape, dtype=torch.bool),
    )

    class Model:
        training = True

        def __call__(self, **kwargs):
            return out

    accelerator = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    fake = SimpleNamespace(
        model=Model(),
        accelerator=accelerator,
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=True,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=label_smoothing,
        use_weighting=False,
        _metrics={"train": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    ref = torch.tensor(np.array(reference))
    inputs = {
        "input_ids": torch.zeros(mask.shape, dtype=torch.long),
        "attention_mask": torch.ones(mask.shape),
        "completion_mask": torch.tensor(np.array(mask)),
        "ref_chosen_logps": ref[:n],
        "ref_rejected_logps": ref[n:],
    }
    return float(trl.DPOTrainer._compute_loss(fake, fake.model, inputs, return_outputs=False))


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_losses_match_trl(tiny_model_dir, loss_type, beta):
    model, tokens, mask, reference, per_token = _policy_batch(tiny_model_dir)
    ours, count, _ = dpo_loss(model, tokens, mask, reference, beta=beta, loss_type=loss_type)
    theirs = _trl_dpo_loss(per_token, mask, reference, loss_type=loss_type, beta=beta)
    assert abs(ours.item() / count.item() - theirs) <= 1e-5 * max(1.0, abs(theirs))


def test_dpo_label_smoothing_matches_trl(tiny_model_dir):
    """Conservative DPO: TRL 1.x keeps its formula in the `aot` loss, which on one pair (nothing to sort) is exactly
    it."""
    model, tokens, mask, reference, per_token = _policy_batch(tiny_model_dir)
    n = tokens.shape[0] // 2
    for eps in (0.1, 0.3):
        ours, count, _ = dpo_loss(model, tokens, mask, reference, beta=0.2, label_smoothing=eps)
        theirs = [
            _trl_dpo_loss(
                per_token[[i, n + i]],
                np.array(mask)[[i, n + i]],
                np.array(reference)[[i, n + i]],
                loss_type="aot",
                beta=0.2,
                label_smoothing=eps,
            )
            for i in range(n)
        ]
        assert abs(ours.item() / count.item() - float(np.mean(theirs))) <= 1e-5
        plain, _, _ = dpo_loss(model, tokens, mask, reference, beta=0.2)
        assert abs(ours.item() - plain.item()) > 1e-3  # the smoothing did something


def test_orpo_odds_ratio_matches_trl(tiny_model_dir):
    import torch
    from trl.experimental.orpo import ORPOTrainer

    model, tokens, mask, _, per_token = _policy_batch(tiny_model_dir, seed=3)
    n = tokens.shape[0] // 2
    counts = np.array(mask)[:, 1:].sum(axis=1)
    avg = per_token.sum(axis=1) / counts
    lam = 0.25
    fake = SimpleNamespace(beta=lam, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses, *_ = ORPOTrainer.odds_ratio_loss(fake, torch.tensor(avg[:n]), torch.tensor(avg[n:]))
    ours, _ = orpo_pair_losses(mx.array(avg[:n]), mx.array(avg[n:]), lam=lam)
    # Ours = the chosen answer's mean NLL - lambda log sigma(log odds); TRL's odds-ratio term is lambda log sigma(...).
    np.testing.assert_allclose(np.array(ours) + avg[:n], -trl_losses.numpy(), rtol=1e-5, atol=1e-6)
    total, count, metrics = orpo_loss(model, tokens, mask, lam=lam)
    expected = float(np.mean(-avg[:n] - trl_losses.numpy()))
    assert abs(total.item() / count.item() - expected) <= 1e-5
    assert metrics["chosen_logp"].item() == pytest.approx(per_token[:n].sum(), rel=1e-5)


# --------------------------------------------------------------------------
# Data: the preference format and its bad rows
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "row,message",
    [
        ({"prompt": "q", "chosen": "a"}, "no 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "no 'prompt'"),
        ({"prompt": "q", "chosen": "a", "rejected": "a"}, "are the same answer"),
        ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "'chosen' is empty"),
        ({"prompt": "q", "chosen": "a", "rejected": 3}, "'rejected' must be a string or a list of messages, got int"),
        ({"prompt": 7, "chosen": "a", "rejected": "b"}, "'prompt' must be a string or a list of messages"),
        ({"prompt": "q", "chosen": "a", "rejected": "b", "system": ["x"]}, "'system' must be a string"),
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "non-empty list"),
    ],
)
def test_bad_preference_rows_name_file_and_line(tmp_path, row, message):
    path = write_jsonl(tmp_path / "train.jsonl", [pairs(1)[0], row])
    with pytest.raises(UserError) as err:
        load_splits(path)
    assert str(err.value).startswith(f"{path}:2: ") and message in str(err.value)
    assert "\n" not in str(err.value)


def test_message_list_rows_render_through_the_chat_template(tiny_model_dir):
    from mlx_lm import load

    _, tokenizer = load(str(tiny_model_dir))
    rows = [
        {
            "prompt": [{"role": "user", "content": "2 + 2?"}],
            "system": "Be brief.",
            "chosen": [{"role": "assistant", "content": "4"}],
            "rejected": [{"role": "assistant", "content": "5"}],
        }
    ]
    assert detect_format(rows[0], "x") == "preference"
    split = tokenize_split(rows, tokenizer, mask_prompt=False, max_seq_length=512, name="train", preference=True)
    pair = split.examples[0]
    for example, answer in ((pair.chosen, "4"), (pair.rejected, "5")):
        ((start, end),) = example.target_positions()
        text = tokenizer.decode(example.tokens[start:end])
        assert text.startswith(answer) and "Be brief" not in text and "2 + 2" not in text
        assert "Be brief" in tokenizer.decode(example.tokens[:start])  # the system prompt is in the context


def test_prompt_without_room_for_an_answer_is_a_counted_warning(tiny_model_dir, pref_data, tmp_path):
    rows = pairs(32)
    rows[5]["prompt"] = "long " * 300
    write_jsonl(pref_data / "train.jsonl", rows)
    lines = []
    finetune(config(tiny_model_dir, pref_data, tmp_path / "run", iters=1, max_seq_length=96), log=lines.append)
    assert any("dropped 1 train pair whose prompt leaves no room for an answer" in line for line in lines), lines


def test_sft_refuses_preference_rows_and_dpo_refuses_sft_rows(tiny_model_dir, pref_data, chat_data, tmp_path):
    with pytest.raises(UserError, match="needs --train-mode dpo or orpo"):
        finetune(config(tiny_model_dir, pref_data, tmp_path / "a", train_mode="sft"), **QUIET)
    with pytest.raises(UserError, match="chat format; --train-mode dpo and orpo need prompt/chosen/rejected"):
        finetune(config(tiny_model_dir, chat_data, tmp_path / "b"), **QUIET)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# --------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------


def test_dpo_starts_at_ln2_and_learns_an_easy_preference(tiny_model_dir, pref_data, tmp_path):
    run = tmp_path / "run"
    finetune(config(tiny_model_dir, pref_data, run, iters=12, steps_per_eval=6), **QUIET)
    evals = records(run, "eval")
    assert evals[0]["step"] == 0 and abs(evals[0]["val_loss"] - math.log(2)) <= 1e-4
    assert evals[0]["val_reward_accuracy"] == 0.0  # equal rewards: not strictly greater
    assert evals[-1]["val_reward_accuracy"] >= 0.9, evals
    assert evals[-1]["val_loss"] < 0.5 * math.log(2)
    train = records(run, "train")
    assert {"reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp"} <= set(train[-1])
    # DPO widens the gap (it need not raise the chosen answer's log-probability, and here does not).
    assert train[-1]["reward_margin"] > train[0]["reward_margin"] + 1.0
    assert train[-1]["rejected_logp"] < train[0]["rejected_logp"] - 5.0
    stored = json.loads((run / REFERENCE_FILE).read_text())["splits"]
    assert stored["train"]["pairs"] == 32 and stored["valid"]["pairs"] == 8
    # The best checkpoint is a trained one: step 0 is reported, never kept as the best.
    assert json.loads((run / "checkpoints" / "best" / "state.json").read_text())["step"] > 0


@pytest.mark.parametrize("mode", ["dpo", "orpo"])
def test_gmt_at_ratio_zero_is_full_bit_for_bit(tiny_model_dir, pref_data, tmp_path, mode):
    a = finetune(config(tiny_model_dir, pref_data, tmp_path / "gmt", train_mode=mode, mask_ratio=0.0, iters=3), **QUIET)
    b = finetune(config(tiny_model_dir, pref_data, tmp_path / "full", train_mode=mode, method="full", iters=3), **QUIET)
    wa, wb = weights(a.model), weights(b.model)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)
    assert records(tmp_path / "gmt", "train") and [r["loss"] for r in records(tmp_path / "gmt", "train")] == [
        r["loss"] for r in records(tmp_path / "full", "train")
    ]


def test_the_mask_applies_to_the_preference_gradient(tiny_model_dir, pref_data, tmp_path):
    finetune(config(tiny_model_dir, pref_data, tmp_path / "run", iters=2), **QUIET)
    kept = [r["kept_fraction"] for r in records(tmp_path / "run", "train")]
    assert all(0 < k < 0.6 for k in kept), kept  # ratio 0.5 of the non-zero entries


@pytest.mark.parametrize(
    "method", ["lora", pytest.param("dora", marks=pytest.mark.slow), pytest.param("random", marks=pytest.mark.slow)]
)
def test_every_method_trains_with_dpo(tiny_model_dir, pref_data, tmp_path, method):
    result = finetune(
        config(
            tiny_model_dir,
            pref_data,
            tmp_path / method,
            method=method,
            iters=6,
            learning_rate=1e-2 if method in ("lora", "dora") else 1e-3,
        ),
        **QUIET,
    )
    evals = records(tmp_path / method, "eval")
    assert abs(evals[0]["val_loss"] - math.log(2)) <= 1e-4
    assert evals[-1]["val_loss"] < evals[0]["val_loss"], evals
    assert result.model_dir.joinpath("model.safetensors").is_file() or any(result.model_dir.glob("*.safetensors"))


def test_orpo_trains_without_a_reference(tiny_model_dir, pref_data, tmp_path):
    run = tmp_path / "orpo"
    finetune(config(tiny_model_dir, pref_data, run, train_mode="orpo", iters=12, steps_per_eval=6), **QUIET)
    assert not (run / REFERENCE_FILE).exists()
    evals = records(run, "eval")
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] and evals[-1]["val_reward_accuracy"] >= 0.9, evals


@pytest.mark.slow
def test_accumulation_equals_the_bigger_batch(tiny_model_dir, pref_data, tmp_path):
    one = finetune(config(tiny_model_dir, pref_data, tmp_path / "b8", batch_size=8, iters=3, optimizer="sgd"), **QUIET)
    two = finetune(
        config(
            tiny_model_dir,
            pref_data,
            tmp_path / "b4x2",
            batch_size=4,
            grad_accumulation_steps=2,
            iters=3,
            optimizer="sgd",
        ),
        **QUIET,
    )
    wa, wb = weights(one.model), weights(two.model)
    worst = max(float(np.abs(wa[k] - wb[k]).max() / (np.abs(wa[k]).max() + 1e-12)) for k in wa)
    assert worst <= 1e-5
    la = [r["loss"] for r in records(tmp_path / "b8", "train")]
    lb = [r["loss"] for r in records(tmp_path / "b4x2", "train")]
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_resume_reuses_the_reference_and_refuses_changed_data(tiny_model_dir, pref_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    uninterrupted = finetune(config(tiny_model_dir, pref_data, tmp_path / "whole"), **QUIET)
    monkeypatch.setattr(
        ckpt, "fault", lambda point: os.kill(os.getpid(), signal.SIGINT) if point == "after-step:3" else None
    )
    result = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(pref_data),
            "--out",
            str(run),
            "--train-mode",
            "dpo",
            "--mask-ratio",
            "0.5",
            "--iters",
            "6",
            "--batch-size",
            "4",
            "--learning-rate",
            "1e-3",
            "--steps-per-eval",
            "3",
            "--steps-per-save",
            "3",
            "--steps-per-report",
            "1",
            "--samples",
            "0",
            "--seed",
            "1",
        ],
    )
    assert result.exit_code != 0 and "interrupted at step 3" in result.output
    monkeypatch.setattr(ckpt, "fault", lambda point: None)
    stored = (run / REFERENCE_FILE).read_bytes()

    # Changed data: refused with one line, nothing changed.
    changed = tmp_path / "changed"
    write_jsonl(changed / "train.jsonl", pairs(32, 1))
    write_jsonl(changed / "valid.jsonl", pairs(8, 100))
    with pytest.raises(UserError, match="not the one the reference log-probabilities were computed on"):
        finetune(config(tiny_model_dir, changed, run), force=True, **QUIET)
    assert (run / REFERENCE_FILE).read_bytes() == stored

    # The reference is read back, not recomputed (the model at step 3 would give other numbers).
    lines = []
    resumed = finetune(config(tiny_model_dir, pref_data, run), resume=True, log=lines.append)
    assert not any(line.startswith("reference ") for line in lines)
    assert (run / REFERENCE_FILE).read_bytes() == stored
    wa, wb = weights(uninterrupted.model), weights(resumed.model)
    assert all(np.array_equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("damage", ["delete", "garble"])
def test_missing_or_damaged_reference_is_refused_on_resume(tiny_model_dir, pref_data, tmp_path, monkeypatch, damage):
    run = tmp_path / "run"
    monkeypatch.setattr(
        ckpt, "fault", lambda point: os.kill(os.getpid(), signal.SIGINT) if point == "after-step:3" else None
    )
    with pytest.raises(Exception):
        finetune(config(tiny_model_dir, pref_data, run), **QUIET)
    monkeypatch.setattr(ckpt, "fault", lambda point: None)
    if damage == "delete":
        (run / REFERENCE_FILE).unlink()
    else:
        (run / REFERENCE_FILE).write_text("{not json")
    with pytest.raises(UserError, match="start over with --overwrite"):
        finetune(config(tiny_model_dir, pref_data, run), resume=True, **QUIET)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["dpo", "orpo"])
def test_sigkill_and_resume_is_bit_for_bit(tiny_model_dir, pref_data, tmp_path, mode):
    problems = kill_and_resume(
        str(tiny_model_dir),
        str(pref_data),
        tmp_path,
        method="gmt",
        iters=8,
        save_every=3,
        extra=["--train-mode", mode, "--learning-rate", "1e-3", "--mask-ratio", "0.5"],
    )
    assert problems == []


def test_card_and_export_name_the_objective(tiny_model_dir, pref_data, tmp_path):
    run = tmp_path / "run"
    finetune(config(tiny_model_dir, pref_data, run, iters=2, beta=0.25), **QUIET)
    card = (run / "model" / "README.md").read_text()
    assert "DPO" in card and "beta 0.25" in card
    result = runner.invoke(app, ["export", str(run), "--out", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    assert "beta 0.25" in (tmp_path / "hf" / "README.md").read_text()


def test_eval_reports_preference_accuracy(tiny_model_dir, pref_data, tmp_path):
    run = tmp_path / "run"
    finetune(config(tiny_model_dir, pref_data, run, iters=12), **QUIET)
    result = runner.invoke(app, ["eval", str(run), "--split", "test", "--baseline", "--scorer", "exact"])
    assert result.exit_code == 0, result.output
    assert "preference accuracy" in result.output and "reward accuracy" in result.output
    from gmt_mlx.evaluation.evaluate import EvalOptions, evaluate

    tuned = evaluate(str(run), options=EvalOptions(split="test", generate=False))
    base = evaluate(str(tiny_model_dir), str(pref_data), EvalOptions(split="test", generate=False))
    assert tuned["preference_accuracy"] >= 0.9 > base["preference_accuracy"] or tuned["preference_accuracy"] == 1.0
    assert tuned["margin"] > base["margin"]
    from gmt_mlx.evaluation.evaluate import against_base

    numbers = against_base(tuned, base, json.loads(json.dumps(Config(train_mode="dpo").to_dict())))
    assert numbers["reward_accuracy"] >= 0.9 and numbers["dpo_loss"] < math.log(2)
    assert against_base(base, base, Config(train_mode="dpo").to_dict())["dpo_loss"] == pytest.approx(math.log(2))


@pytest.mark.slow
def test_compare_runs_every_method_on_dpo(tiny_model_dir, pref_data, tmp_path):
    out = tmp_path / "cmp"
    result = runner.invoke(
        app,
        [
            "compare",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(pref_data),
            "--out",
            str(out),
            "--train-mode",
            "dpo",
            "--methods",
            "full,gmt,random,lora,dora",
            "--mask-ratios",
            "0.5",
            "--iters",
            "4",
            "--batch-size",
            "4",
            "--learning-rates",
            "full=1e-3,gmt=1e-3,random=1e-3,lora=1e-2,dora=1e-2",
            "--eval-limit",
            "2",
            "--max-tokens",
            "4",
            "--samples",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert [r["group"] for r in results["rows"]] == ["full", "gmt r=0.5", "random r=0.5", "lora", "dora"]
    for run in results["runs"]:
        assert run["curves"]["val"][0][0] == 0 and abs(run["curves"]["val"][0][2] - math.log(2)) <= 1e-4
        assert 0.0 <= run["final_val_reward_accuracy"] <= 1.0 and run["test_preference_accuracy"] is not None
        assert 0.0 <= run["test_reward_accuracy"] <= 1.0 and run["test_dpo_loss"] > 0
    assert (out / "runs" / "full-s0" / "reference_logps.json").is_file()
    table = (out / "results.md").read_text()
    assert "val reward acc" in table and "test pref. acc" in table and "DPO (sigmoid loss), beta 0.1" in table


@pytest.mark.slow
def test_two_ranks_match_one_on_dpo(tiny_model_dir, pref_data, tmp_path):
    from tests.e2e.test_distributed import LAUNCH, launch
    from tests.e2e.test_distributed import weights as saved_weights

    if not Path(LAUNCH).exists():
        pytest.skip("mlx.launch not installed")
    cases = [("dpo", "gmt"), ("orpo", "gmt"), ("dpo", "lora")]
    jobs = [
        {
            "config": config(
                tiny_model_dir, pref_data, tmp_path / f"two-{mode}-{method}", train_mode=mode, method=method, iters=4
            ).to_dict()
        }
        for mode, method in cases
    ]
    launched = launch(jobs, tmp_path)
    for mode, method in cases:
        finetune(
            config(
                tiny_model_dir, pref_data, tmp_path / f"one-{mode}-{method}", train_mode=mode, method=method, iters=4
            ),
            **QUIET,
        )
        two = tmp_path / f"two-{mode}-{method}"
        assert (two / "model").is_dir(), launched.stdout[-2000:] + launched.stderr[-2000:]
        a, b = saved_weights(tmp_path / f"one-{mode}-{method}"), saved_weights(two)
        # Two ranks sum the gradient in another order: an entry within float rounding of a GMT
        # threshold may flip (tests/unit/core/test_accumulation.py measured 2 of 123,200 once); such an entry
        # then moves by ~lr. Everything else agrees to float rounding.
        differing = sum(int((np.abs(a[k] - b[k]) > 1e-5).sum()) for k in a)
        total = sum(a[k].size for k in a)
        assert differing <= 1e-4 * total, (mode, method, differing, total)
        assert (two / "rank-0.sha256").read_text() == (two / "rank-1.sha256").read_text()
        one_val = records(tmp_path / f"one-{mode}-{method}", "eval")
        two_val = records(two, "eval")
        np.testing.assert_allclose([r["val_loss"] for r in one_val], [r["val_loss"] for r in two_val], rtol=1e-5)


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--beta", "0"], "--beta must be positive, got 0.0"),
        (["--label-smoothing", "0.5"], "--label-smoothing must be in [0, 0.5), got 0.5"),
        (
            ["--label-smoothing", "0.1", "--dpo-loss", "ipo"],
            "--label-smoothing applies to --dpo-loss sigmoid only, not ipo",
        ),
        (["--orpo-lambda", "-1"], "--orpo-lambda must be 0 or more, got -1.0"),
        (["--train-mode", "kto"], "kto"),
    ],
)
def test_bad_objective_options(tiny_model_dir, pref_data, tmp_path, extra, message):
    result = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(pref_data),
            "--out",
            str(tmp_path / "run"),
            "--train-mode",
            "dpo",
            *extra,
        ],
    )
    assert result.exit_code == 2 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


def test_drawn_indices_are_what_the_batches_draw():
    from gmt_mlx.data.batching import drawn_indices, iterate_batches
    from gmt_mlx.data.encoding import Example, TokenizedSplit

    lengths = [3 + (i * 7) % 11 for i in range(30)]
    # Example i is made of the token 1000 + i: a batch's rows name the examples it drew.
    split = TokenizedSplit([Example.after([1000 + i] * n, 1) for i, n in enumerate(lengths)], 0, "train")
    for steps in (1, 3, 7, 8, 20):
        drawn = set()
        batches = iterate_batches(split, 4, seed=5, pad_id=0)
        for _ in range(steps):
            _, _, tokens, _ = next(batches)
            drawn.update(int(t) - 1000 for t in tokens[:, 0].tolist())
        assert drawn_indices(lengths, 4, seed=5, steps=steps) == sorted(drawn)
    assert len(drawn_indices(lengths, 4, seed=5, steps=3)) == 12
    assert len(drawn_indices(lengths, 4, seed=5, steps=100)) == 30  # 2 sit out each epoch, different ones


def test_a_short_run_computes_the_reference_of_the_pairs_it_draws(tiny_model_dir, pref_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    lines = []
    monkeypatch.setattr(
        ckpt, "fault", lambda point: os.kill(os.getpid(), signal.SIGINT) if point == "after-step:3" else None
    )
    with pytest.raises(Exception):
        finetune(config(tiny_model_dir, pref_data, run, iters=4), log=lines.append)
    monkeypatch.setattr(ckpt, "fault", lambda point: None)
    assert any("reference  log-probabilities of the step-0 model: 16 train, 8 valid pairs" in line for line in lines), (
        lines
    )
    stored = json.loads((run / REFERENCE_FILE).read_text())["splits"]["train"]["logps"]
    assert sum(row == [None, None] for row in stored) == 16
    # A longer run (forced onto the same dir) would draw pairs without a reference: refused, nothing written.
    before = (run / "config.yaml").read_bytes()
    with pytest.raises(UserError, match="has no reference for .* train pairs this run draws"):
        finetune(config(tiny_model_dir, pref_data, run, iters=12), force=True, **QUIET)
    assert (run / "config.yaml").read_bytes() == before
    finetune(config(tiny_model_dir, pref_data, run, iters=4), resume=True, **QUIET)
