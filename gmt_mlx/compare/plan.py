"""What a `gmt-mlx compare` runs: its spec, and the planned runs with their configs.

`CompareSpec` holds what a comparison shares (one base config) and what it
varies (methods, mask ratios, seeds, learning rates); `plan` turns it into one
validated fine-tuning config per run, and `with_cadence` picks a report and
validation cadence that draws curves. compare.py runs the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

from gmt_mlx import config as cfg
from gmt_mlx.config import MASKED_METHODS, Config
from gmt_mlx.errors import UserError

DEFAULT_METHODS = ("sft", "gmt", "lora")
# Peak learning rates when --learning-rates does not name the method. Full-weight
# methods share one, TRL's SFT default (GMT's mask does not change the step size of
# the entries it keeps); adapters start from zero and take ~5-10x more (PEFT users
# run 1e-4 to 2e-4; docs/design.md records 1e-4 working and 5e-4 collapsing SmolLM2-135M).
DEFAULT_LEARNING_RATES = {"sft": 2e-5, "gmt": 2e-5, "random": 2e-5, "lora": 1e-4, "dora": 1e-4}
# Config keys compare sets per run; a base config must leave them alone.
PER_RUN_KEYS = ("method", "mask_ratio", "seed", "learning_rate", "out")
CADENCE_KEYS = ("steps_per_report", "steps_per_eval")
# Validation points per run when compare picks the cadence (train-loss points: twice as many).
CURVE_POINTS = 8


@dataclass
class CompareSpec:
    """What to compare. ``base`` holds every shared option (model, data, iters, batch ...)."""

    base: Config
    out: Path
    methods: List[str] = field(default_factory=lambda: list(DEFAULT_METHODS))
    seeds: List[int] = field(default_factory=lambda: [0])
    mask_ratios: List[float] = field(default_factory=lambda: [0.2])
    learning_rates: Dict[str, float] = field(default_factory=dict)
    # None: the mode's default. SFT/DPO/ORPO: the "exact" scorer and COMPARE_MAX_TOKENS new tokens. GRPO: no scorer (the
    # runs' --reward scores the test answers) and the runs' --max-completion-length.
    scorers: Optional[List[str]] = None
    eval_limit: int = cfg.eval_default("eval_limit")
    max_tokens: Optional[int] = None
    eval_batch_size: int = cfg.eval_default("batch_size")
    command: Optional[str] = None  # the command line, recorded in results.md
    # Cadence keys compare may choose so that every run draws a curve (those the user did not set).
    auto_cadence: Tuple[str, ...] = ()
    # A method's name in run names and the table where the user typed an alias (--methods full: {"sft": "full"}).
    labels: Dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = {**{cfg.METHOD_ALIASES[m]: m for m in self.methods if m in cfg.METHOD_ALIASES}, **self.labels}
        # "full" runs as "sft" (Config stores it so): one run, named and priced as sft.
        self.methods = list(dict.fromkeys(cfg.METHOD_ALIASES.get(m, m) for m in self.methods))
        from gmt_mlx.objectives import objective_of  # here: the objectives load MLX, `compare --help` need not

        rewarded = objective_of(self.base).measure == "reward"  # GRPO: its rewards score greedy answers
        if self.scorers is None:
            self.scorers = [] if rewarded else ["exact"]
        if self.max_tokens is None:
            self.max_tokens = self.base.max_completion_length if rewarded else cfg.COMPARE_MAX_TOKENS

    def learning_rate(self, method: str) -> float:
        return self.learning_rates.get(method, DEFAULT_LEARNING_RATES[method])


@dataclass
class PlannedRun:
    """One run of a comparison: its folder name, method, mask ratio (None unmasked), seed and config."""

    name: str
    method: str
    mask_ratio: Optional[float]  # None for methods that do not mask
    seed: int
    config: Config
    label: Optional[str] = None  # the method as the user named it (CompareSpec.labels), when not its own name

    @property
    def group(self) -> str:
        return group_label(self.label or self.method, self.mask_ratio, self.config.train_mode)


def method_label(method: str, train_mode: str = Config.train_mode) -> str:
    """The unmasked full-weight method is "sft" in SFT comparisons and "full" under another (named) objective."""
    from gmt_mlx.objectives import objective_of  # here: the objectives load MLX, `compare --help` need not

    return "full" if method == "sft" and objective_of(train_mode).named else method


def group_label(method: str, mask_ratio: Optional[float], train_mode: str = Config.train_mode) -> str:
    """The row a run belongs to: the method, with its mask ratio for masked methods (gmt r=0.2)."""
    method = method_label(method, train_mode)
    return f"{method} r={mask_ratio:g}" if mask_ratio is not None else method


def check_base(values: Dict[str, object], where: str) -> None:
    """A base config must not set what compare sets per run."""
    for key in PER_RUN_KEYS:
        if key in values and values[key] is not None:
            hint = {
                "method": "--methods",
                "mask_ratio": "--mask-ratios",
                "seed": "--seeds",
                "learning_rate": "--learning-rates",
                "out": "compare's --out",
            }[key]
            raise UserError(f"{where}: {key} is set per run by compare; use {hint}")


# --------------------------------------------------------------------------
# Planning
# --------------------------------------------------------------------------


def with_cadence(spec: CompareSpec, steps: int, log: Callable[[str], None] = print) -> CompareSpec:
    """``spec`` with the report/eval cadence that draws a curve of ~CURVE_POINTS points for a run of
    ``steps`` steps, for the keys in ``spec.auto_cadence``; warns when the user's cadence draws dots."""
    changes = {}
    every_eval = max(1, steps // CURVE_POINTS)
    if "steps_per_eval" in spec.auto_cadence:
        changes["steps_per_eval"] = every_eval
    if "steps_per_report" in spec.auto_cadence:
        # Eval steps are multiples of report steps, and enough report windows for a median speed.
        changes["steps_per_report"] = max(1, changes.get("steps_per_eval", every_eval) // 2)
    base = replace(spec.base, **changes)
    if changes:
        log(
            f"compare: {steps} steps per run; validation every {base.steps_per_eval}, metrics every "
            f"{base.steps_per_report} (set --steps-per-eval / --steps-per-report to choose)"
        )
    evals = steps // base.steps_per_eval if base.steps_per_eval else 1
    if evals < 3:
        log(
            f"warning: --steps-per-eval {base.steps_per_eval} with {steps} steps: each validation curve has "
            f"{evals + 1} point{'s' if evals else ''} (step 0 included); a smaller --steps-per-eval draws a curve"
        )
    return replace(spec, base=base)


def run_name(method: str, mask_ratio: Optional[float], seed: int) -> str:
    """Run folder name: gmt-r0.3-s0 for masked methods, sft-s0 / lora-s0 for the others."""
    return f"{method}-r{mask_ratio:g}-s{seed}" if mask_ratio is not None else f"{method}-s{seed}"


def plan(spec: CompareSpec) -> List[PlannedRun]:
    """Every run of the comparison, seed-major (all methods of seed 0 first), configs validated."""
    if not spec.base.data:
        raise UserError("--data is required (a folder with train.jsonl, valid.jsonl and test.jsonl)")
    runs = []
    for seed in spec.seeds:
        for method in spec.methods:
            ratios: List[Optional[float]] = list(spec.mask_ratios) if method in MASKED_METHODS else [None]
            for ratio in ratios:
                label = spec.labels.get(method)
                name = run_name(label or method_label(method, spec.base.train_mode), ratio, seed)
                # samples=0: the before/after answers of finetune would repeat (slowly) what
                # the evaluation below records for every test prompt.
                config = replace(
                    spec.base,
                    method=method,
                    mask_ratio=ratio if ratio is not None else 0.0,
                    seed=seed,
                    learning_rate=spec.learning_rate(method),
                    out=str(spec.out / "runs" / name),
                    samples=0,
                    # The table's mask overlap between steps (a byte per parameter of peak memory).
                    mask_overlap=spec.base.mask_overlap or ratio is not None,
                ).validate()
                runs.append(PlannedRun(name, method, ratio, seed, config, label))
    return runs
