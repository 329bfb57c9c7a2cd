"""RUN_DIR/model/ round trip: mlx_lm.load and transformers give the in-memory logits."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm import load

from gmt_mlx.config import Config, MaskOptions, OptimizerOptions
from gmt_mlx.core.optim import build_optimizer
from gmt_mlx.core.trainer import train
from gmt_mlx.models.hf import save_hf_model
from gmt_mlx.models.methods import prepare_model
from tests.helpers import assert_clean_error, cli

TOKENS = [[1, 5, 9, 40, 77, 2, 3, 8, 100, 200]]


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    model, tokenizer, config = load(str(tiny_model_dir), return_config=True)
    prepare_model(model, Config())
    tokens = mx.array(TOKENS)
    train(
        model,
        build_optimizer(OptimizerOptions(), 1e-2, seed=0, mask=MaskOptions(mask_ratio=0.5)),
        iter([(tokens, mx.ones(tokens.shape))] * 3),
        iters=3,
    )
    model.eval()
    return model, tokenizer, config


@pytest.mark.parametrize("dtype,atol", [("float32", 0.0), ("bfloat16", 0.5), ("float16", 0.05)])
def test_mlx_reload(trained, tiny_model_dir, tmp_path, dtype, atol):
    model, tokenizer, config = trained
    save_hf_model(tmp_path, model, tokenizer, config, dtype=dtype, base_path=tiny_model_dir)
    reloaded, _ = load(str(tmp_path))
    expected = model(mx.array(TOKENS))
    got = reloaded(mx.array(TOKENS)).astype(mx.float32)
    assert mx.abs(got - expected).max().item() <= atol


def test_transformers_reload_matches(trained, tiny_model_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, tokenizer, config = trained
    save_hf_model(tmp_path, model, tokenizer, config, dtype="float32", base_path=tiny_model_dir)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf(torch.tensor(TOKENS)).logits.numpy()
    ours = np.array(model(mx.array(TOKENS)))
    # float32 on both sides; different kernels and summation order.
    assert np.abs(hf_logits - ours).max() < 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf_tok.decode(hf_tok.encode("What is 12 + 7?")) == "What is 12 + 7?"


def test_gguf_converted_then_exported_loads_in_transformers(tiny_model_dir, tmp_path):
    """Issue 3 (c): GGUF -> our loader -> our exporter -> transformers, same logits as MLX."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gmt_mlx.models.loading import load_base
    from tests.unit.models.test_gguf import Q8_0, hf_to_gguf

    gguf = hf_to_gguf(tiny_model_dir, tmp_path / "m.gguf", Q8_0)
    model, tokenizer, config, path = load_base(str(gguf))
    save_hf_model(tmp_path / "exported", model, tokenizer, config, dtype="float32", base_path=path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), torch_dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(hf_logits - np.array(model(mx.array(TOKENS)))).max() < 1e-4


# ---- LoRA / DoRA / QLoRA merging (adapters built directly with mlx_lm) -------------------

LORA_SCALE = 10.0


def lora_model(model_dir, *, dora=False, quantize=False, num_layers=2, keys=None, seed=1):
    """The tiny model with mlx_lm adapters whose B is non-zero (a fresh adapter is a no-op)."""
    import mlx.nn as nn
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model, tokenizer, config = load(str(model_dir), return_config=True)
    if quantize:
        nn.quantize(model, group_size=32, bits=8)
    model.freeze()
    mx.random.seed(seed)
    linear_to_lora_layers(
        model, num_layers, {"rank": 4, "scale": LORA_SCALE, "dropout": 0.0, "keys": keys}, use_dora=dora
    )
    for _, module in model.named_modules():
        if "lora_b" in module:
            module.lora_b = 0.05 * mx.random.normal(module.lora_b.shape)
            if dora:  # a trained magnitude differs from the initial row norms
                module.m = module.m * (1 + 0.1 * mx.random.normal(module.m.shape))
    mx.eval(model.parameters())
    model.eval()
    return model, tokenizer, config


def adapters(model):
    return {name: m for name, m in model.named_modules() if "lora_a" in m}


