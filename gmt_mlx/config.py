"""The one typed configuration of a fine-tuning run.

Every option's default, type, choices and help text live here and nowhere
else: the CLI builds its flags from these fields, YAML files are checked
against them, and the run directory stores the resolved config. Precedence:
command-line flags > YAML (`-c config.yaml`) > these defaults.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from gmt_mlx.errors import UserError

# "full" is another name for "sft" (plain full fine-tuning); Config stores it as "sft".
METHODS = ("gmt", "sft", "full", "random", "lora", "dora")
METHOD_ALIASES = {"full": "sft"}
# Methods whose optimizer masks the gradient (the one place that decides it; mask_* apply to them only).
MASKED_METHODS = ("gmt", "random")
# Methods that train low-rank adapters on a frozen base (which may stay quantized: QLoRA).
ADAPTER_METHODS = ("lora", "dora")
MASK_KEYS = ("mask_ratio", "mask_scope", "mask_target", "mask_sample_size")
LORA_KEYS = ("lora_rank", "lora_scale", "lora_dropout", "lora_keys")
# How AdamW's moments are stored (optim.CompactAdamW); "auto": in the weights' dtype.
MOMENTS = ("auto", "float32", "bfloat16", "8bit", "4bit", "8bit-factored")
# How an update is rounded into low-precision (bfloat16) weights.
WEIGHT_ROUNDINGS = ("stochastic", "nearest")
# The choice lists of the options below: this is where they are written; the modules
# that check a value (masking, losses, optim, data) take theirs from here.
ASSISTANT_TURNS = ("final", "all")  # which assistant turns of a chat are targets under mask_prompt
MASK_SCOPES = ("tensor", "layer", "global")
MASK_TARGETS = ("grad", "update")
# The objectives' names (gmt_mlx/objectives: one home each; its registry has exactly these keys, a test checks).
TRAIN_MODES = ("sft", "dpo", "orpo", "grpo")
# --beta's default depends on the mode (Config.beta is None until __post_init__): named here, once, so that
# the GRPO loss, usable without a Config, takes its default from the same place.
PREFERENCE_BETA = 0.1  # DPO's (and ORPO's, which ignores it)
GRPO_BETA = 0.0  # no KL term, so no reference model is held
DPO_LOSSES = ("sigmoid", "ipo", "hinge")
# Online RL (GRPO, objectives/grpo/loss.py): how the per-token loss is normalised, and how rewards are scaled
# into advantages; both as TRL defines them.
GRPO_LOSS_TYPES = ("grpo", "dr_grpo", "dapo", "bnpo")
REWARD_SCALINGS = ("group", "batch", "none")
# --reward takes any --scorer name (data/scorers.py), a module:function, and these
# rewards of its own (objectives/grpo/rewards.py): "format", a final answer in a form the scorers read, at the end.
REWARD_EXTRAS = ("format",)
OPTIMIZERS = ("adamw", "adam", "sgd", "adafactor", "muon")
LR_SCHEDULES = ("cosine", "linear", "constant")
DTYPE_NAMES = ("float32", "bfloat16", "float16")
DISTRIBUTED_BACKENDS = ("any", "ring", "mpi", "nccl", "jaccl")
# What --low-memory sets, for the options the user did not set (docs/design.md decision 11):
# bfloat16 weights with stochastic rounding, 4-bit m and sqrt(v) (the smallest
# state that matched float32 AdamW on the main job over 3 seeds; 8-bit m with a
# factored v did not: benchmarks/RESULTS.md), the model saved in the dtype it
# was trained in, and the update per layer (layerwise). Gradient clipping
# stays as asked: per layer its norm costs a backward pass more, and without
# it the main job lost most of its gain (RESULTS.md, issue 22's fourth round).
LOW_MEMORY = {"train_dtype": "bfloat16", "moments": "4bit", "dtype": "bfloat16", "update_per_layer": True}
GRPO_KEYS = (
    "num_generations",
    "reward",
    "reward_weights",
    "scale_rewards",
    "loss_type",
    "epsilon",
    "epsilon_high",
    "num_iterations",
    "temperature",
    "top_p",
    "max_completion_length",
    "mask_truncated_completions",
)
# Keys of some objectives only (the train modes they apply to): config.diff ignores them elsewhere.
TRAIN_MODE_KEYS = {
    "beta": ("dpo", "grpo"),
    "dpo_loss": ("dpo",),
    "label_smoothing": ("dpo",),
    "orpo_lambda": ("orpo",),
    **{key: ("grpo",) for key in GRPO_KEYS},
}


def opt(default, help: str, choices: tuple = (), group: str = "Training", cli: bool = True, common: bool = False):
    """A config field with its help text (and allowed values) attached; ``common`` fields are
    the ones a short ``--help`` lists (``--help-all`` lists every field)."""
    return field(
        default=default, metadata={"help": help, "choices": choices, "group": group, "cli": cli, "common": common}
    )


def check_mask_ratio(mask_ratio: float) -> float:
    """Validate that ``mask_ratio`` (the fraction dropped) lies in [0, 1)."""
    if not (0.0 <= float(mask_ratio) < 1.0):
        raise ValueError(f"mask_ratio must be in [0, 1) (the fraction dropped), got {mask_ratio}")
    return float(mask_ratio)


@dataclass
class Config:
    # What to train on
    model: str = opt(
        "smollm2-135m",
        "Local HF folder, GGUF file, Hub id, or 'smollm2-135m' (the embedded default).",
        group="Model and data",
        common=True,
    )
    data: Optional[str] = opt(
        None,
        "Folder with train.jsonl (+ valid.jsonl, test.jsonl), a .jsonl, .parquet, .csv or .json file, a folder "
        "written by datasets' save_to_disk, or a Hub dataset id owner/name (all but JSONL: pip install "
        "'gmt-mlx[datasets]').",
        group="Model and data",
        common=True,
    )
    out: str = opt(
        "runs/latest",
        "Run directory: config, metrics, checkpoints and the fine-tuned model.",
        group="Model and data",
        common=True,
    )
    max_seq_length: int = opt(
        2048,
        "Truncate examples to this many tokens (a warning says how many were cut).",
        group="Model and data",
        common=True,
    )
    mask_prompt: bool = opt(
        False,
        "Train only on completions / the final assistant turn (loss masked on prompts).",
        group="Model and data",
        common=True,
    )
    assistant_turns: str = opt(
        "final",
        "With --mask-prompt, the assistant turns of a chat that are targets: final (the last reply, mlx-lm's "
        "--mask-prompt) or all (every reply and tool call, TRL's assistant_only_loss); system, user and tool turns "
        "never are.",
        ASSISTANT_TURNS,
        group="Model and data",
    )
    columns: Optional[str] = opt(
        None,
        "Rename dataset columns to the fields of our formats, SOURCE=FIELD pairs: question=prompt,answer=completion "
        "(other columns are kept).",
        group="Model and data",
    )
    data_config: Optional[str] = opt(
        None,
        "Configuration (subset) of a Hub dataset, load_dataset's name (TRL's --dataset-config), e.g. main for "
        "openai/gsm8k.",
        group="Model and data",
    )
    data_splits: Optional[str] = opt(
        None,
        "Dataset splits that become train/valid/test, SPLIT=OURS pairs: train_sft=train,test_sft=valid, or slices: "
        "train[:90%]=train,train[90%:]=valid.  [default: train, validation (or valid, dev), test]",
        group="Model and data",
    )

    # Method
    method: str = opt(
        "gmt",
        "gmt (gradient-mask tuning), sft or full (plain full fine-tuning), random (random mask control), lora / dora "
        "(low-rank adapters on a frozen base).",
        METHODS,
        group="Method",
        common=True,
    )
    mask_ratio: float = opt(
        0.2, "Fraction of gradient entries DROPPED each optimizer step, in [0, 1).", group="Method", common=True
    )
    mask_scope: str = opt(
        "tensor",
        "Unit sharing one threshold: tensor, layer (transformer block) or global.",
        MASK_SCOPES,
        group="Method",
    )
    mask_target: str = opt(
        "grad",
        "grad: the optimizer sees the masked gradient; update: only kept entries move.",
        MASK_TARGETS,
        group="Method",
    )
    mask_sample_size: int = opt(
        65536,
        "Units larger than this estimate the threshold from a sample of up to this many entries (4 r (1-r) x this at "
        "mask ratio r).",
        group="Method",
    )
    mask_overlap: bool = opt(
        False,
        "Log how much consecutive steps' masks overlap (mask_overlap in metrics.jsonl, from a 65k-entry sample); "
        "costs ~1 byte per trained parameter of peak memory.",
        group="Method",
    )
    freeze_embeddings: bool = opt(False, "Do not train the input embeddings.", group="Method")
    freeze_lm_head: bool = opt(False, "Do not train the output head (lm_head).", group="Method")
    num_layers: int = opt(
        -1,
        "Train only the last N transformer blocks (-1: all); for lora/dora, put adapters on the last N blocks.",
        group="Method",
    )

    # LoRA / DoRA (mlx_lm's adapter layers; the base stays frozen, and quantized if it was)
    lora_rank: int = opt(8, "Rank of the LoRA/DoRA adapters.", group="LoRA")
    lora_scale: float = opt(
        20.0, "Adapter output multiplier, mlx-lm's 'scale' (PEFT's lora_alpha / rank).", group="LoRA"
    )
    lora_dropout: float = opt(0.0, "Dropout on the adapter input, in [0, 1).", group="LoRA")
    lora_keys: str = opt(
        "",
        "Comma-separated block-relative module names to adapt, e.g. self_attn.q_proj,self_attn.v_proj (empty: every "
        "linear layer of the block).",
        group="LoRA",
    )

    # Objective (docs/design.md decision 10): the same loop, methods and mask for every mode
    train_mode: str = opt(
        "sft",
        "sft (next-token loss on the targets), dpo (preference optimisation against the step-0 model, its "
        "log-probabilities computed once), orpo (odds-ratio, no reference) or grpo (online RL: sampled completions "
        "scored by --reward).",
        TRAIN_MODES,
        group="Objective",
        common=True,
    )
    beta: Optional[float] = opt(
        None,
        "DPO's beta: how far the tuned model may move from the step-0 model (larger: stays closer). GRPO's weight of "
        "the KL term to the step-0 model (0: none, and no reference kept; > 0 keeps the step-0 trainable weights: a "
        "second copy for full/gmt/random, the initial adapters for lora/dora).  [default: 0.1; 0 for grpo]",
        group="Objective",
    )
    dpo_loss: str = opt(
        "sigmoid",
        "DPO loss: sigmoid (DPO), ipo (IPO, on per-token averaged log-probabilities) or hinge (SLiC).",
        DPO_LOSSES,
        group="Objective",
    )
    label_smoothing: float = opt(
        0.0,
        "DPO sigmoid loss: the assumed probability that a pair's preference is flipped (conservative DPO), in [0, "
        "0.5).",
        group="Objective",
    )
    orpo_lambda: float = opt(
        0.1, "ORPO's lambda: the weight of the odds-ratio term next to the chosen answer's NLL.", group="Objective"
    )

    # GRPO (--train-mode grpo): rollouts, rewards and the clipped loss, as TRL's GRPOTrainer defines them
    num_generations: int = opt(
        4,
        "Completions sampled per prompt (a group; its rewards' mean is the baseline), at least 2. --batch-size counts "
        "prompts.",
        group="GRPO",
    )
    reward: str = opt(
        "exact",
        "Comma-separated rewards, summed: a scorer (exact, number, gsm8k, boxed, reasoning_gym[:TASK]; "
        "exact/number/gsm8k/boxed need the row's answer), format (ends on a \\boxed{} or #### answer), or a "
        "module:function(prompt, completion, row) -> float.",
        group="GRPO",
    )
    reward_weights: Optional[str] = opt(
        None, "One weight per --reward, comma-separated, e.g. 1,0.5.  [default: 1 each]", group="GRPO"
    )
    scale_rewards: str = opt(
        "group",
        "Divide each group's centred rewards by the group's reward std (group, GRPO), the batch's (batch) or nothing "
        "(none, Dr. GRPO).",
        REWARD_SCALINGS,
        group="GRPO",
    )
    loss_type: str = opt(
        "dapo",
        "How per-token losses are averaged: dapo / bnpo (over all completion tokens of the step), grpo (per "
        "completion, then over completions) or dr_grpo (sum / (completions x --max-completion-length)).",
        GRPO_LOSS_TYPES,
        group="GRPO",
    )
    epsilon: float = opt(0.2, "Clip the probability ratio to new/old policy from below at 1 - epsilon.", group="GRPO")
    epsilon_high: Optional[float] = opt(
        None,
        "Clip it from above at 1 + epsilon_high (DAPO's clip-higher: e.g. 0.28).  [default: --epsilon]",
        group="GRPO",
    )
    num_iterations: int = opt(
        1, "Optimizer steps on each batch of rollouts (more than 1: the ratio and the clip act).", group="GRPO"
    )
    temperature: float = opt(
        1.0, "Sampling temperature of the rollouts (> 0); validation decodes greedily.", group="GRPO"
    )
    top_p: float = opt(1.0, "Nucleus sampling of the rollouts, in (0, 1] (1: off).", group="GRPO")
    max_completion_length: int = opt(
        64, "Most tokens sampled per completion (and generated per validation answer).", group="GRPO"
    )
    mask_truncated_completions: bool = opt(
        False,
        "Leave completions cut at --max-completion-length out of the loss (DAPO's overlong filtering; they still "
        "count in their group's mean).",
        group="GRPO",
    )

    # Optimisation
    optimizer: str = opt("adamw", "Base optimizer that the mask wraps.", OPTIMIZERS)
    learning_rate: float = opt(1e-5, "Peak learning rate.", common=True)
    weight_decay: float = opt(0.0, "Decoupled weight decay (adamw, sgd, muon).")
    momentum: Optional[float] = opt(
        None, "Momentum of sgd and muon; ignored by adam/adamw/adafactor.  [default: 0 for sgd, 0.95 for muon]"
    )
    lr_schedule: str = opt("cosine", "Decay after warmup.", LR_SCHEDULES)
    warmup_steps: int = opt(0, "Linear warmup steps.")
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of the peak.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value (0: off).")
    batch_size: int = opt(4, "Examples per micro-batch.", common=True)
    grad_accumulation_steps: int = opt(1, "Micro-batches per optimizer step (the GMT mask is built once per step).")
    iters: int = opt(100, "Optimizer steps (ignored when --epochs is set).", common=True)
    epochs: Optional[float] = opt(
        None, "Train for this many passes over the training split instead of --iters.", common=True
    )
    seed: int = opt(0, "Seed for initialisation, data order and masks.", common=True)

    # Reporting and saving
    steps_per_report: int = opt(10, "Optimizer steps between metrics lines.", group="Reporting")
    steps_per_eval: int = opt(
        50, "Optimizer steps between validation passes (0: only at the end).", group="Reporting", common=True
    )
    val_batches: int = opt(25, "Validation batches per evaluation (-1: the whole split).", group="Reporting")
    samples: int = opt(
        2,
        "Test prompts answered greedily before and after training, saved in samples.json (0: none).",
        group="Reporting",
    )
    dtype: str = opt("float32", "dtype of the saved model.", DTYPE_NAMES, group="Reporting")
    train_dtype: str = opt(
        "float32",
        "dtype the weights are stored and trained in (float32 recommended on CPU, where bfloat16 matmuls are slow).",
        DTYPE_NAMES,
        group="Memory",
    )
    weight_rounding: str = opt(
        "stochastic",
        "How an update is rounded into bfloat16 weights: stochastic (unbiased: small updates are kept on average) or "
        "nearest (small updates are lost, as in plain bfloat16 training).",
        WEIGHT_ROUNDINGS,
        group="Memory",
    )
    moments: str = opt(
        "auto",
        "Storage of adam/adamw's moments: auto (the weights' dtype), float32, bfloat16 (stochastically rounded), 8bit "
        "(block-wise m and sqrt(v)), 4bit (the same in 4 bits) or 8bit-factored (8-bit m, v factored into row and "
        "column averages).",
        MOMENTS,
        group="Memory",
    )
    update_per_layer: bool = opt(
        False,
        "Run the backward pass one transformer block at a time, each block updated (and its gradient freed) before "
        "the next block's gradient exists: the whole gradient is never held, for one more forward pass per step (and "
        "a backward pass with --grad-clip). Not with --mask-scope global.",
        group="Memory",
    )
    low_memory: bool = opt(
        False,
        "Every saving that kept float32's quality on the main job: bfloat16 weights (stochastic rounding), 4-bit "
        "moments, update per layer, saved in bfloat16 (your options win).",
        group="Memory",
        common=True,
    )
    report_to: str = opt(
        "",
        "Comma-separated trackers that also get metrics.jsonl's records and the config: tensorboard "
        "(RUN_DIR/tensorboard/, pip install 'gmt-mlx[tensorboard]'), wandb (pip install 'gmt-mlx[wandb]').",
        group="Reporting",
    )

    # Checkpoints, resume and guards
    steps_per_save: int = opt(
        100,
        "Optimizer steps between checkpoints of the full training state (0: only on Ctrl-C).",
        group="Checkpoints and safety",
    )
    save_best: bool = opt(
        True,
        "Save the full training state whenever validation loss reaches a new best (export --checkpoint best); off "
        "saves those writes.",
        group="Checkpoints and safety",
    )
    keep_checkpoints: int = opt(
        2,
        "Keep the newest N step checkpoints (the best-validation one is always kept).",
        group="Checkpoints and safety",
    )
    max_bad_steps: int = opt(
        3,
        "Stop after this many consecutive steps with a non-finite loss or gradient (their updates are skipped).",
        group="Checkpoints and safety",
    )
    grad_checkpoint: bool = opt(
        False,
        "Recompute block activations in the backward pass: less memory, ~30% more compute.",
        group="Checkpoints and safety",
    )
    distributed_backend: str = opt(
        "any",
        "Backend of mlx.launch runs (any: whatever the launcher set up).",
        DISTRIBUTED_BACKENDS,
        group="Checkpoints and safety",
    )
    memory_check: bool = opt(
        True,
        "Refuse to start when the estimated peak memory exceeds the memory available.",
        group="Checkpoints and safety",
    )

    # Hub (the token comes from HF_TOKEN or `hf auth login`, never from the config)
    push_to_hub: Optional[str] = opt(
        None,
        "Upload RUN_DIR/model (with its model card) to this Hub repo, user/name, at the end of the run.",
        group="Hub",
    )
    hub_datasets: Optional[str] = opt(
        None, "Comma-separated Hub dataset ids the training data came from (the model card's `datasets`).", group="Hub"
    )

    def __post_init__(self) -> None:
        self.method = METHOD_ALIASES.get(self.method, self.method)
        if self.beta is None:  # per mode: GRPO's default is no KL term (no reference held), DPO's 0.1
            self.beta = GRPO_BETA if self.train_mode == "grpo" else PREFERENCE_BETA

    @property
    def masked(self) -> bool:
        """Whether the optimizer step drops gradient entries (a masking method with mask_ratio > 0)."""
        return self.mask.masked

    # The option groups (see `options_group`): what the functions that need a few options take.
    @property
    def mask(self) -> "MaskOptions":
        """Which gradient entries each step keeps: `MaskOptions`."""
        return MaskOptions.of(self)

    @property
    def optim(self) -> "OptimizerOptions":
        """The optimizer, its schedule and the step: `OptimizerOptions`."""
        return OptimizerOptions.of(self)

    @property
    def precision(self) -> "PrecisionOptions":
        """The dtype the weights train in, their rounding and the moments' storage: `PrecisionOptions`."""
        return PrecisionOptions.of(self)

    @property
    def memory(self) -> "MemoryOptions":
        """The memory savers and the start-up check: `MemoryOptions`."""
        return MemoryOptions.of(self)

    @property
    def lora(self) -> "LoraOptions":
        """The adapters of lora / dora: `LoraOptions`."""
        return LoraOptions.of(self)

    @property
    def objective(self) -> "ObjectiveOptions":
        """DPO's and ORPO's hyper-parameters: `ObjectiveOptions`."""
        return ObjectiveOptions.of(self)

    @property
    def grpo(self) -> "GrpoOptions":
        """GRPO's rollouts, rewards and clipped loss: `GrpoOptions`."""
        return GrpoOptions.of(self)

    def validate(self) -> "Config":
        """Check ranges and choices; raise UserError with a one-line message."""
        check_finite(self)
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise UserError(f"--{flag(f.name)} must be one of {', '.join(choices)}, got {value!r}")
        try:
            check_mask_ratio(self.mask_ratio)
        except ValueError:
            raise UserError(f"--mask-ratio must be in [0, 1) (the fraction dropped), got {self.mask_ratio}") from None
        if self.train_mode == "grpo":
            self._validate_grpo()
        elif self.beta <= 0:
            raise UserError(f"--beta must be positive, got {self.beta}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise UserError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.dpo_loss != "sigmoid":
            raise UserError(f"--label-smoothing applies to --dpo-loss sigmoid only, not {self.dpo_loss}")
        if self.orpo_lambda < 0:
            raise UserError(f"--orpo-lambda must be 0 or more, got {self.orpo_lambda}")
        if self.assistant_turns == "all" and not self.mask_prompt:
            raise UserError("--assistant-turns all needs --mask-prompt (without it the loss covers every token)")
        if self.momentum is not None and not 0.0 <= self.momentum < 1.0:
            raise UserError(f"--momentum must be in [0, 1), got {self.momentum}")
        positive = [
            "batch_size",
            "grad_accumulation_steps",
            "max_seq_length",
            "mask_sample_size",
            "steps_per_report",
            "keep_checkpoints",
        ]
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.iters < 1 and self.epochs is None:
            raise UserError(f"--iters must be at least 1, got {self.iters}")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        for name in ("steps_per_save", "steps_per_eval", "max_bad_steps", "samples", "grad_clip", "warmup_steps"):
            if getattr(self, name) < 0:
                raise UserError(f"--{flag(name)} must be 0 or more, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.num_layers == 0 or self.num_layers < -1:
            raise UserError(f"--num-layers must be -1 (all) or positive, got {self.num_layers}")
        if self.lora_rank < 1:
            raise UserError(f"--lora-rank must be at least 1, got {self.lora_rank}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UserError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if self.lora_scale <= 0:
            raise UserError(f"--lora-scale must be positive, got {self.lora_scale}")
        if self.update_per_layer:
            # Each needs every gradient of the step before the first update (layerwise).
            if self.mask_scope == "global" and self.method in MASKED_METHODS:
                raise UserError(
                    "--update-per-layer cannot build a --mask-scope global mask (one threshold over the "
                    "whole gradient); use tensor or layer"
                )
            if self.lora_dropout > 0 and self.method in ADAPTER_METHODS:
                raise UserError(
                    "--update-per-layer needs --lora-dropout 0 (a block's forward runs again in its "
                    "backward and would draw another dropout mask)"
                )
        if any(not key.strip() for key in self.lora_keys.split(",")) and self.lora_keys.strip():
            raise UserError(f"--lora-keys must be comma-separated module names, got {self.lora_keys!r}")
        return self

    def _validate_grpo(self) -> None:
        if self.beta < 0:
            raise UserError(f"--beta must be 0 (no KL term) or more for --train-mode grpo, got {self.beta}")
        if self.num_generations < 2:
            raise UserError(
                f"--num-generations must be at least 2 (a group's rewards are compared with each "
                f"other), got {self.num_generations}"
            )
        for name in ("num_iterations", "max_completion_length"):
            if getattr(self, name) < 1:
                raise UserError(f"--{flag(name)} must be at least 1, got {getattr(self, name)}")
        if not self.temperature > 0:
            raise UserError(f"--temperature must be positive (rollouts are sampled), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"--top-p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.epsilon < 1 or (self.epsilon_high is not None and self.epsilon_high < 0):
            raise UserError(
                f"--epsilon must be in [0, 1) and --epsilon-high 0 or more, got {self.epsilon} and {self.epsilon_high}"
            )

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # Keys that do not change what is trained (used to compare runs).
    COSMETIC = (
        "out",
        "mask_overlap",
        "steps_per_report",
        "samples",
        "steps_per_save",
        "save_best",
        "keep_checkpoints",
        "max_bad_steps",
        "memory_check",
        "distributed_backend",
        "push_to_hub",
        "hub_datasets",
        "report_to",
    )


def flag(name: str) -> str:
    return name.replace("_", "-")


def field_types() -> Dict[str, type]:
    """Python type of each config field (Optional[X] -> X)."""
    hints = {"str": str, "int": int, "float": float, "bool": bool}
    out = {}
    for f in fields(Config):
        t = str(f.type).replace("Optional[", "").rstrip("]")
        out[f.name] = hints[t]
    return out


def _coerce(name: str, value: Any, where: str) -> Any:
    kind = field_types()[name]
    if value is None:
        return None
    if kind is bool and isinstance(value, bool):
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if kind is float and isinstance(value, str):
        # PyYAML (YAML 1.1) reads 5e-5 (no dot) as a string.
        try:
            return float(value)
        except ValueError:
            pass
    if kind is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{where}: {name} must be {kind.__name__}, got {value!r}")


def did_you_mean(name: str, known) -> str:
    """ " (did you mean mask_ratio?)" for the closest known name, or "" when none is close."""
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def load_yaml(path: str | Path) -> Dict[str, Any]:
    """Read a YAML config; unknown keys and wrong types are user errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UserError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', err)})") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of option: value")
    known = {f.name for f in fields(Config)}
    out = {}
    for key, value in raw.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UserError(f"{path}: unknown option {key!r}{did_you_mean(name, known)}")
        out[name] = _coerce(name, value, str(path))
    return out


def resolve(
    yaml_path: Optional[str | Path] = None,
    overrides: Optional[Dict[str, Any]] = None,
    base: Optional[Dict[str, Any]] = None,
) -> Config:
    """Defaults < ``base`` (a resumed run's config) < YAML < explicit overrides (None = not given)."""
    values: Dict[str, Any] = dict(base or {})
    from_yaml = load_yaml(yaml_path) if yaml_path else {}
    values.update(from_yaml)
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    if values.get("low_memory"):
        if values.get("mask_scope") == "global" or values.get("lora_dropout", 0.0) > 0:
            # What the user asked for needs the whole gradient at once: the split update, not per layer.
            values.setdefault("update_per_layer", False)
        for key, value in LOW_MEMORY.items():
            values.setdefault(key, value)
    try:
        return Config(**values).validate()
    except UserError as err:  # a value the user never passed as a flag is named where it was written
        raise _named_at_its_source(err, yaml_path, from_yaml, base, overrides) from None


def dump_yaml(config: Config) -> str:
    """The config as YAML text, in field order (what `save_yaml` writes)."""
    return yaml.safe_dump(config.to_dict(), sort_keys=False)


def save_yaml(config: Config, path: str | Path) -> None:
    Path(path).write_text(dump_yaml(config))


def applies(key: str, method: Optional[str]) -> bool:
    """Whether option ``key`` can change what ``method`` trains (mask_* only for masking, lora_* only for adapters)."""
    method = METHOD_ALIASES.get(method, method)
    if key in MASK_KEYS:
        return method in MASKED_METHODS
    if key in LORA_KEYS:
        return method in ADAPTER_METHODS
    return True


def diff(a: Dict[str, Any], b: Dict[str, Any], ignore=Config.COSMETIC) -> Dict[str, tuple]:
    """Keys whose values differ between two config dicts.

    Cosmetic keys are ignored, and so are keys that apply to neither side's
    method: an sft run saved with the default mask_ratio resumes under a YAML
    that sets another one.
    """
    keys = (set(a) | set(b)) - set(ignore)
    methods = (a.get("method"), b.get("method"))
    modes = (a.get("train_mode", "sft"), b.get("train_mode", "sft"))
    return {
        k: (a.get(k), b.get(k))
        for k in sorted(keys)
        if a.get(k) != b.get(k)
        and any(applies(k, m) for m in methods)
        and (k not in TRAIN_MODE_KEYS or set(TRAIN_MODE_KEYS[k]) & set(modes))
    }


# --- Option groups -----------------------------------------------------------
# Config's fields, grouped for the functions that need a few of them: a group is
# a frozen dataclass whose fields ARE Config fields (same name, type, default and
# help, copied from Config by `options_group`), so no option has a second name or
# a second default. `config.mask`, `config.optim`, ... hand them out; code that
# runs without a Config (tests, benchmarks) builds one from plain values, e.g.
# MaskOptions(mask_ratio=0.5), the other fields taking Config's defaults.


def options_group(cls: type) -> type:
    """Make ``cls`` (annotations only) a frozen dataclass of the Config fields it names.

    Each annotated name must be a Config field with the same annotation; its
    default and metadata are Config's. ``cls.of(config)`` picks them out of a
    Config (or any object with those attributes, e.g. another group).
    """
    own = {f.name: f for f in fields(Config)}
    for name, annotation in cls.__annotations__.items():
        if name not in own:
            raise TypeError(f"{cls.__name__}.{name} is not a Config field")
        if str(annotation) != str(own[name].type):
            raise TypeError(f"{cls.__name__}.{name}: {annotation} is not Config's {own[name].type}")
        setattr(cls, name, field(default=own[name].default, metadata=own[name].metadata))
    cls = dataclass(frozen=True)(cls)
    cls.of = classmethod(lambda kind, source: kind(**{f.name: getattr(source, f.name) for f in fields(kind)}))
    return cls


@options_group
class MaskOptions:
    """Which gradient entries an optimizer step keeps (GMT, the random control); only masking methods mask."""

    method: str
    mask_ratio: float
    mask_scope: str
    mask_target: str
    mask_sample_size: int
    mask_overlap: bool

    @property
    def masked(self) -> bool:
        """Whether the step drops gradient entries (a masking method with mask_ratio > 0)."""
        return METHOD_ALIASES.get(self.method, self.method) in MASKED_METHODS and self.mask_ratio > 0


@options_group
class OptimizerOptions:
    """The base optimizer, its learning-rate schedule, clipping and the micro-batches of a step."""

    optimizer: str
    learning_rate: float
    weight_decay: float
    momentum: Optional[float]
    lr_schedule: str
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float
    grad_accumulation_steps: int


@options_group
class PrecisionOptions:
    """How the trained weights and AdamW's moments are stored, and how updates are rounded into them."""

    train_dtype: str
    weight_rounding: str
    moments: str


@options_group
class MemoryOptions:
    """What trades compute for memory, and the start-up check of the estimate."""

    update_per_layer: bool
    grad_checkpoint: bool
    low_memory: bool
    memory_check: bool


@options_group
class LoraOptions:
    """The low-rank adapters of lora / dora."""

    lora_rank: int
    lora_scale: float
    lora_dropout: float
    lora_keys: str


@options_group
class ObjectiveOptions:
    """The preference objectives' hyper-parameters (DPO, ORPO); ``beta`` is GRPO's KL weight too."""

    beta: Optional[float]
    dpo_loss: str
    label_smoothing: float
    orpo_lambda: float


@options_group
class GrpoOptions:
    """GRPO's rollouts, rewards and clipped loss (``beta``: the KL term's weight)."""

    beta: Optional[float]
    num_generations: int
    reward: str
    reward_weights: Optional[str]
    scale_rewards: str
    loss_type: str
    epsilon: float
    epsilon_high: Optional[float]
    num_iterations: int
    temperature: float
    top_p: float
    max_completion_length: int
    mask_truncated_completions: bool


@options_group
class DataOptions:
    """What is trained on and how it is read (``config.data`` is the path; ``DataOptions.of(config)`` the group)."""

    model: str
    data: Optional[str]
    max_seq_length: int
    mask_prompt: bool
    assistant_turns: str
    columns: Optional[str]
    data_config: Optional[str]
    data_splits: Optional[str]


# Every group, by the name Config's help and docs use for it; each Config field is in one at least
# (beta in two: DPO's and GRPO's), the ones no function takes as a group in RUN_FIELDS (the run's).
GROUPS = {
    "mask": MaskOptions,
    "optimizer": OptimizerOptions,
    "precision": PrecisionOptions,
    "memory": MemoryOptions,
    "lora": LoraOptions,
    "objective": ObjectiveOptions,
    "grpo": GrpoOptions,
    "data": DataOptions,
}
RUN_FIELDS = (
    "out",
    "freeze_embeddings",
    "freeze_lm_head",
    "num_layers",
    "train_mode",
    "batch_size",
    "iters",
    "epochs",
    "seed",
    "steps_per_report",
    "steps_per_eval",
    "val_batches",
    "samples",
    "dtype",
    "report_to",
    "steps_per_save",
    "save_best",
    "keep_checkpoints",
    "max_bad_steps",
    "distributed_backend",
    "push_to_hub",
    "hub_datasets",
)


# --- Evaluation options (`gmt-mlx eval`, and compare's evaluation of each run) ---------------
# Written once here: eval's flags (cli/eval.py) come from these fields, evaluation.EvalOptions and
# compare.plan.CompareSpec take their defaults from them. The options eval shares with
# finetune (--columns, --reward ...) are Config's fields themselves, with "the run's own" as default.
# The answers' length differs by command on purpose: eval answers up to 64 tokens, compare (many
# runs, 100 prompts each) up to 32 by default; README.md quotes both, and its numbers depend on them.
EVAL_MAX_TOKENS = 64
COMPARE_MAX_TOKENS = 32


@dataclass(frozen=True)
class EvalFields:
    """The evaluation options of `gmt-mlx eval` (compare's --eval-limit, --eval-batch-size and --max-tokens
    are ``limit``, ``batch_size`` and ``max_tokens`` here)."""

    split: str = opt("test", "Split to evaluate: train, valid or test.", group="Evaluation")
    scorer: Optional[str] = opt(
        None,
        "Comma-separated scorers: exact, number, gsm8k, boxed, reasoning_gym[:TASK] or "
        "module:function.  [default: exact; none with --reward or for a GRPO run]",
        group="Evaluation",
    )
    max_tokens: Optional[int] = opt(
        None,
        "Tokens to generate per answer at most (greedy).  "
        f"[default: a GRPO run's --max-completion-length, else {EVAL_MAX_TOKENS}]",
        group="Evaluation",
    )
    batch_size: int = opt(16, "Prompts generated (and loss examples scored) together.", group="Evaluation")
    limit: Optional[int] = opt(
        None, "Score only the first N prompt/answer pairs (the loss still uses the whole split).", group="Evaluation"
    )
    # Not Config's mask_prompt: an evaluation's default is the run's own setting, else completions only.
    mask_prompt: Optional[bool] = opt(
        None, "Loss on completions only.  [default: a run's own setting, else yes]", group="Evaluation"
    )
    # compare's: the test prompts each run answers (eval's --limit); a comparison needs a bound.
    eval_limit: int = opt(
        100, "Test prompts to generate answers for, per run (the test loss uses the whole split).", group="Evaluation"
    )


def eval_default(name: str) -> Any:
    """The default of evaluation option ``name`` (an `EvalFields` field)."""
    return EvalFields.__dataclass_fields__[name].default


def field_help(name: str, default_note: Optional[str] = None) -> str:
    """Config field ``name``'s help text, with ``default_note`` as its shown default ("[default: ...]")."""
    text = Config.__dataclass_fields__[name].metadata["help"]
    if default_note is not None:
        text = text.split("  [default:")[0] + f"  [default: {default_note}]"
    return text


def check_finite(config: Config) -> None:
    """Refuse a NaN or infinite value in any numeric option, in one line (one check for every field).

    A comparison with NaN is False, so the range checks of ``validate`` let it
    through (``--learning-rate nan`` trained a model of NaNs, rc 0): this runs first.
    """
    kinds = field_types()
    for f in fields(config):
        value = getattr(config, f.name)
        if kinds[f.name] in (int, float) and isinstance(value, (int, float)) and not math.isfinite(value):
            raise UserError(f"--{flag(f.name)} must be a finite number, got {value}")


def _named_at_its_source(
    err: UserError,
    yaml_path,
    from_yaml: Dict[str, Any],
    base: Optional[Dict[str, Any]],
    overrides: Optional[Dict[str, Any]],
) -> UserError:
    """``err`` ("--mask-ratio must be ...") said of the file the value came from when no flag set it:
    ``c.yaml: mask_ratio must be ...``, or the resumed run's config.yaml (``base``, which holds its ``out``)."""
    message = str(err)
    name = message[2:].split(" ", 1)[0].replace("-", "_") if message.startswith("--") else None
    if name is None or (overrides or {}).get(name) is not None:
        return err
    if name in from_yaml:
        where = str(yaml_path)
    elif name in (base or {}) and base.get("out"):
        where = str(Path(base["out"]) / "config.yaml")
    else:
        return err
    return UserError(f"{where}: {name}{message[2 + len(name) :]}")
