"""Training losses, as plain functions of (model, batch)."""

from __future__ import annotations

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn


def sft_loss(
    model: nn.Module, tokens: mx.array, mask: mx.array, norm: Optional[mx.array] = None
) -> Tuple[mx.array, mx.array]:
    """Mean next-token cross-entropy over target positions, and their count.

    ``tokens`` is (B, L) int32; ``mask[b, t]`` is 1 where token t is a loss
    target (predicted from position t - 1), 0 on prompts and padding. In
    data-parallel runs ``norm`` is the target count of the *global* batch, so
    the ranks' losses (and gradients) sum to the global mean.
    """
    logits = model(tokens[:, :-1]).astype(mx.float32)
    weights = mask[:, 1:].astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:]) * weights
    ntoks = weights.sum()
    return ce.sum() / (mx.maximum(ntoks, 1.0) if norm is None else norm), ntoks
