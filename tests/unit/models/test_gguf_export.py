"""GGUF export (issue 16 §5): checked by readers that are not our importer.

- MLX's own GGUF loader (`mx.load`) decodes the file; the tensors are renamed and
  their q/k rows put back with this file's and test_gguf.py's tables (derived from
  the two rope definitions, not from gmt_mlx), and an mlx_lm llama built from
  them gives the HF export's logits.
- The `gguf` package's GGUFReader (llama.cpp's own Python reader) reads the
  metadata and tensor types back.
- Our importer (`convert_gguf`) brings back bit-identical float32 weights,
  config and tokenizer.
- llama.cpp itself (`llama-cpp-python`), in a slow test, when it is installed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from gmt_mlx.errors import UserError
from gmt_mlx.models.gguf.header import read_gguf_header
from gmt_mlx.models.gguf.reader import convert_gguf, unpermute_qk
from gmt_mlx.models.tiny import make_tiny_model
from tests.helpers import cli

from .test_gguf import _TO_GGUF, ENGLISH, IDS, TEXTS, _smollm2_gguf, ggml_order, llama_cpp_permute

gguf = pytest.importorskip("gguf")

from gmt_mlx.models.gguf.writer import hf_folder_to_gguf, ollama_modelfile, permute_qk  # noqa: E402

_FROM_GGUF = {gg: hf for hf, gg in _TO_GGUF.items()}


# ---------------------------------------------------------------- an independent reader


def hf_from_mx_load(path: Path, config: dict) -> dict[str, mx.array]:
    """The GGUF as HF-named float32 tensors: mx.load decodes, this file renames and un-permutes
    (llama's q/k only: llama.cpp runs qwen2 with the NEOX rope, i.e. HF's row order)."""
    raw = mx.load(str(path))
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    if config["model_type"] == "qwen2":
        heads = {}
    out = {}
    for name in raw:
        if name.endswith((".scales", ".biases")) or name == "rope_freqs.weight":
            continue
        base, leaf = name.rsplit(".", 1)
        w = raw[name]
        if f"{base}.scales" in raw:  # Q8_0/Q4_0 come back as an MLX affine triplet, blocks of 32
            scales = raw[f"{base}.scales"]
            bits = w.shape[-1] * 32 // (scales.shape[-1] * 32)  # packed uint32 words per row -> bits
            w = mx.dequantize(
                w, scales.astype(mx.float32), raw[f"{base}.biases"].astype(mx.float32), group_size=32, bits=bits
            )
        w = np.array(w.astype(mx.float32))
        parts = base.split(".")
        if parts[0] == "blk":
            if parts[2] in heads:  # GGML slot j holds HF row order[j]: invert that
                d = w.shape[0] // heads[parts[2]]
                inverse = np.argsort(ggml_order(d))
                w = w.reshape(heads[parts[2]], d, *w.shape[1:])[:, inverse].reshape(w.shape)
            hf = f"model.layers.{parts[1]}.{_FROM_GGUF[parts[2]]}.{leaf}"
        else:
            hf = (
                {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}[base]
                + "."
                + leaf
            )
        out[hf] = mx.array(w)
    return out


def mlx_model_from_gguf(path: Path, hf_dir: Path):
    from mlx_lm.models import llama

    config = json.loads((hf_dir / "config.json").read_text())
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.load_weights(list(hf_from_mx_load(path, config).items()), strict=True)
    model.eval()
    return model


def hf_logits(hf_dir: Path, ids) -> np.ndarray:
    from mlx_lm.utils import load

    model, _ = load(str(hf_dir))
    return np.array(model(mx.array([ids])).astype(mx.float32))


def perplexity(model, ids) -> float:
    import mlx.nn as nn

    x = mx.array([ids])
    return math.exp(nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:]).mean().item())


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True, seed=1)


# ---------------------------------------------------------------- tensors


def test_permute_qk_is_llama_cpps_order_and_the_inverse_of_the_import():
    rng = np.random.default_rng(0)
    for n_head, rows, cols in [(4, 64, 8), (2, 32, 8), (3, 48, 1)]:
        w = rng.standard_normal((rows, cols)).astype(np.float32)
        np.testing.assert_array_equal(permute_qk(w, n_head), llama_cpp_permute(w, n_head))
        np.testing.assert_array_equal(unpermute_qk(permute_qk(w, n_head), n_head), w)
        bias = w[:, 0]
        np.testing.assert_array_equal(permute_qk(bias, n_head), llama_cpp_permute(bias, n_head))


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_tied"])
def test_f32_round_trip_through_our_import_is_exact(fixture, request, tmp_path):
    hf_dir = request.getfixturevalue(fixture)
    path = hf_folder_to_gguf(hf_dir, tmp_path / "m.gguf", outtype="f32")
    back = convert_gguf(path, tmp_path / "back")
    want, got = mx.load(str(hf_dir / "model.safetensors")), mx.load(str(back / "model.safetensors"))
    assert sorted(got) == sorted(want)
    assert all(mx.array_equal(got[k], want[k]).item() for k in want)
    cfg, orig = json.loads((back / "config.json").read_text()), json.loads((hf_dir / "config.json").read_text())
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "vocab_size",
        "rms_norm_eps",
        "rope_theta",
        "tie_word_embeddings",
        "eos_token_id",
        "max_position_embeddings",
    ):
        assert cfg[key] == orig[key], key
    from tokenizers import Tokenizer

    new, old = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (back, hf_dir))
    for text in TEXTS:
        assert new.encode(text).ids == old.encode(text).ids, text
    tc_new = json.loads((back / "tokenizer_config.json").read_text())
    tc_old = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert tc_new["chat_template"] == tc_old["chat_template"]
    assert (tc_new["eos_token"], tc_new["pad_token"]) == (tc_old["eos_token"], tc_old["pad_token"])


# Logits of an mlx_lm llama built from mx.load's tensors vs the HF folder (float32 compute).
MX_LOAD_ATOL = {"f32": 1e-4, "f16": 0.02, "q8_0": 0.1, "q4_0": 1.0}


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0", "q4_0"])
def test_mx_load_reads_the_gguf_with_the_hf_logits(outtype, tiny_model_dir, tmp_path):
    path = hf_folder_to_gguf(tiny_model_dir, tmp_path / "m.gguf", outtype=outtype)
    got = np.array(mlx_model_from_gguf(path, tiny_model_dir)(mx.array([IDS])))
    want = hf_logits(tiny_model_dir, IDS)
    diff = float(np.abs(got - want).max())
    print(f"{outtype}: max |logit diff| vs the HF folder = {diff:.2e}")
    assert diff < MX_LOAD_ATOL[outtype]
    if outtype == "f32":  # f32 is the same numbers, so it is the same model bit for bit
        assert diff == 0.0


def test_gguf_reader_sees_llama_cpps_layout(tiny_model_dir, tmp_path):
    """llama.cpp's own Python reader: architecture, types per outtype, tokenizer keys."""
    path = hf_folder_to_gguf(tiny_model_dir, tmp_path / "m.gguf", outtype="q8_0", name="tiny")
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}

    def value(key):
        return fields[key].contents()

    assert value("general.architecture") == "llama" and value("general.name") == "tiny"
    assert value("general.file_type") == 7 and value("general.quantization_version") == 2
    assert value("llama.block_count") == 2 and value("llama.rope.freq_base") == 10000.0
    assert value("tokenizer.ggml.model") == "gpt2" and value("tokenizer.ggml.pre") == "gpt-2"
    vocab = json.loads((tiny_model_dir / "tokenizer.json").read_text())
    tokens = value("tokenizer.ggml.tokens")
    assert all(tokens[i] == t for t, i in vocab["model"]["vocab"].items())
    types = value("tokenizer.ggml.token_type")
    assert [types[i] for i in (0, 1, 2)] == [3, 3, 3] and types[10] == 1  # specials are CONTROL
    assert tokens[value("tokenizer.ggml.eos_token_id")] == "<|im_end|>"
    assert "<|im_start|>" in value("tokenizer.chat_template")
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.0.attn_q.weight"] == "Q8_0"
    assert kinds["token_embd.weight"] == "Q8_0" and "output.weight" in kinds
    # Two decoders agree on the Q8_0 blocks: gguf's numpy one and mx.load's.
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    ours = np.array(
        hf_from_mx_load(path, json.loads((tiny_model_dir / "config.json").read_text()))[
            "model.layers.1.mlp.down_proj.weight"
        ]
    )
    np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type), ours)


