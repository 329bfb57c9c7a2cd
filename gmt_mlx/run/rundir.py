"""The run directory's one owner: its file names, its metrics and its checkpoints.

A run directory (``gmt-mlx finetune --out RUN_DIR``) holds:

    config.yaml             the resolved config (what a resume compares against), its
                            last line the sha256 of the rest (checked on every read)
    .lock                   locked (flock) by the one process writing the run, its pid
                            in it (run/lock.py); a killed writer's lock is taken over
    metrics.jsonl           one JSON record per line: "setup", "train", "eval"
    samples_before.json     answers of the untrained model (reused on resume)
    samples.json            prompts with their answers before and after training
    model/                  the final model in Hugging Face layout
    finished.json           written last, when everything the run promised is there
                            (model/, samples, card, push): model/'s sha256 sums
    checkpoints/step-NNNNNN full training states (checkpoint.py writes one)
    checkpoints/best        the best-validation checkpoint (never pruned)

Every module that reads or writes these goes through the names and functions
here; checkpoint.py knows only what is inside one checkpoint folder, and
tracking.py appends the metrics records.

Any file here may be damaged (a disk, a kill, a hand edit): readers say which
file and why in one line, and fall back on an older good state where one
exists (the newest checkpoint that verifies; the config a checkpoint holds).
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import fields
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

from gmt_mlx import config as cfg
from gmt_mlx.errors import UserError
from gmt_mlx.run import checkpoint as ckpt

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.json"
SAMPLES_BEFORE_FILE = "samples_before.json"
FINISHED_FILE = "finished.json"  # written last: the run kept every promise; model/'s sha256 sums
REFERENCE_FILE = "reference_logps.json"  # DPO: the step-0 model's log-probabilities (objectives/dpo/reference.py)
RESULTS_MD = "results.md"  # a comparison's report (compare/report.py); a card beside it quotes it (publish/card.py)
MODEL_DIR = "model"
CHECKPOINTS_DIR = "checkpoints"
BEST = "best"
TENSORBOARD_DIR = "tensorboard"  # --report-to tensorboard (tracking.py)
WANDB_DIR = "wandb"  # --report-to wandb: its files and the run id
LOCK_FILE = ".lock"  # held (flock) by the one process writing the run, with its pid (run/lock.py); never cleared
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Every name a run directory holds; a folder of these alone (with a metrics file or a
# checkpoint in it) is what is left of a run whose config.yaml was lost or never written.
_WRITTEN_ATOMICALLY = (CONFIG_FILE, SAMPLES_FILE, SAMPLES_BEFORE_FILE, REFERENCE_FILE, FINISHED_FILE)  # via a .tmp file
_RUN_NAMES = {
    METRICS_FILE,
    MODEL_DIR,
    CHECKPOINTS_DIR,
    TENSORBOARD_DIR,
    WANDB_DIR,
    *_WRITTEN_ATOMICALLY,
    *(name + ".tmp" for name in _WRITTEN_ATOMICALLY),
}


def is_run_dir(path: str | Path) -> bool:
    """A gmt-mlx run (finished or not, maybe damaged): config.yaml, or nothing but a run's own files.

    The second form must not match a folder a user made: every entry must be a
    run-directory name and a metrics file or a checkpoints folder must be there.
    """
    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        return True
    if not path.is_dir():
        return False
    names = {child.name for child in path.iterdir()} - {LOCK_FILE}
    return bool(names) and names <= _RUN_NAMES and bool(names & {METRICS_FILE, CHECKPOINTS_DIR, CONFIG_FILE + ".tmp"})


def is_empty(path: str | Path) -> bool:
    """A folder holding nothing but maybe the lock file (a run killed before it wrote anything leaves that)."""
    return all(child.name == LOCK_FILE for child in Path(path).iterdir())


def has_trained(path: str | Path) -> bool:
    """Whether the run got past set-up: a checkpoint folder or a train/eval record exists.

    A run that did not is replaceable: nothing it holds took more than its set-up to make.
    """
    folder = Path(path) / CHECKPOINTS_DIR
    if folder.is_dir() and any(_STEP_DIR.match(c.name) or c.name == BEST for c in folder.iterdir()):
        return True
    return any(record.get("type") in ("train", "eval") for record in read_metrics(path))


def clear(path: str | Path) -> None:
    """Empty a run directory for a fresh start: checkpoints and model first, config.yaml last.

    A kill part-way leaves a run that is still recognised (config.yaml stays to
    the end) and whose leftover checkpoints fail verification rather than resume.
    """
    path = Path(path)
    order = {CHECKPOINTS_DIR: 0, MODEL_DIR: 1, CONFIG_FILE: 3}
    for child in sorted(path.iterdir(), key=lambda c: order.get(c.name, 2)):
        if child.name == LOCK_FILE:  # the lock of the process clearing it: removing it would let a second one in
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


# ---------------------------------------------------------------- JSON files


def read_json(path: Path) -> Any:
    """``path`` parsed; None when it is absent or damaged (not UTF-8, not JSON)."""
    try:
        return json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError):
        return None


def write_json_atomically(path: Path, value: Any, **dumps) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, **dumps))
    tmp.replace(path)  # a kill leaves the old file or the new one, never half of one
    return path


def read_samples(run_dir: str | Path) -> List[dict]:
    """samples.json's prompts with their answers before and after; [] when absent (--samples 0) or damaged."""
    samples = read_json(Path(run_dir) / SAMPLES_FILE)
    if not isinstance(samples, list) or not all(
        isinstance(s, dict) and {"prompt", "before", "after"} <= set(s) for s in samples
    ):
        return []
    return samples


