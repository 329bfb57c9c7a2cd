"""Peak-memory estimate for a training run, and the memory this machine offers.

The estimate is deliberately simple arithmetic so a user can follow it:
weights + optimizer state + GMT's masking + the gradients (with an
accumulation buffer and the update's temporaries) and the activations of one
micro-batch; in the one compiled step only the larger of those two counts
(see _PLAIN_IN_FLIGHT). GRPO adds its rollouts' KV cache and, with --beta > 0,
the step-0 copy of the trainable weights (`rollout_kv_bytes`). It predicts MLX's own peak (mx.get_peak_memory);
`finetune` prints it, refuses to start when it plus PROCESS_BYTES exceeds
the available memory (``--no-memory-check`` overrides), and writes it next
to the measured peak in metrics.jsonl so its accuracy stays visible.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Dict, Optional

from gmt_mlx.config import ADAPTER_METHODS, MaskOptions, MemoryOptions, OptimizerOptions, PrecisionOptions

F32 = 4
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}

# Optimizer state in float32 words per trainable entry, for mlx's optimizers.
_OPTIMIZER_WORDS = {"adamw": 2, "adam": 2, "sgd": 1, "muon": 1, "adafactor": 0.1}
# Bytes per trainable entry of Adam's two moments, by storage (compact.CompactAdamW):
# 8-bit forms carry a float32 scale per block of 128 entries.
_MOMENT_BYTES = {
    "float32": 8,
    "bfloat16": 4,
    "8bit": 2 + 2 * 4 / 128,
    "4bit": 1 + 2 * 4 / 128,
    "8bit-factored": 1 + 4 / 128,
}

# Where each constant below was measured: benchmarks/RESULTS.md, "Issue 22:
# the estimate against the measured peak" (SmolLM2-135M and the 1.39B shape,
# one step of batch 1 x 49 tokens; `python benchmarks/estimate_check.py`
# recomputes every row there with this code).
#
# The one compiled step (trainer.make_fused_step): MLX's scheduler runs the
# whole backward pass before the first update, so the whole gradient (in the
# weights' dtype) is held with or without --grad-clip (135M float32 adamw:
# 2.28 / 2.18 GB for gmt / full both ways), and the activations are freed
# by then: the step holds the larger of the two (135M: the same peak at
# batch 1 and 4). Beyond the whole gradient, in flight during the update:
# with mlx's own optimizers, bytes per entry of the largest tensor (adamw
# ~1, adafactor's squared-gradient temporaries ~6) ...
_PLAIN_IN_FLIGHT = {"adafactor": 6}
# On bfloat16 weights mlx's own optimizers work on float32 copies of them
# (optim.MaskedOptimizer), about 2.4 bytes per trainable entry alive at once
# (135M, adafactor: 1.18 GB in bfloat16 against 1.50 in float32).
_PLAIN_WORK_COPY = 2.4
# ... and with CompactAdamW (moments stored in less than float32), a chain of
# kernels (block scales, rounding) whose float32 temporaries MLX keeps alive
# for many tensors at once: (bytes per trainable entry, bytes per entry of
# the largest tensor). 8-bit: 0.64 GB at 135M and ~4.4 GB at 1.39B over the
# whole gradient; 4-bit 0.86 GB and bfloat16 moments 0.85 GB at 135M; a
# factored v ~3 bytes per entry (135M 1.90 GB, 1.39B 11.44 GB).
_COMPACT_IN_FLIGHT = {"4bit": (2.7, 17.8), "bfloat16": (2.7, 17.2), "8bit-factored": (3.0, 0)}
_COMPACT_DEFAULT = (2.7, 9.6)
# GMT's masks in that step: a byte per entry of the largest tensor's twice with
# mlx's optimizers; with CompactAdamW's slower update they pile up: (bytes per
# trainable entry, per entry of the largest) (135M: gmt - full 0.30 GB with
# 8-bit moments, 1.39B: 1.4 GB).
_PLAIN_MASKS = 2
_COMPACT_MASKS = (0.5, 6)
# GMT's cached tie ranks: a uint16 per entry of each distinct trainable shape
# (masking.position_rank), for the whole run (1.39B: 0.21 GB).
_TIE_RANK_BYTES = 2
# Updated per layer (layerwise), one tensor at a time, in bytes per entry of
# the largest tensor (benchmarks/bench_update_memory.py, a 13.8M-entry
# matrix): 12-13 with mlx's AdamW on float32 weights (one compiled update:
# its temporaries and the new weights and state beside the old). With
# CompactAdamW's 8-bit moments the update is staged in slices of rows: ~22
# bytes per entry of one slice (``chunk`` entries) in flight, plus ~7 per
# entry of the whole tensor (its masked gradient in float32, the mask, the
# new slices until joined): 13.6 measured on that matrix, 13.7 from this rule.
# 4-bit codes take one less (1.39B: 5.37 GB for gmt against 6.83 with 8-bit,
# 2.86 - 1.47 GB of it the state); a factored v three more (the squared
# gradient of the whole tensor for its row and column means: 5.63 GB). A
# tensor whose rows are not whole blocks is one slice (135M's embedding,
# 576 columns: 1.27 GB for gmt with 4-bit moments, 22 bytes per entry of it).
_PER_TENSOR_UPDATE = 13
_SLICE_UPDATE = 22
_STAGED_UPDATE = {"8bit": 7, "4bit": 6, "8bit-factored": 10}
# Float32 copies of the logits per token: the logits, their log-softmax and its gradient.
_LOGIT_COPIES = 3
# What the process holds beside MLX's arrays (Python, MLX, the BLAS, the
# tokenizer, the heap): RSS minus MLX's peak, 0.3-0.7 GB from 135M to 1.39B.
# The refusal keeps it as headroom.
PROCESS_BYTES = int(0.5e9)
# mlx-lm's batched KV cache grows in blocks of this many positions (models.cache.BatchKVCache.step).
KV_STEP = 256


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int  # with the update's temporaries
    optimizer: int
    masking: int
    activations: int
    fused: bool = False  # one compiled step: activations and gradients are not held at once, the larger counts
    # GRPO: the rollouts' KV cache, alive while they are sampled (before the step: the larger of it and
    # the step's gradients / activations counts), and the KL term's reference weights, held all run.
    rollouts: int = 0
    reference: int = 0

    @property
    def total(self) -> int:
        held = max(self.gradients, self.activations) if self.fused else self.gradients + self.activations
        return self.weights + self.optimizer + self.masking + self.reference + max(held, self.rollouts)

    def describe(self) -> str:
        gb = lambda x: f"{x / 1e9:.2f}"  # noqa: E731
        join = " or " if self.fused else ", "
        grpo = (f"; or rollouts' KV cache {gb(self.rollouts)}" if self.rollouts else "") + (
            f"; reference weights {gb(self.reference)}" if self.reference else ""
        )
        return (
            f"~{gb(self.total)} GB (weights {gb(self.weights)}, optimizer {gb(self.optimizer)}, "
            f"masking {gb(self.masking)}, gradients {gb(self.gradients)}{join}activations {gb(self.activations)}"
            f"{grpo})"
        )


def moment_storage(moments: str, train_dtype: str) -> str:
    """The storage "auto" resolves to (optim.build_optimizer's rule)."""
    if moments != "auto":
        return moments
    return train_dtype if train_dtype in _MOMENT_BYTES else "float32"


@dataclass(frozen=True)
class Footprint:
    """What the estimate reads off the prepared model: measured, not configured.

    ``weight_bytes``: every weight, as stored for training; ``trainable``: the
    trainable entries. ``largest``: entries of the largest trainable tensor (0:
    guessed from the vocabulary and hidden size). ``shapes``: the entries of the
    distinct trainable shapes, GMT's tie ranks (0: ``largest``). The per-layer
    update (layerwise): ``block`` is the largest block's trainable entries and
    ``outer`` those outside the blocks (embeddings, head); ``chunk`` the slice of
    a large tensor one staged 8-bit update works on (compact.CHUNK_ENTRIES; the
    whole tensor when its rows are not whole blocks of 128).
    """

    weight_bytes: int
    trainable: int
    largest: int = 0
    block: int = 0
    outer: int = 0
    chunk: int = 1 << 22
    shapes: int = 0


def estimate(
    hf_config: Dict,
    footprint: Footprint,
    *,
    batch_rows: int,
    seq_len: int,
    optim: OptimizerOptions,
    precision: PrecisionOptions,
    memory: MemoryOptions,
    mask: MaskOptions,
    rollout_rows: int = 0,
    rollout_tokens: int = 0,
    reference_bytes: int = 0,
) -> MemoryEstimate:
    """Estimate the peak bytes of one training step (trainer.make_fused_step, or layerwise's).

    ``batch_rows``: the sequences of one micro-batch (two per preference pair,
    G per GRPO prompt); ``seq_len``: the longest training batch's width. The
    option groups are Config's (config.optim, .precision, .memory, .mask): the
    optimizer and the accumulation, the weights' dtype and the moments, the
    per-layer update and gradient checkpointing, and whether (and how) the step
    masks. The fused step holds the whole gradient whatever --grad-clip says
    (see _PLAIN_IN_FLIGHT), and the accumulation buffer with
    --grad-accumulation-steps > 1. The per-layer update recomputes one block at
    a time, with every block's input kept (see `Footprint`).
    GRPO: ``rollout_rows`` x ``rollout_tokens`` decoded at once (`rollout_kv_bytes`); ``reference_bytes``
    (the step-0 trainable weights that --beta > 0 keeps).
    """
    hidden = int(hf_config.get("hidden_size", 0))
    optimizer, accumulation = optim.optimizer, optim.grad_accumulation_steps
    train_dtype, update_per_layer = precision.train_dtype, memory.update_per_layer
    trainable = footprint.trainable
    width = DTYPE_BYTES.get(train_dtype, F32)
    largest = footprint.largest or min(trainable, int(hf_config.get("vocab_size", 0)) * hidden)
    storage = moment_storage(precision.moments, train_dtype)
    compact = optimizer in ("adam", "adamw") and not (storage == "float32" and train_dtype == "float32")
    if update_per_layer:
        gradients = _per_layer_gradient_bytes(
            trainable,
            width,
            largest,
            accumulation,
            footprint.block,
            footprint.outer,
            storage if compact else "",
            footprint.chunk,
        )
    else:
        gradients = _fused_gradient_bytes(
            trainable, width, largest, optimizer, accumulation, storage if compact else ""
        )
    masking = (
        _masking_bytes(trainable, largest, footprint.shapes or largest, update_per_layer, compact, mask.mask_overlap)
        if mask.masked
        else 0
    )
    activations = _activation_bytes(hf_config, batch_rows, seq_len, width, memory.grad_checkpoint or update_per_layer)
    return MemoryEstimate(
        footprint.weight_bytes,
        int(gradients),
        _optimizer_bytes(optimizer, storage, trainable, width),
        masking,
        activations,
        fused=not update_per_layer,
        rollouts=rollout_kv_bytes(hf_config, rollout_rows, rollout_tokens, width),
        reference=int(reference_bytes),
    )


def rollout_kv_bytes(hf_config: Dict, rows: int, tokens: int, width: int) -> int:
    """GRPO's rollouts: the KV cache of ``rows`` sequences (prompts x G) of up to ``tokens`` positions
    (prompt + --max-completion-length) decoded together: per layer a key and a value of kv_heads x
    head_dim per position, in the weights' dtype (``width`` bytes). mlx-lm's cache grows in blocks of
    KV_STEP positions, so ``tokens`` is rounded up to one. (`estimate`'s ``reference_bytes`` beside it:
    the step-0 trainable weights that --beta > 0 keeps.)"""
    if rows <= 0 or tokens <= 0:
        return 0
    layers = int(hf_config.get("num_hidden_layers", 0))
    heads = int(hf_config.get("num_attention_heads", 1))
    kv_heads = int(hf_config.get("num_key_value_heads") or heads)
    head_dim = int(hf_config.get("head_dim") or int(hf_config.get("hidden_size", 0)) // max(heads, 1))
    positions = -(-tokens // KV_STEP) * KV_STEP
    return rows * positions * layers * 2 * kv_heads * head_dim * width


def _fused_gradient_bytes(
    trainable: int, width: int, largest: int, optimizer: str, grad_accumulation_steps: int, compact: str
) -> int:
    """The whole gradient (and accumulation buffer) and the update's temporaries in the fused step;
    ``compact``: CompactAdamW's storage, or ""."""
    gradients = trainable * width * (1 + (grad_accumulation_steps > 1))
    if compact:
        per_entry, per_largest = _COMPACT_IN_FLIGHT.get(compact, _COMPACT_DEFAULT)
        return gradients + int(trainable * per_entry + largest * per_largest)
    work = trainable * _PLAIN_WORK_COPY if width < F32 else 0
    return gradients + int(work) + largest * _PLAIN_IN_FLIGHT.get(optimizer, 1)


def _per_layer_gradient_bytes(
    trainable: int,
    width: int,
    largest: int,
    grad_accumulation_steps: int,
    block: int,
    outer: int,
    compact: str,
    chunk: int,
) -> int:
    """The per-layer step's gradients outside the blocks and one block's (and the accumulation buffer), and
    the largest tensor's update (staged in slices with quantized moments); ``compact`` as above."""
    if compact in _STAGED_UPDATE and chunk >= largest:  # one slice: the whole tensor (SmolLM2-135M's embedding)
        in_flight = largest * _SLICE_UPDATE
    elif compact in _STAGED_UPDATE:
        in_flight = largest * _STAGED_UPDATE[compact] + chunk * _SLICE_UPDATE
    else:
        in_flight = largest * _PER_TENSOR_UPDATE
    return trainable * width * (grad_accumulation_steps > 1) + (outer + block) * width + in_flight


def _masking_bytes(
    trainable: int, largest: int, shapes: int, update_per_layer: bool, compact: bool, mask_overlap: bool
) -> int:
    """GMT's tie ranks and its masks (see the constants); --mask-overlap keeps every mask until the step ends."""
    if update_per_layer:
        masks = largest
    elif compact:
        masks = trainable * _COMPACT_MASKS[0] + largest * _COMPACT_MASKS[1]
    else:
        masks = largest * _PLAIN_MASKS
    return int(shapes * _TIE_RANK_BYTES + masks + trainable * mask_overlap)


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
    logits = tokens * vocab * F32 * _LOGIT_COPIES
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
    tips += [
        "a smaller --batch-size (with --grad-accumulation-steps to keep the batch)",
        "a shorter --max-seq-length",
        "--grad-checkpoint",
    ]
    if method not in ADAPTER_METHODS:
        tips.append("--method lora, or --num-layers N to train fewer blocks")
    return "try " + ", ".join(tips)