@pytest.mark.parametrize("fixture", ["tiny_model_dir", "tiny_tied"])
def test_q4_0_keeps_the_output_matrix_in_q8_0(fixture, request, tmp_path):
    """q4_0: matrices Q4_0, the output matrix (the embedding when tied) Q8_0 as llama.cpp keeps it above 4 bits."""
    hf_dir = request.getfixturevalue(fixture)
    path = hf_folder_to_gguf(hf_dir, tmp_path / "m.gguf", outtype="q4_0")
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f for f in reader.fields.values()}
    assert fields["general.file_type"].contents() == 2 and fields["general.quantization_version"].contents() == 2
    kinds = {t.name: t.tensor_type.name for t in reader.tensors}
    assert kinds["blk.0.attn_q.weight"] == "Q4_0" and kinds["blk.1.ffn_down.weight"] == "Q4_0"
    assert kinds["blk.0.attn_norm.weight"] == "F32"
    if fixture == "tiny_tied":
        assert kinds["token_embd.weight"] == "Q8_0" and "output.weight" not in kinds
    else:
        assert kinds["token_embd.weight"] == "Q4_0" and kinds["output.weight"] == "Q8_0"
    # Two decoders agree on the Q4_0 blocks: gguf's numpy one and mx.load's.
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    ours = np.array(
        hf_from_mx_load(path, json.loads((hf_dir / "config.json").read_text()))["model.layers.1.mlp.down_proj.weight"]
    )
    np.testing.assert_array_equal(gguf.quants.dequantize(t.data, t.tensor_type), ours)
    # And our importer reads it back within Q4_0's step d = max|x| / 8 per block (half a step when
    # rounded, one where the codes -8..7 clip the side opposite the largest |x|).
    want = mx.load(str(hf_dir / "model.safetensors"))["model.layers.1.mlp.down_proj.weight"]
    back = mx.load(str(convert_gguf(path, tmp_path / "back") / "model.safetensors"))
    err = np.abs(np.array(back["model.layers.1.mlp.down_proj.weight"]) - np.array(want)).reshape(-1, 32)
    step = np.abs(np.array(want)).reshape(-1, 32).max(axis=1, keepdims=True) / 8
    assert (err <= step * 1.01).all() and np.median(err / step) < 0.3  # d is stored in f16: 1% slack


