"""The GRPO objective (objectives/grpo/loss.py) against TRL 1.16's own GRPOTrainer code, on the same numbers.

The oracle is TRL's code itself, not a transcription of it: the loss, its
gradient and its clip/KL metrics come from ``GRPOTrainer._compute_loss`` and
the advantages from ``GRPOTrainer._generate_and_score_completions``, both
called unbound on a stand-in ``self`` whose model "computes" the per-token
log-probabilities we give it, and whose sampler "generates" completions whose
rewards we give it (as test_preference.py does with DPOTrainer._compute_loss).
Both are private methods: trl is pinned (pyproject's test extra).
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from importlib.util import find_spec
from types import SimpleNamespace

import mlx.core as mx
import numpy as np
import pytest

from gmt_mlx import config
from gmt_mlx.config import GRPO_LOSS_TYPES, REWARD_SCALINGS
from gmt_mlx.objectives.grpo import loss as grpo
from gmt_mlx.objectives.grpo.loss import CLIP_METRICS, group_advantages, grpo_loss

needs_trl = pytest.mark.skipif(
    find_spec("trl") is None or find_spec("torch") is None,
    reason="TRL's GRPOTrainer is the oracle: pip install -e '.[test]' (trl, torch)",
)
GROUP, GROUPS, WIDTH, MAX_LEN = 4, 3, 9, 12
TOL = 1e-5


def batch(seed: int = 0, padding_scale: float = 3.0):
    """Rewards, and (B, T) log-probs of a policy, the one that sampled, and a reference; right padding, uneven lengths.

    The padding holds noise, which must change nothing (TRL's loss turns NaN
    when it is large enough for exp(ref - logps) to overflow there, as a real
    model's log-probs of padding never are, so the oracle tests keep it
    moderate); the old and reference log-probs are a few tenths off, so that
    both clip bounds bite on some tokens.
    """
    rng = np.random.default_rng(seed)
    rows = GROUP * GROUPS
    lengths = np.array([1, WIDTH, 3, 7, 5, 2, WIDTH, 4, 6, 8, 1, 5])[:rows]
    mask = (np.arange(WIDTH)[None, :] < lengths[:, None]).astype(np.float32)
    logps = rng.normal(-2.0, 1.0, (rows, WIDTH)).astype(np.float32)
    old = (logps + rng.normal(0, 0.3, logps.shape)).astype(np.float32)
    ref = (logps + rng.normal(0, 0.5, logps.shape)).astype(np.float32)
    for a in (logps, old, ref):
        a[mask == 0] = rng.normal(0, padding_scale, int((mask == 0).sum()))
    rewards = rng.integers(0, 3, rows).astype(np.float32) + rng.normal(0, 0.1, rows).astype(np.float32)
    return rewards, logps, old, ref, mask


# --------------------------------------------------------------------------
# The oracles: TRL's methods on a stand-in trainer
# --------------------------------------------------------------------------


def trl_advantages(rewards: np.ndarray, group_size: int, scale: str) -> np.ndarray:
    """GRPOTrainer._generate_and_score_completions' advantages, for completions that score ``rewards``."""
    import torch
    import trl

    n = len(rewards)
    model = SimpleNamespace(training=True, is_gradient_checkpointing=False)
    sampled = ([[1, 2]] * n, [[3, 4, 5]] * n, None, ["x"] * n, None, {}, None, None)
    fake = SimpleNamespace(
        model=model,
        environment_factories=None,
        tools=None,
        environments=[],
        _generate=lambda prompts: sampled,
        _tokenizer=SimpleNamespace(pad_token_id=0),
        pad_to_multiple_of=None,
        mask_truncated_completions=False,
        accelerator=SimpleNamespace(device=torch.device("cpu"), gather=lambda x: x, process_index=0),
        args=SimpleNamespace(
            per_device_train_batch_size=n,
            steps_per_generation=1,
            gradient_accumulation_steps=1,
            gradient_checkpointing_kwargs=None,
        ),
        num_iterations=1,
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        beta=0.0,
        _calculate_rewards=lambda *_: torch.tensor(rewards, dtype=torch.float32)[:, None],
        num_generations=group_size,
        multi_objective_aggregation="sum_then_normalize",
        reward_weights=torch.ones(1),
        scale_rewards=scale,
        reward_func_names=["r"],
        _metrics={"train": defaultdict(list)},
        _pending_extra_logs={},
        _pending_metrics={},
        log_multimodal=False,
        _logs={
            "prompt": [],
            "completion": [],
            "advantages": [],
            "rewards": defaultdict(list),
            "extra": defaultdict(list),
        },
    )
    out = trl.GRPOTrainer._generate_and_score_completions(fake, [{"prompt": "p"}] * n)
    return out["advantages"].numpy()


