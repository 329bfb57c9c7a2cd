"""Convert a llama, qwen2, qwen3, phi3, gemma or gemma2 GGUF file into a Hugging Face model folder.

`convert_gguf(path, out_dir)` writes what `mlx_lm.load` and `transformers`
read: `model.safetensors` (dequantized, float32 by default), `config.json`
derived from the GGUF metadata, `tokenizer.json` + `tokenizer_config.json`
rebuilt with the `tokenizers` library from the GGUF vocabulary, and
`generation_config.json`.

How the tensors come back:
- `mx.load` reads F32/F16 tensors as they are and Q4_0/Q4_1/Q8_0 tensors as
  MLX affine-quantized triplets (`x.weight` packed uint32, `x.scales`,
  `x.biases`, group size 32), which `mx.dequantize` turns back into floats
  exactly (scales and biases are taken in float32, as ggml does).
- Every other ggml type (K-quants, IQ*, BF16, ...) is refused up front with a
  `UserError` naming it: `mx.load` would either fail on it or silently cast it
  to float16 through a decoder we cannot vouch for.
- llama.cpp's converter permutes the rows of q_proj/k_proj so that GGML's
  rope (rotating adjacent pairs) matches Hugging Face's (rotating the two
  halves of each head). We apply the exact inverse; see `unpermute_qk`.
  Only for `llama` (Llama, Mistral, SmolLM ...): llama.cpp runs qwen2, qwen3,
  phi3, gemma and gemma2 with the NEOX rope, which is Hugging Face's, so their
  rows are stored as they are.
- Per architecture (`layer_names`): qwen3's per-head q/k norms, phi3's fused
  `attn_qkv` and `ffn_up` (gate half first, as Hugging Face's gate_up_proj),
  gemma2's four norms per block. Gemma's RMSNorm scales by 1 + weight and
  llama.cpp stores that 1 + weight, so the import subtracts 1 again (exact up
  to float32 rounding of the stored sum: one ulp of 1 at most).

The GGUF header (metadata and tensor types) is parsed in pure Python
(`header.read_gguf_header`) so that an unsupported file is refused here before
any tensor is read.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

from gmt_mlx.errors import UserError
from gmt_mlx.models.gguf.header import GGUFHeader, read_gguf_header
from gmt_mlx.models.gguf.tables import (
    DIGITS_THEN_GPT2,
    GEMMA_ACTIVATION,
    GGUF_SOURCE,
    GPT2_STYLE,
    HF_MODEL_TYPES,
    LLAMA3_PATTERN,
    LLAMA3_STYLE,
    NORM_PLUS_ONE_ARCHITECTURES,
    PERMUTED_QK_ARCHITECTURES,
    QWEN2_PATTERN,
    QWEN2_STYLE,
    ROPE_TENSORS,
    SUPPORTED_ARCHITECTURES,
    TOP_NAMES,
    layer_names,
)

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
QUANT_GROUP_SIZE = 32  # ggml's Q4_0/Q4_1/Q8_0 block size, as mx.load keeps it

# llama.cpp token types (llama.h: LLAMA_TOKEN_TYPE_*).
_TOKEN_NORMAL, _TOKEN_UNKNOWN, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_BYTE = 1, 2, 3, 4, 6


def check_supported(header: GGUFHeader, path: str | Path = "") -> str:
    """Refuse files we cannot convert faithfully; return the architecture name."""
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"unsupported GGUF architecture {arch!r} in {path} "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    if meta.get(f"{arch}.expert_count", 0):
        raise UserError(f"unsupported GGUF model in {path}: mixture-of-experts {arch} (expert_count > 0)")
    bad = sorted({t for t in header.tensor_types.values() if t not in SUPPORTED_TENSOR_TYPES})
    if bad:
        raise UserError(
            f"unsupported GGUF tensor type(s) {', '.join(bad)} in {path} "
            f"(supported: {', '.join(SUPPORTED_TENSOR_TYPES)}); re-export it as Q8_0, F16 or F32"
        )
    return arch


# ---------------------------------------------------------------- tensors


def unpermute_qk(w, n_head: int):
    """GGML pairwise rows back to HF half-split rows: the inverse of llama.cpp's q/k permutation.

    llama.cpp's converter views the rows of one head as (2 halves, head_dim/2)
    and interleaves them into (head_dim/2, 2 pairs) for GGML's pairwise rope;
    this views them as (head_dim/2, 2) and swaps back. Works on numpy and MLX
    arrays, 1-D (bias) or 2-D.
    """
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def _dequantize(raw: dict, name: str):
    """One GGUF tensor as floats: F32/F16 as is, MLX triplets via mx.dequantize."""
    import mlx.core as mx

    w = raw[f"{name}.weight"]
    scales = raw.get(f"{name}.scales")
    if scales is None:
        return w
    cols = scales.shape[-1] * QUANT_GROUP_SIZE
    bits = w.shape[-1] * 32 // cols
    # float32 scales/biases: ggml dequantizes as float(d) * q + float(m) in fp32.
    return mx.dequantize(
        w,
        scales.astype(mx.float32),
        raw[f"{name}.biases"].astype(mx.float32),
        group_size=QUANT_GROUP_SIZE,
        bits=bits,
    )


def hf_tensor_names(header: GGUFHeader) -> dict[str, str]:
    """GGUF tensor name -> Hugging Face llama name, for every tensor the file holds."""
    arch = header.metadata.get("general.architecture", "llama")
    layers = layer_names(arch)
    names = {}
    for gguf_name in header.tensor_types:
        if gguf_name in ROPE_TENSORS:  # folded into config["rope_scaling"]
            continue
        parts = gguf_name.split(".")
        if parts[0] == "blk" and len(parts) == 4 and parts[2] in layers:
            names[gguf_name] = f"model.layers.{parts[1]}.{layers[parts[2]]}.{parts[3]}"
        elif len(parts) == 2 and parts[0] in TOP_NAMES:
            names[gguf_name] = f"{TOP_NAMES[parts[0]]}.{parts[1]}"
        else:
            raise UserError(f"unexpected tensor {gguf_name!r} in a {arch} GGUF (not a plain {arch}?)")
    n_layers = int(header.metadata.get(f"{arch}.block_count", 0))
    expected = ["model.embed_tokens.weight", "model.norm.weight"] + [
        f"model.layers.{i}.{m}.weight" for i in range(n_layers) for m in layers.values()
    ]
    missing = sorted(set(expected) - set(names.values()))
    if missing:
        raise UserError(f"GGUF is missing {len(missing)} {arch} tensor(s), e.g. {missing[0]}")
    return names


def _hf_weights(raw: dict, names: dict[str, str], config: dict, dtype) -> dict:
    """Dequantize, un-permute q/k, undo Gemma's 1 + norm and rename every tensor (lazily)."""
    import mlx.core as mx

    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    if config["model_type"] not in PERMUTED_QK_ARCHITECTURES:
        heads = {}  # NEOX rope: llama.cpp stored the rows in Hugging Face's order
    norm_shift = config["model_type"] in NORM_PLUS_ONE_ARCHITECTURES
    out = {}
    for gguf_name, hf_name in names.items():
        if gguf_name.endswith(".weight"):
            w = _dequantize(raw, gguf_name[: -len(".weight")])
        else:  # biases are stored unquantized
            w = raw[gguf_name]
        kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else None
        if kind in heads:
            w = unpermute_qk(w, heads[kind])
        if norm_shift and hf_name.endswith("norm.weight"):
            w = w.astype(mx.float32) - 1.0
        out[hf_name] = w.astype(dtype)
    return out


