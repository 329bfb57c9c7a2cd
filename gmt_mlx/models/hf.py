"""Write a model back in Hugging Face layout: merged weights, or a PEFT adapter.

`save_hf_model` writes what `transformers` and `mlx_lm.load` read: safetensors
(sharded with an index above `SHARD_BYTES`), config.json, tokenizer files and
generation_config.json. LoRA/DoRA adapters are fused into their base weights
(the adapter scale included) and quantized layers are expanded to floats on
the way out, without modifying the in-memory model. `save_peft_adapter` writes
a LoRA run's adapters alone, in PEFT's format.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from gmt_mlx.config import Config
from gmt_mlx.errors import UserError
from gmt_mlx.models.methods import DTYPES, is_quantized
from gmt_mlx.run.checkpoint import save_arrays

# Shard above this many bytes per file, like transformers' and mlx_lm's writers.
SHARD_BYTES = 5 * 1024**3
WEIGHTS_INDEX = "model.safetensors.index.json"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# ---------------------------------------------------------------- merging


def is_adapter(module: nn.Module) -> bool:
    """An mlx_lm LoRA/DoRA layer (linear, embedding or switch), or anything shaped like one."""
    return callable(getattr(module, "fuse", None)) and "lora_a" in module and "lora_b" in module


def _fuse_one(module: nn.Module) -> nn.Module:
    try:
        return module.fuse(dequantize=True)
    except TypeError:  # an adapter class whose fuse() takes no arguments
        return module.fuse()


def _dequantized_params(module: nn.Module) -> Dict[str, mx.array]:
    weight = mx.dequantize(
        module["weight"],
        module["scales"],
        module.get("biases"),
        module.group_size,
        module.bits,
        mode=getattr(module, "mode", "affine"),
    )
    out = {"weight": weight}
    if "bias" in module:
        out["bias"] = module["bias"]
    return out


def _replacements(model: nn.Module) -> Dict[str, Dict[str, mx.array]]:
    """Module name -> the parameters that replace its subtree (fused adapters, dequantized layers)."""
    out: Dict[str, Dict[str, mx.array]] = {}
    for name, module in sorted(model.named_modules(), key=lambda nm: nm[0].count(".") if nm[0] else -1):
        if not name or any(name.startswith(done + ".") for done in out):
            continue  # the root, or inside a module already replaced (an adapter's base layer)
        if is_adapter(module):
            fused = _fuse_one(module)
            out[name] = _dequantized_params(fused) if is_quantized(fused) else dict(tree_flatten(fused.parameters()))
        elif is_quantized(module):
            out[name] = _dequantized_params(module)
    return out


def merged_weights(model: nn.Module) -> Dict[str, mx.array]:
    """All parameters with adapters fused and quantized layers dequantized; ``model`` is unchanged.

    A LoRA layer contributes ``W + scale * (lora_a @ lora_b).T`` under the base
    layer's name (``...q_proj.weight``), exactly what `fuse_adapters` would leave.
    """
    flat = dict(tree_flatten(model.parameters()))
    for name, params in _replacements(model).items():
        for key in [k for k in flat if k.startswith(name + ".")]:
            del flat[key]
        flat.update({f"{name}.{key}": value for key, value in params.items()})
    return flat


def fuse_adapters(model: nn.Module) -> nn.Module:
    """Replace every LoRA/DoRA layer by its fused base layer, in place; dequantize what is left.

    Returns ``model``. `save_hf_model` does not need this (it merges on the
    fly); use it to keep working with a merged model in memory.
    """
    from mlx_lm.utils import dequantize_model

    fused = [(name, _fuse_one(module)) for name, module in model.named_modules() if name and is_adapter(module)]
    if fused:
        model.update_modules(tree_unflatten(fused))
    if any(is_quantized(module) for _, module in model.named_modules()):
        model = dequantize_model(model)
    return model


def hf_weights(model: nn.Module, dtype: str) -> Dict[str, mx.array]:
    """The model's merged parameters under Hugging Face names, floats cast to ``dtype``."""
    target = DTYPES[dtype]
    out = {}
    for name, value in merged_weights(model).items():
        out[name] = value.astype(target) if mx.issubdtype(value.dtype, mx.floating) else value
    return out


