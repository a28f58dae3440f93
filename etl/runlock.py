"""One extraction per run id at a time: an exclusive ``flock`` on ``_locks/<run_id>.lock``.

The kernel drops the lock when its holder exits, however it exits (SIGKILL included), so a
killed extraction never leaves a run locked. The file keeps the holder's pid, host and start
time, for the message that the next contender gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path

from etl.errors import UserError


class RunLock:
    """Holds the lock of ``run_id`` under the warehouse ``root`` until ``release``."""

    def __init__(self, root: Path, run_id: str) -> None:
        self.path = Path(root) / "_locks" / f"{run_id}.lock"
        self.run_id = run_id
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock, or raise ``UserError`` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(
                f"run {self.run_id!r} is being written by another extraction ({holder}); wait "
                "for it to finish or choose another --run-id") from None
        except BaseException:
            os.close(fd)
            raise
        info = {"pid": os.getpid(), "host": platform.node(),
                "since": datetime.now(UTC).isoformat(timespec="seconds")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(info).encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock (the file stays; it is reused by the next extraction)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"
