"""`gmt-mlx finetune` / `generate` end to end on a tiny model, and every bad input."""

from __future__ import annotations

import json

import mlx.core as mx
import pytest
import yaml

from gmt_mlx.cli import app
from tests.helpers import arithmetic_chat, assert_clean_error, runner, write_jsonl


def finetune(*args):
    return runner.invoke(app, ["finetune", *map(str, args)])


def base_args(model, data, out, *extra):
    return [
        "--model",
        model,
        "--data",
        data,
        "--out",
        out,
        "--iters",
        "6",
        "--batch-size",
        "4",
        "--learning-rate",
        "1e-3",
        "--steps-per-eval",
        "3",
        "--steps-per-report",
        "2",
        *extra,
    ]


@pytest.mark.parametrize("method", ["gmt", "sft", "random"])
def test_finetune_writes_the_run_directory(tiny_model_dir, chat_data, tmp_path, method):
    out = tmp_path / "run"
    result = finetune(*base_args(tiny_model_dir, chat_data, out, "--method", method, "--mask-ratio", "0.5"))
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["method"] == method and saved["mask_ratio"] == 0.5 and saved["iters"] == 6
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    evals = [r for r in records if r["type"] == "eval"]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["step"] for r in evals] == [3, 6]
    for key in ("loss", "learning_rate", "tokens_per_sec", "kept_fraction", "peak_memory_gb", "wall_time"):
        assert key in train[-1]
    if method == "sft":
        assert train[-1]["kept_fraction"] == 1.0
    else:
        assert 0.2 < train[-1]["kept_fraction"] <= 0.5 + 0.01
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / "model" / name).is_file(), name
    assert (out / "checkpoints" / "best" / "state.json").is_file()
    assert "trainable" in result.output and "ETA" in result.output
    assert "prompt:" in result.output and "after:" in result.output


def test_try_it_suggests_a_held_out_prompt(tiny_model_dir, chat_data, tmp_path):
    """The closing hint is a command to paste, with a prompt of the kind the model learned."""
    result = finetune(*base_args(tiny_model_dir, chat_data, tmp_path / "run", "--iters", "1", "--samples", "0"))
    assert result.exit_code == 0, result.output
    held_out = json.loads((chat_data / "test.jsonl").read_text().splitlines()[0])["messages"][0]["content"]
    assert (
        result.output.strip().splitlines()[-1] == f"try it: gmt-mlx generate {tmp_path / 'run'} --prompt '{held_out}'"
    )


def test_gmt_run_reduces_training_loss(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    result = finetune(*base_args(tiny_model_dir, chat_data, out, "--iters", "20", "--mask-prompt"))
    assert result.exit_code == 0, result.output
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    losses = [json.loads(line)["loss"] for line in metrics if '"train"' in line]
    assert losses[-1] < 0.7 * losses[0]


def test_yaml_is_overridden_by_flags(tiny_model_dir, chat_data, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"iters": 2, "mask_ratio": 0.3, "method": "random", "seed": 5}))
    out = tmp_path / "run"
    result = finetune("-c", config, "--model", tiny_model_dir, "--data", chat_data, "--out", out, "--mask-ratio", "0.4")
    assert result.exit_code == 0, result.output
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert (saved["iters"], saved["mask_ratio"], saved["method"], saved["seed"]) == (2, 0.4, "random", 5)
    assert saved["batch_size"] == 4  # default


def test_every_assistant_turn_trains_and_is_recorded(tiny_model_dir, tmp_path):
    # The flag reaches the run (test_turns.py checks which tokens it makes targets).
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"What is {a}?"},
                {"role": "assistant", "content": f"{a}."},
                {"role": "user", "content": "And plus 1?"},
                {"role": "assistant", "content": f"{a + 1}."},
            ]
        }
        for a in range(8)
    ]
    data = write_jsonl(tmp_path / "d" / "train.jsonl", rows).parent
    out = tmp_path / "run"
    result = finetune(
        *base_args(tiny_model_dir, data, out, "--iters", "2", "--mask-prompt", "--assistant-turns", "all")
    )
    assert result.exit_code == 0, result.output
    assert yaml.safe_load((out / "config.yaml").read_text())["assistant_turns"] == "all"


