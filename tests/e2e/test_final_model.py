"""What the user keeps is verified: model/'s sha256 sums in finished.json, written last (issue 25)."""

from __future__ import annotations

import hashlib
import shutil

import pytest

from gmt_mlx.cli import app
from gmt_mlx.run import checkpoint as ckpt
from gmt_mlx.run import final, rundir
from tests.helpers import runner, write_jsonl

from .test_resume import args


def sums(folder):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


def exported_weights(folder):
    import mlx.core as mx
    import numpy as np

    return {k: np.array(v).tobytes() for f in sorted(folder.glob("*.safetensors")) for k, v in mx.load(str(f)).items()}


def last_line(result):
    assert "Traceback" not in result.output
    return result.output.strip().splitlines()[-1]


@pytest.fixture
def finished(tiny_model_dir, chat_data, tmp_path_factory):
    """A finished run (checkpoints every 2 steps, so the final step has one) and its model/'s files."""
    out = tmp_path_factory.mktemp("final") / "run"
    done = runner.invoke(app, args(tiny_model_dir, chat_data, out, "--samples", "1"))
    assert done.exit_code == 0, done.output
    return out, sums(rundir.model_dir(out))


def copy_of(finished, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished[0], out)
    return out


def test_a_finished_run_records_its_models_sums_last(finished):
    out, files = finished
    assert rundir.is_finished(out) and final.model_damage(out) is None
    assert final.finished_step(out) == 6
    assert set(files) <= {p.name for p in rundir.model_dir(out).iterdir()}
    assert "model.safetensors" in files and "README.md" in files  # the card is part of what is verified


def test_a_kill_after_the_model_is_completed_on_resume(tiny_model_dir, chat_data, tmp_path, monkeypatch, finished):
    out = tmp_path / "run"
    real = ckpt.fault

    def killed_after_the_model(point):
        if point == "after-model":
            raise KeyboardInterrupt  # nothing after model/ is written: no samples, card, finished.json
        real(point)

    monkeypatch.setattr(ckpt, "fault", killed_after_the_model)
    assert runner.invoke(app, args(tiny_model_dir, chat_data, out, "--samples", "1")).exit_code != 0
    assert rundir.has_model(out) and not rundir.is_finished(out)
    assert not (out / rundir.SAMPLES_FILE).exists() and not (rundir.model_dir(out) / "README.md").exists()
    monkeypatch.setattr(ckpt, "fault", real)
    resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert resumed.exit_code == 0, resumed.output
    assert (
        "model/ is written but not everything the run promised (samples, card, push): completing it" in resumed.output
    )
    assert rundir.is_finished(out) and (out / rundir.SAMPLES_FILE).is_file()
    # Bit for bit the uninterrupted run's model; the card was written (it quotes measured speeds: not compared).
    now = sums(rundir.model_dir(out))
    assert now.pop("README.md") and now == {k: v for k, v in finished[1].items() if k != "README.md"}


@pytest.mark.parametrize(
    "damage", ["flip", pytest.param("truncate", marks=pytest.mark.slow), pytest.param("delete", marks=pytest.mark.slow)]
)
def test_a_damaged_model_is_refused_by_eval_and_generate_and_rebuilt_by_resume(finished, tmp_path, damage):
    out = copy_of(finished, tmp_path)
    weights = rundir.model_dir(out) / "model.safetensors"
    if damage == "flip":
        flip_a_byte(weights)
    elif damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    why = (
        "model/model.safetensors is missing"
        if damage == "delete"
        else "model/model.safetensors is not the file the run wrote (its sha256 differs)"
    )
    advice = f"; rebuild it with: gmt-mlx finetune --resume {out}"
    for command in (
        ["eval", str(out)],
        ["generate", str(out), "--prompt", "hi"],
        ["push", str(out), "--repo", "a/b", "--dry-run"],
    ):
        result = runner.invoke(app, command)
        assert result.exit_code == 2, (command, result.output)
        assert last_line(result) == f"error: {out}: {why}{advice}", command

    rebuilt = runner.invoke(app, ["finetune", "--resume", str(out)])
    assert rebuilt.exit_code == 0, rebuilt.output
    assert f"warning: {out}: {why}; rebuilding model/ from step-000006, the final step's checkpoint" in rebuilt.output
    assert final.model_damage(out) is None
    now = sums(rundir.model_dir(out))
    assert now.pop("README.md") and now == {k: v for k, v in finished[1].items() if k != "README.md"}
    assert "already finished; nothing changed" in runner.invoke(app, ["finetune", "--resume", str(out)]).output


