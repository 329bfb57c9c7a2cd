"""--report-to: TensorBoard event files and a wandb run carry what metrics.jsonl holds, resumes included.

TensorBoard is tested for real (tensorboardX, the `tensorboard` extra) by
reading the event files back; wandb (the `wandb` extra, ~20 MB with its
service binary and a dozen dependencies) through a fake `wandb` module that
records the calls, as the real one offline would receive them.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import sys
import types
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest

from gmt_mlx.cli import app
from gmt_mlx.recipes import setup as run_setup
from gmt_mlx.run import checkpoint as ckpt
from tests.helpers import runner


def args(model, data, out, *extra):
    return [
        "finetune",
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
        "--iters",
        "6",
        "--learning-rate",
        "1e-3",
        "--steps-per-save",
        "2",
        "--steps-per-eval",
        "3",
        "--steps-per-report",
        "1",
        "--samples",
        "0",
        *map(str, extra),
    ]


def ctrl_c():
    os.kill(os.getpid(), signal.SIGINT)  # the loop stops after the step and checkpoints it


def crash():
    raise RuntimeError("simulated crash")  # no checkpoint: the run resumes from an older one


def stop_after_step_3_then_resume(monkeypatch, first: list, stop, *resume_args) -> Path:
    """Run ``first`` until ``stop`` after step 3 (checkpoints every 2 steps), then ``finetune --resume`` it; return
    the run dir."""
    out = Path(first[first.index("--out") + 1])
    monkeypatch.setattr(ckpt, "fault", lambda point: stop() if point == "after-step:3" else None)
    stopped = runner.invoke(app, first)
    assert stopped.exit_code == (130 if stop is ctrl_c else 1), stopped.output
    monkeypatch.setattr(ckpt, "fault", lambda point: None)
    resumed = runner.invoke(app, ["finetune", "--resume", str(out), *resume_args])
    assert resumed.exit_code == 0, resumed.output  # report_to does not change what is trained: no --force needed
    return out


def expected_scalars(run_dir: Path) -> Dict[str, List[Tuple[int, float]]]:
    """metrics.jsonl's train/eval numbers as tag -> [(step, value)] (what a tracker must show)."""
    out: Dict[str, List[Tuple[int, float]]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record["type"] == "setup":
            continue
        for key, value in record.items():
            if key not in ("type", "step") and isinstance(value, (int, float)):
                out.setdefault(f"{record['type']}/{key}", []).append((record["step"], float(value)))
    return out


def read_events(folder: Path) -> list:
    """Every Event of the folder's event files, file after file in the order they were started (TFRecord framing)."""
    from tensorboardX.proto.event_pb2 import Event

    files = []
    for path in folder.glob("events.out.tfevents.*"):
        data, events, offset = path.read_bytes(), [], 0
        while offset < len(data):  # uint64 length, uint32 crc, payload, uint32 crc
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            events.append(Event.FromString(data[offset + 12 : offset + 12 + length]))
            offset += 12 + length + 4
        files.append(events)
    files.sort(key=lambda events: events[0].wall_time)
    return [event for events in files for event in events]


def tensorboard_scalars(folder: Path, purge: bool = True) -> Dict[str, List[Tuple[int, float]]]:
    """tag -> [(step, value)] as TensorBoard shows them: a session START at step s hides earlier events at >= s."""
    out: Dict[str, List[Tuple[int, float]]] = {}
    for event in read_events(folder):
        if purge and event.HasField("session_log") and event.session_log.status == event.session_log.START:
            out = {tag: [(s, v) for s, v in points if s < event.step] for tag, points in out.items()}
        for value in event.summary.value:
            if value.HasField("simple_value"):
                out.setdefault(value.tag, []).append((event.step, value.simple_value))
    return out


def assert_same_scalars(shown: dict, expected: dict) -> None:
    assert sorted(shown) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in shown[tag]] == [s for s, _ in points], tag  # each step once, in order
        # Event files hold float32.
        np.testing.assert_array_equal(
            np.float32([v for _, v in shown[tag]]), np.float32([v for _, v in points]), err_msg=tag
        )


def test_tensorboard_events_hold_the_metrics_and_the_config(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, args(tiny_model_dir, chat_data, out, "--report-to", "tensorboard"))
    assert result.exit_code == 0, result.output
    expected = expected_scalars(out)
    assert {"train/loss", "train/learning_rate", "train/grad_norm", "eval/val_loss"} <= set(expected)
    assert_same_scalars(tensorboard_scalars(out / "tensorboard"), expected)

    summaries = {value.tag: value for event in read_events(out / "tensorboard") for value in event.summary.value}
    assert "method: gmt" in summaries["config/text_summary"].tensor.string_val[0].decode()
    hparams = summaries["_hparams_/session_start_info"].metadata.plugin_data.content.decode("latin-1")
    assert "trainable_params" in hparams and "learning_rate" in hparams  # the setup record and the config


