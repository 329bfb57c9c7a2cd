"""`gmt-mlx export`: a run's model, rebuilt from its config and a checkpoint, written as a Hugging Face folder.

`export_run` takes RUN_DIR/model (the final model) or a checkpoint, loads the
base model, prepares it for the run's method (adapters for lora/dora), loads
the checkpoint's weights and writes merged weights (any --dtype), a PEFT
adapter or a GGUF file, with the model card.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from gmt_mlx.config import ADAPTER_METHODS
from gmt_mlx.errors import UserError
from gmt_mlx.models.hf import PEFT_CONFIG, save_hf_model, save_peft_adapter
from gmt_mlx.models.methods import DTYPES
from gmt_mlx.run import rundir



# ---------------------------------------------------------------- a run's model


@dataclass
class ExportResult:
    """What `export_run` wrote: the folder, what it came from, its step and its files."""

    out: Path
    source: str  # "model/" (the final merged model) or a checkpoint folder
    step: Optional[int]
    files: List[str]


def load_run_model(checkpoint_dir: Path, config) -> Tuple[nn.Module, Any, Dict[str, Any], Path, dict]:
    """Base model + the run's method preparation (adapters for lora/dora) + the checkpoint's weights."""
    from gmt_mlx.models.loading import load_base
    from gmt_mlx.models.methods import prepare_model
    from gmt_mlx.run import checkpoint as ckpt

    meta = ckpt.verify(checkpoint_dir)
    # As finetune does: adapter methods keep a quantized base quantized (QLoRA), the others expand it.
    model, tokenizer, hf_config, base_path = load_base(config.model, dequantize=config.method not in ADAPTER_METHODS)
    prepare_model(model, config)
    weights = mx.load(str(checkpoint_dir / "weights.safetensors"))
    params = dict(tree_flatten(model.parameters()))
    # load_weights(strict=False) would skip names the rebuilt model lacks, leaving base weights in
    # place silently (the "fused model behaves like the base" bug): check every name and shape.
    missing = [k for k in weights if k not in params]
    if missing:
        raise UserError(f"{checkpoint_dir}: {len(missing)} weights do not exist in the rebuilt model "
                        f"(e.g. {missing[0]}); was the run made with another method or gmt-mlx version?")
    wrong = [k for k, v in weights.items() if v.shape != params[k].shape]
    if wrong:
        raise UserError(f"{checkpoint_dir}: {wrong[0]} has shape {weights[wrong[0]].shape}, "
                        f"the rebuilt model {params[wrong[0]].shape}")
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model, tokenizer, hf_config, base_path, meta


def _local_base(model: str) -> Optional[Path]:
    """The base model's folder when it is on this machine already (nothing converted or downloaded)."""
    from gmt_mlx.models.resolve import EMBEDDED_MODELS, local_embedded

    if model.lower() in EMBEDDED_MODELS:
        return local_embedded(model)
    local = Path(model).expanduser()
    return local if local.is_dir() else None


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        looks_exported = (out / "config.json").is_file() or (out / PEFT_CONFIG).is_file() or any(out.glob("*.gguf"))
        if not looks_exported:
            raise UserError(f"--out {out} is a non-empty folder that is not an exported model; choose another")
        if not overwrite:
            raise UserError(f"--out {out} already holds a model; pass --overwrite to replace it")


