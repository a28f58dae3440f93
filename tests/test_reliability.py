"""Faults between a crash and its resume, and readers racing an ``--overwrite``: a shard
changed while the run was down is measured again, never published; a query that started
before a publish reads the old run or the new one, never an error."""

import hashlib
import json
import signal

from analysis.api import Warehouse as AnalysisWarehouse
from etl.warehouse import RunWriter, Warehouse, complete_runs
from etl.warehouse.files import KILL_AT_ENV
from queries.cli import main as queries_main
from queries.db import usable_runs
from scripts.overwrite_race import main as race_main
from tests import test_faults
from tests.test_faults import _command, _rows, _run, _run_here
from tests.test_warehouse import _batch, bare_manifest

corpus = test_faults.corpus  # the same fixtures: a small corpus, an uninterrupted run's rows
reference = test_faults.reference

TABLES = ("component_effects", "resid_entropy", "tokens")


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
    moved = sorted((tmp_path / "component_effects" / "run_id=whole").glob("*.parquet"))
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


def _publish(root, run_id: str, seed: int) -> None:
    """Publish ``run_id`` (a new generation, its old files deleted) with rows from ``seed``."""
    writer = RunWriter(Warehouse(root).open_staging(run_id, overwrite=True), workers=1)
    for batch in range(2):
        _batch(writer, batch, seed)
    writer.close()
    writer.staging.publish(bare_manifest(run_id), n_batches=2)


SUM = "select count(*) as n, sum(entropy_diff) as total from component_effects"


def test_a_read_made_before_a_publish_reads_the_new_run_after_it(tmp_path):
    """The views were opened over the old generation; publishing deletes its files; the next
    read is made again over the new one instead of failing."""
    _publish(tmp_path, "r", seed=0)
    wh = AnalysisWarehouse(tmp_path)
    old = wh.sql(SUM).row(0)
    _publish(tmp_path, "r", seed=1)
    new = AnalysisWarehouse(tmp_path).sql(SUM).row(0)
    assert new != old
    assert wh.sql(SUM).row(0) == new


def test_runs_listed_before_a_publish_are_read_again_not_left_out(tmp_path, capsys):
    _publish(tmp_path, "r", seed=0)
    warehouse = Warehouse(tmp_path)
    listed = complete_runs(warehouse)
    _publish(tmp_path, "r", seed=1)
    usable = usable_runs(warehouse, listed)
    assert [run.shards for run in usable] == [run.shards for run in complete_runs(warehouse)]
    assert "warning" not in capsys.readouterr().err


def test_reads_racing_a_killed_and_restarted_overwrite_never_fail(tiny_checkpoint, capsys):
    """``scripts/overwrite_race.py`` with 2 attempts (the README's figure is from 20)."""
    code = race_main(["--model", str(tiny_checkpoint), "--attempts", "2"])
    counts = json.loads(capsys.readouterr().out)
    assert code == 0 and counts["failures"] == 0, counts
    assert counts["reads"] >= 20 and counts["publishes"] >= 1


def test_charts_drawn_while_their_run_is_published_again_are_all_written(tmp_path, monkeypatch):
    """A chart's read meets the files deleted under it and is made again over the new run;
    the index after it reads the runs' facts through the views as they are now."""
    from analysis import render
    from analysis.__main__ import main as analysis_main

    root = tmp_path / "wh"
    _publish(root, "r", seed=0)
    real = render._save_charts

    def republished_first(views, *args, **kwargs):
        _publish(root, "r", seed=1)
        return real(views, *args, **kwargs)

    monkeypatch.setattr(render, "_save_charts", republished_first)
    out = tmp_path / "charts"
    assert analysis_main(["--warehouse", str(root), "--out", str(out), "--format", "svg",
                          "--chart", "heatmap", "--no-progress"]) == 0
    assert (out / "index.html").is_file() and (out / "r" / "heatmap.svg").is_file()