def test_lora_export_is_the_base_plus_exactly_the_merged_delta(tiny_model_dir, tmp_path):
    model, tokenizer, config = lora_model(tiny_model_dir)
    save_hf_model(tmp_path, model, tokenizer, config, dtype="float32", base_path=tiny_model_dir)
    exported = mx.load(str(tmp_path / "model.safetensors"))
    base = mx.load(str(tiny_model_dir / "model.safetensors"))
    assert set(exported) == set(base)  # no lora_a / lora_b / linear.* names left
    layers = adapters(model)
    assert len(layers) == 14  # 7 linear layers x 2 blocks
    for name, module in layers.items():
        a, b = np.array(module.lora_a, np.float64), np.array(module.lora_b, np.float64)
        expected = np.array(base[f"{name}.weight"], np.float64) + LORA_SCALE * (a @ b).T
        got = np.array(exported[f"{name}.weight"], np.float64)
        # The scale is in: without it the delta would be 10x smaller than this bound checks.
        assert np.abs(got - expected).max() < 1e-6, name
        assert np.abs(got - np.array(base[f"{name}.weight"])).max() > 1e-3, name
    for key in set(base) - {f"{n}.weight" for n in layers}:
        assert mx.array_equal(exported[key], base[key]).item(), key
    assert len(adapters(model)) == 14  # saving merged a copy: the in-memory model keeps its adapters


@pytest.mark.parametrize("kind", ["lora", "dora", "qlora"])
def test_adapter_export_loads_with_the_in_memory_logits(kind, tiny_model_dir, tmp_path):
    model, tokenizer, config = lora_model(tiny_model_dir, dora=kind == "dora", quantize=kind == "qlora")
    if kind == "qlora":
        config = {**config, "quantization": {"group_size": 32, "bits": 8}}
    expected = np.array(model(mx.array(TOKENS)))
    save_hf_model(tmp_path, model, tokenizer, config, dtype="float32", base_path=tiny_model_dir)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert "quantization" not in saved and saved["torch_dtype"] == "float32"
    assert all(v.dtype == mx.float32 for v in mx.load(str(tmp_path / "model.safetensors")).values())
    reloaded, _ = load(str(tmp_path))
    # Fused vs unfused is a different order of float32 operations: 1e-4 absolute on logits.
    assert np.abs(np.array(reloaded(mx.array(TOKENS))) - expected).max() < 1e-4
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(hf(torch.tensor(TOKENS)).logits.numpy() - expected).max() < 1e-4


def test_dora_export_is_the_renormalised_merge(tiny_model_dir, tmp_path):
    model, tokenizer, config = lora_model(tiny_model_dir, dora=True)
    save_hf_model(tmp_path, model, tokenizer, config, dtype="float32")
    exported = mx.load(str(tmp_path / "model.safetensors"))
    base = mx.load(str(tiny_model_dir / "model.safetensors"))
    for name, module in adapters(model).items():
        a, b, m = (np.array(x, np.float64) for x in (module.lora_a, module.lora_b, module.m))
        merged = np.array(base[f"{name}.weight"], np.float64) + LORA_SCALE * (a @ b).T
        expected = m[:, None] * merged / np.linalg.norm(merged, axis=1, keepdims=True)
        assert np.abs(np.array(exported[f"{name}.weight"]) - expected).max() < 1e-5, name


def test_fuse_adapters_in_place(tiny_model_dir):
    from gmt_mlx.models.hf import fuse_adapters, merged_weights

    model, _, _ = lora_model(tiny_model_dir, quantize=True)
    expected = model(mx.array(TOKENS))
    merged = merged_weights(model)
    fused = fuse_adapters(model)
    assert not adapters(fused) and not any("scales" in m for _, m in fused.named_modules())
    assert np.abs(np.array(fused(mx.array(TOKENS)) - expected)).max() < 1e-4
    flat = dict(tree_flatten(fused.parameters()))
    assert set(flat) == set(merged) and all(mx.array_equal(flat[k], merged[k]).item() for k in flat)


# ---- sharding ------------------------------------------------------------------------------


