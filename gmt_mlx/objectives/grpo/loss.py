"""The GRPO objective (online RL from rewards), as pure functions of log-probabilities.

Group Relative Policy Optimization samples a group of completions per prompt,
scores them, and pushes up the completions that beat their group's mean. This
module is only that arithmetic, with no model and no sampler in it, so that it
can be checked number for number against TRL's GRPOTrainer (1.16; its code is
the oracle in tests/test_grpo_loss.py): the same advantages from the same
rewards, and the same loss, gradient and clip/KL metrics from the same
per-token log-probabilities.

Shapes: a batch holds B completions, ``group_size`` consecutive rows per
prompt; per-token arrays are (B, T), with ``mask`` 1 on completion tokens and
0 on padding. Log-probabilities are those of the sampled tokens.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from gmt_mlx.config import GRPO_BETA, GRPO_LOSS_TYPES, REWARD_SCALINGS, GrpoOptions

# Added to the reward standard deviation before dividing (TRL's constant): a group whose
# rewards are all equal gets zero advantage rather than 0/0.
STD_EPS = 1e-4
# The metrics `grpo_loss` reports, named as TRL logs them; "kl" only when beta > 0.
CLIP_METRICS = (
    "clip_ratio/low_mean",
    "clip_ratio/high_mean",
    "clip_ratio/region_mean",
    "clip_ratio/low_min",
    "clip_ratio/high_max",
)


def _sample_std(values: mx.array, axis: Optional[int]) -> mx.array:
    """Standard deviation with Bessel's correction (n - 1), as TRL's ``nanstd``; 0 for fewer than two values.

    TRL divides by n - 1, not n: the difference is the whole factor
    sqrt(n / (n - 1)) on every advantage, large for small groups.
    """
    n = values.size if axis is None else values.shape[axis]
    if n < 2:
        return mx.zeros_like(values.mean(axis=axis, keepdims=True))
    centred = values - values.mean(axis=axis, keepdims=True)
    return mx.sqrt((centred * centred).sum(axis=axis, keepdims=True) / (n - 1))


def group_advantages(rewards: mx.array, group_size: int, scale: str = "group") -> mx.array:
    """Each completion's reward minus its group's mean, scaled per ``scale`` (REWARD_SCALINGS).

    ``rewards`` is (B,), groups of ``group_size`` consecutive completions of one
    prompt. The group mean is the baseline in every case (no value network);
    ``scale`` only picks the divisor: "group" the group's own std (GRPO),
    "batch" the std of all B rewards (PPO-Lite; the baseline stays the group's
    mean), "none" no division (Dr. GRPO: dividing by a group's std over-weights
    questions that are nearly always or never solved). Stds are sample stds
    (n - 1) plus STD_EPS, so an all-equal group has zero advantage.
    """
    if scale not in REWARD_SCALINGS:
        raise ValueError(f"unknown reward scaling {scale!r} (one of {', '.join(REWARD_SCALINGS)})")
    if group_size < 1 or rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards of shape {tuple(rewards.shape)} do not split into groups of {group_size}")
    grouped = rewards.astype(mx.float32).reshape(-1, group_size)
    centred = grouped - grouped.mean(axis=1, keepdims=True)
    if scale == "group":
        centred = centred / (_sample_std(grouped, axis=1) + STD_EPS)
    elif scale == "batch":
        centred = centred / (_sample_std(grouped.reshape(-1), axis=None) + STD_EPS)
    return centred.reshape(-1)


def _masked_mean(values: mx.array, mask: mx.array) -> mx.array:
    """Mean of ``values`` over the masked tokens of the whole batch (0 when there are none)."""
    return (values * mask).sum() / mx.maximum(mask.sum(), 1.0)


def _clip_metrics(
    ratio: mx.array, advantages: mx.array, mask: mx.array, low: float, high: float
) -> Dict[str, mx.array]:
    """How often the clip bound the update, as TRL reports it (CLIP_METRICS).

    A token counts as clipped only where clipping changed its loss: the ratio
    fell below 1 - low with a negative advantage, or rose above 1 + high with
    a positive one. "*_mean" are fractions of all completion tokens; low_min
    and high_max are the extreme per-completion fractions (completions without
    tokens left out). Large values mean the policy moved far from the one that
    sampled the batch (too high a learning rate or too many --num-iterations).
    """
    low_clipped = ((ratio < 1 - low) & (advantages < 0)).astype(mx.float32)
    high_clipped = ((ratio > 1 + high) & (advantages > 0)).astype(mx.float32)
    region = mx.maximum(low_clipped, high_clipped)
    tokens = mask.sum(axis=-1)
    has_tokens = tokens > 0

    def per_row(x: mx.array) -> mx.array:
        return (x * mask).sum(axis=-1) / mx.maximum(tokens, 1.0)

    return {
        "clip_ratio/low_mean": _masked_mean(low_clipped, mask),
        "clip_ratio/high_mean": _masked_mean(high_clipped, mask),
        "clip_ratio/region_mean": _masked_mean(region, mask),
        "clip_ratio/low_min": mx.where(has_tokens, per_row(low_clipped), mx.inf).min(),
        "clip_ratio/high_max": mx.where(has_tokens, per_row(high_clipped), -mx.inf).max(),
    }


def _aggregate(per_token: mx.array, mask: mx.array, loss_type: str, max_completion_length: Optional[int]) -> mx.array:
    """The batch loss from masked per-token losses: what each loss type divides by.

    grpo: each completion's mean over its tokens, then the mean over
    completions (a long completion's tokens weigh less: GRPO's length bias).
    bnpo and dapo: the sum over all tokens of the batch / their count (TRL's
    dapo divides by the count over the whole generation batch and all ranks,
    bnpo by the local micro-batch's; for one batch they are the same number).
    dr_grpo: the sum / (B * max_completion_length), a constant, so no
    completion's length changes how much its tokens weigh.
    """
    total = (per_token * mask).sum()
    if loss_type == "grpo":
        rows = (per_token * mask).sum(axis=-1) / mx.maximum(mask.sum(axis=-1), 1.0)
        return rows.mean()
    if loss_type in ("bnpo", "dapo"):
        return total / mx.maximum(mask.sum(), 1.0)
    return total / (per_token.shape[0] * max_completion_length)


def _check(loss_type: str, max_completion_length: Optional[int], logps: mx.array, advantages: mx.array) -> None:
    """Refuse what TRL would refuse or silently misread."""
    if loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"unknown GRPO loss {loss_type!r} (one of {', '.join(GRPO_LOSS_TYPES)})")
    if loss_type == "dr_grpo" and not (max_completion_length and max_completion_length > 0):
        raise ValueError("the dr_grpo loss divides by max_completion_length: give a positive one")
    if logps.ndim != 2 or advantages.shape != (logps.shape[0],):
        raise ValueError(
            f"log-probs must be (B, T) and advantages (B,), got {tuple(logps.shape)} and {tuple(advantages.shape)}"
        )


def grpo_loss(
    logps: mx.array,
    old_logps: Optional[mx.array],
    ref_logps: Optional[mx.array],
    advantages: mx.array,
    mask: mx.array,
    *,
    loss_type: str = GrpoOptions.loss_type,
    epsilon: float = GrpoOptions.epsilon,
    epsilon_high: Optional[float] = None,
    beta: float = GRPO_BETA,
    max_completion_length: Optional[int] = None,
    delta: Optional[float] = None,
    kl_ratio: bool = True,
) -> Tuple[mx.array, Dict[str, mx.array]]:
    """The clipped GRPO loss of a batch and its metrics, as TRL's GRPOTrainer computes them.

    Per token, with ratio r = exp(logps - old_logps) and advantage A of the
    token's completion: -min(r A, clip(r, 1 - epsilon, 1 + epsilon_high) A),
    the PPO surrogate, which stops rewarding a move once the policy has left
    the trust region around the policy that sampled the batch. ``old_logps``
    are that sampling policy's log-probs; they differ from ``logps`` only when
    a batch of rollouts is reused (--num-iterations > 1), and None means "the
    same" (r = 1 in value, its gradient still ∇logps). ``epsilon_high`` (None:
    ``epsilon``) is DAPO's wider upper bound; ``delta`` (None: off) also caps
    r from above in the unclipped term (INTELLECT-2's two-sided clip).

    With ``beta`` > 0, β·KL to the reference policy is added per token, the
    k3 estimator exp(ref - logps) - (ref - logps) - 1 (non-negative, unbiased),
    times r when ``kl_ratio`` (TRL's default use_bias_correction_kl: it makes
    the gradient that of the reverse KL when rollouts are reused). β = 0 needs
    no reference (``ref_logps`` may be None) and reports no "kl".

    The per-token losses are reduced per ``loss_type`` (see `_aggregate`).
    Metrics (scalars, no gradient): CLIP_METRICS, and "kl" (the token mean of
    the KL term) when β > 0. The loss is one micro-batch's, before any division
    for gradient accumulation.
    """
    _check(loss_type, max_completion_length, logps, advantages)
    mask = mask.astype(mx.float32)
    logps = logps.astype(mx.float32)
    old = mx.stop_gradient(logps) if old_logps is None else old_logps.astype(mx.float32)
    ratio = mx.exp(mx.where(mask > 0, logps - old, 0.0))  # padding: r = 1, whatever it holds
    high = epsilon if epsilon_high is None else epsilon_high
    adv = advantages.astype(mx.float32)[:, None]
    unclipped = ratio if delta is None else mx.minimum(ratio, delta)
    per_token = -mx.minimum(unclipped * adv, mx.clip(ratio, 1 - epsilon, 1 + high) * adv)
    metrics = _clip_metrics(mx.stop_gradient(unclipped), adv, mask, epsilon, high)  # TRL: after delta's cap
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("beta > 0 adds a KL term to the reference policy: ref_logps are needed")
        gap = mx.where(mask > 0, ref_logps.astype(mx.float32) - logps, 0.0)
        kl = mx.exp(gap) - gap - 1
        if kl_ratio:
            kl = kl * ratio
        per_token = per_token + beta * kl
        metrics["kl"] = _masked_mean(mx.stop_gradient(kl), mask)
    return _aggregate(per_token, mask, loss_type, max_completion_length), metrics


def completion_logps(
    model: nn.Module,
    tokens: mx.array,
    prompt_lengths: mx.array,
    width: int,
    temperature: float = GrpoOptions.temperature,
) -> mx.array:
    """(B, ``width``) float32 log-probabilities of each completion token given its prompt and the completion
    before it, at ``temperature``, from one forward over the right-padded prompt + completion rows.

    The temperature is the rollouts' (TRL's selective_log_softmax(logits / T)): the policy whose ratio,
    clip and gradient the loss takes is the one that sampled, not the model's untempered distribution.

    ``tokens`` (B, L) holds row b's prompt in [0, prompt_lengths[b]) and its
    completion right after it; padding follows, which a causal model's real
    positions never see. Positions past a row's end hold what padding predicts:
    the caller's completion mask zeroes them. Differentiable in the model's parameters.
    """
    logits = model(tokens[:, :-1]).astype(mx.float32)
    if temperature != 1.0:
        logits = logits / temperature
    token_logps = -nn.losses.cross_entropy(logits, tokens[:, 1:])  # (B, L - 1): logp of token t + 1
    # Completion token j of row b is token prompt_length[b] + j, predicted at position prompt_length[b] + j - 1.
    positions = prompt_lengths[:, None] - 1 + mx.arange(width)[None, :]
    positions = mx.minimum(positions, token_logps.shape[1] - 1)
    return mx.take_along_axis(token_logps, positions, axis=1)


def grpo_batch_loss(
    model: nn.Module,
    tokens: mx.array,
    prompt_lengths: mx.array,
    mask: mx.array,
    old_logps: mx.array,
    ref_logps: mx.array,
    advantages: mx.array,
    *,
    loss_type: str = GrpoOptions.loss_type,
    epsilon: float = GrpoOptions.epsilon,
    epsilon_high: Optional[float] = None,
    beta: float = GRPO_BETA,
    max_completion_length: Optional[int] = None,
    reuse: bool = False,
    temperature: float = GrpoOptions.temperature,
) -> Tuple[mx.array, mx.array, Dict[str, mx.array]]:
    """`grpo_loss` of a rollout batch as the trainer's losses return theirs: (summed loss, unit count, metric sums).

    The trainer divides a step's sums by its total count, so the count is what
    the loss type averages over: completion tokens for dapo/bnpo (a step of
    several micro-batches then averages over all their tokens, as TRL's dapo
    does over its generation batch; TRL's bnpo would average per micro-batch),
    completions for grpo and dr_grpo. The clip metrics are weighted by the same
    count (low_min/high_max become count-weighted means across micro-batches).
    ``old_logps`` are read only when ``reuse`` (--num-iterations > 1); otherwise
    the batch was sampled by these very weights and the ratio is 1 (its gradient is still ∇logps).
    ``ref_logps`` (the step-0 model's) are read only when ``beta`` > 0 (the KL term; metric "kl").
    All three are log-probabilities at the rollouts' ``temperature``.
    """
    logps = completion_logps(model, tokens, prompt_lengths, mask.shape[1], temperature)
    loss, metrics = grpo_loss(
        logps,
        old_logps if reuse else None,
        ref_logps if beta else None,
        advantages,
        mask,
        loss_type=loss_type,
        epsilon=epsilon,
        epsilon_high=epsilon_high,
        beta=beta,
        max_completion_length=max_completion_length,
    )
    # Not mask.sum(): an output that is the very node the loss divides by fails under mx.compile's
    # value_and_grad (MLX 0.30: "_Map_base::at"); this count is equal, and its own node.
    tokens_count = (mask > 0).astype(mx.float32).sum()
    count = tokens_count if loss_type in ("dapo", "bnpo") else mx.array(float(mask.shape[0]))
    return loss * count, count, {k: v * count for k, v in metrics.items()}
