"""GRPO rewards (objectives/grpo/rewards.py): --reward and --reward-weights, row checks, scoring, metrics."""

from __future__ import annotations

import itertools
import math
import statistics

import pytest

from gmt_mlx import config
from gmt_mlx.data import scorers as sc
from gmt_mlx.errors import UserError
from gmt_mlx.objectives.grpo import rewards as rw

CHOICES = "exact, number, gsm8k, boxed, reasoning_gym[:TASK], format, module:function"
_names = itertools.count()

USER_MODULE = """
import math

calls = []

def reward(prompt, completion, row):
    calls.append((prompt, completion, row))
    return len(completion) / 10

def as_bool(prompt, completion, row):
    return completion == row["answer"]

def as_int(prompt, completion, row):
    return 3

def as_numpy(prompt, completion, row):
    import numpy
    return numpy.float32(0.25)

def with_defaults(prompt, completion, row, scale=2.0, *rest, **options):
    return scale

def raises(prompt, completion, row):
    raise ValueError("no digits in " + completion + "\\nsecond line")

def raises_bare(prompt, completion, row):
    raise KeyError

def returns_none(prompt, completion, row):
    return None

def returns_text(prompt, completion, row):
    return "0.5"

def returns_list(prompt, completion, row):
    return [1, 2]

def returns_nan(prompt, completion, row):
    return math.nan

def returns_inf(prompt, completion, row):
    return -math.inf

def scorer_style(answer, row):
    return 1.0

not_a_function = 3
"""


@pytest.fixture()
def user_module(tmp_path, monkeypatch) -> str:
    """A user's reward module written to tmp_path and importable by name (a fresh name per test)."""
    name = f"user_rewards_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


def message(excinfo) -> str:
    text = str(excinfo.value)
    assert "\n" not in text
    return text


# ---- --reward and --reward-weights ------------------------------------------------------


def test_parse_rewards_names_weights_and_kinds():
    rewards = rw.parse_rewards(" number , format,exact,, ")
    assert rewards.names == ["number", "format", "exact"]
    assert rewards.weights == [1.0, 1.0, 1.0]
    assert [r.kind for r in rewards.rewards] == ["scorer", "format", "scorer"]
    assert rw.parse_rewards("gsm8k,boxed", " 2, -0.5 ").weights == [2.0, -0.5]
    assert rw.parse_rewards("number", "").weights == [1.0]
    assert rw.parse_rewards("number", "1e-1").weights == [0.1]
    assert rewards.needs_answer and not rw.parse_rewards("format").needs_answer


def test_choice_names_are_configs():
    assert rw.FORMAT is config.REWARD_EXTRAS[0] and rw.reward_choices() == CHOICES
    assert set(config.REWARD_EXTRAS).isdisjoint(sc.BUILTIN)


@pytest.mark.parametrize(
    "spec,weights,expected",
    [
        ("bogus", None, f"unknown reward 'bogus' (expected one of {CHOICES})"),
        ("number,Format", None, f"unknown reward 'Format' (expected one of {CHOICES})"),
        ("number,:f", None, f"unknown reward ':f' (expected one of {CHOICES})"),
        ("bogus", "1,2", f"unknown reward 'bogus' (expected one of {CHOICES})"),  # names before weights
        (" , ", None, f"--reward needs at least one reward name (one of {CHOICES})"),
        ("", None, f"--reward needs at least one reward name (one of {CHOICES})"),
        ("number,format,number", None, "--reward names number twice (give it one larger weight with --reward-weights)"),
        ("number,format", "1", "--reward-weights has 1 weight but --reward names 2 rewards (number, format)"),
        ("number", "1,2", "--reward-weights has 2 weights but --reward names 1 reward (number)"),
        (
            "number,format",
            "1,abc",
            "--reward-weights: 'abc' is not a number (one number per --reward, comma-separated, e.g. 1,0.5)",
        ),
        (
            "number,format",
            "1,,",
            "--reward-weights: '' is not a number (one number per --reward, comma-separated, e.g. 1,0.5)",
        ),
        (
            "number",
            "nan",
            "--reward-weights: 'nan' is not a number (one number per --reward, comma-separated, e.g. 1,0.5)",
        ),
        (
            "number",
            "inf",
            "--reward-weights: 'inf' is not a number (one number per --reward, comma-separated, e.g. 1,0.5)",
        ),
        (
            "number,format",
            "0, 0.0",
            "--reward-weights are all 0: every completion would get reward 0 and nothing would be learned",
        ),
        ("reasoning_gym:not_a_task", None, "reasoning-gym has no task 'not_a_task'"),
    ],
)
def test_parse_rewards_refuses(spec, weights, expected):
    if "reasoning_gym" in spec:
        pytest.importorskip("reasoning_gym")
    with pytest.raises(UserError) as excinfo:
        rw.parse_rewards(spec, weights)
    assert message(excinfo) == expected