# ---------------------------------------------------------------- config


def _f32(x: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99e-06 -> 1e-05)."""
    return float(f"{x:.7g}")


def llama3_rope_freqs(scaling: dict, base: float, head_dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor (per-frequency divisors) for HF's llama3 rope scaling."""
    import numpy as np

    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    original = float(scaling.get("original_max_position_embeddings", 8192))
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * base ** (i / head_dim)
        if wavelen < original / high:
            out.append(1.0)
        elif wavelen > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _llama3_rope_scaling(factors: list[float], base: float, head_dim: int) -> dict | None:
    """Recover Llama 3.x rope_scaling from llama.cpp's `rope_freqs` tensor.

    llama.cpp stores the per-frequency divisors it computed from HF's
    (factor, low_freq_factor, high_freq_factor, original context); we try the
    values every Llama 3.x release uses and keep the one that reproduces them.
    """
    if all(abs(f - 1.0) < 1e-6 for f in factors):
        return None  # identity: no scaling reaches these frequencies
    factor = max(factors)
    for low, high, original in [(1.0, 4.0, 8192)]:
        expect = llama3_rope_freqs({"factor": factor, "low_freq_factor": low, "high_freq_factor": high,
                                    "original_max_position_embeddings": original}, base, head_dim).tolist()
        if len(expect) == len(factors) and all(
            abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(factors, expect)
        ):
            return {
                "rope_type": "llama3",
                "factor": _f32(factor),
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            }
    raise UserError("unsupported rope scaling: the GGUF's rope_freqs tensor matches no Llama 3 setting")


