"""One extraction per run id at a time.

In a local (or shared-filesystem) warehouse the lock is an exclusive ``flock`` on
``_locks/<run_id>.lock``: the kernel drops it when its holder exits, however it exits
(SIGKILL included), so a killed extraction never leaves a run locked.

In object storage there is no ``flock``; the lock is a lease: the object
``_locks/<run_id>.lock`` is created only if it is absent (a conditional PUT), and its holder
rewrites it every ``stale_s / 6`` seconds. A lock whose last heartbeat is older than
``stale_s`` seconds (``STALE_S``, or ``STALE_ENV``) belongs to a holder that died, and the
next extraction takes it over.
Before publishing, the holder checks that the lock is still its own (``confirm``), so of
two extractions that took over the same stale lock at once only one publishes.

Either lock file keeps the holder's pid, host and start time, for the message that the
next contender gets.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

from etl.errors import UserError
from etl.warehouse.storage import seconds_from_env, storage_errors

STALE_S = 120.0
"""How old an object-storage lock's heartbeat must be for the lock to be taken over (hosts'
clocks are assumed to agree to well within this); the holder beats six times as often."""
STALE_ENV = "ENTROPY_WAREHOUSE_LOCK_STALE_S"
"""Overrides ``STALE_S`` (seconds): shorter lets a crashed run be resumed sooner, longer
suits a storage with slow writes."""


def stale_seconds() -> float:
    """``STALE_S``, or the positive number of seconds ``STALE_ENV`` holds."""
    return seconds_from_env(STALE_ENV, STALE_S)


def _holder_info(**extra) -> dict:
    return dict({"pid": os.getpid(), "host": platform.node(),
                 "since": datetime.now(UTC).isoformat(timespec="seconds")}, **extra)


def _describe(info: dict) -> str:
    try:
        return f"pid {info['pid']} on {info['host']} since {info['since']}"
    except (KeyError, TypeError):
        return "holder unknown"


def _busy(run_id: str, holder: str) -> UserError:
    return UserError(f"run {run_id!r} is being written by another extraction ({holder}); "
                     "wait for it to finish or choose another --run-id")


class FileLock:
    """Holds the ``flock`` on the local file ``path`` (the lock of ``run_id``) until
    ``release``."""

    def __init__(self, path: Path, run_id: str) -> None:
        self.path = Path(path)
        self.run_id = run_id
        self._fd: int | None = None

    def acquire(self) -> FileLock:
        """Take the lock, or raise ``UserError`` naming the process that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _wait_for_holder(fd)
                os.close(fd)
                raise _busy(self.run_id, holder) from None
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            if self._lost() is None:
                break
            self.release()  # the file was deleted or replaced before it was locked: again
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(_holder_info()).encode(), 0)
        return self

    def _lost(self) -> str | None:
        """Why the locked file is no longer the one at ``path`` (deleted or replaced: a
        second extraction can then lock the new one), else None."""
        held = os.fstat(self._fd)
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            named = None
        if named is None or (named.st_dev, named.st_ino) != (held.st_dev, held.st_ino):
            return f"its lock file {str(self.path)!r} was deleted or replaced while it ran"
        return None

    def lost_error(self) -> UserError | None:
        """The error to end the run with when the lock is no longer this holder's, else
        None (a cheap check: one ``stat``)."""
        why = self._lost() if self._fd is not None else None
        if why is None:
            return None
        return UserError(f"run {self.run_id!r} was not published: {why}, so another "
                         "extraction may be writing it too; the batches staged are kept: "
                         "run the same command again once no other extraction of it runs")

    def confirm(self) -> None:
        """Raise ``lost_error`` when the lock file was deleted or replaced (nothing may be
        published then); called just before publishing."""
        error = self.lost_error()
        if error is not None:
            raise error

    def release(self) -> None:
        """Drop the lock (the file stays; it is reused by the next extraction)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FileLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    try:
        return _describe(json.loads(os.pread(fd, 4096, 0) or b"{}"))
    except (OSError, ValueError):
        return "holder unknown"


def _wait_for_holder(fd: int, wait_s: float = 1.0) -> str:
    """The holder of the lock file ``fd``, waiting up to ``wait_s`` for a holder that has
    just taken the lock to write its name."""
    deadline = time.monotonic() + wait_s
    holder = _read_holder(fd)
    while holder == "holder unknown" and time.monotonic() < deadline:
        time.sleep(0.05)
        holder = _read_holder(fd)
    return holder


def _heartbeat(info: dict) -> float:
    """The lease's last heartbeat (seconds since the epoch); 0 when it has none."""
    try:
        return float(info.get("heartbeat") or 0)
    except (TypeError, ValueError):
        return 0.0


