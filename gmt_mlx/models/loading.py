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
    files = check_model_files(path)
    overrides = rope_overrides(files["config.json"], path)
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


# The text files of a model folder that loading reads (mlx_lm, transformers' tokenizer, our generate).
JSON_FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
)
CHAT_TEMPLATE = "chat_template.jinja"


def _text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {err.start}); the file is damaged") from None
    except OSError as err:
        raise UserError(f"{path}: {err.strerror or err}") from None


def check_model_files(path: Path) -> Dict[str, Any]:
    """Read every JSON file of model folder ``path`` that is there, and compile its chat template.

    A damaged file is a one-line UserError naming it (and the line), before
    mlx_lm or the tokenizer library meet it with a traceback. Returns the parsed JSON files.
    """
    parsed = {}
    for name in JSON_FILES:
        if (path / name).is_file():
            try:
                parsed[name] = json.loads(_text(path / name))
            except json.JSONDecodeError as err:
                raise UserError(f"{path / name}:{err.lineno}: not valid JSON ({err.msg})") from None
    for name, value in parsed.items():
        if not isinstance(value, dict):
            raise UserError(f"{path / name}: expected a JSON object, got {type(value).__name__}")
    if (path / CHAT_TEMPLATE).is_file():
        from jinja2 import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        try:  # the environment transformers renders chat templates in
            ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).parse(_text(path / CHAT_TEMPLATE))
        except TemplateSyntaxError as err:
            raise UserError(f"{path / CHAT_TEMPLATE}:{err.lineno}: not a valid chat template ({err.message})") from None
    return parsed


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
        raise UserError(
            f"{where / 'config.json'}: rope_parameters per layer type ({', '.join(map(str, params))}) "
            f"cannot be read by mlx-lm; use a config with rope_theta / rope_scaling"
        )
    overrides: Dict[str, Any] = {"rope_theta": params["rope_theta"]}
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling.get("rope_type", "default") != "default":
        overrides["rope_scaling"] = {**scaling, "type": scaling["rope_type"]}
    return overrides


def run_model_dir(path_or_model: str) -> str:
    """A run directory stands for its fine-tuned model (RUN_DIR/model), verified against the sums the run wrote."""
    from gmt_mlx.run import final, rundir

    if not rundir.has_model(path_or_model):
        return path_or_model
    final.check_model(path_or_model)
    return str(rundir.model_dir(path_or_model))
