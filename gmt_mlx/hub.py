"""The only module that calls `huggingface_hub`: names, model downloads, tokens and uploads.

`is_hub_id` / `looks_like_path` tell a Hub id from a path (for models and
datasets alike). `download_model` fetches a model repo's snapshot (what
`--model owner/name` needs). `upload_folder` creates the repo if needed and
uploads a folder, like `hf upload`; rerunning it after an interruption sends
only what is missing (files already on the Hub are skipped, large-file data
already uploaded is deduplicated). What is uploaded (the model folder, its
card) is publish/push.py's business. Hub *datasets* are fetched by the
`datasets` library in data/sources.py: the same `load_dataset` call reads
local parquet/CSV files, and this module only tells it whether a name is a
Hub id.

The token comes from `HF_TOKEN` or the local login (`hf auth login`). It is
handed to `HfApi` and nowhere else: never printed, logged or written, and
scrubbed from any error message that quotes it.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import List, Optional, Tuple

from gmt_mlx.errors import UserError

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


def looks_like_path(name: str) -> bool:
    """Whether ``name`` was typed as a local path rather than a Hub id (owner/name).

    A path: starts with /, ./, ../ or ~, has more than one slash or a backslash, ends with a
    slash or .gguf, or its first part is a local folder or runs/ (where runs go by default).
    A bare owner/name that exists nowhere locally is a Hub id.
    """
    if name.startswith(("/", "./", "../", "~")) or name in (".", "..") or "\\" in name:
        return True
    if name.count("/") > 1 or name.endswith("/") or name.lower().endswith(".gguf"):
        return True
    first = name.split("/", 1)[0]
    return "/" in name and (first == "runs" or Path(first).is_dir())


class HubUnreachable(UserError):
    """The Hub could not be reached (offline mode or no network) and the model is not in the HF cache."""


def _unreachable_reason(err: BaseException) -> Optional[str]:
    """ "offline mode (HF_HUB_OFFLINE is set)" / "no network (ConnectError)" when ``err`` or its cause says so."""
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
            raise HubUnreachable(
                f"cannot reach the Hugging Face Hub ({reason}) and {repo_id} is not in the local "
                f"Hugging Face cache ({constants.HF_HUB_CACHE}), where a copy would be used "
                "as it is"
            ) from err
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
        raise UserError(
            f"bad repo id {repo_id!r}: expected owner/name with letters, digits, '-', '_' or '.' ({_first_line(err)})"
        ) from None
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
    network = {
        "ConnectError",
        "ConnectTimeout",
        "ReadTimeout",
        "TimeoutException",
        "NetworkError",
        "TransportError",
        "ProxyError",
        "SSLError",
        "Timeout",
        "ConnectionError",
    }
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
            return (
                f"the token may not write to {repo_id} (403 Forbidden): use a token with write access to that namespace"
            )
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
        why = f"{type(err).__name__}: {_first_line(err)}"
        return f"cannot reach the Hugging Face Hub ({why}): check the network, then {rerun}"
    return None


def upload_folder(
    folder: Path, repo_id: str, *, token: str, private: bool, revision: Optional[str], commit_message: str
) -> Tuple[str, Optional[str]]:
    """Create ``repo_id`` (and the branch) if missing and upload ``folder``; (repo URL, commit URL).

    Errors the user can act on become one-line UserErrors with the token scrubbed.
    """
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
            commit_message=commit_message,
        )
    except Exception as err:  # the Hub raises many types; describe the ones a user can act on
        message = describe_hub_error(err, repo_id, revision)
        if message is None:
            raise
        raise UserError(redact(message, token)) from None
    return str(url), getattr(info, "commit_url", None)