def hf_config(header: GGUFHeader, raw: dict | None = None, dtype_name: str = "float32") -> dict:
    """A Hugging Face config.json (the class of `HF_MODEL_TYPES`) built from GGUF metadata."""
    meta = header.metadata
    arch = meta.get("general.architecture", "llama")

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"GGUF metadata lacks {arch}.{key}")
        return value

    n_head = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    n_layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", hidden // n_head))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim and arch != "phi3":  # Phi-4-mini rotates part of each head, as HF's Phi3 can
        raise UserError(f"unsupported GGUF: partial rotary embedding ({rope_dim} of {head_dim} dims)")
    vocab = header.tensor_shapes["token_embd.weight"][0]
    rope_theta = _f32(get("rope.freq_base", 10000.0))
    rope_scaling = None
    scaling_type = get("rope.scaling.type", "none")
    if scaling_type == "linear":
        rope_scaling = {"rope_type": "linear", "factor": _f32(get("rope.scaling.factor"))}
    elif scaling_type != "none":
        raise UserError(f"unsupported GGUF rope scaling type {scaling_type!r} (supported: none, linear)")
    if raw is None and any(t in header.tensor_types for t in ROPE_TENSORS):
        raise ValueError("rope factor tensors need the loaded tensors")
    if "rope_freqs.weight" in header.tensor_types:
        factors = [float(f) for f in raw["rope_freqs.weight"].tolist()]
        rope_scaling = _llama3_rope_scaling(factors, rope_theta, head_dim)
    if "rope_factors_long.weight" in header.tensor_types:  # Phi-3.5 / Phi-4-mini: longrope
        rope_scaling = {
            "rope_type": "longrope",
            "type": "longrope",  # the key mlx-lm's phi3 requires (Phi-3.5's own config.json has it)
            "long_factor": [_f32(float(f)) for f in raw["rope_factors_long.weight"].tolist()],
            "short_factor": [_f32(float(f)) for f in raw["rope_factors_short.weight"].tolist()],
        }

    tokens = meta.get("tokenizer.ggml.tokens") or []
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [i for i in (eos, meta.get("tokenizer.ggml.eot_token_id")) if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids))  # unique, in order
    model_type, hf_class = HF_MODEL_TYPES.get(arch, HF_MODEL_TYPES["llama"])
    config = {
        "architectures": [hf_class],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": n_layers,
        "num_attention_heads": n_head,
        "num_key_value_heads": int(get("attention.head_count_kv", n_head)),
        "head_dim": head_dim,
        "vocab_size": int(vocab or len(tokens)),
        "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "hidden_act": "silu",
        "attention_bias": "blk.0.attn_q.bias" in header.tensor_types,
        "mlp_bias": False,
        "tie_word_embeddings": "output.weight" not in header.tensor_types,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype_name,
    }
    config.update(_arch_config(arch, config, get, rope_dim))
    for key in [k for k, v in config.items() if v is _DROP]:
        del config[key]
    return config


_DROP = object()  # an _arch_config value that removes the key: not part of that HF config class