def test_epochs_and_accumulation(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    result = finetune(
        "--model",
        tiny_model_dir,
        "--data",
        chat_data,
        "--out",
        out,
        "--epochs",
        "2",
        "--grad-accumulation-steps",
        "2",
        "--steps-per-report",
        "1",
    )
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert steps[-1] == 4  # 16 examples / batch 4 = 4 batches per epoch, 2 per step, 2 epochs


def test_saved_model_reloads_with_identical_logits(tiny_model_dir, tmp_path):
    from mlx_lm import load

    from gmt_mlx.config import Config, MaskOptions, OptimizerOptions
    from gmt_mlx.core.optim import build_optimizer
    from gmt_mlx.core.trainer import train
    from gmt_mlx.models.hf import save_hf_model
    from gmt_mlx.models.methods import prepare_model

    model, tokenizer, config = load(str(tiny_model_dir), return_config=True)
    prepare_model(model, Config())
    tokens = mx.array([[1, 5, 9, 40, 77, 2, 3, 8]])
    data = iter([(tokens, mx.ones(tokens.shape))] * 3)
    train(model, build_optimizer(OptimizerOptions(), 1e-2, seed=0, mask=MaskOptions(mask_ratio=0.5)), data, iters=3)
    model.eval()
    expected = model(tokens)
    save_hf_model(tmp_path / "model", model, tokenizer, config, dtype="float32", base_path=tiny_model_dir)
    reloaded, _ = load(str(tmp_path / "model"))
    assert mx.array_equal(reloaded(tokens), expected).item()
    before, _ = load(str(tiny_model_dir))
    assert not mx.allclose(before(tokens), expected).item()  # training changed it


def test_generate_from_a_run(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    # A small learning rate: the run's model differs from the base but does not yet end every answer at once.
    assert (
        finetune(*base_args(tiny_model_dir, chat_data, out, "--iters", "2", "--learning-rate", "1e-4")).exit_code == 0
    )
    result = runner.invoke(app, ["generate", str(out), "--prompt", "What is 2 + 5?", "--max-tokens", "5"])
    assert result.exit_code == 0, result.output
    # The printed text is the greedy completion of the run's model (not the base model's),
    # computed here with mlx_lm directly from the chat-templated prompt.
    from mlx_lm import generate, load

    model, tokenizer = load(str(out / "model"))
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 5?"}], add_generation_prompt=True)
    expected = generate(model, tokenizer, prompt, max_tokens=5, verbose=False)
    assert expected, "the tiny model's completion is empty: the test would prove nothing"
    assert result.stdout == expected + "\n"
    base, _ = load(str(tiny_model_dir))
    assert generate(base, tokenizer, prompt, max_tokens=5, verbose=False) != expected  # the run's weights were used


# ---- bad input: one line, non-zero exit, no traceback --------------------------------


def test_missing_model(chat_data, tmp_path):
    assert_clean_error(finetune("--model", tmp_path / "nope", "--data", chat_data, "--out", tmp_path / "o"), "nope")


@pytest.mark.parametrize("model", ["runs/nope", "./nope", "~/models/x"])
def test_missing_path_like_model_is_no_such_folder(monkeypatch, chat_data, tmp_path, model):
    import huggingface_hub

    def no_lookup(repo_id, **kwargs):
        raise AssertionError("looked up on the Hub")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_lookup)
    assert_clean_error(runner.invoke(app, ["generate", model, "-p", "hi"]), f"{model}: no such folder or file")
    result = finetune("--model", model, "--data", chat_data, "--out", tmp_path / "o")
    assert_clean_error(result, f"{model}: no such folder or file")


def test_offline_hub_id_points_to_the_embedded_model(monkeypatch, chat_data, tmp_path):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    def offline(repo_id, **kwargs):
        raise LocalEntryNotFoundError("no cached snapshot") from OfflineModeIsEnabled("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    result = finetune("--model", "HuggingFaceTB/SmolLM2-135M-Instruct", "--data", chat_data, "--out", tmp_path / "o")
    assert_clean_error(
        result,
        "cannot reach the Hugging Face Hub (offline mode",
        "Hugging Face cache",
        "the embedded 'smollm2-135m' is this very model",
    )


def test_malformed_json_line(tiny_model_dir, tmp_path):
    data = tmp_path / "d"
    write_jsonl(data / "train.jsonl", arithmetic_chat(5))
    with open(data / "train.jsonl", "a") as fh:
        fh.write('{"messages": [\n')
    assert_clean_error(finetune(*base_args(tiny_model_dir, data, tmp_path / "o")), "train.jsonl:6")


def test_unknown_format_line(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", arithmetic_chat(3) + [{"question": "hi"}])
    assert_clean_error(finetune(*base_args(tiny_model_dir, data, tmp_path / "o")), "train.jsonl:4")


def test_empty_training_file(tiny_model_dir, tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "train.jsonl").write_text("")
    assert_clean_error(finetune(*base_args(tiny_model_dir, tmp_path / "d", tmp_path / "o")), "train.jsonl")


@pytest.mark.parametrize(
    "flag,value,fragment",
    [
        ("--mask-ratio", "1.0", "--mask-ratio"),
        ("--mask-ratio", "-0.1", "--mask-ratio"),
        ("--method", "topk", "--method"),
        ("--mask-scope", "row", "--mask-scope"),
        ("--mask-target", "w", "--mask-target"),
        ("--assistant-turns", "every", "--assistant-turns"),
        ("--assistant-turns", "all", "needs --mask-prompt"),
    ],
)
def test_bad_options(tiny_model_dir, chat_data, tmp_path, flag, value, fragment):
    assert_clean_error(finetune(*base_args(tiny_model_dir, chat_data, tmp_path / "o", flag, value)), fragment)


def test_existing_run_is_refused_then_overwritten(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    assert finetune(*base_args(tiny_model_dir, chat_data, out, "--iters", "2")).exit_code == 0
    assert_clean_error(finetune(*base_args(tiny_model_dir, chat_data, out, "--iters", "3")), "--overwrite")
    again = finetune(*base_args(tiny_model_dir, chat_data, out, "--iters", "3", "--overwrite"))
    assert again.exit_code == 0, again.output
    assert yaml.safe_load((out / "config.yaml").read_text())["iters"] == 3


def test_foreign_folder_is_never_touched(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    assert_clean_error(finetune(*base_args(tiny_model_dir, chat_data, out, "--overwrite")), "not a gmt-mlx run")
    assert (out / "notes.txt").read_text() == "precious"


def test_bad_yaml_key(tiny_model_dir, chat_data, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("mask_ration: 0.3\n")
    assert_clean_error(
        finetune("-c", config, *base_args(tiny_model_dir, chat_data, tmp_path / "o")),
        "unknown option 'mask_ration' (did you mean mask_ratio?)",
    )
    config.write_text("zzz_nothing_like_it: 1\n")
    result = finetune("-c", config, *base_args(tiny_model_dir, chat_data, tmp_path / "o"))
    assert_clean_error(result, "unknown option 'zzz_nothing_like_it'")
    assert "did you mean" not in result.output
    # An unknown flag: click suggests the close ones itself.
    assert_clean_error(finetune("--mask-ration", "0.3"), "No such option: --mask-ration", "--mask-ratio", usage=True)