# ---------------------------------------------------------------- HF folder


def _shard(weights: Dict[str, mx.array], shard_bytes: int) -> List[Dict[str, mx.array]]:
    shards, current, size = [], {}, 0
    for name in sorted(weights):
        nbytes = weights[name].nbytes
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = weights[name]
        size += nbytes
    shards.append(current)
    return shards


def save_safetensors(out_dir: Path, weights: Dict[str, mx.array], shard_bytes: Optional[int] = None) -> None:
    """Write ``weights`` as model.safetensors, or, above ``shard_bytes`` (default SHARD_BYTES),
    as numbered shards with model.safetensors.index.json, like transformers' writer."""
    shards = _shard(weights, SHARD_BYTES if shard_bytes is None else shard_bytes)
    weight_map = {}
    for i, shard in enumerate(shards):
        fname = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        # transformers requires format=pt in the safetensors metadata.
        save_arrays(out_dir / fname, shard, metadata={"format": "pt"})
        weight_map.update({name: fname for name in shard})
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(w.nbytes for w in weights.values())}, "weight_map": weight_map}
        (out_dir / WEIGHTS_INDEX).write_text(json.dumps(index, indent=2))


def _generation_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """What transformers derives from config.json when the base ships no generation_config.json."""
    out: Dict[str, Any] = {"_from_model_config": True}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if config.get(key) is not None:
            out[key] = config[key]
    return out


def save_hf_model(
    out_dir: str | Path,
    model: nn.Module,
    tokenizer,
    base_config: Dict[str, Any],
    *,
    dtype: str = Config.dtype,
    base_path: Optional[str | Path] = None,
    shard_bytes: Optional[int] = None,
) -> Path:
    """Write ``model`` as a Hugging Face folder that `mlx_lm.load` and `transformers` read.

    Adapters are merged and quantized layers dequantized (``model`` itself is not
    modified); config.json is the base's with the dtype updated and any
    quantization entry removed.
    """
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Old shards would be read with the new ones (mlx_lm globs model*.safetensors).
    for stale in [*out_dir.glob("model*.safetensors"), out_dir / WEIGHTS_INDEX]:
        stale.unlink(missing_ok=True)
    save_safetensors(out_dir, hf_weights(model, dtype), shard_bytes)
    config = dict(base_config)
    # The weights are saved dequantized: drop any quantization entry.
    for key in ("quantization", "quantization_config"):
        config.pop(key, None)
    config["torch_dtype"] = dtype
    if "dtype" in config:  # transformers >= 5 writes "dtype"
        config["dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2))
    tokenizer.save_pretrained(str(out_dir))
    generation = Path(base_path) / "generation_config.json" if base_path is not None else None
    if generation is not None and generation.is_file():
        shutil.copy(generation, out_dir / "generation_config.json")
    else:
        (out_dir / "generation_config.json").write_text(json.dumps(_generation_config(config), indent=2))
    return out_dir


# ---------------------------------------------------------------- PEFT adapter


def _dropout_p(module: nn.Module) -> float:
    dropout = getattr(module, "dropout", None)
    return round(1.0 - getattr(dropout, "_p_1", 1.0), 6) if dropout is not None else 0.0


def peft_adapter(model: nn.Module) -> Tuple[Dict[str, mx.array], Dict[str, Any]]:
    """The model's LoRA/DoRA adapters as PEFT tensors and the matching LoraConfig fields.

    mlx_lm computes ``y = W x + scale * (x @ lora_a) @ lora_b``; PEFT computes
    ``W x + (lora_alpha / r) * B(A(x))``, so ``A = lora_a.T``, ``B = lora_b.T``
    and ``lora_alpha = scale * r``. DoRA's magnitude ``m`` is PEFT's
    ``lora_magnitude_vector``.
    """
    from mlx_lm.tuner.dora import DoRALinear
    from mlx_lm.tuner.lora import LoRALinear

    weights: Dict[str, mx.array] = {}
    ranks, alphas, dropouts, kinds = {}, {}, set(), set()
    adapter_names = []
    for name, module in model.named_modules():
        if not name or not is_adapter(module):
            continue
        if not isinstance(module, (LoRALinear, DoRALinear)):
            raise UserError(
                f"{name}: {type(module).__name__} has no PEFT equivalent here; "
                "export the merged model instead (without --adapter-only)"
            )
        prefix = f"base_model.model.{name}"
        weights[f"{prefix}.lora_A.weight"] = module.lora_a.T
        weights[f"{prefix}.lora_B.weight"] = module.lora_b.T
        if isinstance(module, DoRALinear):
            weights[f"{prefix}.lora_magnitude_vector"] = module.m
        rank = int(module.lora_a.shape[1])
        ranks[name], alphas[name] = rank, float(module.scale) * rank
        dropouts.add(_dropout_p(module))
        kinds.add(type(module))
        adapter_names.append(name)
    if not adapter_names:
        raise UserError("the model has no LoRA/DoRA adapters: --adapter-only needs a lora or dora run")
    if len(kinds) > 1:
        raise UserError("the model mixes LoRA and DoRA layers, which one PEFT config cannot describe")
    lora_suffixes = (".lora_a", ".lora_b", ".m")
    others = [
        k
        for k, _ in tree_flatten(model.trainable_parameters())
        if not (k.endswith(lora_suffixes) and k.rsplit(".", 1)[0] in ranks)
    ]
    if others:
        raise UserError(
            f"--adapter-only would drop trained weights outside the adapters ({others[0]}, ...); "
            "export the merged model instead"
        )
    rank = Counter(ranks.values()).most_common(1)[0][0]
    alpha = Counter(alphas.values()).most_common(1)[0][0]
    config: Dict[str, Any] = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": max(dropouts),
        "use_dora": kinds == {DoRALinear},
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "modules_to_save": None,
        "rank_pattern": {n: r for n, r in ranks.items() if r != rank},
        "alpha_pattern": {n: a for n, a in alphas.items() if a != alpha},
    }
    config.update(_peft_targets(model, adapter_names))
    return weights, config