def test_llama3_and_linear_rope_scaling_survive_the_round_trip(tiny_model_dir, tmp_path):
    import shutil

    for scaling in [
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
        {"rope_type": "linear", "factor": 2.0},
    ]:
        src = tmp_path / scaling["rope_type"]
        shutil.copytree(tiny_model_dir, src)
        cfg = json.loads((src / "config.json").read_text())
        # transformers 5 writes rope_parameters and no top-level rope_theta.
        cfg["rope_parameters"] = {**scaling, "rope_theta": cfg.pop("rope_theta")}
        (src / "config.json").write_text(json.dumps(cfg))
        back = convert_gguf(
            hf_folder_to_gguf(src, src / "m.gguf", outtype="f32"), tmp_path / f"back-{scaling['rope_type']}"
        )
        got = json.loads((back / "config.json").read_text())
        assert got["rope_theta"] == 10000.0
        assert got["rope_scaling"] == scaling


def test_refusals_are_one_line_user_errors(tiny_model_dir, tmp_path):
    import shutil

    src = tmp_path / "gemma"
    shutil.copytree(tiny_model_dir, src)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma3_text"}))
    with pytest.raises(UserError, match="model type 'gemma3_text'"):
        hf_folder_to_gguf(src, tmp_path / "x.gguf")
    (src / "config.json").write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(UserError, match="rope scaling 'yarn'"):
        hf_folder_to_gguf(src, tmp_path / "x.gguf")
    (src / "config.json").write_text(json.dumps(cfg))
    tj = json.loads((src / "tokenizer.json").read_text())
    tj["pre_tokenizer"] = {"type": "Whitespace"}
    (src / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(UserError, match="pre-tokenizer Whitespace"):
        hf_folder_to_gguf(src, tmp_path / "x.gguf")
    with pytest.raises(UserError, match="--outtype"):
        hf_folder_to_gguf(tiny_model_dir, tmp_path / "x.gguf", outtype="q4_k")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*partial"))


def test_ollama_modelfile_for_chatml(tiny_model_dir, tmp_path):
    path = hf_folder_to_gguf(tiny_model_dir, tmp_path / "m.gguf", outtype="f16")
    text = ollama_modelfile(path.name, read_gguf_header(path).metadata)
    lines = text.splitlines()
    assert "FROM ./m.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|im_start|>"' in lines
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    meta = dict(read_gguf_header(path).metadata, **{"tokenizer.chat_template": "{{ messages }}"})
    other = ollama_modelfile("m.gguf", meta)
    assert not any(line.startswith("TEMPLATE") for line in other.splitlines())
    assert 'PARAMETER stop "<|im_end|>"' in other


# ---------------------------------------------------------------- Qwen2 and Mistral, written by transformers


LONGROPE_FACTORS = {
    "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 9.0],
    "short_factor": [1.0, 1.1, 1.2, 1.3, 1.5, 1.7, 2.0, 2.5],
}
# The families beyond llama/qwen2, each with what makes it differ (head_dim is not hidden/heads where the
# family allows it, so a config rebuilt from hidden/heads would not load).
FAMILIES = {
    # per-head q/k RMSNorms, no biases, explicit head_dim
    "qwen3": lambda t, shape: t.Qwen3Config(**shape, head_dim=32, tie_word_embeddings=False, rope_theta=1000000.0),
    # fused qkv_proj and gate_up_proj, half of each head rotated
    "phi3": lambda t, shape: t.Phi3Config(
        **shape,
        original_max_position_embeddings=2048,
        partial_rotary_factor=0.5,
        rope_theta=50000.0,
        sliding_window=None,
    ),
    # Phi-3.5 / Phi-4-mini's longrope (factors for the 8 rotated dims of a 16-dim head)
    "phi3-longrope": lambda t, shape: t.Phi3Config(
        **{**shape, "max_position_embeddings": 8192},
        original_max_position_embeddings=2048,
        rope_theta=10000.0,
        rope_scaling={"rope_type": "longrope", **LONGROPE_FACTORS},
    ),
    # RMSNorm scaling by 1 + weight, GELU-tanh, tied embeddings
    "gemma": lambda t, shape: t.GemmaConfig(**shape, head_dim=32),
    # sandwich norms, soft-capping (low caps, so they bite on random weights), every other layer windowed
    # (8 < len(IDS): a lost window shows in the logits)
    "gemma2": lambda t, shape: t.Gemma2Config(
        **shape,
        head_dim=32,
        query_pre_attn_scalar=32,
        sliding_window=8,
        attn_logit_softcapping=5.0,
        final_logit_softcapping=3.0,
    ),
}


def transformers_model(kind: str, out: Path, tiny_model_dir: Path) -> Path:
    """A tiny random Qwen2 (q/k/v biases, tied embeddings, Qwen2's split regex), Mistral or one of FAMILIES,
    saved by transformers itself (so config.json has transformers 5's rope_parameters), with the tiny tokenizer."""
    import shutil

    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from gmt_mlx.models.gguf.tables import QWEN2_PATTERN

    shape = dict(
        vocab_size=384,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        eos_token_id=2,
        bos_token_id=None,
        pad_token_id=0,
    )
    if kind == "qwen2":
        config = transformers.Qwen2Config(**shape, tie_word_embeddings=True, rope_theta=1000000.0)
        model = transformers.Qwen2ForCausalLM(config)
    elif kind == "mistral":
        config = transformers.MistralConfig(**shape, tie_word_embeddings=False, sliding_window=None)
        model = transformers.MistralForCausalLM(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(FAMILIES[kind](transformers, shape))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # biases too, so a wrongly permuted bias shows
            p.normal_(0, 0.2)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, out / name)
    if kind in ("qwen2", "qwen3"):
        tj = json.loads((out / "tokenizer.json").read_text())
        tj["pre_tokenizer"] = {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        }
        (out / "tokenizer.json").write_text(json.dumps(tj))
    return out


def torch_logits(folder: Path, ids) -> np.ndarray:
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits.numpy()


@pytest.mark.parametrize("kind,arch", [("qwen2", "qwen2"), ("mistral", "llama")])
def test_transformers_models_round_trip_through_gguf(kind, arch, tiny_model_dir, tmp_path):
    """transformers writes the model; GGUF out; mx.load and our import (then transformers) read it back."""
    src = transformers_model(kind, tmp_path / kind, tiny_model_dir)
    want = torch_logits(src, IDS)
    path = hf_folder_to_gguf(src, tmp_path / "m.gguf", outtype="f32")
    meta = read_gguf_header(path).metadata
    assert meta["general.architecture"] == arch
    config = json.loads((src / "config.json").read_text())
    assert "rope_theta" not in config  # transformers 5: rope_parameters only
    assert meta[f"{arch}.rope.freq_base"] == config["rope_parameters"]["rope_theta"]
    if kind == "qwen2":
        assert meta["tokenizer.ggml.pre"] == "qwen2" and "output.weight" not in read_gguf_header(path).tensor_types
        assert "blk.0.attn_q.bias" in read_gguf_header(path).tensor_types
    # MLX's reader: the GGUF's tensors, renamed by this file, are the model's.
    from mlx_lm.models import llama, qwen2

    module = qwen2 if kind == "qwen2" else llama
    mlx_config = {**config, "rope_theta": config["rope_parameters"]["rope_theta"]}
    model = module.Model(module.ModelArgs.from_dict(mlx_config))
    model.load_weights(list(hf_from_mx_load(path, mlx_config).items()), strict=True)
    assert np.abs(np.array(model(mx.array([IDS]))) - want).max() < 1e-4
    # Our import, then transformers.
    back = convert_gguf(path, tmp_path / "back")
    assert json.loads((back / "config.json").read_text())["model_type"] == ("qwen2" if kind == "qwen2" else "llama")
    assert np.abs(torch_logits(back, IDS) - want).max() < 1e-4
    from tokenizers import Tokenizer

    new, old = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (back, src))
    for text in TEXTS + ["digits 1234567 and 'll contractions"]:
        assert new.encode(text).ids == old.encode(text).ids, text


