"""AdamW with its moments stored in less memory (--moments bfloat16 / 8bit / 4bit / 8bit-factored).

`CompactAdamW` is a plain `mlx.optimizers.Optimizer`; `optim.MaskedOptimizer`
wraps it like any other and `optim.build_optimizer` chooses it for low-precision
weights or moments. Its 8- and 4-bit updates run in compiled stages (the first moment, the
root of the second, the new weights) that a caller outside any compiled function
(layerwise) can evaluate one after another, a slice of rows at a time
(`CHUNK_ENTRIES`), so that their float32 temporaries never pile up.
"""

from __future__ import annotations

from typing import Callable, Dict, NamedTuple, Optional, Tuple

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_map_with_path

from gmt_mlx.config import MOMENTS
from gmt_mlx.core.masking import hash_start
from gmt_mlx.core.precision import (
    BLOCK,
    SALT_M,
    SALT_V,
    blocks_of,
    dequantize_root,
    dequantize_signed,
    quantizable,
    quantize_signed,
    quantize_sqrt,
    round_to,
    step_seed,
    tensor_seed,
)

# Entries of one slice of a large tensor's staged update (~22 bytes each in flight: ~90 MB).
CHUNK_ENTRIES = 1 << 22

# Storage forms of CompactAdamW's moments ("auto" resolves to the weights' dtype).
COMPACT_MOMENTS = tuple(m for m in MOMENTS if m != "auto")
# The forms held as block-wise codes, whose update runs in stages.
QUANTIZED_MOMENTS = ("8bit", "4bit", "8bit-factored")


class _Rows(NamedTuple):
    """One tensor's update inputs as rows of its last dimension; the scales have one entry per BLOCK."""

    g: mx.array  # the gradient, float32
    p: mx.array  # the weights
    m_codes: mx.array  # 4bit: two codes a byte, half as many columns
    m_scale: mx.array
    v_codes: Optional[mx.array]  # 8bit / 4bit: sqrt(v) in 8 / 4 bits
    v_scale: Optional[mx.array]
    v_row: Optional[mx.array]  # 8bit-factored: v_ij ~ v_row_i col_term_j
    col_term: Optional[mx.array]