def test_export_of_a_damaged_model_uses_the_final_checkpoint_or_refuses(finished, tmp_path):
    out = copy_of(finished, tmp_path)
    flip_a_byte(rundir.model_dir(out) / "model.safetensors")
    exported = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "exp")])
    assert exported.exit_code == 0, exported.output
    assert "exporting the final step's checkpoint step-000006 instead (the same weights)" in exported.output
    reference = runner.invoke(app, ["export", str(finished[0]), "--out", str(tmp_path / "ref")])
    assert reference.exit_code == 0, reference.output
    assert exported_weights(tmp_path / "exp") == exported_weights(tmp_path / "ref")

    for folder in (rundir.step_dir(out, 6), rundir.best_dir(out)):  # no checkpoint of the final step left
        shutil.rmtree(folder, ignore_errors=True)
    refused = runner.invoke(app, ["export", str(out), "--out", str(tmp_path / "exp2")])  # refuse, never export wrong
    assert refused.exit_code == 2, refused.output
    assert last_line(refused).startswith(f"error: {out}: model/model.safetensors is not the file the run wrote")
    assert not (tmp_path / "exp2").exists()


def damaged(path, how):
    if how == "delete":
        path.unlink()
    elif how == "truncate":
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    else:
        flip_a_byte(path)


@pytest.mark.slow
def test_damage_campaign_over_every_file_of_model(finished, tmp_path):
    """Every file of a finished run's model/ x truncate/flip/delete x eval/generate/push --dry-run/export/resume:
    no traceback, no wrong export, and resume rebuilds what the run wrote (docs/bad-input.md has the tally)."""
    out0, files = finished
    reference = tmp_path / "reference"
    assert runner.invoke(app, ["export", str(out0), "--out", str(reference)]).exit_code == 0
    expected = {k: v for k, v in sums(reference).items() if k != "README.md"}
    tally = {"cases": 0, "tracebacks": 0, "wrong_exports": 0, "refused": 0, "rebuilt": 0}
    for name in sorted(files):
        for how in ("truncate", "flip", "delete"):
            case = tmp_path / f"{name}-{how}"
            out = case / "run"
            shutil.copytree(out0, out)
            damaged(rundir.model_dir(out) / name, how)
            tally["cases"] += 1
            for command in (
                ["eval", str(out)],
                ["generate", str(out), "--prompt", "hi"],
                ["push", str(out), "--repo", "a/b", "--dry-run"],
            ):
                result = runner.invoke(app, command)
                tally["tracebacks"] += result.exit_code not in (0, 2) or "Traceback" in result.output
                tally["refused"] += result.exit_code == 2
            export = runner.invoke(app, ["export", str(out), "--out", str(case / "exp")])
            tally["tracebacks"] += export.exit_code not in (0, 2)
            if export.exit_code == 0:
                got = {k: v for k, v in sums(case / "exp").items() if k != "README.md"}
                tally["wrong_exports"] += got != expected
            resumed = runner.invoke(app, ["finetune", "--resume", str(out)])
            tally["tracebacks"] += resumed.exit_code != 0
            now = {k: v for k, v in sums(rundir.model_dir(out)).items() if k != "README.md"}
            tally["rebuilt"] += now == {k: v for k, v in files.items() if k != "README.md"}
    print(tally)
    n = tally["cases"]
    assert tally == {"cases": n, "tracebacks": 0, "wrong_exports": 0, "refused": 3 * n, "rebuilt": n}


@pytest.mark.parametrize("case", ["config-not-utf8", "tokenizer-json-cut", "template-cut", "no-tokenizer-config"])
def test_any_model_folder_is_checked_on_read(tiny_model_dir, tmp_path, case):
    """A --model folder that is not a run has no sums: each file we read is checked as it is read."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    if case == "config-not-utf8":
        raw = (folder / "config.json").read_bytes()
        (folder / "config.json").write_bytes(raw.replace(b'"', b'\xff"', 1))
        first_quote = raw.index(b'"')
        expected = f"error: {folder / 'config.json'}: not UTF-8 text (byte {first_quote}); the file is damaged"
    elif case == "tokenizer-json-cut":
        text = (folder / "tokenizer.json").read_text()
        (folder / "tokenizer.json").write_text(text[: len(text) // 2])
        expected = f"error: {folder / 'tokenizer.json'}:"
    elif case == "template-cut":
        (folder / "chat_template.jinja").write_text("{% for message in messages %}{{ message['content'] }}")
        expected = f"error: {folder / 'chat_template.jinja'}:1: not a valid chat template ("
    else:
        (folder / "tokenizer_config.json").unlink()
        expected = "error: the tokenizer has neither a pad nor an end-of-sequence token"
    text = tmp_path / "text"  # plain text rows: no chat template needed
    for split in ("train", "valid"):
        write_jsonl(text / f"{split}.jsonl", [{"text": f"{i} plus {i} is {2 * i}"} for i in range(4)])
    commands = [["eval", str(folder), "--data", str(text), "--split", "valid"]]
    if case != "no-tokenizer-config":  # generation needs no pad token: only eval's batches did (int(None))
        commands.append(["generate", str(folder), "-p", "hi"])
    for command in commands:
        result = runner.invoke(app, command)
        assert result.exit_code == 2 and "Traceback" not in result.output, (command, result.output)
        assert last_line(result).startswith(expected), (command, last_line(result))
