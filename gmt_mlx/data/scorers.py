"""Scorers for generation-based accuracy: (model answer, data row) -> score in [0, 1].

A scorer never raises on what a model wrote: an empty, truncated or
nonsensical answer scores 0. Built-in scorers, by name:

- ``exact``: the answer equals the reference after trimming whitespace, a
  trailing period and case.
- ``number``: the last number in the answer equals the reference's number
  (``1,234`` = ``1234.0``; see `reference_number`).
- ``gsm8k``: the number after the *last* ``#### `` marker in the answer (the
  GSM8K convention) equals the reference's number; no marker scores 0.
- ``boxed``: the content of the last ``\\boxed{...}`` equals the reference
  (numerically when both are numbers, else as normalized text); no box scores 0.
- ``reasoning_gym`` or ``reasoning_gym:TASK``: the task's own checker from the
  PyPI package `reasoning-gym` (``score_answer(answer, entry)``); TASK
  defaults to the row's ``metadata.source_dataset``. Partial credit is kept.
- ``package.module:function``: any function ``f(answer: str, row: dict) ->
  float | bool``, imported by name: the hook for task-specific checkers.

The reference of a row is its ``answer`` field when present, else the
completion or the final assistant message (`reference_of`).
"""

from __future__ import annotations

import importlib
import math
import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Callable, Dict, Optional

from gmt_mlx.errors import UserError

Scorer = Callable[[str, dict], float]

# A number not glued to a preceding word or number: "12-5" holds 12 and 5, "= -4" holds -4.
_NUMBER = re.compile(r"(?<![\w.])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?![\d])|(?<![\w.])-?\.\d+")
_HASHES = re.compile(r"####\s*([^\n]*)")
_MINUS = str.maketrans({"\u2212": "-", "\u2013": "-"})


def reference_of(row: dict) -> Optional[str]:
    """The reference answer of a data row: ``answer``, else the completion, the chosen answer or last assistant turn."""
    if isinstance(row.get("answer"), (str, int, float)) and not isinstance(row.get("answer"), bool):
        return str(row["answer"])
    if isinstance(row.get("completion"), str):
        return row["completion"]
    if isinstance(row.get("chosen"), str):  # a preference pair: its preferred answer
        return row["chosen"]
    messages = row.get("messages")
    if isinstance(messages, list) and len(messages) > 1 and isinstance(messages[-1], dict):
        content = messages[-1].get("content")
        if messages[-1].get("role") == "assistant" and isinstance(content, str):
            return content
    return None


def normalize_text(text: str) -> str:
    """Trim, collapse whitespace, drop one trailing period, casefold."""
    text = " ".join(str(text).split())
    if text.endswith("."):
        text = text[:-1].rstrip()
    return text.casefold()


def parse_number(text: Optional[str]) -> Optional[Decimal]:
    """``text`` as a number (commas, a leading +, surrounding $ and spaces allowed), else None."""
    if text is None:
        return None
    cleaned = str(text).translate(_MINUS).strip().strip("$").replace(",", "").rstrip(".").strip()
    if cleaned.startswith("+"):
        cleaned = cleaned[1:]
    if not cleaned or len(cleaned) > 100:
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    return value if value.is_finite() else None


def last_number(text: Optional[str]) -> Optional[str]:
    """The last number written in ``text`` (as written, e.g. "1,234" or "-4"), or None."""
    if not text:
        return None
    found = _NUMBER.findall(str(text).translate(_MINUS))
    return found[-1] if found else None


def hash_answer(text: Optional[str]) -> Optional[str]:
    """What follows the last ``####`` marker (GSM8K style), or None."""
    if not text:
        return None
    found = _HASHES.findall(str(text))
    if not found:
        return None
    value = found[-1].strip()
    return value or None


def boxed(text: Optional[str]) -> Optional[str]:
    """The content of the last balanced ``\\boxed{...}`` (nested braces allowed), or None."""
    if not text:
        return None
    text = str(text)
    start = text.rfind("\\boxed{")
    while start != -1:
        depth, i = 0, start + len("\\boxed")
        for i in range(start + len("\\boxed"), len(text)):
            if text[i] == "{":
                depth += 1
            elif text[i] == "}":
                depth -= 1
                if depth == 0:
                    return text[start + len("\\boxed{") : i].strip()
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier box
    return None


def reference_number(reference: Optional[str]) -> Optional[Decimal]:
    """The number a reference stands for: its ``\\boxed{}``, else its ``####`` answer,
    else the whole text if it is a number, else its last number."""
    if reference is None:
        return None
    for candidate in (boxed(reference), hash_answer(reference), reference, last_number(reference)):
        value = parse_number(candidate) if candidate is not None else None
        if value is None and candidate is not None and candidate is not reference:
            value = parse_number(last_number(candidate))
        if value is not None:
            return value
    return None


def numbers_equal(a: Optional[Decimal], b: Optional[Decimal]) -> bool:
    """Equal as numbers (exactly, or within 1e-9 for values that went through floats); None never matches."""
    if a is None or b is None:
        return False
    if a == b:
        return True
    return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=1e-9)