def _arch_config(arch: str, config: dict, get, rope_dim: int) -> dict:
    """The config keys one architecture adds to (or drops from) the llama ones, as llama.cpp runs it."""
    n_layers = config["num_hidden_layers"]
    if arch in ("qwen2", "qwen3"):  # no sliding window in llama.cpp; qwen2's q/k/v biases are built in
        return {"mlp_bias": _DROP, "attention_bias": _DROP if arch == "qwen2" else False,
                "use_sliding_window": False, "sliding_window": None, "max_window_layers": n_layers}
    if arch == "phi3":
        return {
            "attention_bias": _DROP, "mlp_bias": _DROP,
            "original_max_position_embeddings": int(
                get("rope.scaling.original_context_length", config["max_position_embeddings"])),
            "sliding_window": int(get("attention.sliding_window", 0)) or None,  # 0: none (Phi-4)
            "partial_rotary_factor": rope_dim / config["head_dim"],
        }
    if arch in ("gemma", "gemma2"):
        extra = {"mlp_bias": _DROP, "hidden_act": GEMMA_ACTIVATION}
        if arch == "gemma2":
            # llama.cpp's gemma2 scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the
            # 46-layer 27B: HF's query_pre_attn_scalar. Soft-capping defaults are llama.cpp's.
            scalar = config["hidden_size"] // config["num_attention_heads"] if n_layers == 46 else config["head_dim"]
            extra.update(
                hidden_activation=GEMMA_ACTIVATION,
                query_pre_attn_scalar=scalar,
                attn_logit_softcapping=_f32(get("attn_logit_softcapping", 50.0)),
                final_logit_softcapping=_f32(get("final_logit_softcapping", 30.0)),
                sliding_window=int(get("attention.sliding_window", 4096)),
            )
        return extra
    return {}


# ---------------------------------------------------------------- tokenizer


