"""Build the data of the second evidence study (studies/ceiling_study.py), deterministically.

    pip install -e ".[tasks]"
    python studies/ceiling_make_data.py

examples/data/ceiling/
  large/   reasoning-gym chain_sum (two terms, 1-2 digits), train 512 / valid 64 / test 128:
           regime (a), enough data that the study's 32 steps of batch 8 never repeat an example;
  small/   the first 32 training examples of large/ and the same valid/test: regime (b), a small
           set seen for many epochs;
  english.jsonl  forgetting probe 1: 64 docstrings of the Python standard library (prose only,
           written by Python's authors, PSF licence), as plain text;
and the forgetting probe 2 is an existing file: examples/data/leg_counting/test.jsonl, another
reasoning-gym task (word problems about animals' legs) that the study never trains on.

The splits use seeds far from the other example sets' (60000, 70000, 80000) and every question
appears in one split only. The docstrings are written out (not read at study time) so that the
probe is the same text whatever Python version runs the study.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare_make_chain_sum import TASK, TASK_OPTIONS, build, write  # noqa: E402

OUT = Path(__file__).resolve().parent.parent / "examples" / "data" / "ceiling"  # the shipped data, not studies/
SPLITS = {"train": (60000, 512), "valid": (70000, 64), "test": (80000, 128)}
SMALL_TRAIN = 32
SYSTEM = "Answer with the number."
# Pure-Python modules with prose docstrings; C modules' docstrings are mostly signatures.
MODULES = (
    "argparse",
    "calendar",
    "configparser",
    "csv",
    "dataclasses",
    "difflib",
    "email.message",
    "fractions",
    "ftplib",
    "gettext",
    "heapq",
    "http.client",
    "imaplib",
    "logging",
    "mailbox",
    "pathlib",
    "pickle",
    "pprint",
    "queue",
    "random",
    "shutil",
    "smtplib",
    "statistics",
    "string",
    "tarfile",
    "textwrap",
    "threading",
    "typing",
    "unittest.case",
    "urllib.parse",
    "uuid",
    "zipfile",
)
DOCSTRINGS = 64


def _prose(doc: str) -> bool:
    """Mostly running English: no doctests, tables or signature lists, letters and spaces dominate."""
    if not 300 <= len(doc) <= 900 or ">>>" in doc or "::" in doc or "|" in doc:
        return False
    letters = sum(c.isalpha() or c.isspace() for c in doc)
    return letters / len(doc) > 0.9 and len(re.findall(r"[.!?](\s|$)", doc)) >= 3


def docstrings(count: int = DOCSTRINGS) -> list:
    """The first ``count`` prose docstrings (module, class, function, method) in MODULES' order, a module at a time."""
    per_module = []
    for name in MODULES:
        module = importlib.import_module(name)
        found, seen = [], set()
        objects = [module] + [
            obj
            for _, obj in sorted(inspect.getmembers(module), key=lambda kv: kv[0])
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == name
        ]
        for obj in list(objects):
            if inspect.isclass(obj):
                objects += [m for _, m in sorted(vars(obj).items()) if inspect.isfunction(m)]
        for obj in objects:
            doc = inspect.getdoc(obj) or ""
            if _prose(doc) and doc not in seen:
                seen.add(doc)
                found.append(doc)
        per_module.append(found)
    picked = []
    while len(picked) < count and any(per_module):  # round robin: no module dominates the probe
        for found in per_module:
            if found and len(picked) < count:
                picked.append(found.pop(0))
    return picked


def short(row: dict) -> dict:
    """The chat example with a short prompt: a one-line system message and the bare expression.

    About 31 tokens instead of 53 with SmolLM2's default system message and reasoning-gym's
    sentence, which makes a training step ~1.7x cheaper; the answer and the checker's fields stay.
    """
    expression = row["metadata"]["expression"]
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"{expression} ="},
        row["messages"][-1],
    ]
    return {**row, "messages": messages}


def main() -> None:
    splits = {name: [short(row) for row in rows] for name, rows in build(TASK, TASK_OPTIONS, SPLITS).items()}
    write(OUT / "large", splits)
    write(OUT / "small", {"train": splits["train"][:SMALL_TRAIN], "valid": splits["valid"], "test": splits["test"]})
    texts = docstrings()
    path = OUT / "english.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    print(f"wrote {path} ({len(texts)} docstrings, Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
