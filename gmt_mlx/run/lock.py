"""One writer per run directory: an exclusive lock held while `finetune` writes it.

Two `finetune` processes on one ``--out`` used to interleave their checkpoints
and metrics (the campaign of issue 38: 5 of 6 pairs failed to save, and the
survivor's metrics.jsonl kept 2 of 9 records). Now the process that writes a
run directory holds ``fcntl.flock`` on ``RUN_DIR/.lock`` (which holds its pid)
from before it reads the folder until it returns; a second writer is refused
in one line naming the holder's pid. The kernel drops the lock when its holder
dies, so the file a SIGKILLed run leaves behind is taken over by the next
start with nothing to clean. Under ``mlx.launch`` only rank 0 writes, so only
rank 0 locks. The folder's readers (export, eval, generate) take no lock.
"""

from __future__ import annotations

import errno
import fcntl
import os
from pathlib import Path
from typing import Optional

from gmt_mlx.errors import UserError
from gmt_mlx.run import rundir


class RunLock:
    """The lock of one run directory, taken by ``hold`` and given back by ``release`` (idempotent both)."""

    def __init__(self) -> None:
        self.fd: Optional[int] = None
        self.path: Optional[Path] = None
        self.tried = False  # hold() ran on an existing folder (a read-only one cannot be locked, nor written)

    @property
    def held(self) -> bool:
        return self.fd is not None

    def hold(self, run_dir: str | Path, *, new: bool = False) -> None:
        """Lock ``run_dir`` if it exists (a folder made later is locked with ``new=True`` once made).

        ``new``: the run planned a fresh start in a folder that did not exist; make it, lock it, and
        refuse if another process filled it meanwhile (this one's plan no longer holds).
        """
        run_dir = Path(run_dir)
        if self.held or (self.tried and not new):
            return
        if new:
            run_dir.mkdir(parents=True, exist_ok=True)
        if not run_dir.is_dir():
            return
        self.fd = _lock(run_dir)
        self.tried = True
        self.path = run_dir / rundir.LOCK_FILE if self.fd is not None else None
        if new and self.held and not rundir.is_empty(run_dir):
            self.release()
            raise UserError(
                f"{run_dir} was started by another gmt-mlx process while this one set up; run the "
                f"command again to resume it"
            )

    def release(self) -> None:
        """Give the lock back and remove its file (the file goes first: see ``_lock``)."""
        if self.fd is None:
            return
        try:
            self.path.unlink()
        except OSError:
            pass
        os.close(self.fd)
        self.fd = self.path = None


def _lock(run_dir: Path) -> Optional[int]:
    """A file descriptor holding RUN_DIR/.lock's flock, with this process's pid written in it; None where the
    folder cannot be written (read-only: the run's first write says so); UserError naming the holder if held."""
    path = run_dir / rundir.LOCK_FILE
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                return None
            raise UserError(f"could not lock {run_dir}: {err.strerror or err}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = os.read(fd, 32).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise UserError(f"could not lock {run_dir}: {err.strerror or err}") from None
            raise UserError(
                f"{run_dir} is being written by another gmt-mlx process (pid {holder}); wait for it "
                f"to end, or choose another --out"
            ) from None
        # A holder releasing removes the file before unlocking: the lock we got may be on a
        # file no longer at ``path`` (another process may hold the new one). Then try again.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode("ascii"))
            return fd
        os.close(fd)