def exact_match(answer: str, row: dict) -> float:
    """1.0 when the answer equals the reference after normalize_text (case, spaces, trailing period)."""
    reference = reference_of(row)
    if reference is None or answer is None:
        return 0.0
    return float(normalize_text(answer) == normalize_text(reference))


def number_match(answer: str, row: dict) -> float:
    """1.0 when the answer's last number equals the reference's number."""
    return float(numbers_equal(parse_number(last_number(answer)), reference_number(reference_of(row))))


def gsm8k_match(answer: str, row: dict) -> float:
    """1.0 when the number after the answer's "####" equals the reference's number (GSM8K's format)."""
    found = hash_answer(answer)
    # "#### 72 apples" still counts: take the first number after the marker.
    value = parse_number(found) if found is not None else None
    if value is None and found is not None:
        numbers = _NUMBER.findall(found.translate(_MINUS))
        value = parse_number(numbers[0]) if numbers else None
    return float(numbers_equal(value, reference_number(reference_of(row))))


def boxed_match(answer: str, row: dict) -> float:
    """1.0 when the answer's last \\boxed{...} equals the reference (as numbers when both parse)."""
    content = boxed(answer)
    reference = reference_of(row)
    if content is None or reference is None:
        return 0.0
    target = boxed(reference) or hash_answer(reference) or reference
    a, b = parse_number(content), parse_number(target)
    if b is None:
        b = reference_number(reference)
    if a is not None and b is not None:
        return float(numbers_equal(a, b))
    return float(normalize_text(content) == normalize_text(target))


BUILTIN: Dict[str, Scorer] = {
    "exact": exact_match,
    "number": number_match,
    "gsm8k": gsm8k_match,
    "boxed": boxed_match,
}


@lru_cache(maxsize=None)
def _reasoning_gym_checker(task: str) -> Callable:
    try:
        import reasoning_gym
    except ImportError:
        raise UserError(
            "the reasoning_gym scorer needs the reasoning-gym package: pip install 'gmt-mlx[tasks]'"
        ) from None
    try:
        return reasoning_gym.get_score_answer_fn(task)
    except (ValueError, KeyError):
        raise UserError(f"reasoning-gym has no task {task!r}") from None


def reasoning_gym_scorer(task: Optional[str] = None) -> Scorer:
    """The reasoning-gym checker of ``task`` (default: each row's metadata.source_dataset)."""
    if task:
        _reasoning_gym_checker(task)  # unknown task or missing package: fail before generating

    def score(answer: str, row: dict) -> float:
        metadata = row.get("metadata") if isinstance(row.get("metadata"), dict) else {}
        name = task or metadata.get("source_dataset")
        if not name:
            raise UserError(
                "reasoning_gym scorer: the row has no metadata.source_dataset; name the task "
                "as --scorer reasoning_gym:TASK"
            )
        checker = _reasoning_gym_checker(name)
        entry = {"question": row.get("question", ""), "answer": reference_of(row), "metadata": metadata}
        try:
            value = float(checker(answer if isinstance(answer, str) else None, entry))
        except Exception:  # a task checker choking on a malformed answer is a wrong answer
            return 0.0
        return min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0

    return score


def import_function(spec: str, option: str) -> Callable:
    """The function named by ``spec`` ("package.module:function"); a one-line UserError naming
    ``option`` (e.g. "--scorer") when the module cannot be imported or has no such function.

    A module that fails while importing (a syntax error, an exception at its top level)
    is reported the same way, by its error's first line, not by a traceback.
    """
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or the user's module failing as it runs
        detail = (str(err).strip().splitlines() or [""])[0][:300]
        reason = detail if isinstance(err, ImportError) else f"{type(err).__name__}: {detail}"
        raise UserError(f"{option} {spec}: cannot import {module_name} ({reason})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise UserError(f"{option} {spec}: {module_name} has no function {attr!r}")
    return fn


def _import_hook(spec: str) -> Scorer:
    fn = import_function(spec, "--scorer")

    def score(answer: str, row: dict) -> float:
        value = fn(answer, row)
        return float(value) if value is not None else 0.0

    return score


def get_scorer(name: str) -> Scorer:
    """Look a scorer up by name (see the module docstring); UserError for an unknown one."""
    name = name.strip()
    if name in BUILTIN:
        return BUILTIN[name]
    if name == "reasoning_gym" or name.startswith("reasoning_gym:"):
        return reasoning_gym_scorer(name.partition(":")[2] or None)
    if ":" in name and all(part.strip() for part in name.split(":", 1)):
        return _import_hook(name)
    known = ", ".join([*BUILTIN, "reasoning_gym[:TASK]", "module:function"])
    raise UserError(f"unknown scorer {name!r} (expected one of {known})")


def parse_scorers(names: str | list) -> list:
    """Split "number,reasoning_gym" (or a list) into scorer names, checking each."""
    items = names if isinstance(names, (list, tuple)) else str(names).split(",")
    out = [n.strip() for n in items if n and n.strip()]
    if not out:
        raise UserError("--scorer needs at least one scorer name")
    for name in out:
        get_scorer(name)
    return out
