"""File helpers of the warehouse writer: checksums, atomic JSON writes, and the
fault-injection points the crash tests kill the process at."""

from __future__ import annotations

import hashlib
import json
import os
import signal
from pathlib import Path

from etl.warehouse.storage import write_bytes_atomically

KILL_AT_ENV = "ENTROPY_WAREHOUSE_KILL_AT"
"""Fault-injection hook for the crash tests: when this environment variable names a point
(``shard:<table>:<batch>``, ``publish:moved``, ``publish:manifest``; with ``--workers``,
``driver:<n>`` once the driver has received ``n`` staged batches, and on a worker
``worker:<first sequence of the batch>``, once, see ``KILL_ONCE_ENV``), the process kills
itself with SIGKILL there."""


def fault_point(name: str) -> None:
    """SIGKILL this process at ``name`` when ``KILL_AT_ENV`` asks for it (tests only)."""
    if os.environ.get(KILL_AT_ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)


KILL_ONCE_ENV = "ENTROPY_WAREHOUSE_KILL_ONCE"
"""With ``KILL_AT_ENV``: a marker file; ``fault_point_once`` kills only while it is absent
(and creates it first), so a restarted worker gets past the point."""


def fault_point_once(name: str) -> None:
    """SIGKILL this process at ``name`` once per marker file (``KILL_ONCE_ENV``; tests only)."""
    marker = os.environ.get(KILL_ONCE_ENV)
    if os.environ.get(KILL_AT_ENV) == name and marker and not os.path.exists(marker):
        Path(marker).touch()
        os.kill(os.getpid(), signal.SIGKILL)


def sha256_of(path: Path) -> str:
    """Hex sha256 of the file's bytes (the checksum manifests record per shard)."""
    digest = hashlib.sha256()
    with (path.open("rb") if hasattr(path, "open") else open(path, "rb")) as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_json_atomically(path: Path, data: dict) -> None:
    """Write ``data`` as indented JSON to ``path``, whole or not at all
    (``storage.write_bytes_atomically``: a temporary file, fsync'd, then ``os.replace``
    locally; one PUT in object storage)."""
    text = json.dumps(data, indent=2, sort_keys=True, default=str) + "\n"
    write_bytes_atomically(path, text.encode("utf-8"))
