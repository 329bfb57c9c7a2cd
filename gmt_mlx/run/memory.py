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

from gmt_mlx.config import ADAPTER_METHODS

F32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Optimizer state in float32 words per trainable entry, for mlx's optimizers.
_OPTIMIZER_WORDS = {"adamw": 2, "adam": 2, "sgd": 1, "muon": 1, "adafactor": 0.1}
# Bytes per trainable entry of Adam's two moments, by storage (compact.CompactAdamW):
# 8-bit forms carry a float32 scale per block of 128 entries.
_MOMENT_BYTES = {"float32": 8, "bfloat16": 4, "8bit": 2 + 2 * 4 / 128, "4bit": 1 + 2 * 4 / 128, "8bit-factored": 1 + 4 / 128}
# Of the tensors being updated at one moment in the fused step: ~8 float32
# copies of the largest (its gradient, old and new weights and moments,
# temporaries). Measured: 1.05 GB over weights + state on a 309M llama whose
# largest tensor has 32.8M entries.
_IN_FLIGHT_COPIES = 8
# The compact moments' update is a chain of kernels (block scales, row and
# column means, rounding) whose float32 temporaries MLX's scheduler keeps
# alive for many tensors at once: ~3.3 bytes per trainable entry, fitted to
# the 1.39B benchmark shape (full --low-memory: MLX peak 11.44 GB) and within
# 16% on a 309M llama (benchmarks/RESULTS.md). GMT's masks add ~1 byte there.
_COMPACT_IN_FLIGHT = 3.3
# Updated per layer (layerwise), one tensor at a time, in bytes per entry of
# the largest tensor (benchmarks/bench_update_memory.py, a 13.8M-entry
# matrix): 12-13 with mlx's AdamW on float32 weights (one compiled update:
# its temporaries and the new weights and state beside the old). With
# CompactAdamW's 8-bit moments the update is staged in slices of rows: ~22
# bytes per entry of one slice (``chunk`` entries) in flight, plus ~7 per
# entry of the whole tensor (its masked gradient in float32, the mask, the
# new slices until joined): 13.6 measured on that matrix, 13.7 from this rule.
_PER_TENSOR_UPDATE = 13
_SLICE_UPDATE, _STAGED_UPDATE = 22, 7


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


def moment_storage(moments: str, train_dtype: str) -> str:
    """The storage "auto" resolves to (optim.build_optimizer's rule)."""
    if moments != "auto":
        return moments
    return train_dtype if train_dtype in _MOMENT_BYTES else "float32"


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
    train_dtype: str = "float32",
    moments: str = "auto",
    grad_clip: float = 0.0,
    mask_overlap: bool = False,
    largest: int = 0,
    update_per_layer: bool = False,
    block: int = 0,
    outer: int = 0,
    chunk: int = 1 << 22,
) -> MemoryEstimate:
    """Estimate the peak bytes of one training step (trainer.make_fused_step).

    ``largest``: entries of the largest trainable tensor (0: guessed from the
    vocabulary and hidden size). ``masked``: Config.masked.

    The fused step frees each gradient as soon as its update ran, so a whole
    gradient (in the weights' dtype) is only counted when something needs it
    all before the first update: global clipping (``grad_clip`` > 0) or the
    accumulation buffer (``grad_accumulation_steps`` > 1: both).

    ``update_per_layer`` (layerwise): ``block`` is the largest block's
    trainable entries and ``outer`` those outside the blocks (embeddings,
    head), whose gradient waits for the end of the backward pass; one block
    is recomputed at a time, with every block's input kept. ``chunk``: the
    slice of a large tensor one staged 8-bit update works on (compact.CHUNK_ENTRIES).
    """
    hidden = int(hf_config.get("hidden_size", 0))
    width = DTYPE_BYTES.get(train_dtype, F32)
    largest = largest or min(trainable, int(hf_config.get("vocab_size", 0)) * hidden)
    storage = moment_storage(moments, train_dtype)
    compact = optimizer in ("adam", "adamw") and not (storage == "float32" and train_dtype == "float32")
    if update_per_layer:
        in_flight = (largest * _STAGED_UPDATE + min(largest, chunk) * _SLICE_UPDATE if compact
                     else largest * _PER_TENSOR_UPDATE)
        gradients = trainable * width * (grad_accumulation_steps > 1) + (outer + block) * width + in_flight
    else:
        gradients = _fused_gradient_bytes(trainable, width, largest, grad_clip, grad_accumulation_steps, compact)
    # With mlx's AdamW the masks are built and consumed tensor by tensor (in the
    # in-flight term); --mask-overlap's sample, and the compact moments' slower
    # update, keep them (a byte per entry) until the step ends.
    masking = trainable if masked and (mask_overlap or compact) and not update_per_layer else 0
    activations = _activation_bytes(hf_config, batch_size, seq_len, width, grad_checkpoint or update_per_layer)
    return MemoryEstimate(weight_bytes, int(gradients), _optimizer_bytes(optimizer, storage, trainable, width),
                          masking, activations)


