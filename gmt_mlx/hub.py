"""Model cards and uploads: the only module that talks to the Hugging Face Hub.

`write_model_card` describes a run (method, mask settings, config, final
metrics, and the `compare` table and plots when the run came from one) in a
README.md with the Hub's YAML metadata. `push` creates the repo if needed and
uploads a folder with `huggingface_hub`, like `hf upload`; rerunning it after
an interruption sends only what is missing (files already on the Hub are
skipped, large-file data already uploaded is deduplicated).

The token comes from `HF_TOKEN` or the local login (`hf auth login`). It is
handed to `HfApi` and nowhere else: never printed, logged or written, and
scrubbed from any error message that quotes it.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional

import yaml

from .errors import UserError

CARD_FILE = "README.md"
# The usage snippets name the model by this until `push` knows the repo id.
MODEL_ID_PLACEHOLDER = "path/to/this/model"
PAPER_URL = "https://arxiv.org/abs/2406.15330"
# Licenses of the embedded default models (their Hub cards say so; the GGUF copy carries no card).
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}
# What `upload_folder` never sends; the dry-run listing leaves the same out.
SKIPPED_DIRS = (".git", ".cache")

# Short names for the card's first line, and what each method changes (the Method table).
METHOD_NAMES = {
    "gmt": f"Gradient-Mask Tuning (GMT, [arXiv 2406.15330]({PAPER_URL}))",
    "sft": "plain full-parameter fine-tuning (SFT)",
    "random": "random-mask fine-tuning (the control for GMT)",
    "lora": "LoRA",
    "dora": "DoRA",
}
METHOD_TEXT = {
    "gmt": "full fine-tuning in which the gradient entries with the smallest magnitudes "
    "(a `mask_ratio` fraction) are dropped at every optimizer step",
    "sft": "every trained weight gets the full gradient",
    "random": "a random `mask_ratio` fraction of gradient entries is dropped, resampled every step",
    "lora": "low-rank adapters trained on a frozen base",
    "dora": "weight-decomposed low-rank adapters trained on a frozen base",
}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_CACHE_SNAPSHOT = re.compile(r"models--([^/]+)--([^/]+)/snapshots/")


# ---------------------------------------------------------------- model card


def base_model_id(model: Optional[str], base_path: Optional[str | Path] = None) -> Optional[str]:
    """The Hub id of a run's base model when it can be known offline, else None.

    An embedded name maps to its Hub repo, a Hub id is itself, a folder inside
    the Hugging Face cache names its repo; any other local folder or GGUF is unknown.
    """
    from .models import EMBEDDED_MODELS

    if not model:
        return None
    if model.lower() in EMBEDDED_MODELS:
        return EMBEDDED_MODELS[model.lower()].hub_repo
    for candidate in (model, str(base_path) if base_path else None):
        if candidate:
            match = _CACHE_SNAPSHOT.search(str(Path(candidate).expanduser().resolve()) + "/")
            if match:
                return f"{match.group(1)}/{match.group(2)}"
    if _HUB_ID.match(model) and not Path(model).expanduser().exists():
        return model
    return None


def front_matter(text: str) -> Dict[str, Any]:
    """The YAML metadata block at the top of a README.md ({} when absent or broken)."""
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def base_license(base_path: Optional[str | Path], base_id: Optional[str]) -> Dict[str, Any]:
    """License metadata inherited from the base: its README.md front matter, else a known license."""
    if base_path is not None:
        readme = Path(base_path) / CARD_FILE
        if readme.is_file():
            meta = front_matter(readme.read_text(errors="replace"))
            if meta.get("license"):
                return {k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)}
    if base_id in KNOWN_LICENSES:
        return {"license": KNOWN_LICENSES[base_id]}
    return {}


@dataclass
class RunSummary:
    """What the card reports from a run directory."""

    config: Dict[str, Any]
    train: List[dict] = field(default_factory=list)
    evals: List[dict] = field(default_factory=list)
    other: Dict[str, dict] = field(default_factory=dict)  # last record of any other type

    @classmethod
    def read(cls, run_dir: str | Path) -> "RunSummary":
        run_dir = Path(run_dir)
        config_file = run_dir / "config.yaml"
        config = yaml.safe_load(config_file.read_text()) if config_file.is_file() else {}
        summary = cls(config if isinstance(config, dict) else {})
        metrics = run_dir / "metrics.jsonl"
        if metrics.is_file():
            for line in metrics.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill; the rest is good
                kind = record.get("type")
                if kind == "train":
                    summary.train.append(record)
                elif kind == "eval":
                    summary.evals.append(record)
                elif kind:
                    summary.other[kind] = record
        return summary


def _fmt(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return str(value)
        return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(rows: Iterable[tuple], header: tuple = ("setting", "value")) -> str:
    lines = [f"| {header[0]} | {header[1]} |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in rows]
    return "\n".join(lines)


def _public_value(value: Any) -> Any:
    """Local paths shrink to their last part: a public card must not show the user's home folder."""
    if isinstance(value, str) and (value.startswith(("/", "~", "./", "../")) or Path(value).expanduser().exists()):
        return Path(value).name
    return value


