"""Peak-memory estimate for a training run, and the memory this machine offers.

The estimate is deliberately simple arithmetic so a user can follow it:
weights + gradients (+ an accumulation buffer) + optimizer state + the
masking temporaries + activations of one micro-batch. `finetune` prints it,
refuses to start when it exceeds the available memory (``--no-memory-check``
overrides), and writes it next to the measured peak in metrics.jsonl so its
accuracy stays visible.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Dict, Optional

from .config import ADAPTER_METHODS

F32 = 4

# Optimizer state in float32 words per trainable entry.
_OPTIMIZER_WORDS = {"adamw": 2, "adam": 2, "sgd": 1, "muon": 1, "adafactor": 0.1}


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    masking: int
    activations: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.masking + self.activations

    def describe(self) -> str:
        gb = lambda x: f"{x / 1e9:.2f}"  # noqa: E731
        return (f"~{gb(self.total)} GB (weights {gb(self.weights)}, gradients {gb(self.gradients)}, "
                f"optimizer {gb(self.optimizer)}, masking {gb(self.masking)}, activations {gb(self.activations)})")


def estimate(
    hf_config: Dict,
    *,
    weight_bytes: int,
    trainable: int,
    batch_size: int,
    seq_len: int,
    optimizer: str = "adamw",
    masked: bool = True,
    grad_accumulation_steps: int = 1,
    grad_checkpoint: bool = False,
) -> MemoryEstimate:
    """Estimate the peak bytes of one training step (float32 training); ``masked``: Config.masked."""
    hidden = int(hf_config.get("hidden_size", 0))
    inter = int(hf_config.get("intermediate_size", 4 * hidden))
    layers = int(hf_config.get("num_hidden_layers", 0))
    heads = int(hf_config.get("num_attention_heads", 1))
    vocab = int(hf_config.get("vocab_size", 0))
    tokens = batch_size * seq_len
    gradients = trainable * F32 * (2 if grad_accumulation_steps > 1 else 1)
    opt_words = _OPTIMIZER_WORDS.get(optimizer, 2)
    optimizer_bytes = int(trainable * F32 * opt_words)
    # A masked step holds a bool mask plus one masked copy of the gradient (or of the update).
    masking = trainable * (1 + F32) if masked else 0
    # Saved for the backward pass per layer and token: ~12 hidden-sized and
    # ~4 intermediate-sized vectors, plus attention scores and probabilities.
    per_layer = tokens * (12 * hidden + 4 * inter) * F32 + batch_size * heads * seq_len * seq_len * 2 * F32
    kept_layers = 1 if grad_checkpoint else layers
    checkpoint_inputs = tokens * hidden * F32 * layers if grad_checkpoint else 0
    logits = tokens * vocab * F32 * 3  # logits, log-softmax, and their gradient
    activations = per_layer * kept_layers + checkpoint_inputs + logits
    return MemoryEstimate(weight_bytes, gradients, optimizer_bytes, masking, activations)


def available_bytes() -> Optional[int]:
    """Memory this process can use: GPU working set on Apple silicon, else free RAM."""
    try:
        import mlx.core as mx

        info = mx.device_info()
        for key in ("max_recommended_working_set_size", "memory_size"):
            if info.get(key):
                return int(info[key])
    except Exception:
        pass
    if sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as fh:
                for line in fh:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def advice(method: str) -> str:
    tips = ["a smaller --batch-size (with --grad-accumulation-steps to keep the batch)",
            "a shorter --max-seq-length", "--grad-checkpoint"]
    if method not in ADAPTER_METHODS:
        tips.append("--method lora, or --num-layers N to train fewer blocks")
    return "try " + ", ".join(tips)
