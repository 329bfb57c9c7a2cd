"""Rewards for online RL (``--train-mode grpo``): (prompt, completion, row) -> a number.

``--reward`` names one or more rewards, comma-separated, and ``--reward-weights``
one weight each (default 1); a completion's reward is the weighted sum, and each
reward's own (unweighted) value is kept for the metrics. A reward is:

- any scorer of `scorers.py` (``exact``, ``number``, ``gsm8k``, ``boxed``,
  ``reasoning_gym[:TASK]``): the completion scored against the row, in [0, 1].
  ``exact``/``number``/``gsm8k``/``boxed`` need the row's ``answer`` (a string or
  number); ``reasoning_gym`` needs an answer or ``metadata`` (some tasks check from
  metadata alone), and without ``:TASK`` the row's ``metadata.source_dataset``.
  `RewardSet.check_rows` refuses a file missing them before any generation.
- ``format`` (config.REWARD_EXTRAS), see `format_reward`: 1 when the completion
  ends on a final answer written as ``\\boxed{...}`` or ``#### ...``, 0.5 when it
  writes one but goes on after it, 0 when it writes none.
- ``package.module:function``: the user's ``f(prompt, completion, row) -> float``,
  imported as ``--scorer`` hooks are (`scorers.import_function`). It gets the
  prompt as the caller has it (a string, or the chat's messages), the completion's
  text and the data row. It may return any finite number, or a bool (True = 1.0,
  as scorer hooks may). Anything else stops the run with one line naming the row
  and the function: an exception, None (a silent 0 would train on a reward the
  function never gave), a string, NaN or an infinity (one NaN turns its whole
  group's advantages into NaN).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from gmt_mlx.config import REWARD_EXTRAS
from gmt_mlx.data.scorers import BUILTIN, get_scorer, import_function, reasoning_gym_scorer
from gmt_mlx.errors import UserError

RewardFn = Callable[[Any, str, dict], Any]
Scores = Tuple[float, Dict[str, float]]

FORMAT = REWARD_EXTRAS[0]
# A group's rewards count as all equal when their sample std is within this of 0 (TRL's
# frac_reward_zero_std: torch.isclose(std, 0), whose absolute tolerance is 1e-8).
ZERO_STD = 1e-8

_BOX = "\\boxed{"
# The gsm8k scorer's marker, read the same way (scorers.hash_answer): the rest of the line after "####".
_HASHES = re.compile(r"####\s*([^\n]*)")
# What may follow the final answer and still end on it: spaces, a period, and closers of math
# or emphasis around the answer ("$\boxed{4}$.", "\[ \boxed{4} \]", "**\boxed{4}**").
_CLEAN_TAIL = re.compile(r"(?:\s|\.|\$|\\\]|\\\)|\*)*")


def _last_box_end(text: str) -> Optional[int]:
    """The index just past the last balanced ``\\boxed{...}`` with something in it, else None."""
    start = text.rfind(_BOX)
    while start != -1:
        depth = 0
        for i in range(start + len(_BOX) - 1, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                if text[start + len(_BOX) : i].strip():
                    return i + 1
                break
        start = text.rfind(_BOX, 0, start)
    return None


def _last_hash_end(text: str) -> Optional[int]:
    """The index just past the last ``#### answer`` line (a marker with something after it), else None."""
    found = [m for m in _HASHES.finditer(text)]
    return found[-1].end() if found and found[-1].group(1).strip() else None


def format_reward(prompt: Any, completion: str, row: dict) -> float:
    """1.0 when the completion ends on a final answer, 0.5 when it has one but goes on, else 0.0.

    A final answer is what the project's scorers read as one: the last
    ``\\boxed{...}`` (the boxed scorer) or the last ``#### ...`` line (the gsm8k
    scorer). After it only whitespace, a period and closing ``$``, ``\\]``,
    ``\\)`` or ``*`` may follow. Why this shape: it is the one the correctness
    rewards and ``eval --scorer boxed|gsm8k`` read, so the two rewards pull the
    same way (a ``<answer>`` tag, TRL's examples' format, is read by no scorer
    here); text after the answer is what makes ``number`` (the last number)
    read the wrong one; and a completion cut off by the token limit rarely ends
    on a closed answer, so it is marked down with no need to know why generation
    stopped. The 0.5 step rewards marking an answer before stopping after it.
    The completion should be decoded without special tokens (no EOS text).
    """
    text = completion if isinstance(completion, str) else ""
    ends = [end for end in (_last_box_end(text), _last_hash_end(text)) if end is not None]
    if not ends:
        return 0.0
    return 1.0 if _CLEAN_TAIL.fullmatch(text[max(ends) :]) else 0.5


@dataclass(frozen=True)
class Reward:
    """One named reward: ``fn(prompt, completion, row)``; ``kind`` is scorer, reasoning_gym, format or user."""

    name: str
    weight: float
    fn: RewardFn
    kind: str