def _bpe_pre_tokenizer(pre: str):
    """The Hugging Face pre-tokenizer matching llama.cpp's `tokenizer.ggml.pre`."""
    from tokenizers import Regex, pre_tokenizers

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in LLAMA3_STYLE or pre in QWEN2_STYLE:
        pattern = LLAMA3_PATTERN if pre in LLAMA3_STYLE else QWEN2_PATTERN
        split = pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False)
        return pre_tokenizers.Sequence(
            [split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    if pre not in GPT2_STYLE:
        warnings.warn(
            f"GGUF pre-tokenizer {pre!r} is not known to gmt-mlx; using GPT-2's split rules, "
            "so some texts may tokenize differently than in llama.cpp",
            stacklevel=3,
        )
    return byte_level


def _spm_merges(tokens: list[str], scores: list[float], vocab: dict[str, int], normal: set[int]):
    """BPE merges implied by a SentencePiece vocabulary: a piece's score ranks its merge."""
    ranked = []
    for i in sorted(normal):
        piece = tokens[i]
        local = [
            (piece[:k], piece[k:])
            for k in range(1, len(piece))
            if vocab.get(piece[:k]) in normal and vocab.get(piece[k:]) in normal
        ]
        local.sort(key=lambda lr: (vocab[lr[0]], vocab[lr[1]]))
        ranked.extend((scores[i], lr) for lr in local)
    ranked.sort(key=lambda item: -item[0])  # stable: ties keep vocabulary order
    return [lr for _, lr in ranked]


def build_tokenizer(metadata: dict):
    """A `tokenizers.Tokenizer` and its tokenizer_config.json dict from GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, processors

    kind = metadata.get("tokenizer.ggml.model")
    tokens = metadata.get("tokenizer.ggml.tokens")
    if kind is None or not tokens:
        raise UserError("GGUF has no tokenizer (tokenizer.ggml.model / tokens metadata missing)")
    types = metadata.get("tokenizer.ggml.token_type") or [_TOKEN_NORMAL] * len(tokens)
    vocab = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a duplicated string keeps its first id, like llama.cpp

    def token(key):
        idx = metadata.get(f"tokenizer.ggml.{key}")
        return tokens[idx] if idx is not None and 0 <= idx < len(tokens) else None

    bos, eos = token("bos_token_id"), token("eos_token_id")
    unk, pad = token("unknown_token_id"), token("padding_token_id")
    if kind == "gpt2":
        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges") or []]
        pre = metadata.get("tokenizer.ggml.pre", "default")
        tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre in LLAMA3_STYLE))
        tok.pre_tokenizer = _bpe_pre_tokenizer(pre)
        tok.decoder = decoders.ByteLevel()
        add_bos_default, byte_post = False, processors.ByteLevel(trim_offsets=False)
    elif kind == "llama":
        scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        normal = {i for i, t in enumerate(types) if t in (_TOKEN_NORMAL, _TOKEN_USER_DEFINED)}
        merges = _spm_merges(tokens, scores, vocab, normal)
        tok = Tokenizer(models.BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
        space_prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        steps = [normalizers.Prepend("▁")] if space_prefix else []
        tok.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
        strip = [decoders.Strip(" ", 1, 0)] if space_prefix else []  # the prepended space
        tok.decoder = decoders.Sequence(
            [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()] + strip
        )
        add_bos_default, byte_post = True, None
    else:
        raise UserError(f"unsupported GGUF tokenizer model {kind!r} (supported: gpt2, llama)")

    # Control tokens (and SPM's <unk>) are special; user-defined ones are matched
    # in raw text but decoded like normal text, as llama.cpp treats them.
    special_types = (_TOKEN_CONTROL, _TOKEN_UNKNOWN)
    specials = [tokens[i] for i, t in enumerate(types) if t in special_types]
    user = [tokens[i] for i, t in enumerate(types) if t == _TOKEN_USER_DEFINED]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    if user:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    add_bos = bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    add_eos = bool(metadata.get("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:
        head, tail = (f"{bos}:0 " if add_bos else ""), (f" {eos}:0" if add_eos else "")
        used = [(t, vocab[t]) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{head}$A:0{tail}",
            pair=f"{head}$A:0{tail} {head.replace(':0', ':1')}$B:1{tail.replace(':0', ':1')}",
            special_tokens=list(dict.fromkeys(used)),
        )
    elif byte_post is not None:
        tok.post_processor = byte_post

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": pad,
        "unk_token": unk,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(
            metadata.get(f"{metadata.get('general.architecture', 'llama')}.context_length", 2048)
        ),
    }
    if metadata.get("tokenizer.chat_template"):
        config["chat_template"] = metadata["tokenizer.chat_template"]
    return tok, config


# ---------------------------------------------------------------- writing


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Convert a GGUF file of a `SUPPORTED_ARCHITECTURES` model into a Hugging Face model folder; return out_dir.

    dtype: float dtype of the written weights ("float32", "float16" or
    "bfloat16"); float32 is what training and generation on CPU want.
    Raises UserError for files it cannot convert faithfully.
    """
    import mlx.core as mx

    from gmt_mlx.models.hf import save_safetensors

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if not gguf_path.is_file():
        raise UserError(f"GGUF file not found: {gguf_path}")
    if dtype not in ("float32", "float16", "bfloat16"):
        raise UserError(f"unsupported dtype {dtype!r} (use float32, float16 or bfloat16)")
    header = read_gguf_header(gguf_path)
    check_supported(header, gguf_path)
    names = hf_tensor_names(header)  # fail fast, before reading any tensor
    tokenizer, tokenizer_config = build_tokenizer(header.metadata)

    try:
        raw = mx.load(str(gguf_path))
    except Exception as err:  # mlx raises RuntimeError/ValueError with a one-line reason
        raise UserError(f"cannot load GGUF tensors from {gguf_path}: {err}") from err
    config = hf_config(header, raw, dtype)
    weights = _hf_weights(raw, names, config, getattr(mx, dtype))

    out_dir.mkdir(parents=True, exist_ok=True)
    save_safetensors(out_dir, weights)
    del weights, raw
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    tokenizer.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    ids = ("bos_token_id", "eos_token_id", "pad_token_id")
    generation = {k: config[k] for k in ids if config[k] is not None}
    (out_dir / "generation_config.json").write_text(json.dumps(generation, indent=2))
    source = {
        "converted_from": str(gguf_path.resolve()),
        "size": gguf_path.stat().st_size,
        "general.name": header.metadata.get("general.name"),
        "file_types": sorted(set(header.tensor_types.values())),
        "converter": "gmt_mlx.models.gguf.reader.convert_gguf",
    }
    (out_dir / GGUF_SOURCE).write_text(json.dumps(source, indent=2))
    return out_dir
