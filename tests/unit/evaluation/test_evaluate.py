"""Scorers (including malformed model answers), batched generation, `evaluate` and `gmt-mlx eval`."""

from __future__ import annotations

import json

import pytest

from gmt_mlx.cli import app
from gmt_mlx.data import scorers as sc
from gmt_mlx.errors import UserError
from tests.helpers import runner


def chat_row(reply: str, **extra) -> dict:
    return {"messages": [{"role": "user", "content": "q?"}, {"role": "assistant", "content": reply}], **extra}


# ---- extraction ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text,expected",
    [
        ("The answer is 17.", "17"),
        ("12 + 5 = 17", "17"),
        ("5 - 9 = -4", "-4"),
        ("12-5", "5"),  # a hyphen glued to a number is an operator, not a sign
        ("about 1,234 apples", "1,234"),
        ("pi is 3.14159", "3.14159"),
        ("\u22124 degrees", "-4"),  # unicode minus
        ("no digits here", None),
        ("", None),
        (None, None),
    ],
)
def test_last_number(text, expected):
    assert sc.last_number(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{1} then \\boxed{2", "1"),  # an unclosed last box falls back to the earlier one
        ("\\boxed{", None),
        ("boxed 42", None),
        (None, None),
    ],
)
def test_boxed(text, expected):
    assert sc.boxed(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("steps...\n#### 72", "72"),
        ("#### 1\n#### 2", "2"),
        ("####", None),
        ("#### \n", None),
        ("no marker 72", None),
    ],
)
def test_hash_answer(text, expected):
    assert sc.hash_answer(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("1,000", 1000),
        ("+01,000.00", 1000),
        ("$5", 5),
        ("-0.5", -0.5),
        ("7.", 7),
        ("NaN", None),
        ("Infinity", None),
        ("1/2", None),
        ("", None),
        ("abc", None),
        ("9" * 200, None),
    ],
)
def test_parse_number(text, expected):
    value = sc.parse_number(text)
    assert (value is None) if expected is None else (float(value) == expected)


# ---- scorers ---------------------------------------------------------------------------


def test_exact_match_normalizes_case_space_and_final_period():
    row = chat_row("Paris")
    assert sc.exact_match("  paris. ", row) == 1.0
    assert sc.exact_match("Paris is the answer", row) == 0.0
    assert sc.exact_match("", row) == 0.0
    assert sc.exact_match(None, row) == 0.0
    assert sc.exact_match("x", {"text": "no reference"}) == 0.0


def test_number_scorer_uses_the_references_number():
    assert sc.number_match("I think it is 19", chat_row("12 + 7 = 19.")) == 1.0
    assert sc.number_match("19.0", chat_row("19")) == 1.0
    assert sc.number_match("1,234", {"prompt": "p", "completion": "1234"}) == 1.0
    assert sc.number_match("19 or 20", chat_row("19")) == 0.0  # the last number counts
    assert sc.number_match("solution: #### 72", chat_row("work\n#### 72")) == 1.0
    # An explicit answer field wins over the assistant text.
    assert sc.number_match("5", chat_row("the result is five", answer="5")) == 1.0


@pytest.mark.parametrize("answer", ["", None, "???", "\\boxed{", "####", "1e999999", "-", "." * 500, "\x00\x01"])
def test_malformed_answers_score_zero_without_raising(answer):
    row = chat_row("#### 42", answer="42")
    for name in ("exact", "number", "gsm8k", "boxed"):
        assert sc.get_scorer(name)(answer, row) == 0.0, name


def test_gsm8k_and_boxed_scorers():
    row = chat_row("Natalia sold 72 clips.\n#### 72")
    assert sc.gsm8k_match("reasoning\n#### 72", row) == 1.0
    assert sc.gsm8k_match("#### 72 clips", row) == 1.0
    assert sc.gsm8k_match("72", row) == 0.0  # no marker
    assert sc.boxed_match("so \\boxed{72}", row) == 1.0
    assert sc.boxed_match("\\boxed{71}", row) == 0.0
    assert sc.boxed_match("\\boxed{x+1}", chat_row("\\boxed{x + 1}")) == 0.0
    assert sc.boxed_match("\\boxed{x + 1}", chat_row("\\boxed{X + 1}")) == 1.0


