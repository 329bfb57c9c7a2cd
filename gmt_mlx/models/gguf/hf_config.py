"""The Hugging Face config.json of a GGUF model, derived from its metadata (and its rope factor tensors).

`hf_config` gives the llama keys every architecture shares and `_arch_config`
what one architecture adds or drops, as llama.cpp runs it. The Llama 3 rope
helpers work both ways: `llama3_rope_freqs` computes llama.cpp's `rope_freqs`
tensor (the export writes it) and `llama3_rope_scaling` recovers HF's
rope_scaling from it (the import).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from gmt_mlx.errors import UserError
from gmt_mlx.models.gguf.header import GGUFHeader
from gmt_mlx.models.gguf.tables import GEMMA_ACTIVATION, HF_MODEL_TYPES, ROPE_TENSORS

if TYPE_CHECKING:  # numpy only for an annotation: llama3_rope_freqs imports it when called
    import numpy as np


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


def llama3_rope_scaling(factors: list[float], base: float, head_dim: int) -> dict | None:
    """Recover Llama 3.x rope_scaling from llama.cpp's `rope_freqs` tensor.

    llama.cpp stores the per-frequency divisors it computed from HF's
    (factor, low_freq_factor, high_freq_factor, original context); we try the
    values every Llama 3.x release uses and keep the one that reproduces them.
    """
    if all(abs(f - 1.0) < 1e-6 for f in factors):
        return None  # identity: no scaling reaches these frequencies
    factor = max(factors)
    for low, high, original in [(1.0, 4.0, 8192)]:
        expect = llama3_rope_freqs(
            {
                "factor": factor,
                "low_freq_factor": low,
                "high_freq_factor": high,
                "original_max_position_embeddings": original,
            },
            base,
            head_dim,
        ).tolist()
        if len(expect) == len(factors) and all(abs(a - b) <= 1e-4 * max(1.0, abs(b)) for a, b in zip(factors, expect)):
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
    rope_scaling = _rope_scaling(header, raw, get, rope_theta, head_dim)

    tokens = meta.get("tokenizer.ggml.tokens") or []
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
        "eos_token_id": _eos_token_id(meta),
        "pad_token_id": meta.get("tokenizer.ggml.padding_token_id"),
        "torch_dtype": dtype_name,
    }
    config.update(_arch_config(arch, config, get, rope_dim))
    for key in [k for k, v in config.items() if v is _DROP]:
        del config[key]
    return config


def _rope_scaling(header: GGUFHeader, raw: dict | None, get, rope_theta: float, head_dim: int) -> dict | None:
    """config["rope_scaling"]: linear from the metadata, llama3 or longrope from llama.cpp's rope factor tensors."""
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
        rope_scaling = llama3_rope_scaling(factors, rope_theta, head_dim)
    if "rope_factors_long.weight" in header.tensor_types:  # Phi-3.5 / Phi-4-mini: longrope
        rope_scaling = {
            "rope_type": "longrope",
            "type": "longrope",  # the key mlx-lm's phi3 requires (Phi-3.5's own config.json has it)
            "long_factor": [_f32(float(f)) for f in raw["rope_factors_long.weight"].tolist()],
            "short_factor": [_f32(float(f)) for f in raw["rope_factors_short.weight"].tolist()],
        }
    return rope_scaling


def _eos_token_id(meta: dict):
    """config["eos_token_id"]: the end-of-sequence and end-of-turn ids, one int when they are one (None: neither)."""
    eos = meta.get("tokenizer.ggml.eos_token_id")
    eos_ids = [i for i in (eos, meta.get("tokenizer.ggml.eot_token_id")) if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids))  # unique, in order
    return eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None)


_DROP = object()  # an _arch_config value that removes the key: not part of that HF config class


def _arch_config(arch: str, config: dict, get, rope_dim: int) -> dict:
    """The config keys one architecture adds to (or drops from) the llama ones, as llama.cpp runs it."""
    n_layers = config["num_hidden_layers"]
    if arch in ("qwen2", "qwen3"):  # no sliding window in llama.cpp; qwen2's q/k/v biases are built in
        return {
            "mlp_bias": _DROP,
            "attention_bias": _DROP if arch == "qwen2" else False,
            "use_sliding_window": False,
            "sliding_window": None,
            "max_window_layers": n_layers,
        }
    if arch == "phi3":
        return {
            "attention_bias": _DROP,
            "mlp_bias": _DROP,
            "original_max_position_embeddings": int(
                get("rope.scaling.original_context_length", config["max_position_embeddings"])
            ),
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
