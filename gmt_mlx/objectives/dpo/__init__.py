"""DPO (Rafailov et al., 2023) against the step-0 model, its log-probabilities computed once (`reference`).

It reads prompt/chosen/rejected pairs (two sequences per pair in a batch);
its loss is `losses.dpo_loss` (sigmoid, ipo or hinge); its state is the
reference log-probabilities in the run directory, checked on resume before
anything is written and computed on a fresh start.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import mlx.core as mx
import numpy as np

from gmt_mlx.core.losses import dpo_loss, dpo_pair_losses
from gmt_mlx.data.batching import drawn_indices
from gmt_mlx.objectives.base import MemoryTerms, Objective, ObjectiveRun, saved_settings
from gmt_mlx.objectives.dpo.reference import compute_reference, load_reference


class DPO(Objective):
    """Direct preference optimisation on pairs, the reference being the step-0 model."""

    name = "dpo"
    rows = "pairs"
    report = "preference"
    named = True
    validates_at_start = True  # DPO starts at ln 2 (policy = reference): the step-0 validation shows it

    def loss(self, config) -> Callable:
        """`dpo_loss` with --beta, --dpo-loss and --label-smoothing bound."""
        return partial(dpo_loss, beta=config.beta, loss_type=config.dpo_loss, label_smoothing=config.label_smoothing)

    def describe(self, config: Dict[str, Any]) -> str:
        """DPO, its loss, beta and label smoothing."""
        config = saved_settings(config)
        smoothing = f", label smoothing {config['label_smoothing']:g}" if config["label_smoothing"] else ""
        return f"DPO ({config['dpo_loss']} loss), beta {config['beta']:g}{smoothing}, reference = the step-0 model"

    def memory_terms(self, config, trainable_bytes: int) -> MemoryTerms:
        """Two rows per pair; the reference pass (forward only, at the same batch) stays below the step's peak."""
        return MemoryTerms(rows=2)

    def against_reference(self, config: Dict[str, Any], tuned: Any, reference: Any) -> Dict[str, float]:
        """dpo_loss, the run's own loss on these pairs, for the sigmoid and hinge losses (whose rewards use
        summed log-probabilities, as ``tuned`` and ``reference`` are)."""
        config = saved_settings(config)
        if config["dpo_loss"] not in ("sigmoid", "hinge"):
            return {}
        t, b = tuned, reference
        losses = dpo_pair_losses(
            *(mx.array(v.astype(np.float32)) for v in (t[:, 0], t[:, 1], b[:, 0], b[:, 1])),
            beta=config["beta"],
            loss_type=config["dpo_loss"],
            label_smoothing=config["label_smoothing"],
        )
        return {"dpo_loss": float(np.array(losses).mean())}

    def start(self, config, run) -> ObjectiveRun:
        """The run's reference log-probabilities (`DpoReference`)."""
        return DpoReference(config, run)


class DpoReference(ObjectiveRun):
    """DPO's reference log-probabilities: checked on resume before anything is written, computed on a fresh start.

    The training pairs the run draws (the order is a pure function of the
    seed) are the ones needed: a short run over a big set computes and checks
    the reference of those alone.
    """

    def __init__(self, config, run):
        self.config, self.run = config, run
        self.splits = {
            name: split for name, split in (("train", run.train_split), ("valid", run.valid_split)) if split is not None
        }
        # One optimizer step's examples: --batch-size micro-batches x --grad-accumulation-steps.
        step_examples = config.batch_size * config.grad_accumulation_steps
        self.needed = {
            "train": drawn_indices(run.train_split.lengths(), step_examples, seed=config.seed, steps=run.steps)
        }

    def check_saved(self, out: Path, checkpoint: Optional[Path]) -> None:
        """On resume, the saved reference must cover the pairs this run draws."""
        if checkpoint is not None:
            # Before anything is written: a refused resume leaves the run as it was.
            load_reference(out, self.splits, self.needed)

    def prepare(self, out: Path, checkpoint: Optional[Path], *, write: bool, log: Callable[[str], None]) -> None:
        """On a fresh start, the step-0 model's log-probabilities of the pairs (rank 0 writes them)."""
        if checkpoint is None:
            compute_reference(
                self.run.model,
                self.splits,
                out,
                write=write,
                batch_size=self.config.batch_size,
                pad_id=self.run.pad_id,
                needed=self.needed,
                log=log,
            )
