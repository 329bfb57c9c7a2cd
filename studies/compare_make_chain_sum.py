"""Build examples/data/chain_sum/ from the reasoning-gym task `chain_sum` (deterministic).

    pip install "reasoning-gym>=0.1.25"      # or: pip install -e ".[tasks]"
    python studies/compare_make_chain_sum.py

Two-term sums and differences of 1-2 digit numbers ("4 - 1 =" -> "3"), the
task docs/design.md used for its mlx_lm.lora reference point. reasoning-gym builds
item i of a dataset from seed S + i, so nearby seeds give nearly the same
items: the splits use widely separated seeds (1, 10000, 20000) and every
question appears in one split only. Each line is a chat example plus the
fields reasoning-gym's checker needs (`answer`, `metadata`), so
`--scorer reasoning_gym` can score answers to it.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "examples" / "data" / "chain_sum"  # the shipped data, not studies/
TASK = "chain_sum"
TASK_OPTIONS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
SPLITS = {"train": (1, 256), "valid": (10000, 16), "test": (20000, 48)}  # split: (seed, size)


def _plain(value):
    """metadata as JSON-ready data (reasoning-gym keeps ranges as tuples)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def build(task: str = TASK, options: dict = TASK_OPTIONS, splits: dict = SPLITS, draws: int = 0) -> dict:
    """split -> rows: per split (seed, size), the first `size` questions not in an earlier split.

    `draws` items are generated per split (0: 3 x size) to find them.
    """
    import reasoning_gym

    seen: set = set()
    out = {}
    for split, (seed, size) in splits.items():
        dataset = reasoning_gym.create_dataset(task, size=draws or size * 3, seed=seed, **options)
        rows = []
        for item in dataset:
            if item["question"] in seen:
                continue
            seen.add(item["question"])
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": item["question"]},
                        {"role": "assistant", "content": item["answer"]},
                    ],
                    "answer": item["answer"],
                    "metadata": _plain(item["metadata"]),
                }
            )
            if len(rows) == size:
                break
        if len(rows) < size:
            raise SystemExit(
                f"only {len(rows)} distinct {split} questions; widen the task options or shrink the splits"
            )
        out[split] = rows
    return out


def write(out: Path, splits: dict) -> None:
    """Write each split's rows to out/SPLIT.jsonl."""
    out.mkdir(parents=True, exist_ok=True)
    for split, rows in splits.items():
        path = out / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {path} ({len(rows)} examples)")


def main() -> None:
    write(OUT, build())


if __name__ == "__main__":
    main()