# llama.cpp's name for each GGUF architecture's tensors, from the gguf package (llama.cpp's own tables).
def llama_cpp_tensor_names(arch: str, n_layers: int) -> set[str]:
    from gguf.constants import MODEL_ARCH_NAMES, MODEL_TENSORS, TENSOR_NAMES

    model_arch = next(a for a, name in MODEL_ARCH_NAMES.items() if name == arch)
    bases = [TENSOR_NAMES[t] for t in MODEL_TENSORS[model_arch]]
    return {f"{b.format(bid=i)}.{leaf}" for b in bases for i in range(n_layers) for leaf in ("weight", "bias")}


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_more_families_round_trip_through_gguf(kind, tiny_model_dir, tmp_path):
    """Qwen3, Phi-3 (also longrope), Gemma and Gemma 2 written by transformers: GGUF out (llama.cpp's tensor
    names and transforms), our import back, the same weights, and transformers gives the same logits."""
    src = transformers_model(kind, tmp_path / kind, tiny_model_dir)
    config = json.loads((src / "config.json").read_text())
    arch = config["model_type"]
    want = torch_logits(src, IDS)
    path = hf_folder_to_gguf(src, tmp_path / "m.gguf", outtype="f32")

    # llama.cpp's own reader and tables: the architecture, tensor names it knows, metadata it reads.
    reader = gguf.GGUFReader(str(path))
    fields = {f.name: f.contents() for f in reader.fields.values()}
    stored = {t.name: np.array(t.data).reshape(tuple(reversed([int(d) for d in t.shape]))) for t in reader.tensors}
    assert fields["general.architecture"] == arch
    assert set(stored) <= llama_cpp_tensor_names(arch, config["num_hidden_layers"])
    original = {k: np.array(v) for k, v in mx.load(str(src / "model.safetensors")).items()}
    if arch == "qwen3":
        np.testing.assert_array_equal(
            stored["blk.1.attn_k_norm.weight"], original["model.layers.1.self_attn.k_norm.weight"]
        )
        assert fields["qwen3.attention.key_length"] == 32 and "blk.0.attn_q.bias" not in stored
    if arch == "phi3":  # fused and unpermuted (NEOX rope), as HF keeps them
        for gg, hf in (("attn_qkv", "self_attn.qkv_proj"), ("ffn_up", "mlp.gate_up_proj")):
            np.testing.assert_array_equal(stored[f"blk.0.{gg}.weight"], original[f"model.layers.0.{hf}.weight"])
        assert fields["phi3.rope.dimension_count"] == (8 if kind == "phi3" else 16)
        assert fields["phi3.rope.scaling.original_context_length"] == 2048
        assert ("rope_factors_long.weight" in stored) == (kind == "phi3-longrope")
    if arch.startswith("gemma"):  # llama.cpp stores Gemma's norms as 1 + weight, and no output matrix
        np.testing.assert_array_equal(
            stored["blk.0.attn_norm.weight"], original["model.layers.0.input_layernorm.weight"] + np.float32(1)
        )
        assert "output.weight" not in stored
    if arch == "gemma2":
        np.testing.assert_array_equal(
            stored["blk.1.post_ffw_norm.weight"],
            original["model.layers.1.post_feedforward_layernorm.weight"] + np.float32(1),
        )
        assert (fields["gemma2.attn_logit_softcapping"], fields["gemma2.final_logit_softcapping"]) == (5.0, 3.0)
        assert fields["gemma2.attention.sliding_window"] == 8

    # Our import: the same weights (Gemma's norms within the float32 rounding of 1 + w), then transformers.
    back = convert_gguf(path, tmp_path / "back")
    got = {k: np.array(v) for k, v in mx.load(str(back / "model.safetensors")).items()}
    assert sorted(got) == sorted(original)
    for name, w in original.items():
        if arch.startswith("gemma") and name.endswith("norm.weight"):
            np.testing.assert_allclose(got[name], w, rtol=0, atol=2**-22, err_msg=name)
        else:
            np.testing.assert_array_equal(got[name], w, err_msg=name)
    import transformers

    old, new = (transformers.AutoConfig.from_pretrained(str(d)) for d in (src, back))
    assert type(new) is type(old)
    for key in (
        "head_dim",
        "num_key_value_heads",
        "tie_word_embeddings",
        "rope_parameters",
        "sliding_window",
        "query_pre_attn_scalar",
        "attn_logit_softcapping",
        "final_logit_softcapping",
        "hidden_activation",
        "original_max_position_embeddings",
        "layer_types",
        "attention_bias",
    ):
        if hasattr(old, key):  # the import also writes longrope's legacy "type", which mlx-lm's phi3 requires
            drop_type = (lambda v: {k: x for k, x in v.items() if k != "type"}) if key == "rope_parameters" else None
            assert (drop_type or (lambda v: v))(getattr(new, key)) == getattr(old, key), key
    diff = float(np.abs(torch_logits(back, IDS) - want).max())
    print(f"{kind}: max |logit diff| transformers(imported) vs transformers(original) = {diff:.2e}")
    assert diff < 1e-4


