"""Write a Hugging Face Llama/Mistral/Qwen2/Qwen3/Phi-3/Gemma/Gemma 2 folder as one GGUF file (llama.cpp, Ollama).

The inverse of `reader.convert_gguf` (the import), written with the `gguf` package
(llama.cpp's own Python writer):
- tensors renamed to llama.cpp's names (`tables.layer_names`: qwen3's q/k
  norms, phi3's fused qkv and gate_up kept fused, gemma2's four norms);
  q_proj/k_proj rows permuted into GGML's rope layout with `permute_qk`, the
  exact inverse of `reader.unpermute_qk` (llama only: llama.cpp runs the others
  with the NEOX rope, Hugging Face's own, and stores their rows as they are);
  Gemma's norms stored as 1 + weight, as llama.cpp's converter does;
  1-D tensors (norms, biases) stay F32, as llama.cpp's
  converter keeps them; matrices in F32, F16, Q8_0 or Q4_0 (`--outtype`), a
  matrix whose rows are not a whole number of 32-blocks falls back to F16 like
  llama.cpp's converter does; q4_0 keeps the output matrix (the embedding when
  tied) in Q8_0, as llama.cpp's quantizer keeps it above 4 bits (its Q6_K; the
  `gguf` package quantizes no k-quant, so no Q4_K_M here);
- the config as `{arch}.*` metadata (rope base read from `rope_theta` or
  transformers 5's `rope_parameters`; Llama 3 rope scaling as the
  `rope_freqs` tensor llama.cpp expects, Phi-3's longrope as its
  `rope_factors_long/short` tensors, linear scaling as metadata; Gemma 2's
  soft-capping and sliding window);
- the tokenizer (byte-level BPE: GPT-2, SmolLM/StarCoder, Llama 3 and Qwen2
  split rules) with its merges, token types, special tokens, add-BOS flag and
  chat template (`tokenizer.tokenizer_metadata`).

Whatever cannot be written faithfully (another architecture, an unknown
pre-tokenizer, a rope scaling llama.cpp would read differently) is a one-line
`UserError`. `ollama_modelfile` writes the Modelfile that goes beside it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from gmt_mlx.errors import UserError
from gmt_mlx.models.gguf.hf_config import llama3_rope_freqs
from gmt_mlx.models.gguf.tables import (
    GEMMA_ACTIVATION,
    NORM_PLUS_ONE_ARCHITECTURES,
    PERMUTED_QK_ARCHITECTURES,
    TOP_NAMES,
    layer_names,
)
from gmt_mlx.models.gguf.tokenizer import tokenizer_metadata

OUTTYPES = ("f32", "f16", "q8_0", "q4_0")
DEFAULT_OUTTYPE = "f16"  # llama.cpp's convert_hf_to_gguf.py default
# Hugging Face model_type -> GGUF architecture (llama.cpp converts Mistral as llama too); the import reads them all.
EXPORT_ARCHITECTURES = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "phi3": "phi3",
    "gemma": "gemma",
    "gemma2": "gemma2",
}
# GGUF architectures whose llama.cpp graph has no q/k/v biases.
_NO_ATTENTION_BIAS = ("qwen3", "phi3", "gemma", "gemma2")
INSTALL_HINT = "pip install 'gmt-mlx[gguf]'  (or: pip install gguf)"
MODELFILE = "Modelfile"
Q8_BLOCK = 32  # Q8_0's and Q4_0's block size
_FILE_TYPES = {"f32": 0, "f16": 1, "q8_0": 7, "q4_0": 2}  # llama.cpp's LlamaFileType
_QUANT_TYPES = {"q8_0": "Q8_0", "q4_0": "Q4_0"}  # outtype -> GGMLQuantizationType

_TO_GGUF_TOP = {hf: gg for gg, hf in TOP_NAMES.items()}


def require_gguf():
    """The `gguf` module, or a one-line error with the install command."""
    try:
        import gguf
    except ImportError as err:
        raise UserError(f"--format gguf needs the gguf package: {INSTALL_HINT}") from err
    return gguf


def check_outtype(outtype: Optional[str]) -> str:
    outtype = (outtype or DEFAULT_OUTTYPE).lower()
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got {outtype!r}")
    return outtype


def gguf_architecture(config: Dict[str, Any]) -> str:
    """The GGUF architecture for an HF config, or a one-line error naming what llama.cpp would run differently."""
    model_type = config.get("model_type")
    if model_type not in EXPORT_ARCHITECTURES:
        raise UserError(
            f"GGUF export does not support model type {model_type!r} "
            f"(supported: {', '.join(EXPORT_ARCHITECTURES)}); export --format hf instead"
        )
    arch = EXPORT_ARCHITECTURES[model_type]
    if config.get("mlp_bias"):
        raise UserError(f"GGUF export does not support mlp_bias=true (llama.cpp's {arch} has no MLP biases)")
    if config.get("attention_bias") and arch in _NO_ATTENTION_BIAS:
        raise UserError(f"GGUF export does not support attention_bias=true (llama.cpp's {arch} has no q/k/v biases)")
    if config.get("use_sliding_window"):
        raise UserError(f"GGUF export does not support use_sliding_window=true (llama.cpp's {arch} has no window)")
    act = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    want = GEMMA_ACTIVATION if arch in ("gemma", "gemma2") else "silu"
    if act != want:
        raise UserError(f"GGUF export of {model_type} needs hidden_act {want}, the config has {act!r}")
    if arch in ("gemma", "gemma2") and config.get("tie_word_embeddings") is False:
        raise UserError(f"GGUF export of {model_type} needs tied embeddings (llama.cpp's {arch} has no output matrix)")
    if arch == "gemma2":
        _check_gemma2(config)
    return arch


def _check_gemma2(config: Dict[str, Any]) -> None:
    """What llama.cpp's gemma2 graph fixes: both soft-caps on, its query scale, alternating sliding layers."""
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if not config.get(key):
            raise UserError(f"GGUF export of gemma2 needs {key} (llama.cpp's gemma2 always soft-caps)")
    heads, n_layers = int(config["num_attention_heads"]), int(config["num_hidden_layers"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    scalar = int(config["hidden_size"]) // heads if n_layers == 46 else head_dim  # llama.cpp: by model size
    if config.get("query_pre_attn_scalar", scalar) != scalar:
        raise UserError(
            f"GGUF export of gemma2 needs query_pre_attn_scalar {scalar} (llama.cpp's query scale "
            f"for {n_layers} layers), the config has {config['query_pre_attn_scalar']}"
        )
    alternating = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n_layers)]
    if config.get("layer_types", alternating) != alternating:
        raise UserError(
            "GGUF export of gemma2 needs sliding-window attention on every other layer from layer 0 "
            "(llama.cpp's pattern); this config's layer_types differ"
        )


