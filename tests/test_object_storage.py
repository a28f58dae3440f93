"""A warehouse in S3-compatible object storage (``--warehouse s3://bucket/prefix``), against
a moto server on 127.0.0.1 started and stopped by this module: an extraction writes rows
equal to a local run's, the lease lock keeps one writer per run, queries and charts read it
through fsspec, and its errors are one line. (A SIGKILLed extraction resumed there, with
its lease taken over: ``test_distributed.py``.)"""

import json
import os
import sys
import time

import pytest

from analysis.__main__ import main as analysis_main
from etl.errors import UserError
from etl.extract import main as extract_main
from etl.warehouse import Warehouse
from etl.warehouse.lock import LeaseLock
from queries.cli import main as queries_main
from queries.db import connect

TABLES = ("component_effects", "resid_entropy", "tokens")
IOI = ["--dataset", "ioi", "--n-prompts", "6", "--batch-size", "2", "--ablation", "mean"]


def _extract(checkpoint, warehouse, run_id, *extra):
    return extract_main(["--model", str(checkpoint), "--warehouse", str(warehouse),
                         "--no-progress", "--device", "cpu", "--run-id", run_id, *IOI,
                         *extra])


def _rows(warehouse, run_id):
    con = connect(Warehouse(warehouse), read_only=True)
    return {t: con.sql(f"select * exclude (run_id) from {t} where run_id = '{run_id}' "
                       "order by all").fetchall() for t in TABLES}


def _keys(prefix):
    return sorted(Warehouse(f"s3://{prefix}").root.fs.find(prefix))


@pytest.fixture(scope="module")
def local_run(tiny_checkpoint, tmp_path_factory):
    """The reference: the same run in a local warehouse."""
    root = tmp_path_factory.mktemp("local")
    assert _extract(tiny_checkpoint, root, "r") == 0
    return root


def test_an_s3_warehouse_holds_the_rows_of_a_local_one_and_queries_and_charts_read_it(
        s3_server, local_run, tiny_checkpoint, tmp_path, capsys):
    url = "s3://bucket/wh"
    assert _extract(tiny_checkpoint, url, "r") == 0
    assert "-> s3://bucket/wh (manifest s3://bucket/wh/runs/run_id=r/manifest.json)" in \
        capsys.readouterr().out
    assert _rows(url, "r") == _rows(local_run, "r")
    keys = _keys("bucket/wh")
    assert "bucket/wh/runs/run_id=r/manifest.json" in keys
    assert not [k for k in keys if "/_staging/" in k or "/_locks/" in k], keys  # all cleaned

    # a saved query prints the same bytes from either warehouse
    outputs = []
    for warehouse in (url, str(local_run)):
        assert queries_main(["run", "top_heads", "--warehouse", warehouse, "--format", "csv",
                             "--param", "k=20"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].count("\n") > 5

    assert queries_main(["check", "--warehouse", url]) == 0
    checked = capsys.readouterr().out  # 3 batches of 3 tables, and the run's 4 sums files
    assert "PASS files: 13 files of 1 runs match their manifests" in checked
    assert "PASS partial_sums" in checked

    out = tmp_path / "charts"
    assert analysis_main(["--warehouse", url, "--out", str(out), "--format", "svg",
                          "--chart", "heatmap", "--no-progress"]) == 0
    index = (out / "index.html").read_text()
    assert "s3://bucket/wh" in index
    assert [p.name for p in out.glob("r/*.svg")] == ["heatmap.svg"]


def _lock_body(root, run_id):
    lock = root / "_locks" / f"{run_id}.lock"
    return json.loads(lock.fs.cat_file(lock.path))  # one GET, while the holder rewrites it


def test_the_lease_admits_one_holder_and_is_released(s3_server):
    warehouse = Warehouse("s3://bucket/locks")
    root = warehouse.root
    held = warehouse.lock("x")
    assert isinstance(held, LeaseLock)
    with held:
        with pytest.raises(UserError, match=r"being written by another extraction \(pid "
                                            rf"{os.getpid()} on .*last heartbeat \d+ s ago"):
            warehouse.lock("x").acquire()
        with warehouse.lock("other"):  # another run id is free
            pass
        held.confirm()
    assert not (root / "_locks" / "x.lock").exists()
    with warehouse.lock("x"):  # free again
        pass


def test_the_lease_beats_and_a_stale_one_is_taken_over(s3_server):
    warehouse = Warehouse("s3://bucket/locks")
    root = warehouse.root
    lock = root / "_locks" / "y.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "gone", "since": "then", "token": "dead",
                                "heartbeat": "not a time"}))  # damaged: stale
    taker = warehouse.lock("y", stale_s=0.6).acquire()
    try:
        first = _lock_body(root, "y")
        assert first["token"] == taker.token
        time.sleep(0.35)
        assert _lock_body(root, "y")["heartbeat"] > first["heartbeat"]  # it beats
        taker.confirm()
    finally:
        taker.release()
    assert not lock.exists()


