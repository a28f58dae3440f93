"""The run lock under faults: a lock file deleted while its run holds it (a second
extraction can then lock a new file) stops the first run from publishing, with a message
that says so; a contender that arrives while the holder is writing its name waits for it."""

import json
import os
import subprocess
import threading
import time

import pytest

from etl.errors import UserError
from etl.warehouse.lock import FileLock
from tests import test_faults
from tests.test_faults import LONG, _command, _env, _first_rows, _rows, _run_here

corpus = test_faults.corpus  # the same fixtures: a small corpus, an uninterrupted run's rows
reference = test_faults.reference


def test_a_deleted_lock_file_is_noticed_before_publishing(tmp_path):
    path = tmp_path / "_locks" / "r.lock"
    first = FileLock(path, "r").acquire()
    path.unlink()  # a user tidying up _locks/
    second = FileLock(path, "r").acquire()  # locks a new file: both think they hold "r"
    with pytest.raises(UserError, match="was not published: its lock file .* was deleted or "
                                        "replaced while it ran, so another extraction may be "
                                        "writing it too"):
        first.confirm()
    second.confirm()  # the new file is the second's own
    first.release()
    second.release()


def test_a_lock_file_replaced_before_it_was_locked_is_taken_again(tmp_path, monkeypatch):
    """Between ``open`` and ``flock`` another process deleted the file: the lock is taken
    on the file now at the path, not on the orphan."""
    import fcntl

    path = tmp_path / "_locks" / "r.lock"
    real, calls = fcntl.flock, [0]

    def flock(fd, op):
        calls[0] += 1
        if calls[0] == 1:
            path.unlink()
        return real(fd, op)

    monkeypatch.setattr(fcntl, "flock", flock)
    lock = FileLock(path, "r").acquire()
    assert os.fstat(lock._fd).st_ino == os.stat(path).st_ino
    lock.release()


def test_a_contender_waits_for_the_holder_to_write_its_name(tmp_path):
    import fcntl

    path = tmp_path / "_locks" / "r.lock"
    path.parent.mkdir()
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # the holder has the lock but has not written its name

    def write_name():
        time.sleep(0.3)
        os.pwrite(fd, json.dumps({"pid": 4242, "host": "h", "since": "now"}).encode(), 0)

    thread = threading.Thread(target=write_name)
    thread.start()
    with pytest.raises(UserError, match="another extraction \\(pid 4242 on h since now\\)"):
        FileLock(path, "r").acquire()
    thread.join()
    os.close(fd)


def test_an_extraction_whose_lock_file_was_deleted_publishes_nothing(tiny_checkpoint, corpus,
                                                                     reference, tmp_path,
                                                                     capsys):
    """A holds the lock; the file is deleted; B locks a new one and runs the same command.
    B publishes; A ends in one line saying its lock file was deleted."""
    cmd = _command(tiny_checkpoint, tmp_path, corpus, "whole", n_batches=LONG)
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = tmp_path / "_locks" / "whole.lock"
    staged = tmp_path / "_staging" / "whole" / "tokens"
    deadline = time.monotonic() + 120

    def holding_and_staging() -> bool:
        holder = lock.read_text() if lock.exists() else ""
        return f'"pid": {first.pid}' in holder and staged.is_dir() and \
            any(staged.glob("*.parquet"))

    while not holding_and_staging():
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    lock.unlink()
    second = _run_here(cmd, capsys)
    _, err = first.communicate(timeout=300)
    assert second.returncode == 0, second.stderr
    assert first.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "was deleted or replaced while it ran" in lines[0], err
    assert _first_rows(_rows(tmp_path, "whole")) == reference
