"""`compare`: every method trains on the tiny model; tables, plots, resume, and bad input."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from gmt_mlx.cli import app, parsing
from gmt_mlx.compare import plan as compare_plan
from gmt_mlx.compare import recipe as cmp
from gmt_mlx.compare import report
from gmt_mlx.config import Config
from gmt_mlx.errors import UserError
from tests.helpers import runner

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def spec_for(model, data, out, **kwargs) -> compare_plan.CompareSpec:
    base = Config(
        model=str(model), data=str(data), iters=4, batch_size=4, steps_per_eval=2, steps_per_report=1, steps_per_save=0
    )
    defaults = dict(
        methods=["sft", "gmt", "random", "lora", "dora"],
        seeds=[0, 1],
        mask_ratios=[0.5],
        learning_rates={m: 1e-3 for m in compare_plan.DEFAULT_LEARNING_RATES},
        scorers=["number", "exact"],
        eval_limit=2,
        max_tokens=3,
    )
    defaults.update(kwargs)
    return compare_plan.CompareSpec(base=base, out=Path(out), **defaults)


@pytest.fixture(scope="module")
def compared(tiny_model_dir, tmp_path_factory):
    """One comparison of all five methods x two seeds on the tiny model, shared by the tests below."""
    from tests.helpers import write_chat_data

    root = tmp_path_factory.mktemp("compare")
    data = write_chat_data(root / "data")
    spec = spec_for(tiny_model_dir, data, root / "cmp")
    logs = []
    results = cmp.compare(spec, log=logs.append)
    return spec, results, logs


@pytest.mark.slow
def test_every_method_trains_through_compare(compared):
    spec, results, logs = compared
    names = {r["name"] for r in results["runs"]}
    expected = {f"{m}-s{s}" for m in ("sft", "lora", "dora") for s in (0, 1)} | {
        f"{m}-r0.5-s{s}" for m in ("gmt", "random") for s in (0, 1)
    }
    assert names == expected
    for run in results["runs"]:
        run_dir = spec.out / "runs" / run["name"]
        assert (run_dir / "model" / "config.json").is_file() and (run_dir / "eval.json").is_file()
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert (saved["method"], saved["seed"], saved["iters"]) == (run["method"], run["seed"], 4)
        assert run["steps"] == 4 and run["final_val_loss"] is not None and run["test_ppl"] > 1
        curve = run["curves"]["val"]
        # Every curve starts at step 0, the base model (the same point for every method and seed).
        assert [p[0] for p in curve] == [0, 2, 4] and curve[-1][2] < 8.0
        assert curve[0][1:] == [0.0, results["base"]["val_loss"]]
        if run["method"] in ("gmt", "random"):
            assert 0.2 < run["kept_fraction"] <= 0.51 and 0 < run["mask_overlap"] <= 1
        else:
            assert run["kept_fraction"] == 1.0 and run["mask_overlap"] is None
        if run["method"] in ("lora", "dora"):
            assert 0 < run["trainable_share"] < 0.5
        else:
            assert run["trainable_share"] == 1.0
    assert any("=== compare 1/10" in line for line in logs) and "ETA" in "\n".join(logs)


@pytest.mark.slow
def test_same_seed_same_data_order(compared):
    spec, results, _ = compared
    # Step 1 of every full-weight method sees the same batch from the same weights: same loss.
    first = {r["name"]: r["curves"]["train"][0][2] for r in results["runs"]}
    assert first["sft-s0"] == pytest.approx(first["gmt-r0.5-s0"]) == pytest.approx(first["random-r0.5-s0"])
    assert first["sft-s0"] != pytest.approx(first["sft-s1"])


@pytest.mark.slow
def test_random_masks_overlap_like_independent_draws(compared):
    _, results, _ = compared
    random_run = next(r for r in results["runs"] if r["name"] == "random-r0.5-s0")
    overlaps = [p[4] for p in random_run["curves"]["train"]]
    assert overlaps[0] is None  # step 1 has no previous mask
    assert all(abs(o - 0.5) < 0.05 for o in overlaps[1:])


@pytest.mark.slow
def test_results_table_and_plots(compared):
    spec, results, _ = compared
    rows = {row["group"]: row for row in results["rows"]}
    assert set(rows) == {"sft", "gmt r=0.5", "random r=0.5", "lora", "dora"}
    assert rows["sft"]["final_val_loss"]["n"] == 2 and rows["sft"]["final_val_loss"]["std"] > 0
    saved = json.loads((spec.out / "results.json").read_text())
    assert [r["group"] for r in saved["rows"]] == [r["group"] for r in results["rows"]]
    assert saved["base"]["test_ppl"] > 1
    md = (spec.out / "results.md").read_text()
    for label in ("| sft |", "| gmt r=0.5 |", "| random r=0.5 |", "| lora |", "| dora |", "base model"):
        assert label in md
    assert "±" in md and "accuracy (number)" in md and "accuracy (exact)" in md
    for name in report.PLOTS:
        path = spec.out / name
        assert path.read_bytes()[:8] == PNG_MAGIC, name
        assert path.stat().st_size > 5000 and f"]({name})" in md


@pytest.mark.slow
def test_base_validation_loss_is_what_a_run_measures_before_training(compared, tiny_model_dir, tmp_path):
    # A 1-step sft run at a learning rate of ~0 still holds the base weights at its first evaluation.
    spec, results, _ = compared
    from gmt_mlx.data.batching import pad_id
    from gmt_mlx.data.encoding import tokenize_split
    from gmt_mlx.data.sources import load_splits
    from gmt_mlx.evaluation.evaluate import split_loss
    from gmt_mlx.models.loading import load_base

    model, tokenizer, _, _ = load_base(str(tiny_model_dir))
    rows = load_splits(spec.base.data)["valid"]
    valid = tokenize_split(rows, tokenizer, mask_prompt=False, max_seq_length=spec.base.max_seq_length, name="valid")
    expected = split_loss(model, valid, batch_size=4, pad_id=pad_id(tokenizer), max_batches=spec.base.val_batches)
    assert results["base"]["val_loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert "base model (no training) | — | " + f"{expected['loss']:.4f}" in (spec.out / "results.md").read_text()


@pytest.mark.parametrize(
    "steps, every_eval, every_report", [(4, 1, 1), (10, 1, 1), (30, 3, 1), (100, 12, 6), (1000, 125, 62)]
)
def test_compare_picks_a_cadence_that_draws_curves(steps, every_eval, every_report):
    spec = compare_plan.CompareSpec(base=Config(iters=steps), out=Path("x"), auto_cadence=compare_plan.CADENCE_KEYS)
    logs = []
    base = compare_plan.with_cadence(spec, steps, logs.append).base
    assert (base.steps_per_eval, base.steps_per_report) == (every_eval, every_report)
    assert steps // base.steps_per_eval >= min(steps, compare_plan.CURVE_POINTS)
    assert "validation every" in logs[0]
    # What the user set stays, with a warning when it draws dots.
    mine = compare_plan.CompareSpec(
        base=Config(iters=steps, steps_per_eval=50), out=Path("x"), auto_cadence=("steps_per_report",)
    )
    logs = []
    assert compare_plan.with_cadence(mine, steps, logs.append).base.steps_per_eval == 50
    assert (steps < 150) == any("warning: --steps-per-eval 50" in line for line in logs)


def test_speed_leaves_out_compilation_and_steps_timed_across_evals():
    train = [
        {"step": s, "tokens_per_sec": v}
        for s, v in [(1, 10.0), (2, 100.0), (3, 40.0), (4, 104.0), (5, 98.0), (6, 102.0), (7, 101.0)]
    ]
    evals = [{"step": 2}]
    speeds = cmp.step_speeds(train, evals, steps_per_save=0)
    assert speeds == [100.0, 104.0, 98.0, 102.0, 101.0]  # not step 1 (compiles) nor 3 (timed across the eval)
    assert cmp.speed_spread(speeds) < report.NOISY_SPREAD
    assert not report.speed_is_noisy({"tokens_per_sec": 101.5, "tokens_per_sec_spread": cmp.speed_spread(speeds)})
    assert report.speed_is_noisy({"tokens_per_sec": 50.0, "tokens_per_sec_spread": None})  # too few steps
    assert cmp.step_speeds(train, evals, steps_per_save=5) == [100.0, 104.0, 98.0, 101.0]  # 6 follows a save


def test_mean_std():
    assert report.mean_std([1.0, 3.0]) == {"mean": 2.0, "std": pytest.approx(2**0.5), "n": 2}
    assert report.mean_std([5.0, None]) == {"mean": 5.0, "std": 0.0, "n": 1}
    assert report.mean_std([None, float("nan")]) is None


@pytest.mark.slow
def test_half_finished_comparison_resumes(compared, tmp_path):
    spec, results, _ = compared
    out = tmp_path / "copy"
    shutil.copytree(spec.out, out)
    shutil.rmtree(out / "runs" / "lora-s1" / "model")  # as if killed while saving
    shutil.rmtree(out / "runs" / "dora-s1")  # as if never started
    logs = []
    again = cmp.compare(spec_for(spec.base.model, spec.base.data, out), log=logs.append)
    text = "\n".join(logs)
    assert text.count("finished earlier, reused") == 8
    assert "10 runs (8 reused)" in text
    assert {r["name"] for r in again["runs"]} == {r["name"] for r in results["runs"]}
    redone = next(r for r in again["runs"] if r["name"] == "dora-s1")
    before = next(r for r in results["runs"] if r["name"] == "dora-s1")
    assert redone["final_val_loss"] == pytest.approx(before["final_val_loss"], rel=1e-5)  # deterministic


@pytest.mark.slow
def test_finished_run_with_another_config_is_refused(compared, tmp_path):
    spec, _, _ = compared
    out = tmp_path / "copy"
    shutil.copytree(spec.out, out)
    changed = spec_for(spec.base.model, spec.base.data, out, learning_rates={"sft": 5e-3}, methods=["sft"])
    with pytest.raises(UserError, match=r"sft-s0 holds a finished run with a different config \(learning_rate"):
        cmp.compare(changed, log=lambda s: None)


@pytest.mark.slow
def test_finished_run_with_a_damaged_config_is_refused_in_one_line(compared, tmp_path):
    spec, _, _ = compared
    out = tmp_path / "copy"
    shutil.copytree(spec.out, out)
    config = out / "runs" / "sft-s0" / "config.yaml"
    config.write_bytes(config.read_bytes().replace(b"model:", b"\xffodel:"))  # not UTF-8: was a traceback
    with pytest.raises(UserError, match=r"sft-s0 holds a finished run with a different config \(config.yaml: 'unread"):
        cmp.compare(spec_for(spec.base.model, spec.base.data, out, methods=["sft"]), log=lambda s: None)


@pytest.mark.parametrize(
    "fn,text,fragment",
    [
        (parsing.parse_methods, "sft,foo", "unknown method 'foo'"),
        (parsing.parse_methods, "sft,sft", "twice"),
        (parsing.parse_methods, "sft,,gmt", "comma-separated"),
        (parsing.parse_methods, "sft,full", "twice"),  # full is sft's other name
        (parsing.parse_seeds, "0,x", "integers"),
        (parsing.parse_seeds, "1,1", "distinct"),
        (parsing.parse_mask_ratios, "0.2,1", "in (0, 1)"),
        (parsing.parse_mask_ratios, "0", "in (0, 1)"),
        (parsing.parse_learning_rates, "lora=abc", "not METHOD=RATE"),
        (parsing.parse_learning_rates, "bogus=1e-4", "unknown method 'bogus'"),
        (parsing.parse_learning_rates, "lora=-1", "must be positive"),
    ],
)
def test_bad_lists_are_user_errors(fn, text, fragment):
    with pytest.raises(UserError) as err:
        fn(text)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_full_is_sft():
    assert parsing.parse_methods("full,gmt") == ["sft", "gmt"]
    assert parsing.parse_learning_rates("full=1e-4") == {"sft": 1e-4}
    assert "full" not in parsing.parse_learning_rates("1e-4")
    spec = compare_plan.CompareSpec(base=Config(), out=Path("x"), methods=["full", "sft"])
    assert spec.methods == ["sft"] and spec.learning_rate("sft") == compare_plan.DEFAULT_LEARNING_RATES["sft"]


def test_learning_rates():
    assert parsing.parse_learning_rates("3e-4")["dora"] == 3e-4
    rates = parsing.parse_learning_rates("lora=2e-4")
    spec = compare_plan.CompareSpec(base=Config(), out=Path("x"), learning_rates=rates)
    assert spec.learning_rate("lora") == 2e-4
    assert spec.learning_rate("gmt") == compare_plan.DEFAULT_LEARNING_RATES["gmt"]


def test_short_compare_draws_curves_from_step_0(tiny_model_dir, chat_data, tmp_path):
    # 8 steps, shorter than the default --steps-per-report 10 and --steps-per-eval 50: a dot each, before.
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(chat_data),
        "--out",
        str(out),
        "--methods",
        "sft,lora",
        "--iters",
        "8",
        "--eval-limit",
        "1",
        "--max-tokens",
        "2",
        "--learning-rates",
        "1e-3",
        "--scorer",
        "number",
        "--steps-per-save",
        "0",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "validation every 1, metrics every 1" in result.output
    results = json.loads((out / "results.json").read_text())
    for run in results["runs"]:
        assert [p[0] for p in run["curves"]["val"]] == list(range(9))
        assert len(run["curves"]["train"]) == 8 and run["tokens_per_sec"] > 0
    assert "every validation curve starts at step 0" in (out / "results.md").read_text()


def test_compare_command(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "cmp"
    args = [
        "compare",
        "--model",
        str(tiny_model_dir),
        "--data",
        str(chat_data),
        "--out",
        str(out),
        "--methods",
        "sft,lora",
        "--iters",
        "2",
        "--steps-per-eval",
        "1",
        "--eval-limit",
        "1",
        "--max-tokens",
        "2",
        "--learning-rates",
        "1e-3",
        "--scorer",
        "number",
    ]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "| sft |" in result.output and "| lora |" in result.output and "compare 2/2" in result.output
    assert (out / "results.md").is_file() and (out / "val_loss_vs_step.png").read_bytes()[:8] == PNG_MAGIC
    again = runner.invoke(app, args)
    assert again.exit_code == 0 and "2 runs (2 reused)" in again.output


@pytest.mark.parametrize(
    "extra,fragment",
    [
        (["--methods", "sft,qlora"], "unknown method 'qlora'"),
        (["--seeds", "a"], "--seeds must be comma-separated integers"),
        (["--mask-ratios", "1.5"], "--mask-ratios must each be in (0, 1)"),
        (["--scorer", "nope"], "unknown scorer 'nope'"),
        (["--iters", "0"], "--iters must be at least 1"),
    ],
)
def test_compare_bad_input_is_one_line(tiny_model_dir, chat_data, tmp_path, extra, fragment):
    result = runner.invoke(
        app,
        ["compare", "--model", str(tiny_model_dir), "--data", str(chat_data), "--out", str(tmp_path / "cmp"), *extra],
    )
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert fragment in result.output.strip().splitlines()[-1]


def test_compare_refuses_per_run_keys_in_the_yaml(tiny_model_dir, chat_data, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("iters: 2\nlearning_rate: 1.0e-4\n")
    result = runner.invoke(
        app,
        [
            "compare",
            "-c",
            str(config),
            "--model",
            str(tiny_model_dir),
            "--data",
            str(chat_data),
            "--out",
            str(tmp_path / "cmp"),
        ],
    )
    assert result.exit_code == 2
    assert "learning_rate is set per run by compare; use --learning-rates" in result.output


def test_compare_needs_data_and_refuses_foreign_folders(tiny_model_dir, tmp_path):
    result = runner.invoke(app, ["compare", "--model", str(tiny_model_dir), "--out", str(tmp_path / "cmp")])
    assert result.exit_code == 2 and "--data is required" in result.output
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a gmt-mlx comparison"):
        cmp.compare(spec_for(tiny_model_dir, tmp_path, foreign), log=lambda s: None)


# ---- the shipped example --------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[3]  # tests/unit/compare/ -> the repository


def test_shipped_compare_example_config_and_data():
    from gmt_mlx.config import load_yaml, resolve
    from gmt_mlx.data.sources import load_splits

    config_path = ROOT / "studies" / "compare_chain_sum.yaml"
    values = load_yaml(config_path)
    compare_plan.check_base(values, str(config_path))  # compare accepts it
    assert resolve(config_path).data == "examples/data/chain_sum"
    splits = load_splits(ROOT / "examples" / "data" / "chain_sum")
    assert {name: len(rows) for name, rows in splits.items()} == {"train": 256, "valid": 16, "test": 48}
    questions = [row["messages"][0]["content"] for rows in splits.values() for row in rows]
    assert len(questions) == len(set(questions)), "a question appears in two places"
    for rows in splits.values():
        for row in rows:
            assert row["answer"] == row["messages"][-1]["content"]
            assert row["metadata"]["source_dataset"] == "chain_sum"
            assert eval(row["metadata"]["expression"]) == int(row["answer"])  # noqa: S307 - two numbers and + or -
    script = (ROOT / "studies" / "compare_chain_sum.sh").read_text()
    assert "-c studies/compare_chain_sum.yaml" in script and "--scorer reasoning_gym" in script


def test_shipped_example_data_is_what_the_generator_makes():
    pytest.importorskip("reasoning_gym")
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_chain_sum", ROOT / "studies" / "compare_make_chain_sum.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    built = module.build()
    for split, rows in built.items():
        shipped = (ROOT / "examples" / "data" / "chain_sum" / f"{split}.jsonl").read_text().splitlines()
        assert [json.loads(line) for line in shipped] == rows, split
    from gmt_mlx.data.scorers import get_scorer

    score = get_scorer("reasoning_gym")
    assert all(score(row["answer"], row) == 1.0 for row in built["test"])
