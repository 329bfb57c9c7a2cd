"""Load a base model (any form `resolve_model` accepts) into MLX, ready to train."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Tuple

from .errors import UserError


def load_base(model: str, *, dequantize: bool = True) -> Tuple[Any, Any, Dict[str, Any], Path]:
    """Return (model, tokenizer, hf_config, local_path); quantized weights are dequantized.

    GMT and full fine-tuning update every weight, so a quantized base is
    expanded to floats first. LoRA/DoRA pass ``dequantize=False`` to train
    adapters on the quantized base (QLoRA); hf_config then keeps its
    quantization entry.
    """
    from mlx_lm.utils import dequantize_model, load

    from .models import resolve_model

    path = resolve_model(model)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model folder (no config.json)")
    try:
        net, tokenizer, config = load(str(path), return_config=True)
    except FileNotFoundError as err:
        raise UserError(f"{path}: cannot load model ({err})") from None
    except ValueError as err:
        raise UserError(f"{path}: cannot load model ({str(err).splitlines()[0]})") from None
    if dequantize and ("quantization" in config or "quantization_config" in config):
        net = dequantize_model(net)
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return net, tokenizer, config, path


def run_model_dir(path_or_model: str) -> str:
    """A run directory stands for its fine-tuned model (RUN_DIR/model)."""
    from .rundir import is_finished, model_dir

    return str(model_dir(path_or_model)) if is_finished(path_or_model) else path_or_model
