"""Regenerate the tiny arithmetic datasets in this folder (deterministic).

    python examples/data/make_examples.py

Writes chat/ (messages), completions/ (prompt/completion) and text/ (text).
Every problem is unique across all files, so no split leaks into another.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _problems(rng: random.Random, count: int, seen: set[str]) -> list[tuple[str, int]]:
    """`count` unseen chain sums / differences / products as (expression, value)."""
    out: list[tuple[str, int]] = []
    while len(out) < count:
        kind = rng.choice(["chain", "chain", "product"])
        if kind == "product":
            expr = f"{rng.randint(2, 12)} * {rng.randint(2, 12)}"
        else:
            # 2 to 5 terms, so examples differ in length (what length grouping is for).
            terms = [str(rng.randint(1, 99))]
            for _ in range(rng.randint(1, 4)):
                terms += [rng.choice(["+", "-"]), str(rng.randint(1, 99))]
            expr = " ".join(terms)
        value = eval(expr)  # noqa: S307 - our own digits and operators only
        if value < 0 or expr in seen:
            continue
        seen.add(expr)
        out.append((expr, value))
    return out


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def main() -> None:
    rng = random.Random(0)
    seen: set[str] = set()
    for split, n in (("train", 48), ("valid", 12), ("test", 12)):
        rows = [
            {
                "messages": [
                    {"role": "user", "content": f"What is {e}?"},
                    {"role": "assistant", "content": f"{e} = {v}."},
                ]
            }
            for e, v in _problems(rng, n, seen)
        ]
        _write(HERE / "chat" / f"{split}.jsonl", rows)
    for split, n in (("train", 32), ("valid", 8), ("test", 8)):
        rows = [{"prompt": f"What is {e}?\nAnswer:", "completion": f" {e} = {v}."} for e, v in _problems(rng, n, seen)]
        _write(HERE / "completions" / f"{split}.jsonl", rows)
    for split, n in (("train", 32), ("valid", 8)):
        rows = [{"text": f"The value of {e} is {v}."} for e, v in _problems(rng, n, seen)]
        _write(HERE / "text" / f"{split}.jsonl", rows)


if __name__ == "__main__":
    main()