def write_samples(run_dir: str | Path, samples: List[dict]) -> None:
    write_json_atomically(Path(run_dir) / SAMPLES_FILE, samples, indent=2)


def read_samples_before(run_dir: str | Path, count: int) -> Optional[List[str]]:
    """The ``count`` untrained answers the run's first start saved; None when missing, damaged or not ``count``."""
    saved = read_json(Path(run_dir) / SAMPLES_BEFORE_FILE)
    if isinstance(saved, list) and len(saved) == count and all(isinstance(a, str) for a in saved):
        return saved
    return None


def write_samples_before(run_dir: str | Path, answers: List[str]) -> None:
    write_json_atomically(Path(run_dir) / SAMPLES_BEFORE_FILE, answers)


def read_reference(run_dir: str | Path) -> Any:
    """reference_logps.json parsed; FileNotFoundError when absent, another OSError or ValueError when damaged."""
    path = Path(run_dir) / REFERENCE_FILE
    return json.loads(path.read_bytes().decode("utf-8"))  # UnicodeDecodeError is a ValueError


def write_reference(run_dir: str | Path, record: dict) -> Path:
    return write_json_atomically(Path(run_dir) / REFERENCE_FILE, record)


def reset_metrics(run_dir: str | Path) -> None:
    """A fresh start's metrics.jsonl begins empty."""
    (Path(run_dir) / METRICS_FILE).unlink(missing_ok=True)


# ---------------------------------------------------------------- config


# config.yaml's last line: the sha256 of the lines above it (a YAML comment, so any YAML reader still reads the file).
_CONFIG_SUM = re.compile(r"^# sha256 ([0-9a-f]{64}) \(of the lines above: gmt-mlx checks it on every read\)$")


