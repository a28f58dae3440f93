"""Faults between a crash and its resume, and readers racing an ``--overwrite``: a shard
changed while the run was down is measured again, never published; a query that started
before a publish reads the old run or the new one, never an error."""

import hashlib
import json
import signal

from etl.warehouse import Warehouse
from etl.warehouse.files import KILL_AT_ENV
from queries.cli import main as queries_main
from tests.test_faults import _command, _rows, _run, _run_here, corpus, reference  # noqa: F401

TABLES = ("component_entropy", "resid_entropy", "tokens")


def _flip_inside_a_data_page(path, n_bytes: int = 8) -> None:
    """Invert ``n_bytes`` bytes half-way through the column data of the Parquet file
    ``path``, leaving its magic bytes and footer as they were (so the footer still reads)."""
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little")
    start = (4 + len(data) - 8 - footer) // 2
    for i in range(start, start + n_bytes):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_shard_changed_between_crash_and_resume_is_measured_again(tiny_checkpoint, corpus,
                                                                     reference, tmp_path,
                                                                     capsys):
    cmd = _command(tiny_checkpoint, tmp_path, corpus, "whole")
    killed = _run(cmd, **{KILL_AT_ENV: "publish:moved"})  # shards moved, no manifest yet
    assert killed.returncode == -signal.SIGKILL
    moved = sorted((tmp_path / "component_entropy" / "run_id=whole").glob("*.parquet"))
    assert len(moved) == 3
    _flip_inside_a_data_page(moved[1])

    resumed = _run_here(cmd, capsys)
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads(Warehouse(tmp_path).manifest_path("whole").read_text())
    assert manifest["timing"]["batches_resumed"] == 2  # the changed batch was measured again
    assert _rows(tmp_path, "whole") == reference
    for table in TABLES:
        for shard in manifest["shards"][table]:
            path = tmp_path / table / "run_id=whole" / shard["file"]
            assert hashlib.sha256(path.read_bytes()).hexdigest() == shard["sha256"]
    assert queries_main(["--warehouse", str(tmp_path), "check"]) == 0


def test_a_staged_shard_without_its_record_is_measured_again(tiny_checkpoint, corpus,
                                                             reference, tmp_path, capsys):
    """Killed after a shard was written but before its record: the shard is not trusted."""
    cmd = _command(tiny_checkpoint, tmp_path, corpus, "whole")
    killed = _run(cmd, **{KILL_AT_ENV: "shard:tokens:1"})
    assert killed.returncode == -signal.SIGKILL
    staged = tmp_path / "_staging" / "whole" / "tokens"
    assert len(list(staged.glob("*-00001.parquet"))) == 1
    assert not list(staged.glob("*-00001.parquet.json"))
    resumed = _run_here(cmd, capsys)
    assert resumed.returncode == 0, resumed.stderr
    manifest = json.loads(Warehouse(tmp_path).manifest_path("whole").read_text())
    assert manifest["timing"]["batches_resumed"] == 1
    assert _rows(tmp_path, "whole") == reference
