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

from gmt_mlx.config import ADAPTER_METHODS, Config
from gmt_mlx.errors import UserError
from gmt_mlx.models.hf import PEFT_CONFIG, save_hf_model, save_peft_adapter
from gmt_mlx.models.methods import DTYPES
from gmt_mlx.models.resolve import ModelOrigin, local_base, model_origin
from gmt_mlx.run import final, rundir

# ---------------------------------------------------------------- a run's model


@dataclass
class ExportResult:
    """What `export_run` wrote: the folder, what it came from, its step and its files."""

    out: Path
    source: str  # "model/" (the final merged model) or a checkpoint folder
    step: Optional[int]
    files: List[str]


def load_run_model(checkpoint_dir: Path, config: Config) -> Tuple[nn.Module, Any, Dict[str, Any], Path, dict]:
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
        raise UserError(
            f"{checkpoint_dir}: {len(missing)} weights do not exist in the rebuilt model "
            f"(e.g. {missing[0]}); was the run made with another method or gmt-mlx version?"
        )
    wrong = [k for k, v in weights.items() if v.shape != params[k].shape]
    if wrong:
        raise UserError(
            f"{checkpoint_dir}: {wrong[0]} has shape {weights[wrong[0]].shape}, "
            f"the rebuilt model {params[wrong[0]].shape}"
        )
    model.load_weights(list(weights.items()), strict=False)
    mx.eval(model.parameters())
    model.eval()
    return model, tokenizer, hf_config, base_path, meta


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        looks_exported = (out / "config.json").is_file() or (out / PEFT_CONFIG).is_file() or any(out.glob("*.gguf"))
        if not looks_exported:
            raise UserError(f"--out {out} is a non-empty folder that is not an exported model; choose another")
        if not overwrite:
            raise UserError(f"--out {out} already holds a model; pass --overwrite to replace it")