def test_tensorboard_resume_after_ctrl_c_continues_without_duplicates(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    first = args(tiny_model_dir, chat_data, tmp_path / "run", "--report-to", "tensorboard")
    out = stop_after_step_3_then_resume(monkeypatch, first, ctrl_c)
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 2  # same log dir, one file per start
    # Steps 1-3 from the first start, 4-6 from the second: no step twice, even before any purge.
    assert_same_scalars(tensorboard_scalars(out / "tensorboard", purge=False), expected_scalars(out))


def test_tensorboard_resume_after_a_crash_hides_the_steps_logged_past_the_checkpoint(
    tiny_model_dir, chat_data, tmp_path, monkeypatch
):
    # Step 3 is reported, the newest checkpoint is step 2.
    out = stop_after_step_3_then_resume(
        monkeypatch, args(tiny_model_dir, chat_data, tmp_path / "run", "--report-to", "tensorboard"), crash
    )

    raw = tensorboard_scalars(out / "tensorboard", purge=False)
    assert [s for s, _ in raw["train/loss"]].count(3) == 2  # step 3 was trained and logged again
    assert_same_scalars(tensorboard_scalars(out / "tensorboard"), expected_scalars(out))  # TensorBoard shows it once


def test_tracker_added_on_resume_gets_the_earlier_records(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    out = stop_after_step_3_then_resume(
        monkeypatch, args(tiny_model_dir, chat_data, tmp_path / "run"), ctrl_c, "--report-to", "tensorboard"
    )
    assert_same_scalars(tensorboard_scalars(out / "tensorboard"), expected_scalars(out))


@pytest.mark.parametrize("tracker,module", [("tensorboard", "tensorboardX"), ("wandb", "wandb")])
def test_missing_extra_is_one_line_with_the_install_command(
    tiny_model_dir, chat_data, tmp_path, monkeypatch, tracker, module
):
    monkeypatch.setitem(sys.modules, module, None)  # import fails as if not installed

    def no_model(*a, **k):
        raise AssertionError("the model was loaded before the check")

    monkeypatch.setattr(run_setup, "load_base", no_model)
    out = tmp_path / "run"
    result = runner.invoke(app, args(tiny_model_dir, chat_data, out, "--report-to", f"{tracker}"))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines() == [
        f"error: --report-to {tracker} needs the {module} package, which is not installed: "
        f"pip install 'gmt-mlx[{tracker}]'"
    ]
    assert not out.exists()


def test_unknown_tracker_is_refused_in_one_line(tiny_model_dir, chat_data, tmp_path):
    out = tmp_path / "run"
    result = runner.invoke(app, args(tiny_model_dir, chat_data, out, "--report-to", "tensorboard,mlflow"))
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "error: --report-to: unknown tracker 'mlflow'; choose from tensorboard, wandb (comma-separated)"
    ]
    assert not out.exists()


class FakeWandb(types.ModuleType):
    """The calls the real wandb would get; a resumed id continues its history like the wandb server does."""

    def __init__(self):
        super().__init__("wandb")
        self.inits: List[dict] = []
        self.history: Dict[str, List[Tuple[int, dict]]] = {}  # run id -> [(step, values)]
        self.configs: Dict[str, dict] = {}

    def init(self, **kwargs):
        self.inits.append(kwargs)
        history = self.history.setdefault(kwargs["id"], [])
        config = self.configs.setdefault(kwargs["id"], {})
        config.update(kwargs.get("config") or {})
        fake = self

        class Config:
            def update(self, values, allow_val_change=False):
                config.update(values)

        class Run:
            step = history[-1][0] + 1 if history else 0  # wandb's next step after a resume
            finished = False

            def log(self, values, step):
                assert step >= Run.step, f"wandb would drop step {step} (< {Run.step})"
                history.append((step, dict(values)))

            def finish(self):
                fake.finished = True

        run = Run()
        run.config = Config()
        return run


def test_wandb_gets_the_config_and_the_same_scalars_and_resumes_the_same_run(
    tiny_model_dir, chat_data, tmp_path, monkeypatch
):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = stop_after_step_3_then_resume(
        monkeypatch, args(tiny_model_dir, chat_data, tmp_path / "run", "--report-to", "wandb"), ctrl_c
    )

    run_id = (out / "wandb" / "run_id").read_text().strip()
    assert [i["id"] for i in fake.inits] == [run_id, run_id] and all(i["resume"] == "allow" for i in fake.inits)
    assert fake.inits[0]["dir"] == str(out) and fake.finished
    config = fake.configs[run_id]
    assert config["method"] == "gmt" and config["learning_rate"] == 1e-3 and config["report_to"] == "wandb"
    setup = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert config["trainable_params"] == setup["trainable_params"] and config["total_steps"] == 6

    shown: Dict[str, List[Tuple[int, float]]] = {}
    for step, values in fake.history[run_id]:
        for tag, value in values.items():
            shown.setdefault(tag, []).append((step, value))
    expected = expected_scalars(out)
    assert shown == expected  # float64, each step once


def test_wandb_resume_after_a_crash_logs_each_step_once(tiny_model_dir, chat_data, tmp_path, monkeypatch):
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    # Step 3 reaches wandb, the newest checkpoint is step 2.
    out = stop_after_step_3_then_resume(
        monkeypatch, args(tiny_model_dir, chat_data, tmp_path / "run", "--report-to", "wandb"), crash
    )

    (history,) = fake.history.values()  # one wandb run
    losses = [(step, values["train/loss"]) for step, values in history if "train/loss" in values]
    # Step 3 is trained again bit for bit: the first start's values stand, no step is logged twice.
    assert losses == expected_scalars(out)["train/loss"]