class CompactAdamW(optim.Optimizer):
    """AdamW with its moments stored in less memory, and float32 arithmetic.

    The update is mlx's AdamW's (decoupled weight decay, no bias correction):
    ``p <- p (1 - lr wd) - lr m / (sqrt(v) + eps)``. ``moments`` says how m and
    v are stored between steps:

    - ``float32``: 8 bytes per entry, as mlx's AdamW on float32 weights;
    - ``bfloat16``: 4 bytes, stochastically rounded (to nearest, v could
      never decay by 0.1% a step: precision.round_to);
    - ``8bit``: ~2 bytes: m as int8 and sqrt(v) as uint8, each with a float32
      scale per block of 128 entries, stochastically rounded
      (precision.quantize_signed / quantize_root say why this v is stable);
    - ``4bit``: ~1 byte: the same in 4 bits, two codes a byte (m: a sign and
      a power of two of its block's largest, precision._quantize_signed4;
      sqrt(v): 1..15 of its block's largest, 0 only for v = 0);
    - ``8bit-factored``: ~1 byte: m in 8 bits, and v of a matrix kept as
      the moving averages of its rows' and columns' mean squared gradient
      (Adafactor's factorisation: v_ij ~ row_i col_j / mean(row)), float32.

    Tensors too small for whole blocks (norms, biases) keep float32 moments:
    they are a negligible share of the memory. Rounding seeds come from
    (seed, step, parameter path), so a resumed run draws the same bits.
    """

    def __init__(
        self,
        learning_rate: float | Callable,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        weight_decay: float,
        moments: str = "float32",
        seed: int,
    ) -> None:
        # weight_decay and seed are Config's (build_optimizer passes them): no second default here.
        super().__init__()
        if moments not in COMPACT_MOMENTS:
            raise ValueError(f"unknown moments storage {moments!r} (expected one of {', '.join(COMPACT_MOMENTS)})")
        self._maybe_schedule("learning_rate", learning_rate)
        self.betas, self.eps, self.weight_decay = betas, eps, weight_decay
        self.moments, self.seed = moments, int(seed)
        self.staged = False  # see _stage
        # Set by MaskedOptimizer for low-precision weights: (path, float32 weights, hash start) ->
        # the weights rounded to their dtype, so a slice is rounded as soon as it is computed.
        self.weight_rounder: Optional[Callable] = None

    def _form(self, shape) -> str:
        """How one tensor's moments are stored."""
        if (
            self.moments in ("float32", "bfloat16")
            or not quantizable(shape)
            or (self.moments == "4bit" and shape[-1] % 2)
        ):
            return "float32" if self.moments != "bfloat16" else "bfloat16"
        if self.moments == "8bit-factored" and len(shape) >= 2:
            return "factored"
        return "8bit"

    @property
    def bits(self) -> int:
        """Bits of a quantized moment's code."""
        return 4 if self.moments == "4bit" else 8

    def _codes_shape(self, shape) -> tuple:
        return (*shape[:-1], shape[-1] // 2) if self.bits == 4 else tuple(shape)

    def init_single(self, parameter: mx.array, state: dict) -> None:
        shape, form = parameter.shape, self._form(parameter.shape)
        if form in ("float32", "bfloat16"):
            dtype = mx.float32 if form == "float32" else mx.bfloat16
            state["m"], state["v"] = mx.zeros(shape, dtype), mx.zeros(shape, dtype)
            return
        blocks, codes = parameter.size // BLOCK, self._codes_shape(shape)
        # 4 bits: a zero byte is magnitude 0 twice, so m starts at 0 as in 8 bits.
        state["m_codes"] = mx.zeros(codes, mx.int8 if self.bits == 8 else mx.uint8)
        state["m_scale"] = mx.zeros((blocks,), mx.float32)
        if form == "factored":
            rows = parameter.size // shape[-1]
            state["v_row"], state["v_col"] = mx.zeros((rows,), mx.float32), mx.zeros((shape[-1],), mx.float32)
        else:
            state["v_codes"], state["v_scale"] = mx.zeros(codes, mx.uint8), mx.zeros((blocks,), mx.float32)

    def apply_gradients(self, gradients: dict, parameters: dict) -> dict:
        # mlx's loop, with the parameter path passed on: it seeds the rounding.
        if not self._initialized:
            self.init(gradients)
        for param, scheduler in self._schedulers.items():
            self.state[param] = scheduler(self.step)
        seed = step_seed(self.seed, self.step)
        self.state["step"] = self.step + 1
        grads, params, states = {}, {}, {}

        def collect(path, g, p, s):
            grads[path], params[path], states[path] = g, p, s

        tree_map_with_path(collect, gradients, parameters, self.state)
        new, previous = {}, None
        # One tensor after another, in the order the backward pass produces
        # their gradients (the reverse of the model's): the update's chain of
        # kernels (block scales, row and column means, rounding) would
        # otherwise run level by level across many tensors, keeping all their
        # float32 temporaries alive at once.
        for path in reversed(list(grads)):
            g = grads[path] if previous is None else mx.depends(grads[path], previous)
            new[path] = previous = self._apply(g, params[path], states[path], seed, path)
        return tree_map_with_path(lambda path, g: new[path], gradients)

    def apply_single(self, gradient: mx.array, parameter: mx.array, state: dict) -> mx.array:
        # The abstract method; apply_gradients bypasses it.
        return self._apply(gradient, parameter, state, step_seed(self.seed, self.step), "")

    def _apply(self, gradient: mx.array, parameter: mx.array, state: dict, seed: mx.array, path: str) -> mx.array:
        """One tensor's new weights in float32 (or as `weight_rounder` rounds them); ``state`` is updated in place."""
        lr = self.learning_rate.astype(mx.float32)
        g = gradient.astype(mx.float32)
        stochastic = None if self.moments == "float32" else tensor_seed(seed, path, SALT_M)
        if "m" in state:
            seed_v = None if stochastic is None else tensor_seed(seed, path, SALT_V)
            return self._apply_dense(g, parameter, state, lr, (stochastic, seed_v))
        return self._apply_8bit(g, parameter, state, lr, (stochastic, tensor_seed(seed, path, SALT_V)), path)

    def _apply_dense(self, g: mx.array, parameter: mx.array, state: dict, lr: mx.array, seeds: tuple) -> mx.array:
        """The update with m and v stored whole, in float32 or bfloat16 (``seeds``: their rounding's, or None)."""
        b1, b2 = self.betas
        m = b1 * state["m"].astype(mx.float32) + (1 - b1) * g
        v = b2 * state["v"].astype(mx.float32) + (1 - b2) * mx.square(g)
        state["m"] = round_to(m, state["m"].dtype, seeds[0])
        state["v"] = round_to(v, state["v"].dtype, seeds[1])
        p = parameter.astype(mx.float32)
        return p * (1 - lr * self.weight_decay) - lr * m / (mx.sqrt(v) + self.eps)

    def _apply_8bit(
        self, g: mx.array, parameter: mx.array, state: dict, lr: mx.array, seeds: tuple, path: str
    ) -> mx.array:
        """The update with m in 8 or 4 bits and v in as many or factored, a slice of rows at a time when staged."""
        # 8-bit: the update works on rows of BLOCK entries (views of the inputs),
        # so that inside a compiled step no reshape forces a float32 copy; m and
        # sqrt(v) are the only float32 arrays of the tensor's size it needs.
        # Staged (layerwise), a large tensor is updated a slice of rows at a
        # time (CHUNK_ENTRIES): its float32 temporaries are a slice's, and the
        # rounding noise of a slice is the whole tensor's there (hash_start).
        shape, cols = parameter.shape, parameter.shape[-1]
        rows = parameter.size // cols
        step = max(1, CHUNK_ENTRIES // cols) if self.staged and cols % BLOCK == 0 else rows
        g = g.reshape(rows, cols)
        row, col_term = self._factored_v(g, state) if "v_row" in state else (None, None)
        v_codes, code_cols = state.get("v_codes"), self._codes_shape((rows, cols))[1]
        tensor = _Rows(
            g,
            parameter.reshape(rows, cols),
            state["m_codes"].reshape(rows, code_cols),
            state["m_scale"],
            None if v_codes is None else v_codes.reshape(rows, code_cols),
            state.get("v_scale"),
            row,
            col_term,
        )
        pieces: Dict[str, list] = {"new": [], "m_codes": [], "m_scale": [], "v_codes": [], "v_scale": []}
        for r0 in range(0, rows, step):
            new = self._update_rows(tensor, r0, min(rows, r0 + step), lr, seeds, path, pieces)
            pieces["new"].append(new)
            self._stage(new)
        joined = {}
        for key, parts in pieces.items():
            if parts:
                joined[key] = parts[0] if len(parts) == 1 else mx.concatenate(parts)
                parts.clear()  # the slices: freed once joined
                self._stage(joined[key])
        for key in ("m_codes", "m_scale", "v_codes", "v_scale"):
            if key in joined:
                state[key] = joined[key].reshape(self._codes_shape(shape)) if key.endswith("codes") else joined[key]
        return joined["new"].reshape(shape)

    def _factored_v(self, g: mx.array, state: dict) -> Tuple[mx.array, mx.array]:
        """Update the factored v's row and column averages in ``state``; return the rows' and columns' terms
        (v_ij ~ row_i col_term_j)."""
        b2 = self.betas[1]
        square = mx.square(g)
        row = b2 * state["v_row"] + (1 - b2) * mx.mean(square, axis=-1)
        col = b2 * state["v_col"] + (1 - b2) * mx.mean(square, axis=0)
        state["v_row"], state["v_col"] = row, col
        col_term = col / mx.maximum(mx.mean(row), 1e-30)
        self._stage(row, col_term)
        return row, col_term

    def _update_rows(
        self, tensor: _Rows, r0: int, r1: int, lr: mx.array, seeds: tuple, path: str, pieces: Dict[str, list]
    ) -> mx.array:
        """Rows ``r0:r1``' new weights; their new 8-bit codes and scales are appended to ``pieces``."""
        b1, b2 = self.betas
        cols, bits = tensor.g.shape[1], self.bits
        first_block, end_block = r0 * cols // BLOCK, r1 * cols // BLOCK
        start = hash_start(r0 * cols) if r0 else None

        def rows_of(a, lo=r0, hi=r1):  # the slice's rows (the array itself when it is all of them)
            return a if lo == 0 and hi == a.shape[0] else a[lo:hi]

        gb = blocks_of(rows_of(tensor.g))
        m_scale = rows_of(tensor.m_scale, first_block, end_block)
        m, codes, scale = _first_moment(gb, rows_of(tensor.m_codes), m_scale, seeds[0], b1, start, bits)
        pieces["m_codes"].append(codes.reshape(r1 - r0, -1))
        pieces["m_scale"].append(scale)
        self._stage(m, codes, scale)
        if tensor.v_codes is None:
            root = blocks_of(mx.sqrt(rows_of(tensor.v_row)[:, None] * tensor.col_term[None, :]))
        else:
            v_scale = rows_of(tensor.v_scale, first_block, end_block)
            root, codes, scale = _second_root(gb, rows_of(tensor.v_codes), v_scale, seeds[1], b2, start, bits)
            pieces["v_codes"].append(codes.reshape(r1 - r0, -1))
            pieces["v_scale"].append(scale)
        self._stage(root, codes, scale)
        new = _adamw_step(rows_of(tensor.p), m, root, lr, self.weight_decay, self.eps)
        if self.weight_rounder is not None:
            new = self.weight_rounder(path, new, start)
        return new  # m, sqrt(v) and the gradient's blocks are freed with this frame, before ``new`` is staged

    def _stage(self, *arrays) -> None:
        """With ``staged`` (set by a caller outside any compiled function: layerwise), evaluate
        one stage of a tensor's update before the next starts, so that at most m,
        sqrt(v) and one stage's temporaries are alive: ~20 bytes per entry, where the
        whole update in one compiled function held ~37 (benchmarks/bench_update_memory.py)."""
        if self.staged:
            mx.eval(*arrays)


# The 8-bit update's stages, each compiled: within one, MLX fuses the
# elementwise ops (at most 11 per kernel); called eagerly one after another
# (CompactAdamW.staged) their float32 temporaries never pile up.
@mx.compile
def _first_moment(
    g: mx.array,
    codes: mx.array,
    scale: mx.array,
    seed: mx.array | None,
    b1: float,
    start: mx.array | None = None,
    bits: int = 8,
) -> Tuple[mx.array, mx.array, mx.array]:
    """AdamW's new m from its 8- or 4-bit codes and the gradient (as blocks): (m, new codes, new scales).
    ``start``: these are a slice of the tensor (masking.hash_start)."""
    m = b1 * dequantize_signed(codes, scale, g.shape, bits) + (1 - b1) * g
    return (m, *quantize_signed(m, seed, start, bits))


@mx.compile
def _second_root(
    g: mx.array,
    codes: mx.array,
    scale: mx.array,
    seed: mx.array,
    b2: float,
    start: mx.array | None = None,
    bits: int = 8,
) -> Tuple[mx.array, mx.array, mx.array]:
    """sqrt of AdamW's new v from its 8- or 4-bit codes and the gradient: (root, new codes, new scales)."""
    root = mx.sqrt(b2 * dequantize_root(codes, scale, g.shape, bits) + (1 - b2) * mx.square(g))
    return (root, *quantize_sqrt(root, seed, start, bits))


@mx.compile
def _adamw_step(
    parameter: mx.array, m: mx.array, root: mx.array, lr: mx.array, weight_decay: float, eps: float
) -> mx.array:
    """The new weights in float32 (decoupled weight decay, no bias correction), in ``parameter``'s shape."""
    p = blocks_of(parameter.astype(mx.float32))
    return (p * (1 - lr * weight_decay) - lr * m / (root + eps)).reshape(parameter.shape)