# ---------------------------------------------------------------- tensors


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF half-split rows -> GGML pairwise rows, head by head: the inverse of `reader.unpermute_qk`.

    Each head's rows, viewed as (2 halves, head_dim/2), are interleaved into
    (head_dim/2, 2), so GGML slot 2i holds HF row i and slot 2i+1 row i + d/2.
    """
    shape = w.shape
    return w.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def rope_theta(config: Dict[str, Any]) -> float:
    """The rope base, from rope_theta or transformers 5's rope_parameters (10000 when neither)."""
    params = config.get("rope_parameters") or {}
    return float(config.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(config: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    scaling = config.get("rope_scaling") or config.get("rope_parameters") or None
    if not scaling or scaling.get("rope_type", scaling.get("type", "default")) == "default":
        return None
    return scaling


def _rotary_dim(config: Dict[str, Any]) -> int:
    """Rotated dims per head: all of them, or Phi-3's partial_rotary_factor of them (llama.cpp's rounding)."""
    params = config.get("rope_parameters") or {}
    factor = float(config.get("partial_rotary_factor") or params.get("partial_rotary_factor") or 1.0)
    heads = int(config["num_attention_heads"])
    if factor == 1.0:
        return int(config.get("head_dim") or config["hidden_size"] // heads)
    return int(factor * int(config["hidden_size"])) // heads


def gguf_tensors(weights: Dict[str, np.ndarray], config: Dict[str, Any]) -> Dict[str, np.ndarray]:
    """HF weights -> llama.cpp names, float32, q/k permuted for llama, Gemma's norms as 1 + weight;
    plus the rope factor tensors of Llama 3 and Phi-3 longrope scaling."""
    arch = gguf_architecture(config)
    to_gguf = {hf: gg for gg, hf in layer_names(arch).items()}
    heads = {
        "attn_q": config["num_attention_heads"],
        "attn_k": config.get("num_key_value_heads") or config["num_attention_heads"],
    }
    if arch not in PERMUTED_QK_ARCHITECTURES:
        heads = {}
    norm_shift = arch in NORM_PLUS_ONE_ARCHITECTURES
    out = {}
    for name, w in weights.items():
        parts = name.split(".")
        if name.rsplit(".", 1)[0] in _TO_GGUF_TOP:
            module, leaf = name.rsplit(".", 1)
            gname = f"{_TO_GGUF_TOP[module]}.{leaf}"
        elif parts[:2] == ["model", "layers"] and ".".join(parts[3:-1]) in to_gguf:
            kind = to_gguf[".".join(parts[3:-1])]
            gname = f"blk.{parts[2]}.{kind}.{parts[-1]}"
            if kind in heads:
                w = permute_qk(np.asarray(w), heads[kind])
        elif "rotary_emb" in name:  # a buffer some writers keep: llama.cpp computes it
            continue
        else:
            raise UserError(f"GGUF export: unexpected tensor {name!r} for a {config.get('model_type')} model")
        w = np.asarray(w, dtype=np.float32)
        if norm_shift and name.endswith("norm.weight"):
            w = w + np.float32(1.0)
        out[gname] = np.ascontiguousarray(w)
    if config.get("tie_word_embeddings", arch in NORM_PLUS_ONE_ARCHITECTURES) and "output.weight" in out:
        del out["output.weight"]  # llama.cpp reads a missing output.weight as tied
    scaling = _rope_scaling(config)
    kind = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
        out["rope_freqs.weight"] = llama3_rope_freqs(scaling, rope_theta(config), head_dim)
    elif kind in ("longrope", "su") and arch == "phi3":
        for which in ("long", "short"):
            factors = np.asarray(scaling[f"{which}_factor"], np.float32)
            if factors.shape != (_rotary_dim(config) // 2,):
                raise UserError(
                    f"GGUF export: {which}_factor has {factors.size} values, "
                    f"the rope rotates {_rotary_dim(config)} dims (needs half as many)"
                )
            out[f"rope_factors_{which}.weight"] = factors
    return out


def encode_tensor(name: str, w: np.ndarray, outtype: str, *, tied: bool = False):
    """(data, raw ggml type or None) as GGUFWriter.add_tensor takes them; 1-D tensors stay F32.

    q4_0 writes the output matrix (``token_embd`` when ``tied``: it is the output too) as Q8_0."""
    gguf = require_gguf()
    if w.ndim == 1 or outtype == "f32":
        return w.astype(np.float32), None
    if outtype == "q4_0" and name == ("token_embd.weight" if tied else "output.weight"):
        outtype = "q8_0"
    if outtype in _QUANT_TYPES and w.shape[-1] % Q8_BLOCK == 0:
        qtype = gguf.GGMLQuantizationType[_QUANT_TYPES[outtype]]
        return gguf.quants.quantize(w, qtype), qtype
    return w.astype(np.float16), None  # f16, or a row length q8_0/q4_0 cannot block (llama.cpp's fallback)


# ---------------------------------------------------------------- metadata


def model_metadata(config: Dict[str, Any], arch: str, n_vocab: int) -> Dict[str, Any]:
    """`{arch}.*` keys from an HF config (ints and floats typed as llama.cpp reads them)."""
    heads = int(config["num_attention_heads"])
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    meta = {
        f"{arch}.context_length": int(config.get("max_position_embeddings", 2048)),
        f"{arch}.embedding_length": int(config["hidden_size"]),
        f"{arch}.feed_forward_length": int(config["intermediate_size"]),
        f"{arch}.block_count": int(config["num_hidden_layers"]),
        f"{arch}.attention.head_count": heads,
        f"{arch}.attention.head_count_kv": int(config.get("num_key_value_heads") or heads),
        f"{arch}.attention.key_length": head_dim,
        f"{arch}.attention.value_length": head_dim,
        f"{arch}.attention.layer_norm_rms_epsilon": float(config.get("rms_norm_eps", 1e-5)),
        f"{arch}.rope.freq_base": rope_theta(config),
        f"{arch}.rope.dimension_count": _rotary_dim(config),
        f"{arch}.vocab_size": int(n_vocab),
    }
    if arch == "phi3":
        meta[f"{arch}.rope.scaling.original_context_length"] = int(
            config.get("original_max_position_embeddings") or meta[f"{arch}.context_length"]
        )
        meta[f"{arch}.attention.sliding_window"] = int(config.get("sliding_window") or 0)  # 0: none
    elif arch == "gemma2":
        meta[f"{arch}.attn_logit_softcapping"] = float(config["attn_logit_softcapping"])
        meta[f"{arch}.final_logit_softcapping"] = float(config["final_logit_softcapping"])
        meta[f"{arch}.attention.sliding_window"] = int(config.get("sliding_window") or 4096)
    elif meta[f"{arch}.rope.dimension_count"] != head_dim:
        raise UserError(f"GGUF export of {config.get('model_type')} does not support a partial rotary embedding")
    scaling = _rope_scaling(config)
    if scaling is not None:
        kind = scaling.get("rope_type", scaling.get("type"))
        if kind == "linear":
            meta[f"{arch}.rope.scaling.type"] = "linear"
            meta[f"{arch}.rope.scaling.factor"] = float(scaling["factor"])
        elif kind in ("longrope", "su") and arch == "phi3":  # the factors go in rope_factors_* tensors
            orig = meta[f"{arch}.rope.scaling.original_context_length"]
            scale = meta[f"{arch}.context_length"] / orig
            meta[f"{arch}.rope.scaling.attn_factor"] = (
                math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
            )
        elif kind != "llama3":  # llama3 goes in the rope_freqs tensor
            supported = "linear, llama3, longrope (phi3)"
            raise UserError(f"GGUF export does not support rope scaling {kind!r} (supported: {supported})")
    return meta


# ---------------------------------------------------------------- Ollama

_CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
_LLAMA3 = (
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>"
    "{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"
)


def ollama_modelfile(gguf_name: str, metadata: Dict[str, Any]) -> str:
    """An Ollama Modelfile for the GGUF: FROM, the chat template in Go syntax when it is a known
    family (ChatML, Llama 3), and the end-of-turn tokens as stop parameters."""
    tokens = metadata["tokenizer.ggml.tokens"]
    template = metadata.get("tokenizer.chat_template") or ""
    lines = [f"# Ollama: ollama create NAME -f {MODELFILE} && ollama run NAME", f"FROM ./{gguf_name}"]
    stops = [
        tokens[metadata[k]] for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id") if k in metadata
    ]
    if "<|im_start|>" in template and "<|im_end|>" in template:
        lines.append(f'TEMPLATE """{_CHATML}"""')
        stops += ["<|im_start|>", "<|im_end|>"]
    elif "<|start_header_id|>" in template and "<|eot_id|>" in template:
        lines.append(f'TEMPLATE """{_LLAMA3}"""')
        stops += ["<|start_header_id|>", "<|eot_id|>"]
    elif template:
        lines.append("# The chat template (GGUF tokenizer.chat_template) has no Go translation here;")
        lines.append("# recent Ollama versions derive one from the GGUF, or write a TEMPLATE line by hand.")
    lines += [f'PARAMETER stop "{s}"' for s in dict.fromkeys(stops)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- writing


def write_gguf(
    path: str | Path, arch: str, metadata: Dict[str, Any], tensors: Dict[str, np.ndarray], outtype: str
) -> Path:
    """Write metadata and float32 tensors (encoded as `outtype`) to one GGUF file, atomically."""
    gguf = require_gguf()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        for key, value in metadata.items():
            if key == "general.architecture":
                continue  # GGUFWriter writes it from arch
            if isinstance(value, list) and value and isinstance(value[0], int) and not isinstance(value[0], bool):
                writer.add_key_value(key, value, gguf.GGUFValueType.ARRAY, sub_type=gguf.GGUFValueType.INT32)
            elif isinstance(value, int) and not isinstance(value, bool):
                writer.add_uint32(key, value)
            else:  # str, float (float32), bool, list of str/float: the writer's own typing
                writer.add_key_value(key, value, gguf.GGUFValueType.get_type(value))
        writer.add_file_type(_FILE_TYPES[outtype])
        if outtype in _QUANT_TYPES:
            writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tied = "output.weight" not in tensors  # llama.cpp reads a missing output.weight as tied
        for name, w in tensors.items():
            data, raw_dtype = encode_tensor(name, w, outtype, tied=tied)
            writer.add_tensor(name, data, raw_dtype=raw_dtype)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return path


def _load_hf_weights(hf_dir: Path) -> Dict[str, np.ndarray]:
    import mlx.core as mx

    files = sorted(hf_dir.glob("model*.safetensors"))
    if not files:
        raise UserError(f"no model*.safetensors in {hf_dir}")
    out = {}
    for f in files:
        out.update({k: np.array(v.astype(mx.float32)) for k, v in mx.load(str(f)).items()})
    return out


def hf_folder_to_gguf(
    hf_dir: str | Path, out_path: str | Path, *, outtype: str = DEFAULT_OUTTYPE, name: Optional[str] = None
) -> Path:
    """Convert a Hugging Face folder (float weights, config.json, tokenizer.json) into one GGUF file."""
    require_gguf()
    hf_dir = Path(hf_dir)
    outtype = check_outtype(outtype)
    config = json.loads((hf_dir / "config.json").read_text())
    arch = gguf_architecture(config)
    tokenizer_json = json.loads((hf_dir / "tokenizer.json").read_text())
    config_path = hf_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    template_path = hf_dir / "chat_template.jinja"  # transformers >= 4.47 keeps the template here
    chat_template = template_path.read_text() if template_path.is_file() else None

    tensors = gguf_tensors(_load_hf_weights(hf_dir), config)
    n_vocab = tensors["token_embd.weight"].shape[0]
    metadata = {
        "general.name": name or hf_dir.name,
        **model_metadata(config, arch, n_vocab),
        **tokenizer_metadata(tokenizer_json, tokenizer_config, config, n_vocab, chat_template),
    }
    return write_gguf(out_path, arch, metadata, tensors, outtype)


def save_gguf_model(
    out_dir: str | Path,
    model,
    tokenizer,
    base_config: Dict[str, Any],
    *,
    outtype: Optional[str] = None,
    name: str = "model",
) -> Path:
    """Write ``model`` (adapters merged) as OUT_DIR/NAME-OUTTYPE.gguf plus an Ollama Modelfile; return the .gguf."""
    import shutil
    import tempfile

    from gmt_mlx.models.hf import save_hf_model

    outtype = check_outtype(outtype)
    gguf_architecture(base_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".hf-staging.", dir=out_dir))
    try:  # the one HF writer (merging, dequantizing) feeds the one GGUF writer
        save_hf_model(staging, model, tokenizer, base_config, dtype="float32")
        path = hf_folder_to_gguf(staging, out_dir / f"{name}-{outtype}.gguf", outtype=outtype, name=name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    from gmt_mlx.models.gguf.header import read_gguf_header

    (out_dir / MODELFILE).write_text(ollama_modelfile(path.name, read_gguf_header(path).metadata))
    return path
