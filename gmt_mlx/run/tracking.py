"""The run's logger: metrics.jsonl and the experiment trackers (`--report-to tensorboard,wandb`), one interface.

Each of them has ``log(record)`` and ``close()``; `open_run_logs` returns them
together (`Trackers`), metrics.jsonl first.

metrics.jsonl stays the run's record; a tracker receives each record as it is
written (train/eval values as scalars by step, the setup record and the
resolved config as the run's config). Each tracker's package is an optional
extra, imported only when asked for, and checked by ``check`` before the
model loads. Only rank 0 opens trackers (finetune.RunLogger).

A resumed run continues the same tracker run: TensorBoard writes to the same
RUN_DIR/tensorboard/ and hides what an earlier start logged after the resumed
checkpoint (``purge_step``); wandb resumes the run whose id RUN_DIR/wandb/run_id
holds. A tracker added on resume first gets the records metrics.jsonl already holds.
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import string
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import yaml

from gmt_mlx.errors import UserError
from gmt_mlx.run.rundir import METRICS_FILE, TENSORBOARD_DIR, WANDB_DIR, read_metrics

# tracker name -> the module it imports (the gmt-mlx extra of the same name installs it)
TRACKERS = {"tensorboard": "tensorboardX", "wandb": "wandb"}
WANDB_ID_FILE = "run_id"


def names(report_to: str) -> List[str]:
    """The tracker names of a ``--report-to`` value (comma-separated, may be empty); unknown ones are a UserError."""
    chosen = [name.strip().lower() for name in (report_to or "").split(",") if name.strip()]
    unknown = [name for name in chosen if name not in TRACKERS]
    if unknown:
        raise UserError(
            f"--report-to: unknown tracker {unknown[0]!r}; choose from {', '.join(TRACKERS)} (comma-separated)"
        )
    return list(dict.fromkeys(chosen))  # in order, once each


def check(report_to: str) -> List[str]:
    """Names of the trackers asked for, after checking that each one's package imports (a one-line UserError if not)."""
    chosen = names(report_to)
    for name in chosen:
        try:
            importlib.import_module(TRACKERS[name])
        except ImportError:
            raise UserError(
                f"--report-to {name} needs the {TRACKERS[name]} package, which is not installed: "
                f"pip install 'gmt-mlx[{name}]'"
            ) from None
    return chosen


def scalars(record: dict) -> Dict[str, float]:
    """A train/eval record's numeric values as ``type/key`` scalars (booleans as 0/1; None and text left out)."""
    kind = record.get("type")
    return {
        f"{kind}/{key}": float(value)
        for key, value in record.items()
        if key not in ("type", "step") and isinstance(value, (int, float))
    }


def setup_values(record: dict) -> Dict[str, Any]:
    """The setup record's values (trainable_params, total_params, total_steps)."""
    return {key: value for key, value in record.items() if key not in ("type", "step")}


def hparams(config: Dict[str, Any], setup: dict) -> Dict[str, Any]:
    """The config plus the setup record's values, flat, as TensorBoard's hparams take them (None -> "none")."""
    values = {**config, **setup_values(setup)}
    return {
        key: "none" if value is None else value if isinstance(value, (bool, int, float, str)) else str(value)
        for key, value in values.items()
    }