def _fused_gradient_bytes(trainable: int, width: int, largest: int, grad_clip: float, grad_accumulation_steps: int,
                          compact: bool) -> int:
    """Gradients and update temporaries of the fused step (see estimate)."""
    whole = (grad_clip > 0) + (grad_accumulation_steps > 1) * 2
    gradients = trainable * width * min(whole, 2) + largest * F32 * _IN_FLIGHT_COPIES
    if compact:
        gradients += int(trainable * _COMPACT_IN_FLIGHT)
    return gradients


def _optimizer_bytes(optimizer: str, storage: str, trainable: int, width: int) -> int:
    """The optimizer's state: Adam's moments as ``storage`` stores them, else mlx's optimizer in the weights' dtype."""
    if optimizer in ("adam", "adamw"):
        return int(trainable * _MOMENT_BYTES.get(storage, 8))
    return int(trainable * width * _OPTIMIZER_WORDS.get(optimizer, 1))


def _activation_bytes(hf_config: Dict, batch_size: int, seq_len: int, width: int, recompute: bool) -> int:
    """Activations of one micro-batch; with ``recompute`` (gradient checkpointing, or the per-layer
    update) only one block's are kept, beside every block's input."""
    hidden = int(hf_config.get("hidden_size", 0))
    inter = int(hf_config.get("intermediate_size", 4 * hidden))
    layers = int(hf_config.get("num_hidden_layers", 0))
    heads = int(hf_config.get("num_attention_heads", 1))
    vocab = int(hf_config.get("vocab_size", 0))
    tokens = batch_size * seq_len
    # Saved for the backward pass per layer and token: ~12 hidden-sized and
    # ~4 intermediate-sized vectors, plus attention scores and probabilities.
    per_layer = tokens * (12 * hidden + 4 * inter) * width + batch_size * heads * seq_len * seq_len * 2 * width
    kept_layers = 1 if recompute else layers
    checkpoint_inputs = tokens * hidden * width * layers if recompute else 0
    logits = tokens * vocab * F32 * 3  # logits, log-softmax, and their gradient
    return per_layer * kept_layers + checkpoint_inputs + logits


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


def advice(method: str, low_memory_total: Optional[int] = None) -> str:
    """What to try when the estimate does not fit (``low_memory_total``: the estimate with --low-memory)."""
    tips = []
    if low_memory_total is not None:
        tips.append(f"--low-memory (estimated ~{low_memory_total / 1e9:.1f} GB)")
    tips += ["a smaller --batch-size (with --grad-accumulation-steps to keep the batch)",
             "a shorter --max-seq-length", "--grad-checkpoint"]
    if method not in ADAPTER_METHODS:
        tips.append("--method lora, or --num-layers N to train fewer blocks")
    return "try " + ", ".join(tips)
