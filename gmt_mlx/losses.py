"""Training losses, as plain functions of (model, batch).

Every loss returns ``(summed loss, count)``: the sum over its units (target
tokens for SFT) and how many there were. The trainer divides the step's sum by
the step's count over every micro-batch and rank (DESIGN.md decision 8), so
that accumulation and data parallelism compute the gradient of one big batch.
"""

from __future__ import annotations

from typing import Tuple

import mlx.core as mx
import mlx.nn as nn


def sft_loss(model: nn.Module, tokens: mx.array, mask: mx.array) -> Tuple[mx.array, mx.array]:
    """Summed next-token cross-entropy over target positions, and their count.

    ``tokens`` is (B, L) int32; ``mask[b, t]`` is 1 where token t is a loss
    target (predicted from position t - 1), 0 on prompts and padding.
    """
    logits = model(tokens[:, :-1]).astype(mx.float32)
    weights = mask[:, 1:].astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:]) * weights
    return ce.sum(), weights.sum()
