"""The one interface every objective (sft, dpo, orpo, grpo) gives the recipes, and its defaults.

An objective answers, for a config, what the recipes used to ask the train
mode: which rows it reads and how they become token ids (`rows`,
`tokenize`), how many sequences one example costs (`memory_terms`), its loss
(`loss`), its share of a run (`start`: the batches, the validation, the state
a checkpoint keeps), what its validation measures (`measure`), and what the
model card and the compare report say about it (`describe`, `named`,
`report`). `Objective` holds the defaults, which are SFT's; an objective
overrides the few that differ (one level of subclassing, nothing deeper), and
`ObjectiveRun` is the per-run part, whose defaults do nothing.

Objectives sit above core/, data/ and models/ and below evaluation/: they
use the loss math, the batching and the tokenizers, and `gmt-mlx eval`
reuses GRPO's rewards and DPO's reference log-probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, Optional

from gmt_mlx.config import Config
from gmt_mlx.core.losses import sft_loss
from gmt_mlx.data.encoding import TokenizedSplit, tokenize_split
from gmt_mlx.errors import UserError

# The row kinds an objective reads (its `rows`): what the data layer loads and checks, and the word for them.
ROW_KINDS = ("examples", "pairs", "prompts")
# What an objective's validation measures (its `measure`): "loss" is lower-better; "reward" is logged as a
# "loss" of minus the mean reward (so the best checkpoint is the one with the highest reward).
MEASURES = ("loss", "reward")


@dataclass(frozen=True)
class MemoryTerms:
    """What one training example of an objective costs beyond SFT's, for the memory estimate and the summary."""

    rows: int = 1  # sequences per example in a batch: 2 for a preference pair, --num-generations for GRPO
    completion_tokens: int = 0  # tokens sampled after each prompt (GRPO: --max-completion-length, a bound)
    rollouts: bool = False  # whether the step decodes its rows first (the KV cache of the rollouts)
    reference_bytes: int = 0  # a second copy of the trainable weights held for a KL term (GRPO --beta > 0)


class ObjectiveRun:
    """An objective's part of one run (`Objective.start`); the defaults are SFT's: nothing to add.

    The recipe calls, in order: `check_saved` (on resume, before anything is
    written), `restore` (after the checkpoint is loaded), `prepare` (before
    training, on a fresh start), then `batches` / `on_step` / `validate` in
    the loop and `checkpoint_state` at every save.
    """

    #: the validation, when it replaces the split's loss (GRPO's greedy reward); None: `split_loss`.
    validate: Optional[Callable[[Any], dict]] = None

    def check_saved(self, out: Path, checkpoint: Optional[Path]) -> None:
        """Refuse a resume whose saved state this objective cannot use (before the run dir is touched)."""

    def restore(self, start_step: int, meta: Optional[dict], checkpoint: Optional[Path]) -> None:
        """Take back what `checkpoint_state` saved, from the checkpoint's metadata (None: a fresh start)."""

    def prepare(self, out: Path, checkpoint: Optional[Path], *, write: bool, log: Callable[[str], None]) -> None:
        """Work done once before the first step (DPO: the reference log-probabilities)."""

    def batches(self, default: Callable[[], Iterator], count: Callable[[int], None], shard: tuple) -> Iterator:
        """The loop's batches: ``default()`` (the split's, in their resumable order) unless it has its own."""
        return default()

    def on_step(self, log_step: Callable[[Any], None]) -> Callable[[Any], None]:
        """The loop's per-step callback, with the objective's metrics added to ``log_step``'s."""
        return log_step

    def checkpoint_state(self) -> Dict[str, Any]:
        """Entries a checkpoint's state.json keeps for this objective (merged into its metadata)."""
        return {}


