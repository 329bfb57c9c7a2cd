"""The quickstart's shipped task (examples/data/sums): real, disjoint, correctly labelled, and wired up."""

from __future__ import annotations

import json
from pathlib import Path

from gmt_mlx.config import load_yaml
from gmt_mlx.data.scorers import get_scorer, reference_of

REPO = Path(__file__).resolve().parent.parent
SUMS = REPO / "examples" / "data" / "sums"


def _rows(split: str) -> list:
    return [json.loads(line) for line in (SUMS / f"{split}.jsonl").read_text().splitlines()]


def test_sums_splits_are_disjoint_and_correct():
    seen = {}
    for split in ("train", "valid", "test"):
        rows = _rows(split)
        assert rows, split
        for row in rows:
            question = row["messages"][0]["content"]
            assert question not in seen, f"{question!r} in {seen.get(question)} and {split}"
            seen[question] = split
            expression = row["metadata"]["expression"]
            a, op, b = expression.split()
            assert op in "+-" and len(a) == len(b) == 1
            assert int(row["answer"]) == (int(a) + int(b) if op == "+" else int(a) - int(b))
            assert question.endswith(f"{expression} =") and reference_of(row) == row["answer"]
            assert row["messages"][-1] == {"role": "assistant", "content": row["answer"]}
            assert row["metadata"]["source_dataset"] == "chain_sum"  # --scorer reasoning_gym can score it
    assert len(seen) == 200  # every two-term one-digit sum or difference, each in one split


def test_exact_scorer_wants_the_number_alone():
    row = _rows("test")[0]
    exact = get_scorer("exact")
    assert exact(row["answer"], row) == 1.0
    assert exact(f"The final answer to this arithmetic problem is {row['answer']}.", row) == 0.0


def test_quickstart_trains_on_sums_and_compares_with_the_base():
    config = load_yaml(REPO / "examples" / "quickstart.yaml")
    assert config["data"] == "examples/data/sums"
    script = (REPO / "scripts" / "quickstart.sh").read_text()
    assert "-c examples/quickstart.yaml" in script
    assert 'eval "$OUT" --baseline --split test' in script