def _peft_targets(model: nn.Module, names: List[str]) -> Dict[str, Any]:
    """target_modules (+ layers_to_transform) that select exactly ``names`` in the model."""
    matches = [_LAYER.match(n) for n in names]
    if all(matches):
        layers = sorted({int(m.group(1)) for m in matches})
        suffixes = sorted({m.group(2) for m in matches})
        # The compact form must select the same modules in the whole model, no more.
        selected = set()
        for name, _ in model.named_modules():
            m = _LAYER.match(name)
            if m and int(m.group(1)) in layers and m.group(2) in suffixes:
                selected.add(name)
        if selected == set(names):
            all_layers = {int(m.group(1)) for m in map(_LAYER.match, (n for n, _ in model.named_modules())) if m}
            compact: Dict[str, Any] = {"target_modules": suffixes}
            if set(layers) != all_layers:
                compact.update(layers_to_transform=layers, layers_pattern="layers")
            return compact
    return {"target_modules": sorted(names)}  # exact names: PEFT matches a name against itself


def save_peft_adapter(
    out_dir: str | Path,
    model: nn.Module,
    *,
    base_model: Optional[str] = None,
    dtype: str = Config.dtype,
    tokenizer=None,
) -> Path:
    """Write the model's adapters as ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT)."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    weights, config = peft_adapter(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.astype(DTYPES[dtype]) for k, v in weights.items()}
    save_arrays(out_dir / PEFT_WEIGHTS, weights, metadata={"format": "pt"})
    config["base_model_name_or_path"] = base_model
    (out_dir / PEFT_CONFIG).write_text(json.dumps(dict(sorted(config.items())), indent=2))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))
    return out_dir
