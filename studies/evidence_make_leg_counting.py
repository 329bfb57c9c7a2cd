"""Build examples/data/leg_counting/ from the reasoning-gym task `leg_counting` (deterministic).

    pip install "reasoning-gym>=0.1.25"      # or: pip install -e ".[tasks]"
    python studies/evidence_make_leg_counting.py

The word-problem task of the evidence study (docs/EVIDENCE.md): "how many legs
are there in total if you have 2 cows, 3 spiders?" with 1-2 kinds of animal and
1-3 of each, so that prompts stay short (~60 tokens with the chat template).
Same recipe as studies/compare_make_chain_sum.py (which it reuses): splits from
widely separated seeds (1, 10000, 20000), every question in one split only.
"""

from __future__ import annotations

from pathlib import Path

from compare_make_chain_sum import build, write

OUT = Path(__file__).resolve().parent.parent / "examples" / "data" / "leg_counting"  # the shipped data, not studies/
TASK = "leg_counting"
TASK_OPTIONS = {"min_animals": 1, "max_animals": 2, "min_instances": 1, "max_instances": 3}
SPLITS = {"train": (1, 256), "valid": (10000, 16), "test": (20000, 48)}  # split: (seed, size)


def main() -> None:
    out = build(TASK, TASK_OPTIONS, SPLITS)
    train = {r["messages"][0]["content"] for r in out["train"]}
    assert not any(r["messages"][0]["content"] in train for s in ("valid", "test") for r in out[s])
    write(OUT, out)


if __name__ == "__main__":
    main()
