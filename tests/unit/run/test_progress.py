"""The progress bar's ETA, also for a run resumed part-way."""

from __future__ import annotations

import io

from gmt_mlx.run import progress


def test_eta_of_a_resumed_run_counts_only_the_steps_run_here(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: now[0])
    bar = progress.Progress(100, stream=io.StringIO(), every=1)
    now[0] = 10.0
    bar.update(51)  # resumed at step 50: steps 1-50 ran in another process
    now[0] = 20.0
    bar.update(52)
    # One step took 10 s here; 48 remain: 480 s (counting from step 0 it would read ~10 s).
    assert bar.eta(52) == 480.0
    assert "ETA 8:00" in bar.stream.getvalue().splitlines()[-1]


def test_format_seconds():
    assert progress.format_seconds(62) == "1:02"
    assert progress.format_seconds(3723) == "1:02:03"
