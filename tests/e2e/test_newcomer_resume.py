"""`finetune --resume RUN --iters 16` on a finished run (issue 37): refused in one line with the command that
trains further, since a longer schedule is not the finished run plus more steps; nothing in RUN changes."""

from __future__ import annotations

import hashlib
import shlex

from gmt_mlx.cli import app
from gmt_mlx.run import rundir
from tests.helpers import runner


def digest(folder) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode() + path.read_bytes())
    return h.hexdigest()


def finished_run(tiny_model_dir, chat_data, out):
    result = runner.invoke(
        app,
        [
            "finetune",
            "--model",
            str(tiny_model_dir),
            "--data",
            str(chat_data),
            "--out",
            str(out),
            "--iters",
            "4",
            "--batch-size",
            "2",
            "--samples",
            "0",
            "--steps-per-eval",
            "0",
        ],
    )
    assert result.exit_code == 0, result.output
    return out


def test_more_iters_on_a_finished_run_is_refused_with_the_command_that_trains_further(
    tiny_model_dir, chat_data, tmp_path
):
    out = finished_run(tiny_model_dir, chat_data, tmp_path / "run")
    before = digest(out)
    for extra in ([], ["--force"]):  # --force resumes a changed config; a finished run has nothing to resume
        result = runner.invoke(app, ["finetune", "--resume", str(out), "--iters", "8", *extra])
        assert result.exit_code == 2 and "Traceback" not in result.output
        [line] = result.output.strip().splitlines()
        assert line.startswith(f"error: {out} is a finished run (4 steps); --resume does not continue it"), line
        assert "iters: 4 -> 8" in line and "or start over with --overwrite" in line
    assert digest(out) == before
    # The command it names trains the 4 steps still wanted, from the finished model, into a new run.
    command = line.split("Train on from its model (a new schedule and optimizer): ")[1].split(", or start over")[0]
    words = shlex.split(command)
    assert words[:6] == ["gmt-mlx", "finetune", "-c", str(out / "config.yaml"), "--model", str(out / "model")]
    assert words[words.index("--iters") + 1] == "4" and words[words.index("--out") + 1] == f"{out}-more"
    follow = runner.invoke(app, [*words[1:], "--batch-size", "2", "--samples", "0"])
    assert follow.exit_code == 0, follow.output
    assert rundir.last_step(f"{out}-more") == 4 and digest(out) == before


def test_resume_of_a_finished_run_with_its_own_options_still_changes_nothing(tiny_model_dir, chat_data, tmp_path):
    out = finished_run(tiny_model_dir, chat_data, tmp_path / "run")
    before = digest(out)
    for extra in ([], ["--iters", "4"]):
        result = runner.invoke(app, ["finetune", "--resume", str(out), *extra])
        assert result.exit_code == 0 and f"{out} is already finished; nothing changed" in result.output
    pushed = runner.invoke(app, ["finetune", "--resume", str(out), "--push-to-hub", "me/model"])
    assert pushed.exit_code == 2 and pushed.output.strip().endswith(f"gmt-mlx push {out} --repo me/model")
    assert digest(out) == before
