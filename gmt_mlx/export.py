"""Write a model back in Hugging Face layout (safetensors + config + tokenizer)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .methods import DTYPES

# Shard above this many bytes per file, like the Hub's own writers.
SHARD_BYTES = 5 * 1024**3


def hf_weights(model: nn.Module, dtype: str) -> Dict[str, mx.array]:
    """The model's parameters under Hugging Face names, floats cast to ``dtype``."""
    target = DTYPES[dtype]
    out = {}
    for name, value in tree_flatten(model.parameters()):
        out[name] = value.astype(target) if mx.issubdtype(value.dtype, mx.floating) else value
    return out


def save_hf_model(
    out_dir: str | Path,
    model: nn.Module,
    tokenizer,
    base_config: Dict[str, Any],
    *,
    dtype: str = "float32",
    base_path: Optional[str | Path] = None,
) -> Path:
    """Write ``model`` as a Hugging Face folder that `mlx_lm.load` and `transformers` read."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = hf_weights(model, dtype)
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if current and size + nbytes > SHARD_BYTES:
            shards.append(current)
            current, size = {}, 0
        current[name] = weights[name]
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # transformers requires format=pt in the safetensors metadata.
        mx.save_safetensors(str(out_dir / fname), shard, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config = dict(base_config)
    # The weights are saved dequantized: drop any quantization entry.
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    config["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
    tokenizer.save_pretrained(str(out_dir))
    if base_path is not None and (Path(base_path) / "generation_config.json").is_file():
        shutil.copy(Path(base_path) / "generation_config.json", out_dir / "generation_config.json")
    return out_dir
