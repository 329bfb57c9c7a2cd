"""LoRA / DoRA: only adapters train, QLoRA keeps the base quantized, fusing is exact."""

from __future__ import annotations

import json
import shutil

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten

from gmt_mlx.cli import app
from gmt_mlx.config import Config, OptimizerOptions
from gmt_mlx.core.optim import build_optimizer
from gmt_mlx.core.trainer import train
from gmt_mlx.errors import UserError
from gmt_mlx.models.hf import fuse_adapters, is_adapter
from gmt_mlx.models.methods import prepare_model
from tests.helpers import runner

TOKENS = mx.array([[1, 5, 9, 40, 77, 2, 3, 8], [4, 4, 10, 11, 12, 13, 14, 15]])


def load_tiny(path, **config):
    from gmt_mlx.models.loading import load_base

    model, tokenizer, hf_config, _ = load_base(str(path), dequantize=config.get("method") not in ("lora", "dora"))
    sizes = prepare_model(model, Config(**config))
    return model, tokenizer, hf_config, sizes


def train_steps(model, steps=3, lr=1e-2):
    data = iter([(TOKENS, mx.ones(TOKENS.shape))] * steps)
    train(model, build_optimizer(OptimizerOptions(), lr, seed=0), data, iters=steps)


def snapshot(model):
    return {k: mx.array(v) for k, v in tree_flatten(model.parameters())}


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_only_adapter_weights_change(tiny_model_dir, method):
    model, _, _, sizes = load_tiny(tiny_model_dir, method=method, lora_rank=4)
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    assert trainable and all(".lora_a" in k or ".lora_b" in k or k.endswith(".m") for k in trainable)
    assert sizes["trainable"] == sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    before = snapshot(model)
    train_steps(model)
    after = snapshot(model)
    changed = {k for k in before if not mx.array_equal(before[k], after[k]).item()}
    assert changed, "training changed nothing"
    assert changed <= trainable, f"non-adapter weights changed: {sorted(changed - trainable)[:5]}"
    assert any(".lora_b" in k for k in changed)  # B starts at zero: it must have moved


def test_adapters_cover_every_linear_layer_of_the_last_blocks(tiny_model_dir):
    model, _, _, _ = load_tiny(tiny_model_dir, method="lora", num_layers=1)
    adapted = {name for name, m in model.named_modules() if hasattr(m, "fuse")}
    assert adapted and all(name.startswith("model.layers.1.") for name in adapted)
    assert {n.rsplit(".", 1)[-1] for n in adapted} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    model, _, _, _ = load_tiny(tiny_model_dir, method="lora", lora_keys="self_attn.q_proj, self_attn.v_proj")
    adapted = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if hasattr(m, "fuse")}
    assert adapted == {"q_proj", "v_proj"}


def test_bad_lora_keys_are_a_user_error(tiny_model_dir):
    with pytest.raises(UserError, match="not found in the model's blocks.*q_proj"):
        load_tiny(tiny_model_dir, method="lora", lora_keys="attention.wq")


@pytest.mark.parametrize("method", ["lora", "dora"])
def test_fused_model_matches_the_adapted_one(tiny_model_dir, method):
    model, _, _, _ = load_tiny(tiny_model_dir, method=method)
    train_steps(model)
    model.eval()
    expected = model(TOKENS)
    fused = fuse_adapters(model)
    assert not any(is_adapter(m) for _, m in fused.named_modules())
    assert all("lora" not in k for k, _ in tree_flatten(fused.parameters()))
    assert mx.allclose(fused(TOKENS), expected, atol=1e-4).item()


def quantized_copy(src, dst):
    """The tiny model, 4-bit quantized the way mlx-lm stores it (config 'quantization')."""
    from mlx_lm import load

    model, _, config = load(str(src), return_config=True)
    nn.quantize(model, group_size=32, bits=4)
    dst.mkdir()
    mx.save_safetensors(
        str(dst / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"}
    )
    config["quantization"] = {"group_size": 32, "bits": 4}
    (dst / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    return dst


def test_qlora_keeps_the_base_quantized_and_exports_floats(tiny_model_dir, tmp_path):
    from mlx_lm import load

    from gmt_mlx.models.hf import save_hf_model

    qdir = quantized_copy(tiny_model_dir, tmp_path / "q4")
    model, tokenizer, hf_config, sizes = load_tiny(qdir, method="lora")
    adapted = [m for _, m in model.named_modules() if hasattr(m, "fuse")]
    assert adapted and all(isinstance(m.linear, nn.QuantizedLinear) for m in adapted)
    # The share counts the values a quantized weight packs, not its uint32 words.
    assert 0 < sizes["trainable"] / sizes["total"] < 0.2
    train_steps(model)
    model.eval()
    expected = model(TOKENS)
    fused = fuse_adapters(model)
    assert not any(isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) for _, m in fused.named_modules())
    out = save_hf_model(tmp_path / "model", fused, tokenizer, hf_config, dtype="float32")
    assert "quantization" not in json.loads((out / "config.json").read_text())
    reloaded, _ = load(str(out))
    # Fusing dequantizes the base exactly and adds the float delta.
    assert mx.allclose(reloaded(TOKENS), expected, atol=1e-3).item()


def test_finetune_lora_writes_a_fused_model(tiny_model_dir, chat_data, tmp_path):
    from mlx_lm import load

    out = tmp_path / "run"
    result = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(chat_data),
            "--out",
            str(out),
            "--method",
            "lora",
            "--lora-rank",
            "4",
            "--iters",
            "4",
            "--learning-rate",
            "1e-3",
            "--steps-per-eval",
            "2",
            "--steps-per-report",
            "1",
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["kept_fraction"] == 1.0 for r in records if r["type"] == "train")
    setup = [r for r in records if r["type"] == "setup"][-1]
    assert setup["trainable_params"] < setup["total_params"]
    saved = load(str(out / "model"))[0]
    assert all("lora" not in k for k, _ in tree_flatten(saved.parameters()))
    # The best checkpoint holds the adapters only.
    weights = mx.load(str(out / "checkpoints" / "best" / "weights.safetensors"))
    assert weights and all(".lora_" in k for k in weights)


@pytest.mark.parametrize(
    "flag,value,fragment",
    [
        ("--lora-rank", "0", "--lora-rank must be at least 1"),
        ("--lora-dropout", "1.5", "--lora-dropout must be in [0, 1)"),
        ("--lora-scale", "-1", "--lora-scale must be positive"),
        ("--lora-keys", "q_proj,,v_proj", "--lora-keys must be comma-separated"),
    ],
)
def test_bad_lora_options_give_one_line_errors(tiny_model_dir, chat_data, tmp_path, flag, value, fragment):
    result = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(chat_data),
            "--out",
            str(tmp_path / "run"),
            "--method",
            "lora",
            flag,
            value,
        ],
    )
    assert result.exit_code == 2
    assert "Traceback" not in result.output
    assert fragment in result.output.strip().splitlines()[-1]
