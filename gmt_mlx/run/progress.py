"""A dependency-free progress bar with an ETA.

On a terminal it redraws one line; elsewhere (CI logs, pipes) it prints a
line every ``every`` steps so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import Optional, TextIO


def format_seconds(seconds: float) -> str:
    """1:02:03 / 2:03 style duration."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """Progress up to step ``total``; ETA from the mean time of the steps seen in this process."""

    def __init__(self, total: int, *, stream: Optional[TextIO] = None, every: int = 10, width: int = 24):
        self.total, self.every, self.width = total, max(1, every), width
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.t0 = time.perf_counter()
        self.first_step_time: Optional[float] = None
        # The step before the first one updated: a resumed run starts late, and the
        # steps done before it took no time here.
        self.start = 0

    def eta(self, step: int) -> float:
        done = step - self.start
        if done <= 0:
            return float("nan")
        # The first step includes compilation: measure the rate after it when possible.
        if self.first_step_time is not None and done > 1:
            rate = (time.perf_counter() - self.first_step_time) / (done - 1)
        else:
            rate = (time.perf_counter() - self.t0) / done
        return rate * (self.total - step)

    def line(self, step: int, **fields) -> str:
        frac = (step / self.total) if self.total else 1.0
        filled = int(round(frac * self.width))
        bar = "#" * filled + "." * (self.width - filled)
        parts = [f"[{bar}] {step}/{self.total}"]
        for name, value in fields.items():
            parts.append(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}")
        eta = self.eta(step)
        parts.append(f"ETA {format_seconds(eta)}" if eta == eta else "ETA ?")
        return " | ".join(parts)

    def update(self, step: int, **fields) -> None:
        if self.first_step_time is None:
            self.first_step_time = time.perf_counter()
            self.start = step - 1
        text = self.line(step, **fields)
        if self.tty:
            self.stream.write("\r\033[K" + text)
            if step >= self.total:
                self.stream.write("\n")
        elif step % self.every == 0 or step >= self.total or step == self.start + 1:
            self.stream.write(text + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Print a line without breaking the bar."""
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()
