"""Load a base model (any form `resolve_model` accepts) into MLX, ready to train."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Tuple

from gmt_mlx.errors import UserError


def load_base(model: str, *, dequantize: bool = True) -> Tuple[Any, Any, Dict[str, Any], Path]:
    """Return (model, tokenizer, hf_config, local_path); quantized weights are dequantized.

    GMT and full fine-tuning update every weight, so a quantized base is
    expanded to floats first. LoRA/DoRA pass ``dequantize=False`` to train
    adapters on the quantized base (QLoRA); hf_config then keeps its
    quantization entry.
    """
    from mlx_lm.utils import dequantize_model, load

    from gmt_mlx.models.resolve import resolve_model

    path = resolve_model(model)
    if not (path / "config.json").is_file():
        raise UserError(f"{path}: not a model folder (no config.json)")
    try:
        overrides = rope_overrides(json.loads((path / "config.json").read_text()), path)
    except json.JSONDecodeError as err:
        raise UserError(f"{path / 'config.json'}:{err.lineno}: not valid JSON ({err.msg})") from None
    try:
        net, tokenizer, config = load(str(path), model_config=overrides, return_config=True)
    except FileNotFoundError as err:
        raise UserError(f"{path}: cannot load model ({err})") from None
    except ValueError as err:
        raise UserError(f"{path}: cannot load model ({str(err).splitlines()[0]})") from None
    if dequantize and ("quantization" in config or "quantization_config" in config):
        net = dequantize_model(net)
        config = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    return net, tokenizer, config, path


def rope_overrides(config: Dict[str, Any], where: Path) -> Dict[str, Any]:
    """Config keys that make mlx-lm read the rope a transformers-5 config describes.

    transformers 5 writes ``rope_parameters`` (``rope_theta``, ``rope_type``
    and the scaling keys) instead of the top-level ``rope_theta`` and
    ``rope_scaling`` that mlx-lm's models read: without these keys mlx-lm
    silently uses its own default base (measured: logits off by up to 2.0).
    """
    params = config.get("rope_parameters")
    if not isinstance(params, dict) or "rope_theta" in config:
        return {}
    if "rope_theta" not in params:
        # One dict per attention type (e.g. Gemma 3's sliding/full): no mlx-lm equivalent to map to.
        raise UserError(f"{where / 'config.json'}: rope_parameters per layer type ({', '.join(map(str, params))}) "
                        f"cannot be read by mlx-lm; use a config with rope_theta / rope_scaling")
    overrides: Dict[str, Any] = {"rope_theta": params["rope_theta"]}
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        overrides["rope_scaling"] = {**scaling, "type": scaling["rope_type"]}
    return overrides


def run_model_dir(path_or_model: str) -> str:
    """A run directory stands for its fine-tuned model (RUN_DIR/model)."""
    from gmt_mlx.run.rundir import is_finished, model_dir

    return str(model_dir(path_or_model)) if is_finished(path_or_model) else path_or_model
