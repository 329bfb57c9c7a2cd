"""The README's table: the largest model each method fine-tunes on 16, 32, 64 and 128 GB, from the estimate.

    python benchmarks/memory_table.py

Shapes are the Qwen2.5 instruct family's (from their config.json), one step of
batch 1 x 512 tokens. "Fits" means the estimate is at most 70% of the Mac's
memory (macOS lets the GPU use ~70-75% of unified memory by default). These are
estimates (gmt_mlx.run.memory.estimate), not measurements: benchmarks/RESULTS.md says
which sizes were measured and how far the estimate was off there.
"""

from __future__ import annotations

from gmt_mlx.config import Config
from gmt_mlx.run.memory import DTYPE_BYTES, Footprint, estimate

# name: (hidden, layers, intermediate, heads, kv heads, vocab, tied)
SHAPES = {
    "Qwen2.5-0.5B": (896, 24, 4864, 14, 2, 151936, True),
    "Qwen2.5-1.5B": (1536, 28, 8960, 12, 2, 151936, True),
    "Qwen2.5-3B": (2048, 36, 11008, 16, 2, 151936, True),
    "Qwen2.5-7B": (3584, 28, 18944, 28, 4, 152064, False),
    "Qwen2.5-14B": (5120, 48, 13824, 40, 8, 152064, False),
    "Qwen2.5-32B": (5120, 64, 27648, 40, 8, 152064, False),
}
SETUPS = {
    "gmt / full, float32 (defaults)": dict(train_dtype="float32", moments="auto", grad_clip=1.0),
    "gmt / full, --low-memory": dict(train_dtype="bfloat16", moments="8bit", grad_clip=0.0, update_per_layer=True),
}
MEMORY_GB = (16, 32, 64, 128)
USABLE = 0.70


def params(hidden, layers, inter, heads, kv, vocab, tied) -> tuple[int, int, int, int]:
    """(parameter count, largest tensor's entries, one block's, those outside the blocks)."""
    head = hidden // heads
    attn = hidden * hidden * 2 + hidden * kv * head * 2 + hidden + 2 * kv * head  # q, o, k, v (+ biases)
    block = attn + 3 * hidden * inter + 2 * hidden
    embed = vocab * hidden
    outer = embed * (1 if tied else 2) + hidden
    return layers * block + outer, embed, block, outer


def peak(shape, setup) -> float:
    hidden, layers, inter, heads, kv, vocab, tied = shape
    n, largest, block, outer = params(*shape)
    config = {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "vocab_size": vocab,
    }
    run = Config(**setup)  # gmt at its default ratio (the mask's memory is counted)
    footprint = Footprint(n * DTYPE_BYTES[setup["train_dtype"]], n, largest=largest, block=block, outer=outer)
    est = estimate(
        config,
        footprint,
        batch_rows=1,
        seq_len=512,
        optim=run.optim,
        precision=run.precision,
        memory=run.memory,
        mask=run.mask,
    )
    return est.total / 1e9


def main() -> None:
    print("| model | parameters | " + " | ".join(SETUPS) + " |")
    print("|---|---|" + "---|" * len(SETUPS))
    for name, shape in SHAPES.items():
        n = params(*shape)[0]
        print(f"| {name} | {n / 1e9:.2f}B | " + " | ".join(f"{peak(shape, s):.1f} GB" for s in SETUPS.values()) + " |")
    print()
    print("| Mac memory | " + " | ".join(SETUPS) + " |")
    print("|---|" + "---|" * len(SETUPS))
    for gb in MEMORY_GB:
        cells = []
        for setup in SETUPS.values():
            fits = [name for name, shape in SHAPES.items() if peak(shape, setup) <= USABLE * gb]
            cells.append(fits[-1] if fits else "none")
        print(f"| {gb} GB | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
