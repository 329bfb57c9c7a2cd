"""Build examples/data/sums/, the quickstart's task, from reasoning-gym's `chain_sum` (deterministic).

    pip install -e ".[tasks]"          # reasoning-gym, only needed to regenerate
    python studies/demo_make_sums.py

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

from pathlib import Path

from compare_make_chain_sum import build, write  # the same split recipe

OUT = Path(__file__).resolve().parent.parent / "examples" / "data" / "sums"  # the shipped data, not studies/
TASK = "chain_sum"
TASK_OPTIONS = {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 1}
SPLITS = {"train": (1, 136), "valid": (10000, 32), "test": (20000, 32)}  # split: (seed, size)
# Only 200 distinct questions exist: generate many items per split to find them.
DRAWS = 4000


def main() -> None:
    write(OUT, build(TASK, TASK_OPTIONS, SPLITS, draws=DRAWS))


if __name__ == "__main__":
    main()
