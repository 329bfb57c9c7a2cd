"""The objectives' interface and registry (gmt_mlx/objectives): what each objective tells the recipes."""

from __future__ import annotations

from functools import partial

import pytest

from gmt_mlx import config as cfg
from gmt_mlx.core.losses import dpo_loss, orpo_loss, sft_loss
from gmt_mlx.errors import UserError
from gmt_mlx.objectives import OBJECTIVES, objective_of
from gmt_mlx.objectives.base import MEASURES, ROW_KINDS, ObjectiveRun
from gmt_mlx.objectives.grpo.loss import grpo_batch_loss


def test_objective_of_reads_a_name_a_config_or_a_saved_dict():
    assert objective_of("dpo") is OBJECTIVES["dpo"]
    assert objective_of(cfg.Config(train_mode="grpo")) is OBJECTIVES["grpo"]
    assert objective_of({"train_mode": "orpo"}) is OBJECTIVES["orpo"]
    assert objective_of({}) is objective_of(None) is OBJECTIVES["sft"]  # an old run dir without the key: sft


def test_an_unknown_train_mode_is_a_one_line_error():
    with pytest.raises(UserError, match=rf"^--train-mode must be one of {', '.join(cfg.TRAIN_MODES)}, got 'ppo'$"):
        objective_of({"train_mode": "ppo"})


@pytest.mark.parametrize("name", cfg.TRAIN_MODES)
def test_every_objective_states_its_kinds(name):
    objective = OBJECTIVES[name]
    assert objective.rows in ROW_KINDS and objective.measure in MEASURES
    assert objective.report in ("loss", "preference", "reward")
    assert objective.named == (name != "sft")  # the card and the summary name every objective but plain SFT


def _keywords(loss):
    return (loss.func, loss.keywords) if isinstance(loss, partial) else (loss, {})


def test_the_losses_are_the_train_modes_losses_with_their_options_bound():
    config = cfg.Config(beta=0.3, dpo_loss="ipo", orpo_lambda=0.25)
    assert objective_of("sft").loss(config) is sft_loss
    assert _keywords(objective_of("dpo").loss(config)) == (
        dpo_loss,
        {"beta": 0.3, "loss_type": "ipo", "label_smoothing": 0.0},
    )
    assert _keywords(objective_of("orpo").loss(config)) == (orpo_loss, {"lam": 0.25})
    grpo = cfg.Config(train_mode="grpo", beta=0.04, num_iterations=2, max_completion_length=9)
    func, keywords = _keywords(objective_of("grpo").loss(grpo))
    assert func is grpo_batch_loss
    assert keywords == {
        "loss_type": grpo.loss_type,
        "epsilon": grpo.epsilon,
        "epsilon_high": grpo.epsilon_high,
        "max_completion_length": 9,
        "reuse": True,
        "beta": 0.04,
        "temperature": grpo.temperature,
    }


def test_memory_terms_rows_per_example_rollouts_and_the_reference_copy():
    assert objective_of("sft").memory_terms(cfg.Config(), 100).rows == 1
    assert objective_of("dpo").memory_terms(cfg.Config(train_mode="dpo"), 100).rows == 2
    assert objective_of("orpo").memory_terms(cfg.Config(train_mode="orpo"), 100).reference_bytes == 0
    grpo = cfg.Config(train_mode="grpo", num_generations=6, max_completion_length=32)
    terms = objective_of(grpo).memory_terms(grpo, 100)
    assert (terms.rows, terms.completion_tokens, terms.rollouts, terms.reference_bytes) == (6, 32, True, 0)
    kl = cfg.Config(train_mode="grpo", beta=0.04)
    assert objective_of(kl).memory_terms(kl, 100).reference_bytes == 100  # a second copy of the trainable weights


def test_rows_read_rounds_and_the_validation_shown():
    for mode in cfg.TRAIN_MODES:
        assert OBJECTIVES[mode].load_options() == {"prompts": mode == "grpo"}
    grpo = cfg.Config(train_mode="grpo", num_iterations=3)
    assert objective_of(grpo).rounds(grpo) == 3 and objective_of("dpo").rounds(grpo) == 1
    assert objective_of("grpo").shown_validation(-0.5) == ("val reward", 0.5)
    assert objective_of("orpo").shown_validation(0.5) == ("val loss", 0.5)


def test_the_default_run_part_adds_nothing():
    part = ObjectiveRun()
    batches = iter([1, 2])
    assert part.batches(lambda: batches, lambda n: None, (0, 1)) is batches
    log_step = print
    assert part.on_step(log_step) is log_step and part.checkpoint_state() == {} and part.validate is None


def test_unknown_rewards_are_refused_before_the_model_load():
    with pytest.raises(UserError, match="reward"):
        objective_of("grpo").check(cfg.Config(train_mode="grpo", reward="no_such_reward"))


def test_the_descriptions_are_the_cards():
    assert objective_of("sft").describe({}) == "SFT (next-token loss)"
    assert objective_of("orpo").describe({"orpo_lambda": 0.2}) == "ORPO, lambda 0.2 (no reference model)"
    dpo = objective_of("dpo").describe({"dpo_loss": "hinge", "beta": 0.5, "label_smoothing": 0.1})
    assert dpo == "DPO (hinge loss), beta 0.5, label smoothing 0.1, reference = the step-0 model"
    assert objective_of("grpo").describe(cfg.Config(train_mode="grpo", reward="number").to_dict()).startswith("GRPO (")