class Objective:
    """A training objective; these defaults are SFT's (the next-token loss on the targets)."""

    name: str = "sft"
    rows: str = "examples"  # one of ROW_KINDS
    measure: str = "loss"  # one of MEASURES
    report: str = "loss"  # the compare report's method table: "loss" (test ppl), "preference", "reward"
    named: bool = False  # whether the card's intro and tags name the objective (SFT goes unnamed)
    validates_at_start: bool = False  # whether a fresh run validates the step-0 model (where training starts)

    def loss(self, config) -> Callable:
        """The loss the loop trains on, its hyper-parameters bound from ``config``."""
        return sft_loss

    def describe(self, config: Dict[str, Any]) -> str:
        """The objective and its settings in a few words (the card, the summary, the comparison); ``config`` a dict."""
        return "SFT (next-token loss)"

    def memory_terms(self, config, trainable_bytes: int) -> MemoryTerms:
        """The objective's terms of the memory estimate (``trainable_bytes``: the trainable weights' bytes)."""
        return MemoryTerms()

    def rounds(self, config) -> int:
        """Optimizer steps trained on each step's worth of examples (GRPO: --num-iterations steps a round)."""
        return 1

    def load_options(self) -> Dict[str, Any]:
        """Keywords of `sources.load_splits` for this objective's rows (GRPO: prompt rows with no completion)."""
        return {"prompts": self.rows == "prompts"}

    def check(self, config) -> None:
        """What must be known before the (slow) model load: a bad option is a one-line UserError here."""

    def tokenize(
        self, config, rows: Dict[str, list], tokenizer, log: Callable[[str], None]
    ) -> Dict[str, TokenizedSplit]:
        """Every split present as token ids (`tokenize_split`), with a warning for what was cut or dropped."""
        return tokenize_rows(config, rows, tokenizer, log, pairs=self.rows == "pairs")

    def start(self, config, run) -> ObjectiveRun:
        """This objective's part of a run (``run``: the recipe's `Setup`, its model, splits and rows)."""
        return ObjectiveRun()

    def against_reference(self, config: Dict[str, Any], tuned: Any, reference: Any) -> Dict[str, float]:
        """Numbers of this objective for pairs' summed log-probabilities (``tuned``, ``reference``: arrays of
        [chosen, rejected] rows) of a tuned model and of its reference (`evaluate.against_base`); none by default."""
        return {}

    def shown_validation(self, val_loss: float) -> tuple:
        """(name, value) of a validation result as a user reads it: GRPO's "loss" is minus the mean reward."""
        return ("val reward", -val_loss) if self.measure == "reward" else ("val loss", val_loss)


def saved_settings(config: Dict[str, Any]) -> Dict[str, Any]:
    """A saved config dict (a run's config.yaml, a comparison's spec) completed with Config's defaults for the
    keys it lacks (a run of an older gmt-mlx), beta's per mode: what `describe` and the reports read."""
    return {**Config(train_mode=config.get("train_mode") or "sft").to_dict(), **config}


def tokenize_rows(
    config, rows: Dict[str, list], tokenizer, log: Callable[[str], None], *, pairs: bool
) -> Dict[str, TokenizedSplit]:
    """Tokenize every split present (``pairs``: prompt/chosen/rejected rows); warn about truncation."""
    splits = {}
    for name, split_rows in rows.items():
        split = tokenize_split(
            split_rows,
            tokenizer,
            mask_prompt=config.mask_prompt,
            max_seq_length=config.max_seq_length,
            name=name,
            assistant_turns=config.assistant_turns,
            preference=pairs,
        )
        what = "pairs" if pairs else "examples"
        if split.truncated:
            log(
                f"warning: {split.truncated} of {len(split_rows)} {name} {what} were longer than "
                f"--max-seq-length {config.max_seq_length} and were truncated"
            )
        if split.dropped and pairs:
            log(
                f"warning: dropped {split.dropped} {name} pair{'s' if split.dropped != 1 else ''} whose prompt leaves "
                f"no room for an answer within --max-seq-length {config.max_seq_length}"
            )
        elif split.dropped:
            log(
                f"warning: dropped {split.dropped} {name} example{'s' if split.dropped != 1 else ''} "
                "with no target tokens left"
            )
        if len(split) == 0:
            raise UserError(f"{name} split has no usable examples")
        splits[name] = split
    return splits