def test_gemma_gguf_with_a_sentencepiece_vocab_imports(tiny_model_dir, tmp_path):
    """A Gemma GGUF as people download it: SentencePiece vocab (scores, byte pieces, no space prefix), which our
    exporter refuses, so this file is written here with gguf's GGUFWriter the way llama.cpp's converter lays it out
    (its own tensor names, norms as 1 + weight, no output matrix)."""
    spm = pytest.importorskip("sentencepiece")
    src = transformers_model("gemma", tmp_path / "gemma", tiny_model_dir)
    cfg = json.loads((src / "config.json").read_text())
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(
        "\n".join(
            [
                "The quick brown fox jumps over the lazy dog.",
                "Hello world, hello there!",
                "Numbers 12345 and words; more words and more numbers.",
            ]
            * 20
        )
    )
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=340,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        minloglevel=2,
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    )  # Gemma's ids, normalizer and turn markers
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n_vocab = cfg["vocab_size"]  # 384 embedding rows, 340 pieces: llama.cpp pads with unused [PADi]

    def kind(i):
        if i >= sp.get_piece_size():
            return 5
        return (
            2
            if sp.is_unknown(i)
            else 3
            if sp.is_control(i)
            else 6
            if sp.is_byte(i)
            else 4
            if sp.id_to_piece(i).startswith("<") and sp.id_to_piece(i).endswith("_turn>")
            else 1
        )

    writer = gguf.GGUFWriter(str(tmp_path / "g.gguf"), "gemma")
    for key, value in [
        ("context_length", cfg["max_position_embeddings"]),
        ("embedding_length", cfg["hidden_size"]),
        ("block_count", cfg["num_hidden_layers"]),
        ("feed_forward_length", cfg["intermediate_size"]),
        ("attention.head_count", cfg["num_attention_heads"]),
        ("attention.head_count_kv", cfg["num_key_value_heads"]),
        ("attention.key_length", cfg["head_dim"]),
        ("attention.value_length", cfg["head_dim"]),
    ]:
        writer.add_uint32(f"gemma.{key}", value)
    writer.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list([sp.id_to_piece(i) if i < sp.get_piece_size() else f"[PAD{i}]" for i in range(n_vocab)])
    writer.add_token_scores([sp.get_score(i) if i < sp.get_piece_size() else -1000.0 for i in range(n_vocab)])
    writer.add_token_types([kind(i) for i in range(n_vocab)])
    writer.add_bos_token_id(2)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(3)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(True)
    writer.add_add_space_prefix(False)
    table = {
        "input_layernorm": "attn_norm",
        "post_attention_layernorm": "ffn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    original = {k: np.array(v) for k, v in mx.load(str(src / "model.safetensors")).items()}
    for name, w in original.items():
        if name.startswith("model.layers."):
            _, _, layer, rest = name.split(".", 3)
            gname = f"blk.{layer}.{table[rest.rsplit('.', 1)[0]]}.weight"
        else:
            gname = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}[name]
        writer.add_tensor(gname, w + np.float32(1) if name.endswith("norm.weight") else w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    back = convert_gguf(tmp_path / "g.gguf", tmp_path / "back")
    got = {k: np.array(v) for k, v in mx.load(str(back / "model.safetensors")).items()}
    assert sorted(got) == sorted(original)
    for name, w in original.items():
        np.testing.assert_allclose(got[name], w, rtol=0, atol=2**-22 if name.endswith("norm.weight") else 0)
    assert np.abs(torch_logits(back, IDS) - torch_logits(src, IDS)).max() < 1e-4
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(str(back))
    for text in [
        "The quick brown fox.",
        "hello world numbers 42",
        "zebra ünïcode ✓",
        "<start_of_turn>user\nHello there<end_of_turn>",
        "  two  spaces,\ta tab\n\nand lines ",
    ]:
        assert tok.encode(text) == [2] + sp.encode(text), text  # BOS, then no prepended space
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == sp.decode(sp.encode(text))


def test_family_refusals_name_what_llama_cpp_cannot_run(tiny_model_dir, tmp_path):
    src = transformers_model("gemma2", tmp_path / "gemma2", tiny_model_dir)
    cfg = json.loads((src / "config.json").read_text())
    for change, message in [
        ({"query_pre_attn_scalar": 20}, "query_pre_attn_scalar 32"),
        ({"final_logit_softcapping": None}, "needs final_logit_softcapping"),
        ({"hidden_activation": "gelu"}, "hidden_act gelu_pytorch_tanh"),
        ({"tie_word_embeddings": False}, "tied embeddings"),
        ({"layer_types": ["full_attention"] * 2}, "every other layer"),
    ]:
        (src / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(UserError, match=message):
            hf_folder_to_gguf(src, tmp_path / "x.gguf")
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen3", "attention_bias": True}))
    with pytest.raises(UserError, match="attention_bias=true .*qwen3"):
        hf_folder_to_gguf(src, tmp_path / "x.gguf")
    assert not list(tmp_path.glob("*.gguf"))


# ---------------------------------------------------------------- gmt-mlx export RUN --format gguf


def export_cli(*args):
    return cli("export", *args)


@pytest.fixture(scope="module")
def lora_run(tiny_model_dir, tmp_path_factory):
    from tests.helpers import arithmetic_chat, write_jsonl

    root = tmp_path_factory.mktemp("gguf-run")
    write_jsonl(root / "data" / "train.jsonl", arithmetic_chat(16))
    write_jsonl(root / "data" / "valid.jsonl", arithmetic_chat(4, 100))
    args = [
        "finetune",
        "--model",
        tiny_model_dir,
        "--data",
        root / "data",
        "--out",
        root / "run",
        "--iters",
        "4",
        "--learning-rate",
        "1e-2",
        "--method",
        "lora",
        "--steps-per-eval",
        "4",
    ]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    return root / "run"


def test_export_run_as_gguf_matches_the_hf_export(lora_run, tiny_model_dir, tmp_path):
    assert export_cli(lora_run, "--out", tmp_path / "hf").exit_code == 0
    result = export_cli(lora_run, "--out", tmp_path / "tiny-gguf", "--format", "gguf", "--outtype", "f32")
    assert result.exit_code == 0, result.output
    assert "ollama create tiny-gguf" in result.output
    files = sorted(p.name for p in (tmp_path / "tiny-gguf").iterdir())
    assert files == ["Modelfile", "README.md", "tiny-gguf-f32.gguf"]
    path = tmp_path / "tiny-gguf" / "tiny-gguf-f32.gguf"
    want = hf_logits(tmp_path / "hf", IDS)
    assert np.abs(want - hf_logits(tiny_model_dir, IDS)).max() > 1e-3  # the LoRA delta is in there
    got = np.array(mlx_model_from_gguf(path, tmp_path / "hf")(mx.array([IDS])))
    assert np.abs(got - want).max() < 1e-4
    # --overwrite replaces a GGUF export; without it the folder is kept (another --outtype joins it: issue 37).
    again = export_cli(lora_run, "--out", tmp_path / "tiny-gguf", "--format", "gguf", "--outtype", "f32")
    assert again.exit_code == 2 and "--overwrite" in again.output
    again = export_cli(
        lora_run, "--out", tmp_path / "tiny-gguf", "--format", "gguf", "--outtype", "q8_0", "--overwrite"
    )
    assert again.exit_code == 0, again.output
    assert sorted(p.name for p in (tmp_path / "tiny-gguf").iterdir()) == [
        "Modelfile",
        "README.md",
        "tiny-gguf-q8_0.gguf",
    ]


def test_export_gguf_option_errors(lora_run, tmp_path, monkeypatch):
    from tests.helpers import assert_clean_error

    out = tmp_path / "o"
    assert_clean_error(export_cli(lora_run, "--out", out, "--format", "gguf", "--outtype", "q4_k"), "--outtype", "q4_k")
    assert_clean_error(export_cli(lora_run, "--out", out, "--format", "gguf", "--dtype", "float16"), "--outtype")
    assert_clean_error(export_cli(lora_run, "--out", out, "--format", "gguf", "--adapter-only"), "--adapter-only")
    assert_clean_error(export_cli(lora_run, "--out", out, "--outtype", "f16"), "--outtype is for --format gguf")
    assert_clean_error(export_cli(lora_run, "--out", out, "--format", "onnx"), "--format", "onnx")
    import sys

    monkeypatch.setitem(sys.modules, "gguf", None)  # as if not installed
    assert_clean_error(export_cli(lora_run, "--out", out, "--format", "gguf"), "pip install 'gmt-mlx[gguf]'")
    assert not out.exists()


# ---------------------------------------------------------------- the real SmolLM2-135M


@pytest.mark.slow
def test_real_smollm2_exports_to_gguf_that_mx_load_reads(tmp_path):
    """SmolLM2-135M (the embedded GGUF, converted to HF float32) -> GGUF f32 and q8_0."""
    from mlx_lm.utils import load

    from gmt_mlx.models.resolve import resolve_model

    original = read_gguf_header(_smollm2_gguf()).metadata
    hf_dir = resolve_model("smollm2-135m")
    _, tok = load(str(hf_dir))
    ids = tok.encode(ENGLISH)
    model_hf, _ = load(str(hf_dir))
    want = np.array(model_hf(mx.array([ids])))
    ppl_hf = perplexity(model_hf, ids)
    for outtype in ("f32", "q8_0"):
        path = hf_folder_to_gguf(hf_dir, tmp_path / f"smollm2-{outtype}.gguf", outtype=outtype)
        meta = read_gguf_header(path).metadata
        for key in (
            "tokenizer.ggml.tokens",
            "tokenizer.ggml.merges",
            "tokenizer.ggml.token_type",
            "tokenizer.ggml.pre",
            "tokenizer.ggml.bos_token_id",
            "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.padding_token_id",
            "tokenizer.chat_template",
            "llama.rope.freq_base",
            "llama.attention.head_count_kv",
            "llama.context_length",
        ):
            assert meta.get(key) == original.get(key), key
        model = mlx_model_from_gguf(path, hf_dir)
        diff = float(np.abs(np.array(model(mx.array([ids]))) - want).max())
        ppl = perplexity(model, ids)
        print(f"SmolLM2-135M {outtype}: max |logit diff| {diff:.2e}, perplexity {ppl:.3f} (HF float32 {ppl_hf:.3f})")
        if outtype == "f32":
            assert diff < 1e-4
        else:
            assert diff < 1.0 and abs(ppl - ppl_hf) / ppl_hf < 0.05


@pytest.mark.slow
def test_llama_cpp_reads_the_export(tiny_model_dir, tmp_path):
    """llama.cpp itself (llama-cpp-python): same tokens and the HF folder's logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = hf_folder_to_gguf(tiny_model_dir, tmp_path / "m.gguf", outtype="f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, verbose=False)
    from tokenizers import Tokenizer

    original = Tokenizer.from_file(str(tiny_model_dir / "tokenizer.json"))
    for text in TEXTS:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == original.encode(text).ids, text
    llm.eval(IDS)
    got = np.array(llm.scores[: len(IDS)])
    np.testing.assert_allclose(got, hf_logits(tiny_model_dir, IDS)[0], atol=1e-3)