def test_sharded_export_with_index(trained, tiny_model_dir, tmp_path):
    model, tokenizer, config = trained
    save_hf_model(tmp_path, model, tokenizer, config, dtype="float32", base_path=tiny_model_dir, shard_bytes=60_000)
    shards = sorted(p.name for p in tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    params = dict(tree_flatten(model.parameters()))
    assert set(index["weight_map"]) == set(params) and set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(v.nbytes for v in params.values())
    for shard in shards:  # no shard over the threshold, unless one tensor alone is
        tensors = mx.load(str(tmp_path / shard))
        assert sum(v.nbytes for v in tensors.values()) <= 60_000 or len(tensors) == 1
    reloaded, _ = load(str(tmp_path))
    assert mx.array_equal(reloaded(mx.array(TOKENS)), model(mx.array(TOKENS))).item()
    # Re-saving unsharded removes the old shards (mlx_lm would read them too).
    save_hf_model(tmp_path, model, tokenizer, config, dtype="float32")
    assert sorted(p.name for p in tmp_path.glob("model*")) == ["model.safetensors"]
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    save_hf_model(tmp_path, model, tokenizer, config, dtype="float32", shard_bytes=60_000)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), torch_dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(hf(torch.tensor(TOKENS)).logits.numpy() - np.array(model(mx.array(TOKENS)))).max() < 1e-4


# ---- PEFT adapter-only export ------------------------------------------------------------