def test_user_function_is_imported_and_checked(user_module):
    rewards = rw.parse_rewards(f"{user_module}:reward,{user_module}:with_defaults")
    assert [r.kind for r in rewards.rewards] == ["user", "user"]
    with pytest.raises(UserError) as excinfo:
        rw.parse_rewards(f"{user_module}:scorer_style")
    assert message(excinfo) == (
        f"--reward {user_module}:scorer_style: the function must take "
        f"(prompt, completion, row), but takes (answer, row)"
    )
    with pytest.raises(UserError) as excinfo:
        rw.parse_rewards(f"number,{user_module}:nothing_here")
    assert message(excinfo) == f"--reward {user_module}:nothing_here: {user_module} has no function 'nothing_here'"
    with pytest.raises(UserError) as excinfo:
        rw.parse_rewards(f"{user_module}:not_a_function")
    assert message(excinfo) == f"--reward {user_module}:not_a_function: {user_module} has no function 'not_a_function'"
    with pytest.raises(UserError) as excinfo:
        rw.parse_rewards("no_such_module_xyz:f")
    assert (
        message(excinfo)
        == "--reward no_such_module_xyz:f: cannot import no_such_module_xyz (No module named 'no_such_module_xyz')"
    )


def test_a_user_module_that_fails_to_import_is_one_line(tmp_path, monkeypatch):
    (tmp_path / "broken_reward_syntax.py").write_text("def reward(prompt, completion, row)\n    return 1\n")
    (tmp_path / "broken_reward_raises.py").write_text("raise RuntimeError('needs an API key\\nset KEY')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as excinfo:
        rw.parse_rewards("broken_reward_syntax:reward")
    assert message(excinfo).startswith(
        "--reward broken_reward_syntax:reward: cannot import broken_reward_syntax (SyntaxError: "
    )
    with pytest.raises(UserError) as excinfo:
        rw.parse_rewards("broken_reward_raises:reward")
    assert message(excinfo) == (
        "--reward broken_reward_raises:reward: cannot import broken_reward_raises (RuntimeError: needs an API key)"
    )
    with pytest.raises(UserError) as excinfo:  # the scorer hooks share the helper, and say --scorer
        sc.get_scorer("broken_reward_raises:f")
    assert message(excinfo) == (
        "--scorer broken_reward_raises:f: cannot import broken_reward_raises (RuntimeError: needs an API key)"
    )


# ---- the format reward ------------------------------------------------------------------


@pytest.mark.parametrize(
    "completion,expected",
    [
        ("2 + 2 = 4, so \\boxed{4}", 1.0),
        ("so the answer is $\\boxed{4}$.\n", 1.0),
        ("\\[ \\boxed{\\frac{1}{2}} \\]", 1.0),
        ("**\\boxed{4}**", 1.0),
        ("steps...\n#### 72", 1.0),
        ("steps...\n#### 72 apples\n\n", 1.0),  # the gsm8k scorer reads that line too
        ("\\boxed{3} at first, but then #### 4", 1.0),  # the later marker is the final answer
        ("\\boxed{4} and then some more words", 0.5),
        ("#### 72\nLet me double-check that.", 0.5),
        ("\\boxed{4} and then \\boxed{}", 0.5),  # an empty box is no answer: the earlier one is, followed by text
        ("\\boxed{4} and then \\boxed{5", 0.5),  # cut off in a box
        ("the answer is 4", 0.0),
        ("\\boxed{}", 0.0),
        ("\\boxed{  }.", 0.0),
        ("####\n", 0.0),
        ("\\boxed{4", 0.0),
        ("", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward(completion, expected):
    assert rw.format_reward("q?", completion, {}) == expected


# ---- checking rows ----------------------------------------------------------------------


def test_check_rows_needs_an_answer_for_answer_rewards():
    rows = [{"prompt": "a", "answer": "4"}, {"prompt": "b", "answer": 7}, {"prompt": "c"}, {"prompt": "d"}]
    rewards = rw.parse_rewards("format,number")
    with pytest.raises(UserError) as excinfo:
        rewards.check_rows(rows, "data/train.jsonl")
    assert message(excinfo) == (
        'data/train.jsonl, row 3: no answer, which --reward number needs (an "answer" '
        "field holding a string or a number; --columns SOURCE=answer renames a column to it)"
    )
    for bad in (
        {"prompt": "x", "answer": "  "},
        {"prompt": "x", "answer": True},
        {"prompt": "x", "answer": None},
        {"prompt": "x", "answer": float("nan")},
        {"prompt": "x", "answer": ["4"]},
        "not a row",
    ):
        with pytest.raises(UserError) as excinfo:
            rw.parse_rewards("exact").check_rows([bad])
        assert message(excinfo) == (
            'row 1: no answer, which --reward exact needs (an "answer" field holding a '
            "string or a number; --columns SOURCE=answer renames a column to it)"
        )
    rewards.check_rows(rows[:2] + [{"prompt": "e", "answer": 10**400}], "data/train.jsonl")
    rw.parse_rewards("format").check_rows(rows)  # no reward here needs an answer


def test_check_rows_user_rewards_need_nothing(user_module):
    rw.parse_rewards(f"{user_module}:reward").check_rows([{"prompt": "no answer"}])


def test_check_rows_reasoning_gym():
    pytest.importorskip("reasoning_gym")
    good = {"prompt": "4 - 1 =", "answer": "3", "metadata": {"source_dataset": "chain_sum"}}
    no_answer = {"prompt": "p", "metadata": {"source_dataset": "chain_sum"}}  # tasks that check from metadata
    rw.parse_rewards("reasoning_gym").check_rows([good, no_answer])
    with pytest.raises(UserError) as excinfo:
        rw.parse_rewards("reasoning_gym").check_rows([good, {"prompt": "p", "answer": "3"}], "rg.jsonl")
    assert message(excinfo) == (
        "rg.jsonl, row 2: no metadata.source_dataset, which --reward reasoning_gym needs "
        "to pick the task's checker (or name the task: --reward reasoning_gym:TASK)"
    )
    with pytest.raises(UserError) as excinfo:
        rw.parse_rewards("reasoning_gym").check_rows(
            [good, {**good, "metadata": {"source_dataset": "nope"}}], "rg.jsonl"
        )
    assert message(excinfo) == "rg.jsonl, row 2: reasoning-gym has no task 'nope'"
    named = rw.parse_rewards("reasoning_gym:chain_sum")
    named.check_rows([{"prompt": "p", "answer": "3"}, no_answer])
    with pytest.raises(UserError) as excinfo:
        named.check_rows([{"prompt": "p"}])
    assert message(excinfo) == "row 1: no answer and no metadata, which --reward reasoning_gym:chain_sum needs"


# ---- scoring ----------------------------------------------------------------------------


def test_score_sums_weighted_rewards():
    row = {"prompt": "What is 2 + 2?", "answer": "4"}
    rewards = rw.parse_rewards("number,format,exact", "1,0.5,-0.25")
    assert rewards.score("q", "2 + 2 = \\boxed{4}", row, 0) == (1.5, {"number": 1.0, "format": 1.0, "exact": 0.0})
    assert rewards.score("q", "4", row, 0) == (0.75, {"number": 1.0, "format": 0.0, "exact": 1.0})
    assert rewards.score("q", "\\boxed{5} I think", row, 0) == (0.25, {"number": 0.0, "format": 0.5, "exact": 0.0})
    total, values = rw.parse_rewards("gsm8k,boxed", "0.1,0.2").score("q", "#### 4", row, 0)
    assert values == {"gsm8k": 1.0, "boxed": 0.0} and total == 0.1


def test_score_reasoning_gym():
    pytest.importorskip("reasoning_gym")
    row = {"prompt": "4 - 1 =", "answer": "3", "metadata": {"source_dataset": "chain_sum", "expression": "4 - 1"}}
    rewards = rw.parse_rewards("reasoning_gym,format", "1,0.1")
    assert rewards.score(row["prompt"], "3", row, 0) == (1.0, {"reasoning_gym": 1.0, "format": 0.0})
    with pytest.raises(UserError) as excinfo:  # a row check_rows would have refused
        rewards.score("p", "3", {"prompt": "p", "answer": "3"}, 4, "rg.jsonl")
    assert message(excinfo) == (
        "rg.jsonl, row 5: reasoning_gym scorer: the row has no metadata.source_dataset; "
        "name the task as --scorer reasoning_gym:TASK"
    )


def test_score_calls_the_user_function(user_module):
    import importlib

    module = importlib.import_module(user_module)
    row = {"messages": [{"role": "user", "content": "hi"}], "answer": "abc"}
    rewards = rw.parse_rewards(
        f"{user_module}:reward,{user_module}:as_bool,{user_module}:as_int,"
        f"{user_module}:with_defaults,{user_module}:as_numpy",
        "2,1,0.5,1,4",
    )
    total, values = rewards.score(row["messages"], "abc", row, 0)
    assert module.calls == [(row["messages"], "abc", row)]
    assert values == {
        f"{user_module}:reward": 0.3,
        f"{user_module}:as_bool": 1.0,
        f"{user_module}:as_int": 3.0,
        f"{user_module}:with_defaults": 2.0,
        f"{user_module}:as_numpy": 0.25,
    }
    assert total == pytest.approx(2 * 0.3 + 1.0 + 1.5 + 2.0 + 1.0)
    assert all(type(v) is float for v in values.values())
    assert rewards.score("p", "abcd", row, 1)[1][f"{user_module}:as_bool"] == 0.0


@pytest.mark.parametrize(
    "function,expected",
    [
        ("raises", "data/train.jsonl, row 3: --reward {m}:raises raised ValueError: no digits in 12"),
        ("raises_bare", "data/train.jsonl, row 3: --reward {m}:raises_bare raised KeyError"),
        ("returns_none", "data/train.jsonl, row 3: --reward {m}:returns_none returned None, not a number"),
        ("returns_text", "data/train.jsonl, row 3: --reward {m}:returns_text returned '0.5' (a str), not a number"),
        ("returns_list", "data/train.jsonl, row 3: --reward {m}:returns_list returned [1, 2] (a list), not a number"),
        ("returns_nan", "data/train.jsonl, row 3: --reward {m}:returns_nan returned nan, not a finite number"),
        ("returns_inf", "data/train.jsonl, row 3: --reward {m}:returns_inf returned -inf, not a finite number"),
    ],
)
def test_a_bad_user_reward_is_one_line_naming_the_row(user_module, function, expected):
    rewards = rw.parse_rewards(f"format,{user_module}:{function}")
    with pytest.raises(UserError) as excinfo:
        rewards.score("p", "12", {"prompt": "p"}, 2, "data/train.jsonl")
    assert message(excinfo) == expected.format(m=user_module)
    with pytest.raises(UserError) as excinfo:
        rewards.score("p", "12", {"prompt": "p"}, 0)
    assert message(excinfo).startswith(f"row 1: --reward {user_module}:{function} ")


def test_a_long_returned_value_is_cut(tmp_path, monkeypatch):
    (tmp_path / "long_reward.py").write_text("def reward(p, c, r):\n    return {'k': 'v' * 100}\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(UserError) as excinfo:
        rw.parse_rewards("long_reward:reward").score("p", "c", {}, 0)
    shown = repr({"k": "v" * 100})[:57]
    assert message(excinfo) == f"row 1: --reward long_reward:reward returned {shown}... (a dict), not a number"


# ---- metrics ----------------------------------------------------------------------------


def test_reward_stats():
    rewards = rw.parse_rewards("number,format", "1,0.5")
    row = {"answer": "4"}
    completions = [
        "\\boxed{4}",
        "\\boxed{4}",  # group 1: all equal
        "4",
        "\\boxed{5} hmm",  # group 2: 1.0 and 0.25
        "no",
        "none",
    ]  # group 3: all 0
    scores = [rewards.score("q", c, row, i // 2) for i, c in enumerate(completions)]
    totals = [1.5, 1.5, 1.0, 0.25, 0.0, 0.0]
    assert [t for t, _ in scores] == totals
    stats = rw.reward_stats(scores, 2)
    number, fmt = [1, 1, 1, 0, 0, 0], [1, 1, 0, 0.5, 0, 0]
    expected = {
        "reward": statistics.mean(totals),
        "reward_std": statistics.stdev(totals),
        "rewards/number/mean": 0.5,
        "rewards/number/std": statistics.stdev(number),
        "rewards/format/mean": statistics.mean(fmt),
        "rewards/format/std": statistics.stdev(fmt),
        "frac_reward_zero_std": 2 / 3,
    }
    assert stats.keys() == expected.keys()
    assert stats == pytest.approx(expected, rel=1e-12)
    assert rw.reward_stats(scores, 3)["frac_reward_zero_std"] == 0.0
    assert rw.reward_stats(scores, 6)["frac_reward_zero_std"] == 0.0
    assert rw.reward_stats(scores[:2] + scores[4:], 2)["frac_reward_zero_std"] == 1.0


def test_reward_stats_equal_groups_are_equal_totals_not_equal_parts():
    # (1, 0) and (0, 1) under equal weights total 1 each: no advantage to learn from, though the parts differ
    scores = [
        (1.0, {"a": 1.0, "b": 0.0}),
        (1.0, {"a": 0.0, "b": 1.0}),
        (0.5 + 1e-12, {"a": 0.5, "b": 0.0}),
        (0.5, {"a": 0.5, "b": 0.0}),
    ]
    stats = rw.reward_stats(scores, 2)
    assert stats["frac_reward_zero_std"] == 1.0 and stats["reward_std"] > 0
    assert stats["rewards/a/std"] == pytest.approx(statistics.stdev([1, 0, 0.5, 0.5]))
    assert rw.reward_stats([(2.0, {"a": 2.0})] * 2, 2) == {
        "reward": 2.0,
        "reward_std": 0.0,
        "rewards/a/mean": 2.0,
        "rewards/a/std": 0.0,
        "frac_reward_zero_std": 1.0,
    }


@pytest.mark.parametrize("count,group_size", [(3, 2), (0, 2), (4, 0)])
def test_reward_stats_needs_whole_groups(count, group_size):
    with pytest.raises(ValueError, match=f"^{count} scores do not split into groups of {group_size}$"):
        rw.reward_stats([(0.0, {"a": 0.0})] * count, group_size)


def test_sample_std_is_bessel_corrected():
    assert rw._sample_std([1.0, 0.0]) == pytest.approx(math.sqrt(0.5))
    assert rw._sample_std([3.0]) == 0.0
