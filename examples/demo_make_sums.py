"""Build examples/data/sums/, the quickstart's task, from reasoning-gym's `chain_sum` (deterministic).

    pip install -e ".[tasks]"          # reasoning-gym, only needed to regenerate
    python examples/demo_make_sums.py

Two-term sums and differences of one-digit numbers ("State the final answer
to the following arithmetic problem: 4 - 1 =" -> "3"). There are exactly 200
such questions; every one appears in one split only. reasoning-gym builds
item i from seed S + i, so the splits draw from widely separated seeds (1,
10000, 20000), each taking the first questions not already taken by an
earlier split. Each line is a chat example plus the fields reasoning-gym's
checker needs (`answer`, `metadata`), so `--scorer reasoning_gym` can score
it too; the quickstart scores with `exact` (the answer is the reference
itself), which needs no extra package and is as strict as reasoning-gym's
checker: that one gives full credit only to the number alone (written as
"3", "+3" or "3.0").

The base SmolLM2-135M-Instruct mostly knows these sums but answers in a
sentence or a worked line; the demo teaches it to state the number alone.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent / "data" / "sums"
TASK = "chain_sum"
TASK_OPTIONS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
SPLITS = {"train": (1, 136), "valid": (10000, 32), "test": (20000, 32)}  # split: (seed, size)


def _plain(value):
    """metadata as JSON-ready data (reasoning-gym keeps ranges as tuples)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def build() -> dict:
    import reasoning_gym

    seen: set = set()
    out = {}
    for split, (seed, size) in SPLITS.items():
        # Over-generate (200 distinct questions exist), keep the first `size` not seen in an earlier split.
        dataset = reasoning_gym.create_dataset(TASK, size=4000, seed=seed, **TASK_OPTIONS)
        rows = []
        for item in dataset:
            if item["question"] in seen:
                continue
            seen.add(item["question"])
            rows.append({
                "messages": [{"role": "user", "content": item["question"]},
                             {"role": "assistant", "content": item["answer"]}],
                "answer": item["answer"],
                "metadata": _plain(item["metadata"]),
            })
            if len(rows) == size:
                break
        if len(rows) < size:
            raise SystemExit(f"only {len(rows)} distinct {split} questions; shrink SPLITS")
        out[split] = rows
    return out


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    for split, rows in build().items():
        path = OUT / f"{split}.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        print(f"wrote {path} ({len(rows)} examples)")


if __name__ == "__main__":
    main()
