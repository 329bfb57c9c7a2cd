"""The only module that talks to the Hugging Face Hub: model downloads and uploads.

`download_model` fetches a model repo's snapshot (what `--model owner/name`
needs). `push` creates the repo if needed and uploads a folder with
`huggingface_hub`, like `hf upload`; rerunning it after an interruption sends
only what is missing (files already on the Hub are skipped, large-file data
already uploaded is deduplicated). The model card it uploads is card.py's.

The token comes from `HF_TOKEN` or the local login (`hf auth login`). It is
handed to `HfApi` and nowhere else: never printed, logged or written, and
scrubbed from any error message that quotes it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

from . import rundir
from .card import CARD_FILE, RunSummary, card_for, write_model_card
from .errors import UserError

# What `upload_folder` never sends; the dry-run listing leaves the same out.
SKIPPED_DIRS = (".git", ".cache")
# What a model folder needs from a Hub repo (the same files mlx_lm fetches).
MODEL_PATTERNS = ["*.json", "*.safetensors", "*.py", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ---------------------------------------------------------------- download


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else type(err).__name__
    return line[:300]


def is_hub_id(name: str) -> bool:
    """``name`` has the shape of a Hub repo id (owner/name); whether it exists is not checked."""
    return bool(_HUB_ID.match(name))


class HubUnreachable(UserError):
    """The Hub could not be reached (offline mode or no network) and the model is not in the HF cache."""


def _unreachable_reason(err: BaseException) -> Optional[str]:
    """"offline mode (HF_HUB_OFFLINE is set)" / "no network (ConnectError)" when ``err`` or its cause says so."""
    from huggingface_hub.errors import OfflineModeIsEnabled

    seen: List[BaseException] = []
    while err is not None and err not in seen:  # the download error wraps the real cause
        seen.append(err)
        if isinstance(err, OfflineModeIsEnabled):
            return "offline mode: HF_HUB_OFFLINE is set"
        if _is_network_error(err):
            return f"no network: {type(err).__name__}"
        err = err.__cause__ or err.__context__
    return None


def download_model(repo_id: str, local_files_only: bool = False) -> Path:
    """A Hub repo's snapshot folder with what a model needs (from the local HF cache only when
    ``local_files_only``); HubUnreachable when offline and not cached, UserError when it cannot
    be had otherwise or lacks config.json or weights."""
    from huggingface_hub import constants, snapshot_download

    try:
        path = Path(snapshot_download(repo_id, allow_patterns=MODEL_PATTERNS, local_files_only=local_files_only))
    except Exception as err:  # hub errors are many types (offline, 404, gated, network)
        reason = None if local_files_only else _unreachable_reason(err)
        if reason is not None:
            raise HubUnreachable(f"cannot reach the Hugging Face Hub ({reason}) and {repo_id} is not in the local "
                                 f"Hugging Face cache ({constants.HF_HUB_CACHE}), where a copy would be used "
                                 "as it is") from err
        raise UserError(f"could not find model {repo_id} locally or on the Hub ({_first_line(err)})") from err
    if not (path / "config.json").is_file() or not any(path.glob("*.safetensors")):
        where = "in the local Hugging Face cache" if local_files_only else "on the Hub"
        raise UserError(f"model {repo_id} {where} lacks config.json or *.safetensors weights")
    return path


# ---------------------------------------------------------------- upload


def redact(text: str, token: Optional[str]) -> str:
    """``text`` with the token, wherever it appears, replaced by ***."""
    return text.replace(token, "***") if token else text


def check_repo_id(repo_id: str) -> str:
    """``owner/name`` (or ``name``, in the token owner's namespace) as the Hub accepts it."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"bad repo id {repo_id!r}: expected owner/name with letters, digits, '-', '_' or '.' "
                        f"({_first_line(err)})") from None
    return repo_id


def get_token() -> Optional[str]:
    """HF_TOKEN, else the token saved by `hf auth login` (None when there is neither)."""
    import huggingface_hub

    try:
        return huggingface_hub.get_token()
    except Exception as err:  # e.g. HF_OIDC_RESOURCE set and the token exchange failed
        raise UserError(f"cannot read the Hugging Face token ({type(err).__name__}: {_first_line(err)})") from None


NO_TOKEN = "no Hugging Face token: set HF_TOKEN or run `hf auth login` (the token needs write access)"


def check_push(repo_id: str) -> None:
    """Fail fast (no network) when a push at the end of a run could not work."""
    check_repo_id(repo_id)
    if not get_token():
        raise UserError(f"--push-to-hub {repo_id}: {NO_TOKEN}")


def _is_network_error(err: BaseException) -> bool:
    names = {cls.__name__ for cls in type(err).__mro__}
    network = {"ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException", "NetworkError",
               "TransportError", "ProxyError", "SSLError", "Timeout", "ConnectionError"}
    return isinstance(err, (ConnectionError, TimeoutError)) or bool(names & network)