@pytest.mark.parametrize("dora", [False, True])
def test_peft_adapter_loads_onto_the_base_with_the_same_logits(dora, tiny_model_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from gmt_mlx.models.hf import save_peft_adapter

    model, tokenizer, config = lora_model(tiny_model_dir, dora=dora)
    expected = np.array(model(mx.array(TOKENS)))
    save_peft_adapter(tmp_path / "adapter", model, base_model="tiny/base", tokenizer=tokenizer)
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["r"] == 4 and saved["lora_alpha"] == LORA_SCALE * 4
    assert saved["use_dora"] is dora and saved["base_model_name_or_path"] == "tiny/base"
    base = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(torch.tensor(TOKENS)).logits.numpy()
    peft_model = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    peft_model.eval()
    with torch.no_grad():
        got = peft_model(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(base_logits - expected).max() > 1e-2  # the adapters matter
    assert np.abs(got - expected).max() < 1e-4
    # PEFT's own merge gives our merged export's weights.
    save_hf_model(tmp_path / "merged", model, tokenizer, config, dtype="float32")
    ours = mx.load(str(tmp_path / "merged" / "model.safetensors"))
    theirs = peft_model.merge_and_unload().state_dict()
    for key, value in ours.items():
        assert np.abs(theirs[key].numpy() - np.array(value)).max() < 1e-5, key


def test_peft_targets_select_exactly_the_adapted_modules(tiny_model_dir):
    from gmt_mlx.models.hf import peft_adapter

    model, _, _ = lora_model(tiny_model_dir, num_layers=1, keys={"self_attn.q_proj", "self_attn.v_proj"})
    _, config = peft_adapter(model)
    assert config["target_modules"] == ["self_attn.q_proj", "self_attn.v_proj"]
    assert config["layers_to_transform"] == [1] and config["layers_pattern"] == "layers"
    model, _, _ = lora_model(tiny_model_dir, num_layers=2, keys={"mlp.up_proj"})
    _, config = peft_adapter(model)
    assert config["target_modules"] == ["mlp.up_proj"] and "layers_to_transform" not in config


def test_peft_adapter_refuses_what_it_cannot_describe(trained, tiny_model_dir):
    from gmt_mlx.errors import UserError
    from gmt_mlx.models.hf import peft_adapter

    with pytest.raises(UserError, match="no LoRA/DoRA adapters"):
        peft_adapter(trained[0])
    model, _, _ = lora_model(tiny_model_dir)
    model.model.norm.unfreeze()  # a trained weight outside the adapters would be lost
    with pytest.raises(UserError, match="model.norm.weight"):
        peft_adapter(model)


# ---- `gmt-mlx export RUN_DIR`: rebuild a run's model from its config and a checkpoint --------


def _finetune_run(base, data, out, *extra):
    args = [
        "finetune",
        "--model",
        base,
        "--data",
        data,
        "--out",
        out,
        "--iters",
        "6",
        "--learning-rate",
        "1e-3",
        "--steps-per-eval",
        "3",
        "--steps-per-save",
        "2",
        "--keep-checkpoints",
        "5",
        *extra,
    ]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory):
    from tests.helpers import arithmetic_chat, write_jsonl

    root = tmp_path_factory.mktemp("runs")
    write_jsonl(root / "data" / "train.jsonl", arithmetic_chat(16))
    write_jsonl(root / "data" / "valid.jsonl", arithmetic_chat(4, 100))
    return {
        "gmt": _finetune_run(tiny_model_dir, root / "data", root / "gmt", "--mask-ratio", "0.5"),
        "lora": _finetune_run(
            tiny_model_dir,
            root / "data",
            root / "lora",
            "--method",
            "lora",
            "--lora-keys",
            "self_attn.q_proj,self_attn.v_proj",
            "--num-layers",
            "1",
        ),
    }


def export_cli(*args):
    return cli("export", *args)


def rebuilt(run_dir, checkpoint):
    """The in-memory model a checkpoint holds: base + the run's method + the checkpoint's weights."""
    import yaml

    from gmt_mlx.config import Config
    from gmt_mlx.models.loading import load_base
    from gmt_mlx.models.methods import prepare_model

    config = Config(**yaml.safe_load((run_dir / "config.yaml").read_text()))
    model, _, _, _ = load_base(config.model)
    prepare_model(model, config)
    model.load_weights(str(run_dir / "checkpoints" / checkpoint / "weights.safetensors"), strict=False)
    model.eval()
    return model


# Tolerances, logits of the exported folder vs the in-memory model (float32 weights):
# - mlx_lm.load: exactly equal to the in-memory model with its weights in the same dtype.
# - transformers (computing in float32 on the exported weights): 1e-4 absolute against the
#   in-memory model with its weights rounded to the export dtype (only kernel order differs).
# - low precision vs the float32 model: within DTYPE_ATOL (what rounding weights costs).
DTYPE_ATOL = {"float32": 1e-6, "bfloat16": 0.1, "float16": 0.02}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_export_best_checkpoint_round_trips(runs, tmp_path, dtype):
    from gmt_mlx.models.methods import DTYPES

    run = runs["gmt"]
    result = export_cli(run, "--out", tmp_path / "out", "--checkpoint", "best", "--dtype", dtype)
    assert result.exit_code == 0, result.output
    model = rebuilt(run, "best")
    full = np.array(model(mx.array(TOKENS)))
    exported = mx.load(str(tmp_path / "out" / "model.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    assert set(exported) == set(params)
    assert all(mx.array_equal(exported[k], v.astype(DTYPES[dtype])).item() for k, v in params.items())
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == dtype
    model.set_dtype(DTYPES[dtype])
    reloaded, _ = load(str(tmp_path / "out"))
    assert mx.array_equal(reloaded(mx.array(TOKENS)), model(mx.array(TOKENS))).item()
    assert np.abs(np.array(reloaded(mx.array(TOKENS)).astype(mx.float32)) - full).max() < DTYPE_ATOL[dtype]
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model.set_dtype(mx.float32)  # the rounded weights, computed in float32
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), torch_dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(hf(torch.tensor(TOKENS)).logits.numpy() - np.array(model(mx.array(TOKENS)))).max() < 1e-4


def test_export_last_is_the_final_model(runs, tmp_path):
    run = runs["gmt"]
    result = export_cli(run, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.output
    final = mx.load(str(run / "model" / "model.safetensors"))
    exported = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert set(final) == set(exported) and all(mx.array_equal(final[k], exported[k]).item() for k in final)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "README.md"):
        assert (tmp_path / "out" / name).is_file(), name
    assert "the final model (step 6)" in (tmp_path / "out" / "README.md").read_text()


@pytest.mark.parametrize("name", ["step-4", "step-000004"])
def test_export_a_step_checkpoint(runs, tmp_path, name):
    run = runs["gmt"]
    result = export_cli(run, "--out", tmp_path / "out", "--checkpoint", name)
    assert result.exit_code == 0, result.output
    reloaded, _ = load(str(tmp_path / "out"))
    model = rebuilt(run, "step-000004")
    assert mx.array_equal(reloaded(mx.array(TOKENS)), model(mx.array(TOKENS))).item()
    assert not mx.array_equal(model(mx.array(TOKENS)), rebuilt(run, "step-000006")(mx.array(TOKENS))).item()


def test_export_sharded_above_the_threshold(runs, tmp_path, monkeypatch):
    from gmt_mlx.models import hf

    monkeypatch.setattr(hf, "SHARD_BYTES", 100_000)
    assert export_cli(runs["gmt"], "--out", tmp_path / "out", "--checkpoint", "best").exit_code == 0
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    assert len(list((tmp_path / "out").glob("model-*-of-*.safetensors"))) >= 2
    reloaded, _ = load(str(tmp_path / "out"))
    assert mx.array_equal(reloaded(mx.array(TOKENS)), rebuilt(runs["gmt"], "best")(mx.array(TOKENS))).item()


def test_export_lora_run_merged_and_as_adapter(runs, tiny_model_dir, tmp_path):
    run = runs["lora"]
    model = rebuilt(run, "best")
    expected = np.array(model(mx.array(TOKENS)))
    assert export_cli(run, "--out", tmp_path / "merged", "--checkpoint", "best").exit_code == 0
    reloaded, _ = load(str(tmp_path / "merged"))
    assert np.abs(np.array(reloaded(mx.array(TOKENS))) - expected).max() < 1e-4
    base, _ = load(str(tiny_model_dir))
    assert np.abs(np.array(base(mx.array(TOKENS))) - expected).max() > 1e-3  # not silently the base
    result = export_cli(run, "--out", tmp_path / "adapter", "--checkpoint", "best", "--adapter-only")
    assert result.exit_code == 0, result.output
    files = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert {"adapter_config.json", "adapter_model.safetensors", "README.md"} <= set(files)
    assert not any(name.startswith("model") for name in files)
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), torch_dtype=torch.float32)
    hf = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        assert np.abs(hf(torch.tensor(TOKENS)).logits.numpy() - expected).max() < 1e-4


