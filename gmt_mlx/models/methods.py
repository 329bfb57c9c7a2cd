"""Prepare a loaded model for a method: which parameters train, in which dtype."""

from __future__ import annotations

from typing import Dict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from gmt_mlx.config import ADAPTER_METHODS, Config
from gmt_mlx.errors import UserError

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


def transformer_blocks(model: nn.Module) -> list:
    """The model's list of transformer blocks (mlx-lm models expose `.layers`)."""
    layers = getattr(model, "layers", None)
    if layers is None:
        layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ValueError(f"cannot find the transformer blocks of {type(model).__name__}")
    return list(layers)


def prepare_model(model: nn.Module, config: Config) -> Dict[str, int]:
    """Cast to the training dtype and freeze what the config excludes.

    By default everything trains, embeddings and lm_head included (unlike
    `mlx_lm.lora --fine-tune-type full`); lora/dora train adapters only (see
    `add_adapters`). Returns trainable/total entry counts.
    """
    if config.method in ADAPTER_METHODS:
        return add_adapters(model, config)
    model.set_dtype(DTYPES[config.train_dtype])
    model.unfreeze()
    if config.num_layers > 0:
        blocks = transformer_blocks(model)
        for block in blocks[: max(0, len(blocks) - config.num_layers)]:
            block.freeze()
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if config.freeze_embeddings and leaf == "embed_tokens":
            module.freeze()
        if config.freeze_lm_head and leaf == "lm_head":
            module.freeze()
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    if trainable == 0:
        raise ValueError("no trainable parameters left after freezing")
    return {"trainable": trainable, "total": total}


def enable_grad_checkpoint(model: nn.Module) -> int:
    """Recompute each transformer block's activations in the backward pass.

    Unlike mlx_lm's `grad_checkpoint`, which replaces `__call__` on the layer
    *class* for the whole process, this gives each block of this model its own
    one-off subclass, so other models (and tests) are unaffected and parameter
    names do not change. Returns the number of blocks wrapped.
    """
    blocks = transformer_blocks(model)
    for block in blocks:
        cls = type(block)
        if getattr(cls, "_gmt_checkpointed", False):
            continue
        call = cls.__call__

        def checkpointed(self, *args, _call=call, **kwargs):
            def inner(params, *inner_args, **inner_kwargs):
                self.update(params)
                return _call(self, *inner_args, **inner_kwargs)

            return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

        block.__class__ = type(cls.__name__, (cls,), {"__call__": checkpointed, "_gmt_checkpointed": True})
    return len(blocks)


def is_quantized(module: nn.Module) -> bool:
    """A quantized layer (QuantizedLinear / QuantizedEmbedding / mlx_lm's QuantizedSwitchLinear)."""
    return "scales" in module and hasattr(module, "bits") and hasattr(module, "group_size")


def add_adapters(model: nn.Module, config: Config) -> Dict[str, int]:
    """Freeze the base and add LoRA (or DoRA) adapters with mlx-lm's layers.

    A quantized base stays quantized (QLoRA): only the adapters are floats.
    Adapters go on the last ``num_layers`` blocks (-1: all), on the modules
    named by ``lora_keys`` (empty: every linear layer of a block, mlx-lm's
    default). Returns trainable/total entry counts (a quantized weight counts
    as the number of values it packs).
    """
    from mlx_lm.tuner.utils import linear_to_lora_layers

    blocks = transformer_blocks(model)
    model.freeze()
    keys = [k.strip() for k in config.lora_keys.split(",") if k.strip()]
    if keys:
        present = {name for block in blocks for name, _ in block.named_modules()}
        missing = [k for k in keys if k not in present]
        if missing:
            linear = sorted(
                name for name, m in blocks[0].named_modules() if isinstance(m, (nn.Linear, nn.QuantizedLinear))
            )
            raise UserError(
                f"--lora-keys {', '.join(missing)} not found in the model's blocks; "
                f"linear layers there: {', '.join(linear)}"
            )
    num_layers = len(blocks) if config.num_layers < 0 else min(config.num_layers, len(blocks))
    lora_config = {
        "rank": config.lora_rank,
        "scale": config.lora_scale,
        "dropout": config.lora_dropout,
        "keys": set(keys) if keys else None,
    }
    try:
        linear_to_lora_layers(model, num_layers, lora_config, use_dora=config.method == "dora")
    except ValueError as err:  # e.g. a layer type mlx-lm cannot adapt
        raise UserError(f"cannot add {config.method} adapters: {str(err).splitlines()[0]}") from None
    # Cast the float weights (adapters included; packed quantized weights are
    # integers and keep their dtype) to the training dtype.
    model.set_dtype(DTYPES[config.train_dtype])
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    total = logical_size(model)
    if trainable == 0:
        raise UserError(f"{config.method}: no adapters were added (check --lora-keys and --num-layers)")
    return {"trainable": trainable, "total": total}


def logical_size(model: nn.Module) -> int:
    """Parameter count with quantized weights counted as the values they pack
    (not their uint32 words) and without their scales and biases."""
    total = sum(v.size for _, v in tree_flatten(model.parameters()))
    for _, m in model.named_modules():
        if is_quantized(m):
            total += m.weight.size * (32 // m.bits - 1) - m.scales.size
            total -= m.biases.size if getattr(m, "biases", None) is not None else 0
    return total