class MetricsFile:
    """RUN_DIR/metrics.jsonl, the run's record: one JSON line per record, flushed as written (a kill loses none)."""

    def __init__(self, out: Path):
        self.file = open(Path(out) / METRICS_FILE, "a")

    def log(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


class TensorBoard:
    """Writes RUN_DIR/tensorboard/ event files with tensorboardX (no TensorFlow, no torch)."""

    def __init__(self, out: Path, config: Dict[str, Any], *, resume_step: Optional[int]):
        from tensorboardX import SummaryWriter

        folder = out / TENSORBOARD_DIR
        self.new = not folder.is_dir()
        self.config = config
        # Events an earlier start wrote past the resumed checkpoint (a kill after a report) are hidden.
        purge = resume_step + 1 if resume_step is not None and not self.new else None
        # tensorboardX names files by the second and opens them "wb": a start in the same second as the last
        # would erase it.
        self.writer = SummaryWriter(
            logdir=str(folder),
            purge_step=purge,
            flush_secs=30,
            filename_suffix=f".{os.getpid()}.{secrets.token_hex(4)}",
        )

    def log(self, record: dict) -> None:
        if record.get("type") == "setup":
            from tensorboardX.summary import hparams as hparams_summary

            for summary in hparams_summary(hparams(self.config, record), {}):  # the HPARAMS tab
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + yaml.safe_dump(self.config, sort_keys=False) + "```", 0)
        else:
            for tag, value in scalars(record).items():
                self.writer.add_scalar(tag, value, record["step"])
        self.writer.flush()  # a report every few steps: someone is watching

    def close(self) -> None:
        self.writer.close()


class Wandb:
    """One wandb run per run directory; its id in RUN_DIR/wandb/run_id lets a resumed run continue it."""

    def __init__(self, out: Path, config: Dict[str, Any], *, resume_step: Optional[int]):
        import wandb

        folder = out / WANDB_DIR
        folder.mkdir(parents=True, exist_ok=True)
        id_file = folder / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if id_file.is_file() else ""
        self.new = not run_id
        if self.new:  # wandb's own id alphabet: lowercase letters and digits
            run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
            id_file.write_text(run_id + "\n")
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT") or "gmt-mlx",
                name=out.name,
                id=run_id,
                resume="allow",
                dir=str(out),
                config=config,
            )
        except Exception as err:  # not logged in, no network in online mode, ...
            message = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise UserError(
                f"--report-to wandb: could not start a wandb run ({message}); run `wandb login`, "
                f"or set WANDB_MODE=offline and `wandb sync` later"
            ) from None
        # wandb refuses steps below the resumed run's next one: those were logged by the earlier start.
        self.first_step = 0 if self.new else int(getattr(self.run, "step", 0) or 0)

    def log(self, record: dict) -> None:
        if record.get("type") == "setup":
            self.run.config.update(setup_values(record), allow_val_change=True)
        elif record["step"] >= self.first_step:
            self.run.log(scalars(record), step=record["step"])

    def close(self) -> None:
        self.run.finish()


OPENERS: Dict[str, Callable[..., Any]] = {"tensorboard": TensorBoard, "wandb": Wandb}


class Trackers:
    """The trackers of one run, fed each metrics.jsonl record; empty when none were asked for."""

    def __init__(self, trackers: Optional[list] = None):
        self.trackers = trackers or []

    def log(self, record: dict) -> None:
        for tracker in self.trackers:
            tracker.log(record)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def open_trackers(
    report_to: str,
    out: Path,
    config: Dict[str, Any],
    *,
    resume_step: Optional[int],
    past_records: Callable[[], List[dict]] = list,
) -> Trackers:
    """Open the ``report_to`` trackers for the run in ``out`` (``resume_step``: the checkpoint resumed, or None).

    A tracker that is new to a resumed run first gets ``past_records()``
    (metrics.jsonl up to the checkpoint), so it shows the whole run.
    """
    opened = []
    for name in names(report_to):
        tracker = OPENERS[name](Path(out), config, resume_step=resume_step)
        if resume_step is not None and tracker.new:
            for record in past_records():
                tracker.log(record)
        opened.append(tracker)
    return Trackers(opened)


def open_run_logs(report_to: str, out: Path, config: Dict[str, Any], *, resume_step: Optional[int]) -> Trackers:
    """The run's logger: metrics.jsonl first (the record, cut back to the checkpoint on resume), then the trackers."""
    trackers = open_trackers(report_to, out, config, resume_step=resume_step, past_records=lambda: read_metrics(out))
    return Trackers([MetricsFile(out), *trackers.trackers])