def trl_loss(
    logps,
    old,
    ref,
    advantages,
    mask,
    *,
    loss_type,
    epsilon,
    epsilon_high=None,
    beta=0.0,
    max_completion_length=MAX_LEN,
    delta=None,
    kl_ratio=True,
):
    """GRPOTrainer._compute_loss on our log-probs: (loss, d loss / d logps, logged metrics)."""
    import torch
    import trl

    policy = torch.tensor(logps, requires_grad=True)
    mask_t = torch.tensor(mask)
    fake = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x),
        _get_per_token_logps_and_entropies=lambda *a, **k: (policy, torch.zeros_like(policy), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        loss_type=loss_type,
        epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high,
        args=SimpleNamespace(delta=delta, use_bias_correction_kl=kl_ratio, steps_per_generation=1),
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        current_gradient_accumulation_steps=1,
        max_completion_length=max_completion_length,
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    rows = mask.shape[0]
    inputs = {
        "prompt_ids": torch.ones(rows, 2, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 2),
        "completion_ids": torch.ones(mask.shape, dtype=torch.long),
        "completion_mask": mask_t,
        "advantages": torch.tensor(advantages),
        "num_items_in_batch": mask_t.sum(),
    }
    if old is not None:
        inputs["old_per_token_logps"] = torch.tensor(old)
    if beta:
        inputs["ref_per_token_logps"] = torch.tensor(ref)
    loss = trl.GRPOTrainer._compute_loss(fake, fake.model, inputs)
    loss.backward()
    metrics = {k: v[-1] for k, v in fake._metrics["train"].items()}
    return float(loss.detach()), policy.grad.numpy(), metrics


def ours(logps, old, ref, advantages, mask, **kw):
    """Our loss, its gradient w.r.t. logps, and its metrics, as numpy/floats."""
    arrays = [None if a is None else mx.array(a) for a in (old, ref, advantages, mask)]

    def loss_of(x):
        return grpo_loss(x, *arrays, **kw)[0]

    loss, metrics = grpo_loss(mx.array(logps), *arrays, **kw)
    grad = mx.grad(loss_of)(mx.array(logps))
    return loss.item(), np.array(grad), {k: v.item() for k, v in metrics.items()}


# --------------------------------------------------------------------------
# Advantages
# --------------------------------------------------------------------------


@needs_trl
@pytest.mark.parametrize("scale", REWARD_SCALINGS)
@pytest.mark.parametrize("group_size", [GROUP, 2, 1])
def test_advantages_match_trl(scale, group_size):
    rewards = batch()[0]
    expected = trl_advantages(rewards, group_size, scale)
    got = np.array(group_advantages(mx.array(rewards), group_size, scale))
    np.testing.assert_allclose(got, expected, rtol=TOL, atol=TOL)


@pytest.mark.parametrize("scale", REWARD_SCALINGS)
def test_a_group_of_equal_rewards_has_zero_advantage(scale):
    rewards = mx.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 2.0, 0.5, 3.0, 3.0, 3.0, 3.0])
    adv = np.array(group_advantages(rewards, 4, scale))
    assert np.all(adv[:4] == 0) and np.all(adv[8:] == 0)
    assert np.all(adv[4:8] != 0)


def test_advantages_refuse_what_they_cannot_mean():
    with pytest.raises(ValueError, match="reward scaling"):
        group_advantages(mx.zeros(4), 2, "global")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(mx.zeros(4), 3)


# --------------------------------------------------------------------------
# The loss, its gradient and its metrics
# --------------------------------------------------------------------------


def assert_matches(mine, theirs, beta):
    (loss, grad, metrics), (t_loss, t_grad, t_metrics) = mine, theirs
    assert abs(loss - t_loss) <= TOL * max(1.0, abs(t_loss)), (loss, t_loss)
    np.testing.assert_allclose(grad, t_grad, rtol=TOL, atol=TOL)
    names = CLIP_METRICS + (("kl",) if beta else ())
    assert set(names) <= set(t_metrics) and set(metrics) == set(names)
    for name in names:
        assert abs(metrics[name] - t_metrics[name]) <= TOL, (name, metrics[name], t_metrics[name])


@needs_trl
@pytest.mark.parametrize(
    "loss_type,scale,beta,epsilon_high",
    list(itertools.product(GRPO_LOSS_TYPES, REWARD_SCALINGS, [0.0, 0.04], [None, 0.28])),
)
def test_loss_gradient_and_metrics_match_trl(loss_type, scale, beta, epsilon_high):
    rewards, logps, old, ref, mask = batch(seed=1)
    adv = np.array(group_advantages(mx.array(rewards), GROUP, scale))
    kw = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=epsilon_high, beta=beta, max_completion_length=MAX_LEN)
    mine = ours(logps, old, ref, adv, mask, **kw)
    assert_matches(mine, trl_loss(logps, old, ref, adv, mask, **kw), beta)
    if beta == 0 and epsilon_high is None:  # the batch does exercise both bounds
        assert mine[2]["clip_ratio/low_mean"] > 0 and mine[2]["clip_ratio/high_mean"] > 0