def _where(where: Optional[str], index: int) -> str:
    """How a message names a row: "FILE, row N" (N 1-based), or "row N"."""
    return f"{where}, row {index + 1}" if where else f"row {index + 1}"


def _has_answer(row: dict) -> bool:
    answer = row.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, (str, int, float)):
        return False
    if isinstance(answer, str):
        return bool(answer.strip())
    return isinstance(answer, int) or math.isfinite(answer)  # an int may be too large for a float


def _shown(value: Any) -> str:
    """A returned value as one short line: its repr and type."""
    text = " ".join(repr(value).split())
    text = text if len(text) <= 60 else text[:57] + "..."
    return text if value is None else f"{text} (a {type(value).__name__})"


def _as_number(value: Any) -> Optional[float]:
    """A user reward's value as a float (bools count 1/0), or None when it is not a number."""
    if value is None or isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _first_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0][:300]
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


@dataclass(frozen=True)
class RewardSet:
    """The rewards of a run, in ``--reward``'s order, with their weights."""

    rewards: Tuple[Reward, ...]

    @property
    def names(self) -> List[str]:
        return [r.name for r in self.rewards]

    @property
    def weights(self) -> List[float]:
        return [r.weight for r in self.rewards]

    @property
    def needs_answer(self) -> bool:
        """Whether a reward here scores against the row's ``answer`` (exact, number, gsm8k, boxed)."""
        return any(r.kind == "scorer" for r in self.rewards)

    def check_rows(self, rows: Sequence[dict], where: Optional[str] = None) -> None:
        """Refuse, before any generation, the first row a reward cannot score (one line, row 1-based)."""
        tasks: Dict[str, int] = {}
        for index, row in enumerate(rows):
            row = row if isinstance(row, dict) else {}
            for reward in self.rewards:
                missing = _missing(reward, row)
                if missing:
                    raise UserError(f"{_where(where, index)}: {missing}")
                if reward.kind == "reasoning_gym" and ":" not in reward.name:
                    tasks.setdefault(row["metadata"]["source_dataset"], index)
        for task, index in tasks.items():  # each task's checker exists (and reasoning-gym is installed)
            try:
                reasoning_gym_scorer(task)
            except UserError as err:
                raise UserError(f"{_where(where, index)}: {err}") from None

    def score(self, prompt: Any, completion: str, row: dict, index: int, where: Optional[str] = None) -> Scores:
        """(weighted total, {name: unweighted value}) of one completion of the row at ``index`` (0-based)."""
        values: Dict[str, float] = {}
        for reward in self.rewards:
            values[reward.name] = _call(reward, prompt, completion, row, _where(where, index))
        return math.fsum(r.weight * values[r.name] for r in self.rewards), values


def _missing(reward: Reward, row: dict) -> Optional[str]:
    """What ``row`` lacks for ``reward``, as the end of a message; None when nothing."""
    flag = f"--reward {reward.name}"
    if reward.kind == "scorer" and not _has_answer(row):
        return (
            f'no answer, which {flag} needs (an "answer" field holding a string or a number; '
            f"--columns SOURCE=answer renames a column to it)"
        )
    if reward.kind != "reasoning_gym":
        return None
    metadata = row.get("metadata")
    if ":" not in reward.name and not (
        isinstance(metadata, dict)
        and isinstance(metadata.get("source_dataset"), str)
        and metadata["source_dataset"].strip()
    ):
        return (
            f"no metadata.source_dataset, which {flag} needs to pick the task's checker "
            f"(or name the task: --reward reasoning_gym:TASK)"
        )
    if not _has_answer(row) and not isinstance(metadata, dict):
        return f"no answer and no metadata, which {flag} needs"
    return None


def _call(reward: Reward, prompt: Any, completion: str, row: dict, where: str) -> float:
    """One reward's value; a user function's failure or non-number is a one-line UserError naming the row."""
    if reward.kind != "user":
        try:
            return float(reward.fn(prompt, completion, row))
        except UserError as err:  # e.g. reasoning_gym without a task for this row
            raise UserError(f"{where}: {err}") from None
    try:
        value = reward.fn(prompt, completion, row)
    except (Exception, SystemExit) as err:  # sys.exit() in a reward must not end the run silently with its code
        raise UserError(f"{where}: --reward {reward.name} raised {_first_line(err)}") from err
    number = _as_number(value)
    if number is None:
        raise UserError(f"{where}: --reward {reward.name} returned {_shown(value)}, not a number")
    if not math.isfinite(number):
        raise UserError(f"{where}: --reward {reward.name} returned {number}, not a finite number")
    return number


def reward_choices() -> str:
    """The names --reward takes, for help and error messages."""
    return ", ".join([*BUILTIN, "reasoning_gym[:TASK]", *REWARD_EXTRAS, "module:function"])


