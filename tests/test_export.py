"""RUN_DIR/model/ round trip: mlx_lm.load and transformers give the in-memory logits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm import load

from gmt_mlx.config import Config
from gmt_mlx.export import save_hf_model
from gmt_mlx.methods import prepare_model
from gmt_mlx.optim import build_optimizer
from gmt_mlx.trainer import train

TOKENS = [[1, 5, 9, 40, 77, 2, 3, 8, 100, 200]]


@pytest.fixture(scope="module")
def trained(tiny_model_dir):
    model, tokenizer, config = load(str(tiny_model_dir), return_config=True)
    prepare_model(model, Config())
    tokens = mx.array(TOKENS)
    train(model, build_optimizer("adamw", 1e-2, method="gmt", mask_ratio=0.5), iter([(tokens, mx.ones(tokens.shape))] * 3), iters=3)
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
    from gmt_mlx.loading import load_base

    from .test_gguf import Q8_0, hf_to_gguf

    gguf = hf_to_gguf(tiny_model_dir, tmp_path / "m.gguf", Q8_0)
    model, tokenizer, config, path = load_base(str(gguf))
    save_hf_model(tmp_path / "exported", model, tokenizer, config, dtype="float32", base_path=path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "exported"), torch_dtype=torch.float32)
    with torch.no_grad():
        hf_logits = hf(torch.tensor(TOKENS)).logits.numpy()
    assert np.abs(hf_logits - np.array(model(mx.array(TOKENS)))).max() < 1e-4
