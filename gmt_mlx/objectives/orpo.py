"""ORPO (Hong et al., 2024): the SFT loss on the chosen answer plus an odds-ratio term; no reference model.

It reads prompt/chosen/rejected pairs (two sequences per pair in a batch) and
its loss is `losses.orpo_loss`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict

from gmt_mlx.core.losses import orpo_loss
from gmt_mlx.objectives.base import MemoryTerms, Objective, saved_settings


class ORPO(Objective):
    """Odds-ratio preference optimisation on pairs."""

    name = "orpo"
    rows = "pairs"
    report = "preference"
    named = True
    validates_at_start = True  # where preference training starts

    def loss(self, config) -> Callable:
        """`orpo_loss` with --orpo-lambda bound."""
        return partial(orpo_loss, lam=config.orpo_lambda)

    def describe(self, config: Dict[str, Any]) -> str:
        """ORPO and its lambda."""
        return f"ORPO, lambda {saved_settings(config)['orpo_lambda']:g} (no reference model)"

    def memory_terms(self, config, trainable_bytes: int) -> MemoryTerms:
        """A batch holds two rows per pair."""
        return MemoryTerms(rows=2)