def test_a_holder_whose_lease_was_taken_over_publishes_nothing(s3_server):
    warehouse = Warehouse("s3://bucket/locks")
    root = warehouse.root
    holder = warehouse.lock("z", stale_s=0.6).acquire()
    lock = root / "_locks" / "z.lock"
    # as another extraction does that found the lease stale (the holder stalled)
    other = dict(_lock_body(root, "z"), pid=2, host="elsewhere", token="other")
    lock.write_text(json.dumps(other))
    time.sleep(0.35)
    assert _lock_body(root, "z")["token"] == "other"  # the old holder's beat stopped
    with pytest.raises(UserError, match="was not published: its lock was taken over by pid 2 "
                                        "on elsewhere .*, which judged it stale .*this "
                                        "extraction stalled, or the hosts' clocks disagree"):
        holder.confirm()
    holder.release()
    assert _lock_body(root, "z")["token"] == "other"  # not the old holder's to delete
    lock.unlink()


@pytest.mark.parametrize("warehouse, message", [
    ("s3://no-such-bucket/wh", "cannot write to --warehouse 's3://no-such-bucket/wh': The "
                               "specified bucket does not exist; check that the bucket"),
    ("s3://", "names no bucket"),
    ("gs://bucket/wh", "only local folders and s3://bucket/prefix URLs are supported"),
])
def test_a_bad_object_storage_warehouse_is_one_line(s3_server, tiny_checkpoint, capsys,
                                                    warehouse, message):
    assert _extract(tiny_checkpoint, warehouse, "r") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_without_s3fs_the_error_says_what_to_install(s3_server, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "s3fs", None)
    assert queries_main(["sql", "select 1", "--warehouse",
                         "s3://bucket/wh"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'entropy-warehouse[s3]'" in err, err


def test_reads_stay_inside_the_s3_warehouse(s3_server, local_run, tiny_checkpoint, capsys):
    """The locked-down connection reads the warehouse's prefix only: not another prefix of
    the bucket, not a local file; and the duckdb shell refuses object storage in one line."""
    url = "s3://bucket/confined"
    assert _extract(tiny_checkpoint, url, "r") == 0
    outside = Warehouse("s3://bucket/outside/secret.csv").root
    outside.write_text("a\n1\n")
    for query in ("select * from read_csv('s3://bucket/outside/secret.csv')",
                  f"select * from read_csv('{local_run}/runs/run_id=r/manifest.json')"):
        capsys.readouterr()
        assert queries_main(["sql", query, "--warehouse", url]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "disabled by configuration" in err, err
    assert queries_main(["shell", "--warehouse", url, "-c", "select 1"]) == 2
    assert "the duckdb shell cannot read 's3://bucket/confined'" in capsys.readouterr().err


def test_an_endpoint_that_does_not_answer_is_one_line(s3_server, tiny_checkpoint, tmp_path,
                                                     monkeypatch, capsys):
    """Extraction, queries and charts against an endpoint where nothing listens: one line
    each, exit 2 (botocore told to try once, not to back off for seconds)."""
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # the discard port
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    s3fs.S3FileSystem.clear_instance_cache()
    try:
        calls = [lambda: _extract(tiny_checkpoint, "s3://bucket/wh", "r"),
                 lambda: queries_main(["sql", "select 1", "--warehouse", "s3://bucket/wh"]),
                 lambda: analysis_main(["--warehouse", "s3://bucket/wh", "--out",
                                        str(tmp_path / "charts"), "--no-progress"])]
        for call in calls:
            capsys.readouterr()
            assert call() == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and "Could not connect to the endpoint URL" in err, err
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_a_store_that_fails_mid_run_ends_in_one_line_and_the_run_resumes(
        s3_server, local_run, tiny_checkpoint, monkeypatch, capsys):
    """The fourth shard upload fails with a client error (the endpoint went away): one line
    that says to resume, nothing published, the lease released and the staged shards kept;
    the same command then resumes and publishes the local run's rows."""
    from botocore.exceptions import EndpointConnectionError

    from etl.warehouse import storage

    real, calls = storage.encode_parquet, [0]

    def failing(table, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise EndpointConnectionError(endpoint_url="http://gone:9000")
        return real(table, **kwargs)

    url = "s3://bucket/flaky"
    monkeypatch.setattr(storage, "encode_parquet", failing)
    capsys.readouterr()
    assert _extract(tiny_checkpoint, url, "r") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Could not connect to the endpoint URL" in err and \
        "run the same command again to resume" in err, err
    keys = _keys("bucket/flaky")
    assert not [k for k in keys if "/runs/" in k or "/_locks/" in k], keys
    assert len([k for k in keys if "/_staging/r/" in k and k.endswith(".parquet")]) >= 3
    monkeypatch.undo()
    assert _extract(tiny_checkpoint, url, "r") == 0
    manifest = json.loads(Warehouse(url).manifest_path("r").read_text())
    assert manifest["timing"]["batches_resumed"] >= 1
    assert _rows(url, "r") == _rows(local_run, "r")
