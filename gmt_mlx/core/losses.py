"""Training losses, as plain functions of (model, *batch).

Every loss returns ``(summed loss, count)`` or ``(summed loss, count,
metrics)``: the sum over its units (target tokens for SFT, preference pairs
for DPO/ORPO), how many there were, and optionally a dict of per-unit sums to
report (reward accuracy, margins). The trainer divides the step's sums by the
step's count over every micro-batch and rank (docs/design.md decision 8), so that
accumulation and data parallelism compute the gradient of one big batch.

Preference batches (data.make_batch of a preference split) stack a pair's two
answers: rows ``[0, B)`` are the chosen answers, rows ``[B, 2B)`` the rejected
ones, with the prompt in front and only the answer's tokens as targets.
"""

from __future__ import annotations

from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from gmt_mlx.config import DPO_LOSSES, ObjectiveOptions

# Per-pair sums a preference loss reports; divided by the pair count they are means.
PREFERENCE_METRICS = ("reward_accuracy", "reward_margin", "chosen_logp", "rejected_logp")
# What `sft_eval_loss` sums besides the loss: matched rows and rows (their ratio is the exact match).
SFT_EVAL_METRICS = ("exact_match", "rows")
# A loss's output and a step's sums alike: (summed loss, unit count, metric sums).
Totals = Tuple[mx.array, mx.array, Dict[str, mx.array]]


def _token_ce(model: nn.Module, tokens: mx.array, mask: mx.array) -> Tuple[mx.array, mx.array, mx.array]:
    """(logits, target weights, per-token cross-entropy zeroed off-target) of next-token prediction.

    ``tokens`` is (B, L) int32; ``mask[b, t]`` is 1 where token t is a loss
    target (predicted from position t - 1), 0 on prompts and padding.
    """
    logits = model(tokens[:, :-1]).astype(mx.float32)
    weights = mask[:, 1:].astype(mx.float32)
    return logits, weights, nn.losses.cross_entropy(logits, tokens[:, 1:]) * weights


def sft_loss(model: nn.Module, tokens: mx.array, mask: mx.array) -> Tuple[mx.array, mx.array]:
    """Summed next-token cross-entropy over target positions, and their count."""
    _, weights, ce = _token_ce(model, tokens, mask)
    return ce.sum(), weights.sum()


def sft_eval_loss(model: nn.Module, tokens: mx.array, mask: mx.array) -> Totals:
    """`sft_loss` for validation, plus how many rows the model reproduces greedily.

    A row counts when every target token is the model's most likely next
    token given the reference before it: exactly when greedy decoding from the
    prompt writes the reference answer (with its end marker, a target too) and
    stops. One forward pass gives both numbers, so validation reports this
    accuracy at no extra cost. Metrics (SFT_EVAL_METRICS): "exact_match"
    (matched rows) and "rows" (rows with targets), summed;
    `trainer.mean_metrics` divides the one by the other.
    """
    logits, weights, ce = _token_ce(model, tokens, mask)
    wrong = ((mx.argmax(logits, axis=-1) != tokens[:, 1:]).astype(mx.float32) * weights).sum(axis=1)
    has_targets = weights.sum(axis=1) > 0
    matched = mx.logical_and(wrong == 0, has_targets)
    return (
        ce.sum(),
        weights.sum(),
        {"exact_match": matched.astype(mx.float32).sum(), "rows": has_targets.astype(mx.float32).sum()},
    )


def sequence_logps(model: nn.Module, tokens: mx.array, mask: mx.array) -> Tuple[mx.array, mx.array]:
    """Each row's summed log-probability of its target tokens, and how many there are: two (B,) arrays."""
    _, weights, ce = _token_ce(model, tokens, mask)
    return -ce.sum(axis=1), weights.sum(axis=1)


def _log_sigmoid(x: mx.array) -> mx.array:
    return -mx.logaddexp(mx.zeros_like(x), -x)  # log(1 / (1 + e^-x)), stable for large |x|


def _log1mexp(x: mx.array) -> mx.array:
    """log(1 - e^x) for x < 0, accurate at both ends (Maechler's split at -ln 2)."""
    x = mx.minimum(x, -1e-7)  # an answer of probability 1 has odds of infinity; keep the log finite
    return mx.where(x > -0.6931471805599453, mx.log(-mx.expm1(x)), mx.log1p(-mx.exp(x)))