def my_checker(answer, row):  # used through --scorer tests.unit.evaluation.test_evaluate:my_checker
    return answer.strip() == row["answer"][::-1]


def test_scorer_lookup_and_hooks():
    hook = sc.get_scorer("tests.unit.evaluation.test_evaluate:my_checker")
    assert hook("cba", {"answer": "abc"}) == 1.0 and hook("abc", {"answer": "abc"}) == 0.0
    assert sc.parse_scorers("number, exact") == ["number", "exact"]
    with pytest.raises(UserError, match="unknown scorer 'bogus'"):
        sc.get_scorer("bogus")
    with pytest.raises(UserError, match="cannot import"):
        sc.get_scorer("no_such_module_xyz:f")
    with pytest.raises(UserError, match="has no function"):
        sc.get_scorer("tests.unit.evaluation.test_evaluate:nothing_here")
    with pytest.raises(UserError, match="at least one"):
        sc.parse_scorers(" , ")


def test_reasoning_gym_scorer():
    pytest.importorskip("reasoning_gym")
    row = chat_row("3", answer="3", metadata={"source_dataset": "chain_sum", "expression": "4 - 1"})
    score = sc.get_scorer("reasoning_gym")
    assert score("3", row) == 1.0
    assert score("+03.0", row) == 1.0  # the task's own tolerance
    assert 0 < score("the answer is 3", row) < 1  # and its partial credit
    for bad in ("", None, "four", "\\boxed{"):
        assert score(bad, row) == 0.0
    assert sc.get_scorer("reasoning_gym:chain_sum")("3", chat_row("3")) == 1.0
    with pytest.raises(UserError, match="no metadata.source_dataset"):
        score("3", chat_row("3"))
    with pytest.raises(UserError, match="no task 'not_a_task'"):
        sc.get_scorer("reasoning_gym:not_a_task")


# ---- generation and evaluate ---------------------------------------------------------------


def test_batched_generation_matches_one_at_a_time(tiny_model_dir):
    from gmt_mlx.evaluation.evaluate import generate_batch, generate_text
    from gmt_mlx.models.loading import load_base

    model, tokenizer, _, _ = load_base(str(tiny_model_dir))
    prompts = ["What is 1 + 2?", [{"role": "user", "content": "What is 12 plus 7? The answer"}], "hello"]
    batched = generate_batch(model, tokenizer, prompts, max_tokens=6, batch_size=2)
    single = [generate_text(model, tokenizer, p, max_tokens=6) for p in prompts]
    assert batched == single


def test_evaluate_a_run_and_a_model(tiny_model_dir, chat_data, tmp_path):
    from gmt_mlx.config import Config
    from gmt_mlx.evaluation.evaluate import EvalOptions, evaluate
    from gmt_mlx.recipes.finetune import finetune

    result = evaluate(
        str(tiny_model_dir),
        str(chat_data),
        EvalOptions(split="valid", scorers=("number", "exact"), max_tokens=4, batch_size=3),
    )
    assert result["count"] == 4 and len(result["items"]) == 4
    assert set(result["accuracy"]) == {"number", "exact"}
    assert result["loss"] > 0 and result["ppl"] > 1 and result["mask_prompt"] is True
    item = result["items"][0]
    assert item["prompt"] == "What is 100 + 103?" and item["reference"] == "100 + 103 = 203."
    run = tmp_path / "run"
    finetune(
        Config(model=str(tiny_model_dir), data=str(chat_data), out=str(run), iters=2, mask_prompt=False, samples=0),
        log=lambda s: None,
    )
    # A run brings its own data and prompt masking (so the loss matches its validation loss).
    result = evaluate(str(run), options=EvalOptions(limit=1, max_tokens=2, split="valid"))
    assert result["data"] == str(chat_data) and result["mask_prompt"] is False and result["count"] == 1
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert result["loss"] == pytest.approx([r for r in records if r["type"] == "eval"][-1]["val_loss"], rel=1e-4)