def public_config(config: Dict[str, Any], base_id: Optional[str]) -> Dict[str, Any]:
    """The config as the card shows it: no run-dir or Hub settings, paths reduced to names."""
    out = {}
    for key, value in config.items():
        if key in ("out", "push_to_hub", "hub_datasets"):
            continue
        out[key] = base_id if key == "model" and base_id else _public_value(value)
    return out


def _method_rows(config: Dict[str, Any], setup: Dict[str, Any]) -> List[tuple]:
    method = config.get("method", "?")
    rows = [("method", f"`{method}`: {METHOD_TEXT.get(method, method)}")]
    if setup.get("trainable_params") and setup.get("total_params"):
        share = 100 * setup["trainable_params"] / setup["total_params"]
        rows.append(("trainable parameters", f"{_fmt(setup['trainable_params'])} of {_fmt(setup['total_params'])} ({share:.2f}%)"))
    if method in ("gmt", "random"):
        rows.append(("mask_ratio", f"{config.get('mask_ratio')} (fraction of gradient entries dropped per step)"))
        rows.append(("mask_scope", f"{config.get('mask_scope')} (entries sharing one threshold)"))
        target = config.get("mask_target")
        what = "the optimizer sees the masked gradient" if target == "grad" else "only kept entries move each step"
        rows.append(("mask_target", f"{target} ({what})"))
    adapters = method in ("lora", "dora")
    if adapters:
        rows += [(key, _fmt(config[key]) if config[key] != "" else "(every linear layer)")
                 for key in sorted(config) if key.startswith("lora_")]
    layers = config.get("num_layers", -1)
    scope = "all transformer blocks" if layers in (-1, None) else f"the last {layers} transformer blocks"
    scope = f"adapters on {scope}" if adapters else scope
    frozen = [name for name, key in (("embeddings", "freeze_embeddings"), ("lm_head", "freeze_lm_head")) if config.get(key)]
    rows.append(("trained", scope + (f" (frozen: {', '.join(frozen)})" if frozen else "")))
    return rows


def _training_rows(config: Dict[str, Any]) -> List[tuple]:
    rows = []
    if config.get("data"):
        rows.append(("data", f"`{_public_value(config['data'])}`" + (" (loss on completions only)" if config.get("mask_prompt") else "")))
    if config.get("optimizer"):
        rows.append(("optimizer", f"{config['optimizer']}, weight decay {config.get('weight_decay')}, "
                                  f"gradient clip {config.get('grad_clip')}"))
    if config.get("learning_rate") is not None:
        rows.append(("learning rate", f"{config['learning_rate']} peak, {config.get('warmup_steps', 0)} warmup steps, "
                                      f"{config.get('lr_schedule')} decay to {config.get('min_lr_ratio')}x"))
    if config.get("batch_size") is not None:
        rows.append(("batch", f"{config['batch_size']} x {config.get('grad_accumulation_steps', 1)} accumulation, "
                              f"max {config.get('max_seq_length')} tokens"))
    length = f"{config['epochs']} epochs" if config.get("epochs") else f"{config.get('iters')} iterations"
    rows.append(("length", length))
    rows.append(("precision", f"trained in {config.get('train_dtype')}, seed {config.get('seed')}"))
    return rows