def export_run(
    run_dir: str | Path,
    out: str | Path,
    *,
    dtype: Optional[str] = None,
    checkpoint: str = "last",
    adapter_only: bool = False,
    datasets: Optional[List[str]] = None,
    overwrite: bool = False,
    shard_bytes: Optional[int] = None,
    log: Callable[[str], None] = print,
    format: str = "hf",
    outtype: Optional[str] = None,
) -> ExportResult:
    """Export a run's model (merged, or the PEFT adapter) with a model card to ``out``.

    ``last`` is the final model: RUN_DIR/model/ re-saved in ``dtype`` (for
    ``--adapter-only``, or when model/ is missing, the newest checkpoint).
    ``best`` and ``step-N`` rebuild the model from the base, the run's method
    and that checkpoint's weights. The folder is written next to ``out`` and
    renamed into place, so an interrupted export leaves nothing half-written.
    ``format="gguf"`` writes OUT/NAME-OUTTYPE.gguf and an Ollama Modelfile
    instead (`gguf_export.save_gguf_model`; ``outtype`` f32, f16 or q8_0).
    """
    from gmt_mlx.config import resolve
    from gmt_mlx.models.loading import load_base
    from gmt_mlx.publish.card import base_model_id, write_model_card
    from gmt_mlx.run import checkpoint as ckpt

    run_dir, out = Path(run_dir), Path(out)
    if not rundir.is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a gmt-mlx run directory (no {rundir.CONFIG_FILE})")
    config = resolve(base=rundir.run_config(run_dir, log))  # a damaged config.yaml falls back on a checkpoint's copy
    if format == "gguf":  # every refusal before the model loads
        from gmt_mlx.models.gguf.writer import check_outtype, require_gguf

        require_gguf()
        outtype = check_outtype(outtype)
        if adapter_only:
            raise UserError("--adapter-only writes a PEFT adapter; --format gguf writes the merged model")
        if dtype is not None:
            raise UserError("--dtype is for --format hf; a GGUF's precision is --outtype f32, f16 or q8_0")
    elif format != "hf":
        raise UserError(f"--format must be hf or gguf, got {format!r}")
    elif outtype is not None:
        raise UserError("--outtype is for --format gguf; a Hugging Face export's precision is --dtype")
    dtype = dtype or config.dtype
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    own = [run_dir.resolve(), rundir.model_dir(run_dir).resolve(), (run_dir / rundir.CHECKPOINTS_DIR).resolve()]
    if out.resolve() in own or own[2] in out.resolve().parents:
        raise UserError(f"--out {out} would overwrite the run's own files; choose another folder")
    _prepare_out(out, overwrite)

    final = rundir.model_dir(run_dir)
    use_final = checkpoint == "last" and not adapter_only and rundir.is_finished(run_dir)
    if use_final:
        try:
            model, tokenizer, hf_config, _ = load_base(str(final))
        except (UserError, OSError, ValueError, RuntimeError) as err:
            # A damaged model/ (it has no checksums): the checkpoints hold the same training, verified.
            log(f"warning: {final} cannot be loaded ({str(err).splitlines()[0][:200]}); "
                "exporting the newest checkpoint that verifies instead")
            use_final = False
    if use_final:
        base_path, step, val_loss, source = final, rundir.last_step(run_dir), None, f"{rundir.MODEL_DIR}/"
        saved = hf_config.get("dtype") or hf_config.get("torch_dtype")
        if saved in DTYPES and DTYPES[saved].size < DTYPES[dtype].size:
            log(f"note: {final} holds {saved} weights; the {dtype} export has {saved} precision "
                "(export --checkpoint best or step-N for the trained precision)")
        versions = ckpt.versions()
    else:
        where = rundir.find_checkpoint(run_dir, checkpoint, log=log)
        model, tokenizer, hf_config, base_path, meta = load_run_model(where, config)
        step, val_loss, source = meta.get("step"), meta.get("val_loss"), str(where.relative_to(run_dir))
        versions = meta.get("versions") or ckpt.versions()
        final_step = rundir.last_step(run_dir)
        if checkpoint == "last" and final_step is not None and step is not None and step < final_step:
            log(f"note: the newest checkpoint is step {step}; the run reported up to step {final_step}")
    label = checkpoint if checkpoint in (rundir.BEST, "last") else f"step-{step}"

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if adapter_only:
            save_peft_adapter(tmp, model, base_model=base_model_id(config.model, base_path) or config.model,
                              dtype=dtype, tokenizer=tokenizer)
        elif format == "gguf":
            from gmt_mlx.models.gguf.writer import save_gguf_model

            save_gguf_model(tmp, model, tokenizer, hf_config, outtype=outtype, name=out.name)
        else:
            save_hf_model(tmp, model, tokenizer, hf_config, dtype=dtype, base_path=base_path, shard_bytes=shard_bytes)
        # The base folder (its license, its GGUF origin) is known after a rebuild; model/ is not the base.
        card_base = _local_base(config.model) if use_final else base_path
        if format == "hf":  # the card describes safetensors and transformers/mlx_lm usage
            write_model_card(tmp, run_dir, dtype=dtype, checkpoint=label, step=step, checkpoint_val_loss=val_loss,
                             adapter=adapter_only, datasets=datasets, base_path=card_base, versions=versions,
                             title=out.name)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return ExportResult(out, source, step, files)