def _config_sum(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_config(config: "cfg.Config", run_dir: str | Path) -> None:
    """Write config.yaml atomically (a kill leaves the old file or the new, never half of one), with its checksum."""
    path = Path(run_dir) / CONFIG_FILE
    tmp = path.with_name(path.name + ".tmp")
    text = cfg.dump_yaml(config)
    tmp.write_text(
        f"{text}# sha256 {_config_sum(text)} (of the lines above: gmt-mlx checks it on every read)\n", encoding="utf-8"
    )
    tmp.replace(path)


def check_config_sum(path: Path, text: str) -> None:
    """Refuse a config.yaml whose lines differ from its checksum (a hand edit, or damage that is still YAML).

    A config.yaml without the checksum line (gmt-mlx before it) is read unchecked.
    """
    body, _, last = text[:-1].rpartition("\n")
    match = _CONFIG_SUM.match(last)
    if match and _config_sum(body + "\n" if body else "") != match.group(1):
        raise UserError(f"{path} was changed after the run wrote it (it does not match its checksum)")


def read_config(run_dir: str | Path) -> Dict[str, Any]:
    """config.yaml as a dict of options; UserError saying the file and why when it is missing or damaged."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise UserError(f"{path} is missing") from None
    except OSError as err:
        raise UserError(f"{path}: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is damaged (not UTF-8 text at byte {err.start})") from None
    if text and not text.endswith("\n"):  # save_yaml ends with a newline: this one was cut short
        raise UserError(f"{path} is damaged (cut short)")
    check_config_sum(path, text)
    return cfg.load_yaml(path)


def run_config(run_dir: str | Path, log: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """The run's options: config.yaml over the newest checkpoint's copy of the config.

    A damaged config.yaml falls back on that copy (``log`` says so); a yaml cut
    at a line end (keys missing) is completed by it. UserError when neither exists.
    """
    saved: Optional[Dict[str, Any]] = None
    for path in _candidates(run_dir):
        try:
            state = ckpt.read_state(path)
        except ckpt.DamagedCheckpoint:
            continue
        if isinstance(state.get("config"), dict):
            saved = state["config"]
            break
    try:
        return {**(saved or {}), **read_config(run_dir)}
    except UserError as err:
        if saved is None:
            raise
        if log:
            log(f"warning: {err}; using the copy of the config in {path.relative_to(run_dir)}")
        known = {f.name for f in fields(cfg.Config)}
        return {k: v for k, v in saved.items() if k in known}


def has_model(path: str | Path) -> bool:
    """The run wrote its final model (model/config.json is written after the weights)."""
    return (Path(path) / MODEL_DIR / "config.json").is_file()


def is_finished(path: str | Path) -> bool:
    """Everything the run promised is written: finished.json, the last file a run writes, is there (run/final.py)."""
    return isinstance(read_json(Path(path) / FINISHED_FILE), dict)


def model_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / MODEL_DIR


# ---------------------------------------------------------------- metrics


def _metric_lines(run_dir: str | Path) -> Iterator[Tuple[int, Optional[str], Optional[dict]]]:
    """(line number, line, record) for every non-blank line of metrics.jsonl, in file order.

    A line that is not a JSON object with an integer step comes as (number,
    None, None): damaged. A final line without its newline is a write cut short
    by a kill and is skipped silently.
    """
    path = Path(run_dir) / METRICS_FILE
    try:
        data = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            line = raw.decode("utf-8")
            record = json.loads(line)
        except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
            line, record = None, None
        if not isinstance(record, dict) or not isinstance(record.get("step", 0), int):
            if number == len(lines):  # no newline after it: cut short by a kill
                continue
            yield number, None, None
            continue
        yield number, line, record


def damaged_metrics(run_dir: str | Path) -> Optional[str]:
    """One line naming metrics.jsonl's damaged lines (which every reader skips), or None."""
    bad = [number for number, _, record in _metric_lines(run_dir) if record is None]
    if not bad:
        return None
    more = f" (and {len(bad) - 1} more damaged line{'s' * (len(bad) > 2)})" if len(bad) > 1 else ""
    return f"{Path(run_dir) / METRICS_FILE}:{bad[0]}: not a metrics record (damaged line, skipped){more}"


def read_metrics(run_dir: str | Path, kind: Optional[str] = None) -> List[dict]:
    """The records of RUN_DIR/metrics.jsonl ([] if absent); ``kind`` keeps one ``type`` ("train", "eval").

    Damaged lines are skipped (``damaged_metrics`` names them): a record of the
    run's past must never stop a resume or an export.
    """
    return [
        record
        for _, _, record in _metric_lines(run_dir)
        if record is not None and (kind is None or record.get("type") == kind)
    ]


def truncate_metrics(run_dir: str | Path, step: int) -> None:
    """Drop records after ``step`` (and damaged lines) so a resumed run's metrics read like an uninterrupted one."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return
    kept = [line for _, line, record in _metric_lines(run_dir) if record is not None and record.get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


def last_step(run_dir: str | Path) -> Optional[int]:
    """The last optimizer step the run reported (its final model's step), or None."""
    steps = [r["step"] for r in read_metrics(run_dir, "train") if isinstance(r.get("step"), int)]
    return max(steps) if steps else None


def last_record(run_dir: str | Path, kind: str, up_to: Optional[int] = None) -> Optional[dict]:
    """The last ``kind`` record at or before step ``up_to`` (any step when None)."""
    records = [r for r in read_metrics(run_dir, kind) if up_to is None or r.get("step", 0) <= up_to]
    return records[-1] if records else None


# ---------------------------------------------------------------- checkpoints


def step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / f"step-{step:06d}"


def best_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR / BEST


def _steps(run_dir: str | Path, complete: bool = True) -> Dict[int, Path]:
    """``step-N`` checkpoint folders by step (from the name: no file is read), oldest first.

    ``complete``: only those whose save finished (``*.tmp`` / ``*.old`` leftovers never match).
    """
    folder = Path(run_dir) / CHECKPOINTS_DIR
    found = {}
    for child in folder.iterdir() if folder.is_dir() else []:
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (not complete or ckpt.is_complete(child)):
            found[int(match.group(1))] = child
    return dict(sorted(found.items()))


def step_checkpoints(run_dir: str | Path) -> List[Path]:
    """Complete ``step-N`` checkpoints of a run, oldest first."""
    return list(_steps(run_dir).values())


def _best_step(run_dir: str | Path) -> Optional[int]:
    try:
        return ckpt.read_state(best_dir(run_dir))["step"]
    except ckpt.DamagedCheckpoint:
        return None


def _candidates(run_dir: str | Path) -> List[Path]:
    """Every checkpoint folder, newest first (a tie goes to ``step-N``); a ``best`` whose state is unreadable last.

    Folders missing their state.json are included: a damaged one must be
    reported, never silently passed over.
    """
    steps = _steps(run_dir, complete=False)
    ranked = [((step, 1), path) for step, path in steps.items()]
    best = best_dir(run_dir)
    if best.is_dir():
        step = _best_step(run_dir)
        ranked.append(((step if step is not None else -1, 0), best))
    return [path for _, path in sorted(ranked, key=lambda item: item[0], reverse=True)]


def latest_checkpoint(run_dir: str | Path) -> Optional[Path]:
    """The complete checkpoint with the highest step (``step-N`` or ``best``; a tie goes to ``step-N``).

    Only ``best``'s state.json is read (``step-N`` is named by its step); nothing is verified.
    """
    for path in _candidates(run_dir):
        if ckpt.is_complete(path) and (path.name != BEST or _best_step(run_dir) is not None):
            return path
    return None


def newest_verified(run_dir: str | Path) -> Tuple[Optional[Path], Optional[dict], List[str]]:
    """(checkpoint, its metadata, why each newer one was passed over) for the newest checkpoint that verifies.

    Each checkpoint's files are hashed against its state.json, newest first,
    until one passes: a damaged newest checkpoint falls back on an older one.
    """
    skipped = []
    for path in _candidates(run_dir):
        try:
            return path, ckpt.verify(path), skipped
        except ckpt.DamagedCheckpoint as err:
            skipped.append(str(err))
    return None, None, skipped


def prune(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` step checkpoints (``best`` is never pruned)."""
    if keep <= 0:
        return
    for old in step_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run_dir: str | Path, name: str, log: Optional[Callable[[str], None]] = None) -> Path:
    """The checkpoint folder for ``best``, ``last`` (the newest one that verifies) or ``step-N``.

    ``best`` and ``step-N`` are verified when loaded; ``log`` hears why ``last`` passed over a newer one.
    """
    run_dir = Path(run_dir)
    best = best_dir(run_dir)
    steps = _steps(run_dir)
    have = ", ".join([BEST] * ckpt.is_complete(best) + [f"step-{n}" for n in steps]) or "none"
    if name == BEST:
        if best.is_dir():
            return best
        raise UserError(
            f"{run_dir} has no 'best' checkpoint (it is saved at validation, which needs "
            f"valid.jsonl); checkpoints: {have}"
        )
    if name == "last":
        last = run_dir / CHECKPOINTS_DIR / "last"
        if ckpt.is_complete(last):  # a "last" folder or link, where a version writes one
            return last
        found, _, skipped = newest_verified(run_dir)
        if found is None and skipped:
            raise UserError(f"{run_dir} has no checkpoint that verifies: {'; '.join(skipped)}")
        if found is None:
            raise UserError(f"{run_dir} has no checkpoint and no final model ({MODEL_DIR}/)")
        if skipped and log:
            log(f"warning: {'; '.join(skipped)}; using {found.name}, the newest checkpoint that verifies")
        return found
    match = re.match(r"^step-?(\d+)$", name)
    if not match:
        raise UserError(f"--checkpoint must be best, last or step-N, got {name!r}")
    if int(match.group(1)) in _steps(run_dir, complete=False):
        return _steps(run_dir, complete=False)[int(match.group(1))]
    raise UserError(f"{run_dir} has no checkpoint {name}; checkpoints: {have}")