def _user_function(spec: str) -> RewardFn:
    """The user's reward ``module:function``, checked to take (prompt, completion, row)."""
    fn = import_function(spec, "--reward")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # a builtin with no readable signature: the first call will tell
        return fn
    try:
        signature.bind(None, None, None)
    except TypeError:
        raise UserError(
            f"--reward {spec}: the function must take (prompt, completion, row), but takes {signature}"
        ) from None
    return fn


def _scorer_reward(scorer: Callable[[str, dict], float]) -> RewardFn:
    return lambda prompt, completion, row: scorer(completion, row)


def get_reward(name: str, weight: float = 1.0) -> Reward:
    """The reward called ``name`` (see the module docstring); UserError for an unknown one."""
    if name == FORMAT:
        return Reward(name, weight, format_reward, "format")
    if name == "reasoning_gym" or name.startswith("reasoning_gym:"):
        return Reward(name, weight, _scorer_reward(get_scorer(name)), "reasoning_gym")
    if name in BUILTIN:
        return Reward(name, weight, _scorer_reward(get_scorer(name)), "scorer")
    if ":" in name and all(part.strip() for part in name.split(":", 1)):
        return Reward(name, weight, _user_function(name), "user")
    raise UserError(f"unknown reward {name!r} (expected one of {reward_choices()})")


def parse_weights(weights: Optional[str], names: Sequence[str]) -> List[float]:
    """``--reward-weights`` ("1,0.5") as one finite number per reward name; None: 1 each."""
    if weights is None or not str(weights).strip():
        return [1.0] * len(names)
    out = []
    for item in str(weights).split(","):
        try:
            value = float(item.strip())
        except ValueError:
            value = math.nan
        if not math.isfinite(value):
            raise UserError(
                f"--reward-weights: {item.strip()!r} is not a number "
                f"(one number per --reward, comma-separated, e.g. 1,0.5)"
            )
        out.append(value)
    if len(out) != len(names):
        rewards = f"{len(names)} reward{'s' * (len(names) != 1)}"
        raise UserError(
            f"--reward-weights has {len(out)} weight{'s' * (len(out) != 1)} "
            f"but --reward names {rewards} ({', '.join(names)})"
        )
    if not any(out):
        raise UserError("--reward-weights are all 0: every completion would get reward 0 and nothing would be learned")
    return out


def parse_rewards(spec: str, weights: Optional[str] = None) -> RewardSet:
    """``--reward`` ("number,format") and ``--reward-weights`` ("1,0.5") as a RewardSet, each name checked."""
    names = [n.strip() for n in str(spec or "").split(",") if n.strip()]
    if not names:
        raise UserError(f"--reward needs at least one reward name (one of {reward_choices()})")
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UserError(f"--reward names {twice[0]} twice (give it one larger weight with --reward-weights)")
    rewards = [get_reward(name) for name in names]  # unknown names first: the weights are about them
    values = parse_weights(weights, names)
    return RewardSet(tuple(dataclasses.replace(r, weight=w) for r, w in zip(rewards, values)))


def _mean(values: Sequence[float]) -> float:
    return math.fsum(values) / len(values)


def _sample_std(values: Sequence[float]) -> float:
    """Standard deviation with Bessel's correction (n - 1), as TRL's nanstd; 0 for fewer than two values."""
    if len(values) < 2:
        return 0.0
    mean = _mean(values)
    return math.sqrt(math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1))


def reward_stats(scores: Sequence[Scores], group_size: int) -> Dict[str, float]:
    """The reward metrics of a batch of `RewardSet.score` results, named as TRL logs them.

    ``scores`` holds groups of ``group_size`` consecutive completions of one prompt.
    ``reward``/``reward_std``: mean and sample std of the weighted totals;
    ``rewards/NAME/mean`` and ``/std``: the same of each reward's own values;
    ``frac_reward_zero_std``: the share of groups whose totals are all equal (sample
    std within ZERO_STD of 0), which get zero advantage and teach nothing.
    """
    if group_size < 1 or not scores or len(scores) % group_size:
        raise ValueError(f"{len(scores)} scores do not split into groups of {group_size}")
    totals = [float(total) for total, _ in scores]
    stats = {"reward": _mean(totals), "reward_std": _sample_std(totals)}
    for name in scores[0][1]:
        values = [float(per_reward[name]) for _, per_reward in scores]
        stats[f"rewards/{name}/mean"] = _mean(values)
        stats[f"rewards/{name}/std"] = _sample_std(values)
    groups = [totals[i : i + group_size] for i in range(0, len(totals), group_size)]
    stats["frac_reward_zero_std"] = sum(_sample_std(g) <= ZERO_STD for g in groups) / len(groups)
    return stats
