"""The one typed configuration of a fine-tuning run.

Every option's default, type, choices and help text live here and nowhere
else: the CLI builds its flags from these fields, YAML files are checked
against them, and the run directory stores the resolved config. Precedence:
command-line flags > YAML (`-c config.yaml`) > these defaults.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Dict, Optional

import yaml

from .errors import UserError

METHODS = ("gmt", "sft", "random")


def opt(default, help: str, choices: tuple = (), group: str = "Training", cli: bool = True):
    """A config field with its help text (and allowed values) attached."""
    return field(default=default, metadata={"help": help, "choices": choices, "group": group, "cli": cli})


@dataclass
class Config:
    # What to train on
    model: str = opt("smollm2-135m", "Local HF folder, GGUF file, Hub id, or 'smollm2-135m' (the embedded default).", group="Model and data")
    data: Optional[str] = opt(None, "Folder with train.jsonl (+ valid.jsonl, test.jsonl) or a single .jsonl file.", group="Model and data")
    out: str = opt("runs/latest", "Run directory: config, metrics, checkpoints and the fine-tuned model.", group="Model and data")
    max_seq_length: int = opt(2048, "Truncate examples to this many tokens (a warning says how many were cut).", group="Model and data")
    mask_prompt: bool = opt(False, "Train only on completions / the final assistant turn (loss masked on prompts).", group="Model and data")

    # Method
    method: str = opt("gmt", "gmt (gradient-mask tuning), sft (plain full fine-tuning), random (random mask control).", METHODS, group="Method")
    mask_ratio: float = opt(0.2, "Fraction of gradient entries DROPPED each optimizer step, in [0, 1).", group="Method")
    mask_scope: str = opt("tensor", "Unit sharing one threshold: tensor, layer (transformer block) or global.", ("tensor", "layer", "global"), group="Method")
    mask_target: str = opt("grad", "grad: the optimizer sees the masked gradient; update: only kept entries move.", ("grad", "update"), group="Method")
    mask_sample_size: int = opt(65536, "Units larger than this estimate the threshold from a sample of this many entries.", group="Method")
    freeze_embeddings: bool = opt(False, "Do not train the input embeddings.", group="Method")
    freeze_lm_head: bool = opt(False, "Do not train the output head (lm_head).", group="Method")
    num_layers: int = opt(-1, "Train only the last N transformer blocks (-1: all).", group="Method")

    # Optimisation
    optimizer: str = opt("adamw", "Base optimizer that the mask wraps.", ("adamw", "adam", "sgd", "adafactor", "muon"))
    learning_rate: float = opt(1e-5, "Peak learning rate.")
    weight_decay: float = opt(0.0, "Decoupled weight decay (adamw, sgd, muon).")
    lr_schedule: str = opt("cosine", "Decay after warmup.", ("cosine", "linear", "constant"))
    warmup_steps: int = opt(0, "Linear warmup steps.")
    min_lr_ratio: float = opt(0.1, "Final learning rate as a fraction of the peak.")
    grad_clip: float = opt(1.0, "Clip the global gradient norm to this value (0: off).")
    batch_size: int = opt(4, "Examples per micro-batch.")
    grad_accumulation_steps: int = opt(1, "Micro-batches per optimizer step (the GMT mask is built once per step).")
    iters: int = opt(100, "Optimizer steps (ignored when --epochs is set).")
    epochs: Optional[float] = opt(None, "Train for this many passes over the training split instead of --iters.")
    seed: int = opt(0, "Seed for initialisation, data order and masks.")

    # Reporting and saving
    steps_per_report: int = opt(10, "Optimizer steps between metrics lines.", group="Reporting")
    steps_per_eval: int = opt(50, "Optimizer steps between validation passes (0: only at the end).", group="Reporting")
    val_batches: int = opt(25, "Validation batches per evaluation (-1: the whole split).", group="Reporting")
    dtype: str = opt("float32", "dtype of the saved model.", ("float32", "bfloat16", "float16"), group="Reporting")
    train_dtype: str = opt("float32", "dtype the weights are trained in (float32 recommended on CPU).", ("float32", "bfloat16", "float16"), group="Reporting")

    def validate(self) -> "Config":
        """Check ranges and choices; raise UserError with a one-line message."""
        for f in fields(self):
            choices = f.metadata.get("choices")
            value = getattr(self, f.name)
            if choices and value not in choices:
                raise UserError(f"--{flag(f.name)} must be one of {', '.join(choices)}, got {value!r}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise UserError(f"--mask-ratio must be in [0, 1) (the fraction dropped), got {self.mask_ratio}")
        positive = ["batch_size", "grad_accumulation_steps", "max_seq_length", "mask_sample_size", "steps_per_report"]
        for name in positive:
            if getattr(self, name) < 1:
                raise UserError(f"--{flag(name)} must be at least 1, got {getattr(self, name)}")
        if self.iters < 1 and self.epochs is None:
            raise UserError(f"--iters must be at least 1, got {self.iters}")
        if self.epochs is not None and self.epochs <= 0:
            raise UserError(f"--epochs must be positive, got {self.epochs}")
        if self.learning_rate <= 0:
            raise UserError(f"--learning-rate must be positive, got {self.learning_rate}")
        if self.num_layers == 0 or self.num_layers < -1:
            raise UserError(f"--num-layers must be -1 (all) or positive, got {self.num_layers}")
        return self

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    # Keys that do not change what is trained (used to compare runs).
    COSMETIC = ("out", "steps_per_report")


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
            raise UserError(f"{path}: unknown option {key!r}")
        out[name] = _coerce(name, value, str(path))
    return out


def resolve(yaml_path: Optional[str | Path] = None, overrides: Optional[Dict[str, Any]] = None) -> Config:
    """Defaults, overlaid by YAML, overlaid by explicit overrides (None = not given)."""
    values: Dict[str, Any] = {}
    if yaml_path:
        values.update(load_yaml(yaml_path))
    for key, value in (overrides or {}).items():
        if value is not None:
            values[key] = value
    return Config(**values).validate()


def save_yaml(config: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))


def diff(a: Dict[str, Any], b: Dict[str, Any], ignore=Config.COSMETIC) -> Dict[str, tuple]:
    """Keys whose values differ between two config dicts (cosmetic keys ignored)."""
    keys = (set(a) | set(b)) - set(ignore)
    return {k: (a.get(k), b.get(k)) for k in sorted(keys) if a.get(k) != b.get(k)}