@dataclass
class ExportSource:
    """The model an export writes, and where it came from (the final model/ or a checkpoint)."""

    model: nn.Module
    tokenizer: Any
    hf_config: Dict[str, Any]
    base_path: Path  # the folder loaded: model/, or the base model under a rebuilt checkpoint
    step: Optional[int]
    val_loss: Optional[float]
    source: str  # what ExportResult.source says
    versions: Dict[str, str]
    final: bool  # model/ itself: the card names the base from the config, not base_path

    def origin(self, config: Config) -> ModelOrigin:
        """The base model's origin: a rebuild loaded the base folder itself; model/ is not the base, so
        its folder is looked up on this machine (nothing converted or downloaded)."""
        return model_origin(config.model, local_base(config.model) if self.final else self.base_path)


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
    instead (`gguf_export.save_gguf_model`; ``outtype`` f32, f16, q8_0 or q4_0).
    """
    from gmt_mlx.config import resolve

    run_dir, out = Path(run_dir), Path(out)
    if not rundir.is_run_dir(run_dir):
        raise UserError(f"{run_dir} is not a gmt-mlx run directory (no {rundir.CONFIG_FILE})")
    config = resolve(base=rundir.run_config(run_dir, log))  # a damaged config.yaml falls back on a checkpoint's copy
    outtype = _check_format(format, outtype, dtype=dtype, adapter_only=adapter_only)  # every refusal before loading
    dtype = dtype or config.dtype
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    adding = format == "gguf" and not overwrite and _adds_gguf(out, outtype)
    _check_out(run_dir, out, overwrite or adding)

    loaded = None
    if checkpoint == "last" and not adapter_only and rundir.has_model(run_dir) and _final_verifies(run_dir, log):
        loaded = _load_final(run_dir, dtype, log)
    loaded = loaded or _load_checkpoint(run_dir, config, checkpoint, log)
    label = checkpoint if checkpoint in (rundir.BEST, "last") else f"step-{loaded.step}"

    def write(folder: Path) -> None:
        _write_model(
            folder,
            loaded,
            config,
            dtype=dtype,
            format=format,
            outtype=outtype,
            adapter_only=adapter_only,
            shard_bytes=shard_bytes,
            name=out.name,
        )
        # The card describes what the folder holds: safetensors, the adapter, or every .gguf (one per --outtype).
        ggufs = {p.name for p in folder.glob("*.gguf")} | ({p.name for p in out.glob("*.gguf")} if adding else set())
        _write_card(
            folder,
            run_dir,
            loaded,
            config,
            dtype=dtype if format == "hf" else outtype,
            label=label,
            adapter_only=adapter_only,
            datasets=datasets,
            title=out.name,
            gguf=sorted(ggufs),
        )

    (_add_to_folder if adding else _write_atomically)(out, write)
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    return ExportResult(out, loaded.source, loaded.step, files)


def _final_verifies(run_dir: Path, log: Callable[[str], None]) -> bool:
    """Whether model/ is what the run wrote; if not, the final step's checkpoint stands in (same weights) or
    a refusal."""
    damage = final.model_damage(run_dir)
    if damage is None:
        return True
    latest, _ = final.final_checkpoint(run_dir)
    if latest is None:
        raise UserError(
            f"{run_dir}: {damage}, and no checkpoint holds the final step; export another one "
            f"(--checkpoint best or step-N) or start the run over"
        )
    log(f"warning: {run_dir}: {damage}; exporting the final step's checkpoint {latest.name} instead (the same weights)")
    return False


def _check_format(format: str, outtype: Optional[str], *, dtype: Optional[str], adapter_only: bool) -> Optional[str]:
    """Refuse options that do not go with ``format`` (hf or gguf); the GGUF outtype, checked (None for hf)."""
    if format == "gguf":
        from gmt_mlx.models.gguf.writer import check_outtype, require_gguf

        require_gguf()
        outtype = check_outtype(outtype)
        if adapter_only:
            raise UserError("--adapter-only writes a PEFT adapter; --format gguf writes the merged model")
        if dtype is not None:
            raise UserError("--dtype is for --format hf; a GGUF's precision is --outtype f32, f16, q8_0 or q4_0")
    elif format != "hf":
        raise UserError(f"--format must be hf or gguf, got {format!r}")
    elif outtype is not None:
        raise UserError("--outtype is for --format gguf; a Hugging Face export's precision is --dtype")
    return outtype


def _check_out(run_dir: Path, out: Path, overwrite: bool) -> None:
    """Refuse an ``out`` inside the run's own files, a file, or a folder holding something other than a model."""
    own = [run_dir.resolve(), rundir.model_dir(run_dir).resolve(), (run_dir / rundir.CHECKPOINTS_DIR).resolve()]
    if out.resolve() in own or own[2] in out.resolve().parents:
        raise UserError(f"--out {out} would overwrite the run's own files; choose another folder")
    _prepare_out(out, overwrite)


def _load_final(run_dir: Path, dtype: str, log: Callable[[str], None]) -> Optional[ExportSource]:
    """RUN_DIR/model/, the final model; None (with a warning) when it cannot be loaded."""
    from gmt_mlx.models.loading import load_base
    from gmt_mlx.run import checkpoint as ckpt

    final = rundir.model_dir(run_dir)
    try:
        model, tokenizer, hf_config, _ = load_base(str(final))
    except (UserError, OSError, ValueError, RuntimeError) as err:
        # A damaged model/ (it has no checksums): the checkpoints hold the same training, verified.
        log(
            f"warning: {final} cannot be loaded ({str(err).splitlines()[0][:200]}); "
            "exporting the newest checkpoint that verifies instead"
        )
        return None
    saved = hf_config.get("dtype") or hf_config.get("torch_dtype")
    if saved in DTYPES and DTYPES[saved].size < DTYPES[dtype].size:
        log(
            f"note: {final} holds {saved} weights; the {dtype} export has {saved} precision "
            "(export --checkpoint best or step-N for the trained precision)"
        )
    return ExportSource(
        model,
        tokenizer,
        hf_config,
        final,
        rundir.last_step(run_dir),
        None,
        f"{rundir.MODEL_DIR}/",
        ckpt.versions(),
        final=True,
    )