def describe_hub_error(err: BaseException, repo_id: str, revision: Optional[str] = None) -> Optional[str]:
    """A one-line message for an error the user can act on; None for anything else (a bug)."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, RevisionNotFoundError

    rerun = "rerun `gmt-mlx push` (files already uploaded are not sent again)"
    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set: unset it to push to the Hub"
    if isinstance(err, HFValidationError):
        return f"bad repo id or revision for {repo_id}: {_first_line(err)}"
    if isinstance(err, HfHubHTTPError):
        response = getattr(err, "response", None)
        status = getattr(response, "status_code", None)
        server = getattr(err, "server_message", None) or _first_line(err)
        server = server.strip().splitlines()[0] if server and server.strip() else ""
        if status == 401:
            return "the Hub rejected the token (401 Unauthorized): set HF_TOKEN to a valid token or run `hf auth login`"
        if status == 403:
            return (f"the token may not write to {repo_id} (403 Forbidden): use a token with write access "
                    "to that namespace")
        if status == 404 and isinstance(err, RevisionNotFoundError):
            return f"revision {revision!r} not found in {repo_id} (404)"
        if status == 404:
            return f"{repo_id} not found (404): check the owner name and that the token can see it"
        if status == 429:
            return f"the Hub is rate-limiting this token (429 Too Many Requests): wait, then {rerun}"
        if status is not None and 400 <= status < 500:
            return f"the Hub refused the upload to {repo_id} ({status}): {server}"
        return f"the Hub failed ({status or 'no status'}: {server}): {rerun}"
    if _is_network_error(err):
        return f"cannot reach the Hugging Face Hub ({type(err).__name__}: {_first_line(err)}): check the network, then {rerun}"
    return None


def model_folder(path: str | Path) -> Path:
    """The folder to upload: ``path`` itself, or RUN_DIR/model for a run directory (its card written if missing)."""
    path = Path(path)
    if rundir.is_run_dir(path) and rundir.is_finished(path):
        run_dir, path = path, rundir.model_dir(path)
        if not (path / CARD_FILE).is_file():
            dtype = (RunSummary.read(run_dir).config.get("dtype")) or "float32"
            write_model_card(path, run_dir, dtype=dtype)
    if not path.is_dir():
        raise UserError(f"{path}: no such folder")
    if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
        raise UserError(f"{path} is not a model folder (no config.json or adapter_config.json); "
                        "write one with `gmt-mlx export RUN_DIR --out DIR`")
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
        log(f"dry run: would create {'private' if private else 'public'} repo {repo_id} if missing, "
            f"then upload {len(files)} files ({_size(total)}) from {folder} to branch {branch}:")
        for f in files:
            log(f"  {f.as_posix():<48} {_size((folder / f).stat().st_size):>10}")
        log("token: " + ("found" if token else f"missing: {NO_TOKEN}"))
        log(f"--- {CARD_FILE} ---\n{card}" if card is not None else f"warning: no {CARD_FILE}: the repo would have no model card")
        return PushResult(repo_id, [f.as_posix() for f in files])
    if not token:
        raise UserError(NO_TOKEN)
    if card is None:
        log(f"warning: {folder} has no {CARD_FILE}: the repo gets no model card")
    elif card != (folder / CARD_FILE).read_text():
        (folder / CARD_FILE).write_text(card)  # the usage snippets now name the repo

    from huggingface_hub import HfApi

    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload {folder.name} with gmt-mlx",
        )
    except Exception as err:  # the Hub raises many types; describe the ones a user can act on
        message = describe_hub_error(err, repo_id, revision)
        if message is None:
            raise
        raise UserError(redact(message, token)) from None
    commit_url = getattr(info, "commit_url", None)
    log(redact(f"pushed {len(files)} files to {url}" + (f" ({commit_url})" if commit_url else ""), token))
    return PushResult(repo_id, [f.as_posix() for f in files], str(url), commit_url)


def publish_run(run_dir: str | Path, model_dir: str | Path, config, *, step: Optional[int] = None,
                base_path: Optional[str | Path] = None, log: Callable[[str], None] = print) -> Optional[PushResult]:
    """The end of `finetune`: write RUN_DIR/model's card, then push it when ``config.push_to_hub`` is set."""
    from .checkpoint import versions

    write_model_card(model_dir, run_dir, dtype=config.dtype, step=step, base_path=base_path, versions=versions())
    if not config.push_to_hub:
        return None
    try:
        return push(model_dir, config.push_to_hub, log=log)
    except UserError as err:
        raise UserError(f"{err} (the run is saved; retry with: gmt-mlx push {run_dir} --repo {config.push_to_hub})") from None
