"""The model families users fine-tune, beyond llama: Qwen2, Phi-3, Mistral, Gemma 2.

Tiny random-weight models written by `transformers` itself (so the config and
weight names are what a user downloads): every method trains, resumes bit for
bit and exports within 1e-4 of transformers' logits (float32); the layer scope
finds each family's blocks. Their rope base is not mlx-lm's default, so a
config whose rope settings were misread would show in the logits.
"""

from __future__ import annotations

import json
import os
import signal

import mlx.core as mx
import numpy as np
import pytest

from gmt_mlx.config import Config
from gmt_mlx.core.masking import group_units
from gmt_mlx.recipes.finetune import finetune
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run.killcheck import final_weights

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LAYERS = 2
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rope_theta=50000.0,
)
FAMILIES = {
    # tied embeddings, q/k/v biases
    "qwen2": lambda v: transformers.Qwen2Config(vocab_size=v, tie_word_embeddings=True, **COMMON),
    # fused qkv_proj and gate_up_proj
    "phi3": lambda v: transformers.Phi3Config(
        vocab_size=v, pad_token_id=0, bos_token_id=1, eos_token_id=2, original_max_position_embeddings=256, **COMMON
    ),
    "mistral": lambda v: transformers.MistralConfig(vocab_size=v, sliding_window=None, **COMMON),
    # soft-capping, sandwich norms, a head_dim of its own, tied embeddings
    "gemma2": lambda v: transformers.Gemma2Config(
        vocab_size=v,
        head_dim=16,
        query_pre_attn_scalar=16,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        sliding_window=128,
        attn_logit_softcapping=50.0,
        final_logit_softcapping=30.0,
        **COMMON,
    ),
}
TOKENS = [[5, 17, 42, 99, 7, 250, 3, 64, 128, 11]]


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_dir(request, tmp_path_factory):
    """A tiny random model of one family, saved by transformers, with the tiny tokenizer."""
    from gmt_mlx.models.tiny import make_tiny_tokenizer

    out = tmp_path_factory.mktemp(request.param)
    make_tiny_tokenizer(out)
    vocab = len(json.loads((out / "tokenizer.json").read_text())["model"]["vocab"])
    torch.manual_seed(0)
    config = FAMILIES[request.param](vocab)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.save_pretrained(str(out), safe_serialization=True)
    return request.param, out


def hf_logits(folder) -> np.ndarray:
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype=torch.float32)
    with torch.no_grad():
        return hf(torch.tensor(TOKENS)).logits.numpy()


def run(model_dir, data, out, **kw):
    values = dict(
        model=str(model_dir),
        data=str(data),
        out=str(out),
        iters=4,
        batch_size=4,
        learning_rate=1e-3,
        mask_ratio=0.5,
        steps_per_eval=0,
        steps_per_save=2,
        samples=0,
        seed=1,
    )
    values.update(kw)
    return finetune(Config(**values), log=lambda *_: None)


def test_base_loads_with_transformers_logits(family_dir):
    """Before any training: mlx-lm's reading of the folder is transformers' model."""
    from gmt_mlx.models.loading import load_base

    _, folder = family_dir
    model = load_base(str(folder))[0]
    ours = np.array(model(mx.array(TOKENS)))
    assert np.abs(ours - hf_logits(folder)).max() < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gmt", "lora"])
def test_trains_and_exports_within_1e4_of_transformers(family_dir, chat_data, tmp_path, method):
    _, folder = family_dir
    result = run(folder, chat_data, tmp_path / method, method=method, mask_scope="layer")
    ours = np.array(result.model(mx.array(TOKENS)))
    assert np.abs(ours - hf_logits(result.model_dir)).max() < 1e-4


def test_layer_scope_finds_every_block(family_dir):
    from mlx.utils import tree_flatten

    from gmt_mlx.models.loading import load_base

    _, folder = family_dir
    names = [n for n, _ in tree_flatten(load_base(str(folder))[0].trainable_parameters())]
    blocks = [u for u in group_units(names, "layer") if u.split(".")[-2] == "layers"]
    assert len(blocks) == LAYERS
    # Every parameter of a block belongs to its block's unit, none is left on its own.
    assert sum(len(v) for u, v in group_units(names, "layer").items() if u in blocks) == sum(
        ".layers." in n for n in names
    )


def test_ctrl_c_and_resume_is_bit_for_bit(family_dir, chat_data, tmp_path, monkeypatch):
    _, folder = family_dir
    reference = run(folder, chat_data, tmp_path / "reference", method="gmt")
    real_fault = ckpt.fault
    monkeypatch.setattr(
        ckpt, "fault", lambda point: os.kill(os.getpid(), signal.SIGINT) if point == "after-step:1" else None
    )
    from gmt_mlx.errors import Interrupted

    with pytest.raises(Interrupted):
        run(folder, chat_data, tmp_path / "run", method="gmt")
    monkeypatch.setattr(ckpt, "fault", real_fault)
    run(folder, chat_data, tmp_path / "run", method="gmt")
    a, b = final_weights(reference.out), final_weights(tmp_path / "run")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def test_rope_parameters_are_mapped_or_refused(tmp_path):
    from gmt_mlx.errors import UserError
    from gmt_mlx.models.loading import rope_overrides

    assert rope_overrides({"rope_theta": 1e6, "rope_parameters": {"rope_theta": 5.0}}, tmp_path) == {}  # already read
    assert rope_overrides({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}}, tmp_path) == {
        "rope_theta": 5e5
    }
    llama3 = {
        "rope_theta": 5e5,
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    got = rope_overrides({"rope_parameters": llama3}, tmp_path)
    assert got["rope_theta"] == 5e5 and got["rope_scaling"]["type"] == "llama3" and got["rope_scaling"]["factor"] == 8.0
    with pytest.raises(UserError, match="per layer type"):
        rope_overrides(
            {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}},
            tmp_path,
        )
