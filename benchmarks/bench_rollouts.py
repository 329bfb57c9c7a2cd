"""Rollout throughput: tokens/s of gmt_mlx's sample_rollouts against mlx-lm's own batch_generate.

The online RL issue's target: our rollouts run at >= 0.9x mlx-lm's batched
generation on the same prompts. Both get the same model, the same chat
prompts each repeated --num-generations times (one batch, as sample_rollouts
makes it), the same max tokens and the same temperature / top-p; the runs
alternate (ours, theirs, ours, ...) so that drift hits both. Tokens are
decode steps, the stop token included on both sides (batch_generate's
stats.generation_tokens counts it too); time is the whole call, prefill
included. Greedy runs (--temperature 0) do identical work on both sides;
sampled runs draw different completions, so lengths can differ.

    python benchmarks/bench_rollouts.py                          # tiny random llama
    python benchmarks/bench_rollouts.py --model smollm2-135m     # a real model (cached or downloaded)

On Linux CPU it first re-executes itself with an optimized BLAS preloaded,
as bench.py does (gmt_mlx/platform/blas.py; --no-blas to keep MLX's reference BLAS).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

PROMPTS = [
    "What is 12 plus 7?",
    "Name three colours.",
    "Write one sentence about the sea.",
    "What is the capital of France? Answer in one word.",
    "Count from one to five.",
    "Give a synonym for happy.",
    "Translate 'thank you' to French.",
    "Is 17 a prime number? Explain briefly.",
]


def load(name: str):
    from gmt_mlx.models.loading import load_base
    from gmt_mlx.models.tiny import make_tiny_model

    if name == "tiny":
        name = str(make_tiny_model(tempfile.mkdtemp(prefix="bench-rollouts-")))
    model, tokenizer, _, _ = load_base(name)
    return model, tokenizer


def ours(model, tokenizer, prompts, args, seed):
    from gmt_mlx.objectives.grpo.rollouts import sample_rollouts

    start = time.perf_counter()
    out = sample_rollouts(
        model,
        tokenizer,
        prompts,
        num_generations=args.num_generations,
        temperature=args.temperature,
        top_p=args.top_p,
        max_completion_length=args.max_tokens,
        key=seed,
    )
    return sum(out.completion_lengths), time.perf_counter() - start


def theirs(model, tokenizer, prompts, args, seed):
    import mlx.core as mx
    from mlx_lm.generate import batch_generate
    from mlx_lm.sample_utils import make_sampler

    rows = [p for p in prompts for _ in range(args.num_generations)]
    mx.random.seed(seed)
    start = time.perf_counter()
    out = batch_generate(
        model,
        tokenizer,
        rows,
        max_tokens=args.max_tokens,
        sampler=make_sampler(args.temperature, args.top_p),
        prefill_batch_size=len(rows),
        completion_batch_size=len(rows),
    )
    return out.stats.generation_tokens, time.perf_counter() - start


def main() -> None:
    from gmt_mlx.data.encoding import chat_ids

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="'tiny' (random llama, built here) or a model name/path")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--num-generations", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--no-blas", action="store_true", help="keep MLX's bundled reference BLAS (no re-exec)")
    args = parser.parse_args()
    if not args.no_blas:  # as bench.py and the CLI: MLX's bundled reference BLAS makes CPU runs ~20x slower
        from gmt_mlx.platform.blas import maybe_reexec_with_blas

        print(f"BLAS: {maybe_reexec_with_blas()}", flush=True)

    model, tokenizer = load(args.model)
    texts = (PROMPTS * (args.prompts // len(PROMPTS) + 1))[: args.prompts]
    prompts = [chat_ids(tokenizer, [{"role": "user", "content": t}], add_generation_prompt=True) for t in texts]
    ours(model, tokenizer, prompts, args, 0)  # warm-up: compile, allocate
    theirs(model, tokenizer, prompts, args, 0)
    rates = {"ours": [], "mlx_lm": []}
    for rep in range(args.reps):
        for name, run in (("ours", ours), ("mlx_lm", theirs)):
            tokens, seconds = run(model, tokenizer, prompts, args, rep + 1)
            rates[name].append(tokens / seconds)
            print(f"rep {rep} {name:7s} {tokens:5d} tokens {seconds:7.3f} s {tokens / seconds:9.1f} tok/s", flush=True)
    ours_rate, their_rate = statistics.median(rates["ours"]), statistics.median(rates["mlx_lm"])
    print(
        f"\nmodel {args.model}: {args.prompts} prompts x {args.num_generations} generations, "
        f"max {args.max_tokens} tokens, temperature {args.temperature}, top-p {args.top_p}"
    )
    print(
        f"median tokens/s: sample_rollouts {ours_rate:.1f}, mlx_lm batch_generate {their_rate:.1f}, "
        f"ratio {ours_rate / their_rate:.3f} (target >= 0.9)"
    )


if __name__ == "__main__":
    main()