@needs_trl
@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("variant", ["on_policy", "delta", "no_kl_ratio"])
def test_options_match_trl(loss_type, variant):
    """No old log-probs (one pass per batch), INTELLECT-2's delta, and the KL without its ratio."""
    rewards, logps, old, ref, mask = batch(seed=2)
    adv = np.array(group_advantages(mx.array(rewards), GROUP))
    kw = dict(loss_type=loss_type, epsilon=0.2, beta=0.1, max_completion_length=MAX_LEN)
    if variant == "on_policy":
        old = None
    elif variant == "delta":
        kw.update(delta=1.1, beta=0.0)
    else:
        kw.update(kl_ratio=False)
    assert_matches(ours(logps, old, ref, adv, mask, **kw), trl_loss(logps, old, ref, adv, mask, **kw), kw["beta"])


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
@pytest.mark.parametrize("same_old", [True, False])
def test_on_policy_loss_is_the_negative_weighted_mean_advantage(loss_type, same_old):
    """Ratio 1 and β = 0: loss = -Σ_i w_i A_i and ∂loss/∂logp_it = -w_i A_i / |o_i|, w per the loss type.

    TRL's docs: with one pass per batch the clip never binds, so the loss is
    the (loss-type-normalised) negative mean advantage, and its gradient is
    the policy gradient A ∇log π.
    """
    rewards, logps, _, _, mask = batch(seed=3)
    adv = np.array(group_advantages(mx.array(rewards), GROUP))
    lengths = mask.sum(axis=1)
    per_token = {
        "grpo": 1 / (len(adv) * lengths),
        "bnpo": np.full_like(lengths, 1 / lengths.sum()),
        "dr_grpo": np.full_like(lengths, 1 / (len(adv) * MAX_LEN)),
    }
    per_token["dapo"] = per_token["bnpo"]
    weight = per_token[loss_type]
    loss, grad, metrics = ours(
        logps, logps if same_old else None, None, adv, mask, loss_type=loss_type, max_completion_length=MAX_LEN
    )
    assert abs(loss - float(-(adv * lengths * weight).sum())) <= TOL
    np.testing.assert_allclose(grad, -(adv * weight)[:, None] * mask, rtol=TOL, atol=1e-7)
    assert all(metrics[name] == 0 for name in CLIP_METRICS)


@pytest.mark.parametrize("loss_type", GRPO_LOSS_TYPES)
def test_padding_changes_nothing(loss_type):
    """Whatever the padding holds (here log-prob gaps of hundreds, exp() = inf), loss and gradient are the same."""
    kw = dict(loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, beta=0.04, max_completion_length=MAX_LEN)
    results = []
    for padding_scale in (0.0, 300.0):
        rewards, logps, old, ref, mask = batch(seed=4, padding_scale=padding_scale)
        results.append(ours(logps, old, ref, np.array(group_advantages(mx.array(rewards), GROUP)), mask, **kw))
    (loss, grad, metrics), (loss2, grad2, metrics2) = results
    assert np.isfinite(loss) and loss == loss2 and metrics == metrics2
    np.testing.assert_array_equal(grad, grad2)


def test_choice_lists_are_configs():
    """grpo checks against config's lists, the same objects (the future --loss-type/--scale-rewards choices)."""
    assert grpo.GRPO_LOSS_TYPES is config.GRPO_LOSS_TYPES and grpo.REWARD_SCALINGS is config.REWARD_SCALINGS


def test_loss_refuses_what_it_cannot_mean():
    _, logps, old, ref, mask = batch()
    args = [mx.array(a) for a in (logps, old, ref)] + [mx.zeros(logps.shape[0]), mx.array(mask)]
    with pytest.raises(ValueError, match="unknown GRPO loss"):
        grpo_loss(*args, loss_type="ppo")
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(*args, loss_type="dr_grpo")
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(*args[:2], None, *args[3:], beta=0.1)


@needs_trl
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.3])
def test_completion_logps_are_trls_at_the_sampling_temperature(temperature):
    """TRL scores completions with selective_log_softmax(logits, ids, temperature): the sampling policy's
    log-probs. completion_logps on the same logits, prompt lengths and ids gives the same numbers."""
    import torch
    from trl.trainer.utils import selective_log_softmax

    rng = np.random.default_rng(7)
    rows, length, vocab = 3, 10, 17
    tokens = rng.integers(0, vocab, (rows, length)).astype(np.int32)
    prompt_lengths = np.array([2, 4, 3], dtype=np.int32)
    width = length - int(prompt_lengths.min())
    logits = rng.normal(0, 2.0, (rows, length - 1, vocab)).astype(np.float32)
    got = np.array(
        grpo.completion_logps(
            lambda _: mx.array(logits), mx.array(tokens), mx.array(prompt_lengths), width, temperature
        )
    )
    for b in range(rows):
        start = int(prompt_lengths[b])  # completion token j = tokens[start + j], predicted at start + j - 1
        ids = torch.tensor(tokens[b, start:], dtype=torch.long)
        want = selective_log_softmax(torch.tensor(logits[b, start - 1 :]), ids, temperature=temperature).numpy()
        np.testing.assert_allclose(got[b, : len(want)], want, rtol=TOL, atol=1e-6)