def test_eval_command(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "eval.json"
    result = runner.invoke(
        app,
        [
            "eval",
            str(tiny_model_dir),
            "--data",
            str(chat_data),
            "--scorer",
            "number,exact",
            "--max-tokens",
            "3",
            "--limit",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "accuracy  number:" in result.output and "of 2" in result.output
    saved = json.loads(out.read_text())
    assert saved["split"] == "test" and saved["count"] == 2 and len(saved["items"]) == 2


def test_eval_on_text_data_skips_accuracy(tiny_model_dir, tmp_path):
    data = tmp_path / "text.jsonl"
    data.write_text(json.dumps({"text": "hello there"}) + "\n")
    result = runner.invoke(
        app, ["eval", str(tiny_model_dir), "--data", str(data), "--split", "train", "--max-tokens", "2"]
    )
    assert result.exit_code == 0, result.output
    assert "accuracy  skipped" in result.output


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--scorer", "nope"], "unknown scorer 'nope'"),
        (["--split", "other"], "no other split"),
        (["--limit", "-1"], "--limit must be 0 or more"),
        (["--no-loss", "--no-generate"], "nothing to do"),
    ],
)
def test_eval_bad_input_is_one_line(tiny_model_dir, chat_data, args, fragment):
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(chat_data), *args])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert fragment in result.output.strip().splitlines()[-1]


def test_eval_without_data_is_one_line(tiny_model_dir):
    result = runner.invoke(app, ["eval", str(tiny_model_dir)])
    assert result.exit_code == 2 and "--data is required" in result.output


@pytest.mark.parametrize(
    "content,why",
    [(b"model: x\n\xff\xfe\n", "is damaged (not UTF-8 text at byte 9)"), (b"model: x\nite", "is damaged (cut short)")],
)
def test_eval_of_a_run_with_a_damaged_config_is_one_line(tmp_path, content, why):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_bytes(content)
    result = runner.invoke(app, ["eval", str(run), "--baseline"])
    assert result.exit_code == 2 and result.output.strip().splitlines() == [f"error: {run / 'config.yaml'} {why}"]


def test_score_summary_counts_or_averages():
    from gmt_mlx.evaluation.evaluate import score_summary

    result = {
        "count": 3,
        "accuracy": {"exact": 2 / 3, "rg": 0.5},
        "items": [
            {"scores": {"exact": 1.0, "rg": 1.0}},
            {"scores": {"exact": True, "rg": 0.5}},
            {"scores": {"exact": 0.0, "rg": 0.0}},
        ],
    }
    assert score_summary(result, "exact") == "2/3 (67%)"
    assert score_summary(result, "rg") == "50.0% of 3"  # partial credit: a mean, not a count
    assert score_summary({"count": 0, "accuracy": {}}, "exact") == "n/a"


