"""Convert a llama, qwen2, qwen3, phi3, gemma or gemma2 GGUF file into a Hugging Face model folder.

`convert_gguf(path, out_dir)` writes what `mlx_lm.load` and `transformers`
read: `model.safetensors` (dequantized, float32 by default), `config.json`
derived from the GGUF metadata (`hf_config`), `tokenizer.json` +
`tokenizer_config.json` rebuilt with the `tokenizers` library from the GGUF
vocabulary (`tokenizer`), and `generation_config.json`.

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
from pathlib import Path

from gmt_mlx.config import Config
from gmt_mlx.errors import UserError
from gmt_mlx.models.gguf.header import GGUFHeader, read_gguf_header
from gmt_mlx.models.gguf.hf_config import hf_config
from gmt_mlx.models.gguf.tables import (
    GGUF_SOURCE,
    NORM_PLUS_ONE_ARCHITECTURES,
    PERMUTED_QK_ARCHITECTURES,
    ROPE_TENSORS,
    SUPPORTED_ARCHITECTURES,
    TOP_NAMES,
    layer_names,
)
from gmt_mlx.models.gguf.tokenizer import build_tokenizer

SUPPORTED_TENSOR_TYPES = ("F32", "F16", "Q4_0", "Q4_1", "Q8_0")
QUANT_GROUP_SIZE = 32  # ggml's Q4_0/Q4_1/Q8_0 block size, as mx.load keeps it


def check_supported(header: GGUFHeader, path: str | Path = "") -> str:
    """Refuse files we cannot convert faithfully; return the architecture name."""
    meta = header.metadata
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UserError(
            f"unsupported GGUF architecture {arch!r} in {path} (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
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


# ---------------------------------------------------------------- writing


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: str = Config.dtype) -> Path:
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