class LeaseLock:
    """Holds the object-storage lease ``path`` (the lock of ``run_id``) until ``release``,
    with a heartbeat thread rewriting it every ``stale_s / 6`` seconds (``stale_s`` default:
    ``stale_seconds()``)."""

    def __init__(self, path: Path, run_id: str, stale_s: float | None = None) -> None:
        self.path = path
        self.run_id = run_id
        self.stale_s = stale_s or stale_seconds()
        self.heartbeat_s = self.stale_s / 6
        self.token = uuid.uuid4().hex
        self.lost: str | None = None
        """Why the lease is no longer this holder's (taken over, deleted), else None."""
        self._taken_over = False
        self._info = _holder_info(token=self.token)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self) -> bytes:
        return json.dumps(dict(self._info, heartbeat=time.time())).encode()

    def _read(self) -> dict | None:
        try:  # one GET (an open file would fail when the holder rewrites the object)
            info = json.loads(self.path.fs.cat_file(self.path.path))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}  # unreadable: treated as stale
        return info if isinstance(info, dict) else {}

    def acquire(self) -> LeaseLock:
        """Take the lease (creating it, or taking over a stale one), or raise ``UserError``
        naming the extraction that holds it."""
        try:
            self.path.fs.pipe_file(self.path.path, self._body(), mode="create")
        except FileExistsError:
            held = self._read()
            if held is not None:
                age = time.time() - _heartbeat(held)
                if age < self.stale_s:
                    raise _busy(self.run_id, f"{_describe(held)}, last heartbeat "
                                f"{age:.0f} s ago; a lock without one for "
                                f"{self.stale_s:.0f} s is taken over") from None
            self.path.write_bytes(self._body())  # a stale lease: take it over
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id}",
                                        daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        """Rewrite the lease every ``heartbeat_s`` while it is still this holder's."""
        while not self._stop.wait(self.heartbeat_s):
            try:
                self._check()
                if self.lost or self._stop.is_set():  # released while it waited: no renewal
                    return
                self.path.write_bytes(self._body())
            except Exception:  # noqa: BLE001  a missed beat is retried; confirm() decides
                continue

    def _check(self) -> None:
        held = self._read()
        if held is None:
            self.lost = "its lock was deleted"
        elif held.get("token") != self.token:
            self.lost = f"its lock was taken over by {_describe(held)}"
            self._taken_over = True

    def lost_error(self) -> UserError | None:
        """The error to end the run with when the heartbeat found the lease no longer this
        holder's, else None (no request is made)."""
        if not self.lost:
            return None
        why = self.lost
        if self._taken_over:
            why += (f", which judged it stale (no heartbeat for {self.stale_s:.0f} s by that "
                    "host's clock: this extraction stalled, or the hosts' clocks disagree)")
        return UserError(f"run {self.run_id!r} was not published: {why}; its staged batches "
                         "are kept for the holder to use")

    def confirm(self) -> None:
        """Raise ``lost_error`` when the lease is no longer this holder's (nothing may be
        published then); called just before publishing."""
        self._check()
        error = self.lost_error()
        if error is not None:
            raise error

    def release(self) -> None:
        """Stop the heartbeat and delete the lease if it is still this holder's. A beat
        still waiting on the storage after ``heartbeat_s`` is left behind (a daemon thread:
        it keeps nothing alive), and so is the lease, which goes stale."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.heartbeat_s)
            stuck, self._thread = self._thread.is_alive(), None
            if stuck:
                return
            try:
                held = self._read()
                if held is not None and held.get("token") == self.token:
                    self.path.unlink()
            except storage_errors():
                pass  # the lease goes stale and the next extraction takes it over

    def __enter__(self) -> LeaseLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