def test_eval_baseline_compares_a_run_with_its_base(tiny_model_dir, chat_data, tmp_path):
    from gmt_mlx.config import Config
    from gmt_mlx.evaluation.evaluate import EvalOptions, evaluate
    from gmt_mlx.recipes.finetune import finetune

    run = tmp_path / "run"
    finetune(
        Config(
            model=str(tiny_model_dir),
            data=str(chat_data),
            out=str(run),
            iters=2,
            learning_rate=1e-2,
            mask_prompt=False,
            samples=0,
        ),
        log=lambda s: None,
    )
    out = tmp_path / "both.json"
    result = runner.invoke(
        app,
        [
            "eval",
            str(run),
            "--baseline",
            "--scorer",
            "exact,number",
            "--max-tokens",
            "3",
            "--limit",
            "2",
            "--show",
            "2",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert sum(line.startswith("  base:  ") for line in lines) == 2
    assert sum(line.startswith("  tuned: ") for line in lines) == 2
    assert any(
        line.startswith("exact     base ") and "/2 (" in line and "-> tuned " in line and "points" in line
        for line in lines
    ), result.output
    assert any(line.startswith("loss      base ") for line in lines), result.output
    saved = json.loads(out.read_text())
    base, tuned = saved["base"], saved["tuned"]
    assert base["model"] == str(tiny_model_dir) and tuned["model"] == str(run)
    assert [i["prompt"] for i in base["items"]] == [i["prompt"] for i in tuned["items"]]
    # The base is scored as the run's own settings would score it (here: loss on whole sequences).
    assert base["mask_prompt"] is False and tuned["mask_prompt"] is False
    alone = evaluate(
        str(tiny_model_dir),
        str(chat_data),
        EvalOptions(scorers=("exact", "number"), max_tokens=3, limit=2, mask_prompt=False),
    )
    assert base["loss"] == pytest.approx(alone["loss"], rel=1e-6)
    assert [i["answer"] for i in base["items"]] == [i["answer"] for i in alone["items"]]
    assert tuned["loss"] != pytest.approx(base["loss"], rel=1e-6)  # the run's weights, not the base's


def test_eval_baseline_needs_a_run(tiny_model_dir, chat_data):
    result = runner.invoke(app, ["eval", str(tiny_model_dir), "--data", str(chat_data), "--baseline"])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "needs a gmt-mlx run directory" in result.output.strip().splitlines()[-1]


# ---- exact match in validation ---------------------------------------------------------------


def _greedy(model, ids, n):
    import mlx.core as mx

    out = list(ids)
    for _ in range(n):
        out.append(int(mx.argmax(model(mx.array([out]))[0, -1]).item()))
    return out[len(ids) :]


def test_validation_exact_match_is_greedy_decoding_reproducing_the_answer(tiny_model_dir):
    """A row counts exactly when greedy decoding from its prompt writes its target tokens; padding and prompts do not
    count."""
    import mlx.core as mx

    from gmt_mlx.core.losses import sft_eval_loss, sft_loss
    from gmt_mlx.models.loading import load_base

    model, tokenizer, _, _ = load_base(str(tiny_model_dir))
    rows, expected = [], 0
    for i, prompt in enumerate(["What is 1 + 2?", "hello there", "12 plus 7", "a b c d e f", "x", "What is 100 + 3?"]):
        ids = [int(t) for t in tokenizer.encode(prompt)]
        answer = _greedy(model, ids, 2 + i % 3)  # the model's own greedy continuation: a match
        if i % 2:  # change one target token: no longer what greedy decoding writes
            position = i % len(answer)
            answer[position] = (answer[position] + 1) % 64
        else:
            expected += 1
        rows.append((ids, answer))
    width = max(len(p) + len(a) for p, a in rows) + 3
    tokens = [p + a + [0] * (width - len(p) - len(a)) for p, a in rows]
    mask = [[0] * len(p) + [1] * len(a) + [0] * (width - len(p) - len(a)) for p, a in rows]
    tokens.append([5] * width)  # a row without targets (padding) is not a row
    mask.append([0] * width)
    batch = (mx.array(tokens), mx.array(mask))
    loss, count, metrics = sft_eval_loss(model, *batch)
    plain_loss, plain_count = sft_loss(model, *batch)
    assert loss.item() == pytest.approx(plain_loss.item(), rel=1e-6) and count.item() == plain_count.item()
    assert metrics["rows"].item() == len(rows)
    assert metrics["exact_match"].item() == expected == 3


def test_validation_reports_exact_match_and_a_study_hook_sees_each_pass(tiny_model_dir, chat_data, tmp_path):
    """finetune's on_validation gets the model and the numbers of every pass; --no-save-best writes no best
    checkpoint."""
    from gmt_mlx.config import Config
    from gmt_mlx.recipes.finetune import finetune

    seen = []
    run = tmp_path / "run"
    finetune(
        Config(
            model=str(tiny_model_dir),
            data=str(chat_data),
            out=str(run),
            iters=4,
            steps_per_eval=2,
            samples=0,
            steps_per_save=0,
            save_best=False,
            learning_rate=1e-3,
        ),
        log=lambda s: None,
        on_validation=lambda step, model, result: seen.append((step, result, model)),
    )
    assert [s for s, _, _ in seen] == [2, 4]
    assert seen[0][1]["best"] is True and all(0.0 <= r["exact_match"] <= 1.0 for _, r, _ in seen)
    assert seen[1][1]["best"] == (seen[1][1]["loss"] < seen[0][1]["loss"])
    assert not (run / "checkpoints" / "best").exists()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["val_exact_match"] for r in evals] == [r["exact_match"] for _, r, _ in seen]
    with_best = tmp_path / "with_best"
    finetune(
        Config(
            model=str(tiny_model_dir),
            data=str(chat_data),
            out=str(with_best),
            iters=2,
            steps_per_eval=2,
            samples=0,
            steps_per_save=0,
        ),
        log=lambda s: None,
    )
    assert (with_best / "checkpoints" / "best").is_dir()