def dpo_pair_losses(
    chosen: mx.array,
    rejected: mx.array,
    ref_chosen: mx.array,
    ref_rejected: mx.array,
    *,
    beta: float,
    loss_type: str = ObjectiveOptions.dpo_loss,
    label_smoothing: float = ObjectiveOptions.label_smoothing,
) -> mx.array:
    """Per-pair DPO losses from (policy, reference) log-probabilities of the chosen and rejected answers.

    sigmoid: -log σ(β Δ), with label smoothing ε the conservative DPO of
    Mitchell (2023): -(1-ε) log σ(β Δ) - ε log σ(-β Δ). hinge: max(0, 1 - β Δ)
    (SLiC). ipo: (Δ - 1/(2β))², where the caller passes length-averaged
    log-probabilities (as TRL does). Δ = (chosen - ref_chosen) - (rejected - ref_rejected).
    """
    delta = (chosen - ref_chosen) - (rejected - ref_rejected)
    if loss_type == "sigmoid":
        losses = -_log_sigmoid(beta * delta)
        if label_smoothing:
            losses = (1 - label_smoothing) * losses - label_smoothing * _log_sigmoid(-beta * delta)
        return losses
    if loss_type == "hinge":
        return mx.maximum(1 - beta * delta, 0.0)
    if loss_type == "ipo":
        return mx.square(delta - 1 / (2 * beta))
    raise ValueError(f"unknown DPO loss {loss_type!r} (one of {', '.join(DPO_LOSSES)})")


def _preference_metrics(chosen_rewards, rejected_rewards, chosen_logps, rejected_logps) -> Dict[str, mx.array]:
    return {
        "reward_accuracy": (chosen_rewards > rejected_rewards).astype(mx.float32).sum(),
        "reward_margin": (chosen_rewards - rejected_rewards).sum(),
        "chosen_logp": chosen_logps.sum(),
        "rejected_logp": rejected_logps.sum(),
    }


def dpo_loss(
    model: nn.Module,
    tokens: mx.array,
    mask: mx.array,
    reference: mx.array,
    *,
    beta: float,
    loss_type: str = ObjectiveOptions.dpo_loss,
    label_smoothing: float = ObjectiveOptions.label_smoothing,
) -> Totals:
    """Summed DPO loss over a batch of pairs, the pair count, and the per-pair metric sums.

    ``reference`` (2B,) holds the step-0 model's summed log-probabilities of
    the same rows (computed once before training, see objectives/dpo/reference.py). The
    rewards are β (policy - reference), summed over answer tokens (averaged
    per token for ipo, as its loss is).
    """
    logps, counts = sequence_logps(model, tokens, mask)
    reference = reference.astype(mx.float32)
    if loss_type == "ipo":
        logps, reference = logps / mx.maximum(counts, 1.0), reference / mx.maximum(counts, 1.0)
    pairs = tokens.shape[0] // 2
    chosen, rejected = logps[:pairs], logps[pairs:]
    ref_chosen, ref_rejected = reference[:pairs], reference[pairs:]
    losses = dpo_pair_losses(
        chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing
    )
    metrics = _preference_metrics(
        beta * mx.stop_gradient(chosen - ref_chosen),
        beta * mx.stop_gradient(rejected - ref_rejected),
        mx.stop_gradient(chosen),
        mx.stop_gradient(rejected),
    )
    return losses.sum(), mx.array(float(pairs)), metrics


def orpo_pair_losses(chosen_avg: mx.array, rejected_avg: mx.array, *, lam: float) -> Tuple[mx.array, mx.array]:
    """ORPO (Hong et al. 2024) per pair from length-averaged answer log-probabilities.

    Returns (losses, log odds ratio): loss = -chosen_avg (the chosen answer's
    per-token NLL) - λ log σ(log odds(chosen) - log odds(rejected)), with
    odds(y) = P / (1 - P) of the per-token-averaged probability P.
    """
    log_odds = (chosen_avg - rejected_avg) - (_log1mexp(chosen_avg) - _log1mexp(rejected_avg))
    return -chosen_avg - lam * _log_sigmoid(log_odds), log_odds


def orpo_loss(model: nn.Module, tokens: mx.array, mask: mx.array, *, lam: float) -> Totals:
    """Summed ORPO loss over a batch of pairs, the pair count, and the per-pair metric sums.

    The NLL term is each pair's mean over its chosen answer's tokens (the
    paper's per-example L_SFT), so every pair weighs the same in a step, as in
    the odds-ratio term; TRL instead averages the NLL over all chosen tokens of
    a batch. Rewards are λ x the averaged log-probabilities (TRL's logging).
    """
    logps, counts = sequence_logps(model, tokens, mask)
    avg = logps / mx.maximum(counts, 1.0)
    pairs = tokens.shape[0] // 2
    chosen, rejected = avg[:pairs], avg[pairs:]
    losses, _ = orpo_pair_losses(chosen, rejected, lam=lam)
    metrics = _preference_metrics(
        lam * mx.stop_gradient(chosen),
        lam * mx.stop_gradient(rejected),
        mx.stop_gradient(logps[:pairs]),
        mx.stop_gradient(logps[pairs:]),
    )
    return losses.sum(), mx.array(float(pairs)), metrics


def add_totals(totals: Totals, earlier: Optional[tuple]) -> Totals:
    """``totals`` plus the first three entries of ``earlier`` (the step's earlier micro-batches; None: none)."""
    if earlier is None:
        return totals
    loss, count, metrics = totals
    return loss + earlier[0], count + earlier[1], {k: v + earlier[2][k] for k, v in metrics.items()}


def unpack(out: tuple) -> Totals:
    """(loss, count, metrics) from a loss's output, metrics empty for the two-value losses."""
    return (out[0], out[1], out[2]) if len(out) > 2 else (out[0], out[1], {})