def _result_rows(summary: RunSummary) -> List[tuple]:
    rows = []
    if summary.train:
        last = summary.train[-1]
        rows.append(("optimizer steps", _fmt(last.get("step"))))
        rows.append(("final train loss", _fmt(last.get("loss"))))
        if last.get("trained_tokens") is not None:
            rows.append(("tokens trained", _fmt(last["trained_tokens"])))
        if last.get("kept_fraction") is not None:
            rows.append(("kept fraction (last step)", _fmt(last["kept_fraction"])))
        if last.get("wall_time") is not None:
            seconds = last["wall_time"]
            rows.append(("training time", f"{seconds / 60:.1f} min" if seconds >= 60 else f"{seconds:.1f} s"))
    if summary.evals:
        last = summary.evals[-1]
        rows.append(("final validation loss", f"{_fmt(last.get('val_loss'))} (perplexity {_fmt(last.get('val_ppl'))}, step {last.get('step')})"))
        best = min(summary.evals, key=lambda r: r.get("val_loss", float("inf")))
        rows.append(("best validation loss", f"{_fmt(best.get('val_loss'))} (step {best.get('step')})"))
    for kind, record in sorted((k, r) for k, r in summary.other.items() if k != "setup"):
        for key, value in record.items():
            if key not in ("type", "wall_time") and isinstance(value, (int, float)) and not isinstance(value, bool):
                rows.append((f"{kind} {key}", _fmt(value)))
    return rows


# An absolute or ~ path of two parts or more (/home/me/data, ~/runs/x), not inside a URL or a word.
_LOCAL_PATH = re.compile(r"(?<![\w.:/~%])(?:~|/[^\s/`'\"|()<>\[\]]+)(?:/[^\s/`'\"|()<>\[\]]+)+/?")


def _strip_paths(text: str) -> str:
    """Local paths reduced to their last part (URLs, `tokens/s` and `%/step` are left alone)."""
    return _LOCAL_PATH.sub(lambda m: Path(m.group(0)).name or m.group(0), text)


def comparison_dir(run_dir: str | Path) -> Optional[Path]:
    """The `gmt-mlx compare` folder a run belongs to (OUT/runs/NAME, or OUT/NAME), if any."""
    parent = Path(run_dir).resolve().parent
    for candidate in (parent.parent, parent) if parent.name == "runs" else (parent,):
        if (candidate / "results.md").is_file():
            return candidate
    return None


def _comparison(run_dir: Path, folder: Path) -> Optional[str]:
    """The `compare` results the run belongs to, with its plots copied next to the card."""
    parent = comparison_dir(run_dir)
    if parent is None:
        return None
    text = _strip_paths((parent / "results.md").read_text(errors="replace").strip())
    # Nest its headings under the card's "## Comparison".
    text = re.sub(r"^(#{1,4}) ", lambda m: "#" * min(len(m.group(1)) + 2, 6) + " ", text, flags=re.M)
    plots = sorted(parent.glob("*.png"))
    referenced = set(re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", text))
    for ref in referenced:
        src = (parent / ref).resolve()
        if src.suffix.lower() == ".png" and src.is_file() and parent in src.parents and src not in plots:
            plots.append(src)
    for plot in plots:
        dest = folder / plot.relative_to(parent)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(plot, dest)
    extra = [p for p in plots if p.relative_to(parent).as_posix() not in referenced]
    lines = [f"This model is the `{run_dir.name}` run of a `gmt-mlx compare` on the same data and budget:", "", text]
    if extra:
        lines += [""] + [f"![{p.stem}]({p.relative_to(parent).as_posix()})" for p in extra]
    return "\n".join(lines)


def model_card(
    run_dir: str | Path,
    folder: str | Path,
    *,
    dtype: str,
    checkpoint: str = "last",
    step: Optional[int] = None,
    checkpoint_val_loss: Optional[float] = None,
    adapter: bool = False,
    datasets: Optional[List[str]] = None,
    base_path: Optional[str | Path] = None,
    versions: Optional[Dict[str, str]] = None,
    title: Optional[str] = None,
) -> str:
    """The README.md for a model exported from ``run_dir`` into ``folder`` (plots are copied there)."""
    run_dir, folder = Path(run_dir), Path(folder)
    summary = RunSummary.read(run_dir)
    config = summary.config
    base_id = base_model_id(config.get("model"), base_path)
    if datasets is None:
        datasets = [d.strip() for d in str(config.get("hub_datasets") or "").split(",") if d.strip()]
    method = config.get("method", "gmt")

    meta: Dict[str, Any] = {}
    if base_id:
        meta["base_model"] = base_id
        meta["base_model_relation"] = "adapter" if adapter else "finetune"
    # transformers: the folder is a standard HF checkpoint (HF names, float safetensors), so the
    # Hub's "Use this model" snippet and download counter work; the `mlx` tag lists it for MLX users.
    meta["library_name"] = "peft" if adapter else "transformers"
    meta.update(base_license(base_path, base_id))
    if datasets:
        meta["datasets"] = list(datasets)
    meta["pipeline_tag"] = "text-generation"
    tags = ["gmt", "mlx", "gmt-mlx", "gradient-mask-tuning", method]
    tags += ["lora"] if adapter and "lora" not in tags else []
    meta["tags"] = list(dict.fromkeys(tags))

    base_text = f"[{base_id}](https://huggingface.co/{base_id})" if base_id else f"`{_public_value(config.get('model'))}`"
    if adapter:
        what = "the adapter alone, in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`)"
    else:
        merged = " (adapters merged into the base weights)" if method in ("lora", "dora") else ""
        what = f"the full weights{merged} in Hugging Face format (safetensors, {dtype}): they load with `transformers` and `mlx_lm`"
    details = [f"step {step}"] if step is not None else []
    details += [f"validation loss {_fmt(checkpoint_val_loss)}"] if checkpoint_val_loss is not None else []
    source = "the final model" if checkpoint == "last" else f"checkpoint `{checkpoint}`"
    source += f" ({', '.join(details)})" if details else ""

    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---",
        f"# {title or folder.name}",
        f"{base_text} fine-tuned with {METHOD_NAMES.get(method, f'`{method}`')} using gmt-mlx on "
        f"[MLX](https://github.com/ml-explore/mlx). This repository holds {what}; exported from {source}.",
        "## Method\n\n" + _table(_method_rows(config, summary.other.get("setup", {}))),
        "## Training\n\n" + _table(_training_rows(config))
        + "\n\n<details><summary>Full training config</summary>\n\n```yaml\n"
        + yaml.safe_dump(public_config(config, base_id), sort_keys=False).strip() + "\n```\n\n</details>",
    ]
    results = _result_rows(summary)
    if results:
        parts.append("## Results\n\n" + _table(results, ("metric", "value")))
    comparison = _comparison(run_dir, folder)
    if comparison:
        parts.append("## Comparison\n\n" + comparison)
    parts.append("## Usage\n\n" + _usage(adapter, base_id))
    versions = versions or {}
    if versions:
        parts.append("## Framework versions\n\n" + "\n".join(f"- {k} {v}" for k, v in versions.items()))
    return "\n\n".join(parts) + "\n"