def _load_checkpoint(run_dir: Path, config: Config, checkpoint: str, log: Callable[[str], None]) -> ExportSource:
    """The model rebuilt from the base, the run's method and checkpoint ``checkpoint`` (best, last or step-N)."""
    from gmt_mlx.run import checkpoint as ckpt

    where = rundir.find_checkpoint(run_dir, checkpoint, log=log)
    model, tokenizer, hf_config, base_path, meta = load_run_model(where, config)
    step = meta.get("step")
    final_step = rundir.last_step(run_dir)
    if checkpoint == "last" and final_step is not None and step is not None and step < final_step:
        log(f"note: the newest checkpoint is step {step}; the run reported up to step {final_step}")
    return ExportSource(
        model,
        tokenizer,
        hf_config,
        base_path,
        step,
        meta.get("val_loss"),
        str(where.relative_to(run_dir)),
        meta.get("versions") or ckpt.versions(),
        final=False,
    )


def _write_model(
    folder: Path,
    loaded: ExportSource,
    config: Config,
    *,
    dtype: str,
    format: str,
    outtype: Optional[str],
    adapter_only: bool,
    shard_bytes: Optional[int],
    name: str,
) -> None:
    """Write the model into ``folder``: the PEFT adapter, a GGUF file or Hugging Face safetensors."""
    if adapter_only:
        base_model = loaded.origin(config).hub_id or config.model
        save_peft_adapter(folder, loaded.model, base_model=base_model, dtype=dtype, tokenizer=loaded.tokenizer)
    elif format == "gguf":
        from gmt_mlx.models.gguf.writer import save_gguf_model

        save_gguf_model(folder, loaded.model, loaded.tokenizer, loaded.hf_config, outtype=outtype, name=name)
    else:
        save_hf_model(
            folder,
            loaded.model,
            loaded.tokenizer,
            loaded.hf_config,
            dtype=dtype,
            base_path=loaded.base_path,
            shard_bytes=shard_bytes,
        )


def _write_card(
    folder: Path,
    run_dir: Path,
    loaded: ExportSource,
    config: Config,
    *,
    dtype: str,
    label: str,
    adapter_only: bool,
    datasets: Optional[List[str]],
    title: str,
    gguf: List[str],
) -> None:
    from gmt_mlx.publish.card import write_model_card

    write_model_card(
        folder,
        run_dir,
        dtype=dtype,
        checkpoint=label,
        step=loaded.step,
        checkpoint_val_loss=loaded.val_loss,
        adapter=adapter_only,
        datasets=datasets,
        origin=loaded.origin(config),
        versions=loaded.versions,
        title=title,
        gguf=gguf,
    )


def _adds_gguf(out: Path, outtype: str) -> bool:
    """Whether ``out`` is a GGUF export that takes this --outtype's file beside its others (q8_0, then q4_0:
    their names differ); the file of the same type is there already: --overwrite, refused like any model."""
    if not out.is_dir() or not any(out.glob("*.gguf")):
        return False
    if (out / f"{out.name}-{outtype}.gguf").exists():
        raise UserError(
            f"--out {out} already holds {out.name}-{outtype}.gguf; pass --overwrite to replace the "
            f"folder, or choose another --outtype (each type has its own file) or --out"
        )
    return True


def _add_to_folder(out: Path, write: Callable[[Path], None]) -> None:
    """``write`` a folder next to ``out``, then move its files into ``out`` one rename each (a new .gguf, the
    Modelfile and card now naming it): a kill leaves every file of ``out`` whole, the old or the new one."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        for file in sorted(p for p in tmp.rglob("*") if p.is_file()):
            target = out / file.relative_to(tmp)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(file, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_atomically(out: Path, write: Callable[[Path], None]) -> None:
    """``write`` a folder next to ``out``, then rename it into place: a kill leaves no half-written ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        write(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only
        if out.exists():
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
