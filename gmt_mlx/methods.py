"""Prepare a loaded model for a method: which parameters train, in which dtype."""

from __future__ import annotations

from typing import Dict

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import Config

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
    `mlx_lm.lora --fine-tune-type full`). Returns trainable/total entry counts.
    """
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