def _usage(adapter: bool, base_id: Optional[str]) -> str:
    if adapter:
        base = base_id or "BASE_MODEL"
        return (
            "```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
            f'model = PeftModel.from_pretrained(base, "{MODEL_ID_PLACEHOLDER}")\n'
            f'tokenizer = AutoTokenizer.from_pretrained("{base}")\n```'
        )
    return (
        "With MLX (`pip install mlx-lm`):\n\n```python\nfrom mlx_lm import load, generate\n\n"
        f'model, tokenizer = load("{MODEL_ID_PLACEHOLDER}")\n'
        'messages = [{"role": "user", "content": "What is 12 + 7?"}]\n'
        "prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)\n"
        "print(generate(model, tokenizer, prompt=prompt, max_tokens=64))\n```\n\n"
        "With transformers:\n\n```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{MODEL_ID_PLACEHOLDER}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{MODEL_ID_PLACEHOLDER}")\n```'
    )


def write_model_card(folder: str | Path, run_dir: str | Path, **kwargs) -> Path:
    """Write ``folder``/README.md describing ``run_dir`` (see `model_card`); return its path."""
    folder = Path(folder)
    path = folder / CARD_FILE
    path.write_text(model_card(run_dir, folder, **kwargs))
    return path


# ---------------------------------------------------------------- upload


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    line = text.splitlines()[0].strip() if text else type(err).__name__
    return line[:300]


def redact(text: str, token: Optional[str]) -> str:
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
    if (path / "config.yaml").is_file() and (path / "model" / "config.json").is_file():
        run_dir, path = path, path / "model"
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


def card_for(folder: Path, repo_id: str) -> Optional[str]:
    """The folder's README.md with the usage snippets naming ``repo_id`` (None without a card)."""
    card = folder / CARD_FILE
    if not card.is_file():
        return None
    return card.read_text().replace(MODEL_ID_PLACEHOLDER, repo_id)


def _size(nbytes: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1024 or unit == "GB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return ""


@dataclass
class PushResult:
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