def test_export_errors(runs, tmp_path):
    run = runs["gmt"]
    assert_clean_error(
        export_cli(run, "--out", tmp_path / "o", "--checkpoint", "step-5"), "no checkpoint step-5", "best", "step-6"
    )
    assert_clean_error(export_cli(run, "--out", tmp_path / "o", "--checkpoint", "first"), "best, last or step-N")
    assert_clean_error(export_cli(run, "--out", tmp_path / "o", "--dtype", "int8"), "--dtype", "int8")
    assert_clean_error(export_cli(tmp_path, "--out", tmp_path / "o"), "not a gmt-mlx run directory")
    assert_clean_error(
        export_cli(run, "--out", tmp_path / "o", "--adapter-only", "--checkpoint", "best"), "no LoRA/DoRA adapters"
    )
    assert_clean_error(export_cli(run, "--out", run / "model"), "run's own files")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert_clean_error(export_cli(run, "--out", tmp_path / "busy"), "not an exported model")
    assert export_cli(run, "--out", tmp_path / "o").exit_code == 0
    assert_clean_error(export_cli(run, "--out", tmp_path / "o"), "--overwrite")
    assert export_cli(run, "--out", tmp_path / "o", "--overwrite").exit_code == 0
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".o.")]  # no temporary folder left


@pytest.mark.slow
def test_export_qdora_run_is_dequantized(runs, tiny_model_dir, tmp_path):
    """DoRA on a 4-bit base (the base stays quantized in training): the export is plain floats."""
    import shutil

    import mlx.nn as nn

    model, _, config = load(str(tiny_model_dir), return_config=True)
    nn.quantize(model, group_size=32, bits=4)
    base = shutil.copytree(tiny_model_dir, tmp_path / "q4")
    mx.save_safetensors(str(base / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (base / "config.json").write_text(json.dumps({**config, "quantization": {"group_size": 32, "bits": 4}}))
    run = _finetune_run(base, runs["gmt"].parent / "data", tmp_path / "run", "--method", "dora")
    assert export_cli(run, "--out", tmp_path / "out", "--checkpoint", "best").exit_code == 0
    assert "quantization" not in json.loads((tmp_path / "out" / "config.json").read_text())
    weights = mx.load(str(tmp_path / "out" / "model.safetensors"))
    assert all(v.dtype == mx.float32 for v in weights.values()) and not any("scales" in k for k in weights)
    expected = np.array(rebuilt(run, "best")(mx.array(TOKENS)))
    reloaded, _ = load(str(tmp_path / "out"))
    assert np.abs(np.array(reloaded(mx.array(TOKENS))) - expected).max() < 1e-4
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), torch_dtype=torch.float32)
    with torch.no_grad():
        assert np.abs(hf(torch.tensor(TOKENS)).logits.numpy() - expected).max() < 1e-4
