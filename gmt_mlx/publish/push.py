"""`gmt-mlx push` and `--push-to-hub`: what a model folder sends to the Hub, with its card.

`push` takes an exported model folder or a run directory (RUN_DIR/model,
its card written if missing), checks the repo id and the token, prints what a
dry run would send, and hands the upload to hub.upload_folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from gmt_mlx.errors import UserError
from gmt_mlx.hub import NO_TOKEN, SKIPPED_DIRS, check_repo_id, get_token, redact, upload_folder
from gmt_mlx.models.resolve import ModelOrigin
from gmt_mlx.publish.card import CARD_FILE, RunSummary, card_for, write_model_card
from gmt_mlx.run import final, rundir


def model_folder(path: str | Path) -> Path:
    """The folder to upload: ``path`` itself, or RUN_DIR/model for a run directory (its card written if missing)."""
    path = Path(path)
    if rundir.is_run_dir(path) and rundir.has_model(path):
        final.check_model(path)  # never push a model the run did not write
        run_dir, path = path, rundir.model_dir(path)
        if not (path / CARD_FILE).is_file():
            dtype = (RunSummary.read(run_dir).config.get("dtype")) or "float32"
            write_model_card(path, run_dir, dtype=dtype)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder")
    # A GGUF export (gmt-mlx export --format gguf) is a model folder too: its .gguf files, Modelfile and card.
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file() or any(path.glob("*.gguf"))):
        raise UserError(
            f"{path} is not a model folder (no config.json, adapter_config.json or .gguf file); "
            "write one with `gmt-mlx export RUN_DIR --out DIR`"
        )
    return path


def upload_files(folder: Path) -> List[Path]:
    """The files `upload_folder` sends, relative to ``folder``, sorted."""
    files = []
    for file in folder.rglob("*"):
        rel = file.relative_to(folder)
        if file.is_file() and not any(part in SKIPPED_DIRS for part in rel.parts):
            files.append(rel)
    return sorted(files)


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


@dataclass
class PushResult:
    """What `push` sent: the repo, the files (relative paths), the repo and commit URLs."""

    repo_id: str
    files: List[str]
    url: Optional[str] = None
    commit_url: Optional[str] = None


def push(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: Optional[str] = None,
    commit_message: Optional[str] = None,
    dry_run: bool = False,
    log: Callable[[str], None] = print,
) -> PushResult:
    """Create ``repo_id`` if needed and upload ``folder`` (an exported model or a run directory).

    With ``dry_run`` nothing is sent: the files and the model card that would be
    uploaded are printed. Every failure the user can fix is a one-line UserError.
    """
    folder = model_folder(folder)
    check_repo_id(repo_id)
    files = upload_files(folder)
    card = card_for(folder, repo_id)
    token = get_token()
    branch = revision or "main"
    if dry_run:
        total = sum((folder / f).stat().st_size for f in files)
        log(
            f"dry run: would create {'private' if private else 'public'} repo {repo_id} if missing, "
            f"then upload {len(files)} files ({_size(total)}) from {folder} to branch {branch}:"
        )
        for f in files:
            log(f"  {f.as_posix():<48} {_size((folder / f).stat().st_size):>10}")
        log("token: " + ("found" if token else f"missing: {NO_TOKEN}"))
        log(
            f"--- {CARD_FILE} ---\n{card}"
            if card is not None
            else f"warning: no {CARD_FILE}: the repo would have no model card"
        )
        return PushResult(repo_id, [f.as_posix() for f in files])
    if not token:
        raise UserError(NO_TOKEN)
    if card is None:
        log(f"warning: {folder} has no {CARD_FILE}: the repo gets no model card")
    elif card != (folder / CARD_FILE).read_text():
        (folder / CARD_FILE).write_text(card)  # the usage snippets now name the repo

    url, commit_url = upload_folder(
        folder,
        repo_id,
        token=token,
        private=private,
        revision=revision,
        commit_message=commit_message or f"Upload {folder.name} with gmt-mlx",
    )
    log(redact(f"pushed {len(files)} files to {url}" + (f" ({commit_url})" if commit_url else ""), token))
    return PushResult(repo_id, [f.as_posix() for f in files], str(url), commit_url)


def publish_run(
    run_dir: str | Path,
    model_dir: str | Path,
    config,
    *,
    step: Optional[int] = None,
    origin: Optional[ModelOrigin] = None,
    log: Callable[[str], None] = print,
) -> Optional[PushResult]:
    """The end of `finetune`: write RUN_DIR/model's card, then push it when ``config.push_to_hub`` is set."""
    from gmt_mlx.run.checkpoint import versions

    write_model_card(model_dir, run_dir, dtype=config.dtype, step=step, origin=origin, versions=versions())
    if not config.push_to_hub:
        return None
    try:
        return push(model_dir, config.push_to_hub, log=log)
    except UserError as err:
        raise UserError(
            f"{err} (the run is saved; retry with: gmt-mlx push {run_dir} --repo {config.push_to_hub})"
        ) from None
