"""``python -m queries migrate``: runs written by earlier versions (schema-1 manifests without
``shards``, the lens names ``seed`` and ``recomputed``, manifests without ``measures`` and
shards without the effect columns) are left out of the views with a
warning until it rewrites their manifests, in place, one atomic write per run, under the
run's lock; nothing else reads the old forms."""

import hashlib
import json
import os

import pyarrow.parquet as pq
import pytest

from etl.errors import UserError
from etl.warehouse import Warehouse, migrate
from queries.cli import main as query_main
from queries.db import connect
from tests.test_query_safety import N_SEQS, SEQ_LEN, TABLES, counts, shard, write_run


def _manifest(root, run_id):
    return json.loads((root / "runs" / f"run_id={run_id}" / "manifest.json").read_text())


@pytest.fixture()
def old_warehouse(tmp_path):
    """``new`` as written today, ``v1`` (schema 1, no shards), ``seed`` (an old lens name),
    ``v2`` (no measures listed, shards without the effect columns)."""
    root = tmp_path / "wh"
    write_run(root, "new", seed=0)
    write_run(root, "v1", schema_version=1, seed=1)
    write_run(root, "seed", seed=2, lens="seed")
    write_run(root, "v2", seed=3, measures=None)
    return root


def test_old_runs_are_left_out_with_a_warning_naming_migrate(old_warehouse, capsys):
    con = connect(Warehouse(old_warehouse))
    assert counts(con, "tokens") == {"new": N_SEQS * SEQ_LEN}
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 3 and all(w.startswith("warning: left out run ") for w in warnings)
    assert "manifest schema 1" in warnings[1] and "lens name 'seed'" in warnings[0]
    assert "(no measures listed)" in warnings[2]
    assert all(w.endswith("; run python -m queries migrate") for w in warnings)
    assert query_main(["--warehouse", str(old_warehouse), "check"]) == 1
    assert "FAIL files: run v1: " in capsys.readouterr().out


def test_migrate_rewrites_the_old_manifests_and_then_has_nothing_to_do(old_warehouse, capsys):
    untouched = (old_warehouse / "runs" / "run_id=new" / "manifest.json").read_bytes()
    assert query_main(["--warehouse", str(old_warehouse), "migrate"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out == ["migrated run seed: lens 'seed' → 'final-scale'",
                   "migrated run v1: schema 1 → 2 (3 files listed with their rows and sha256)",
                   "migrated run v2: measures: entropy (the only group measured then)",
                   "3 runs migrated"]
    v1 = _manifest(old_warehouse, "v1")
    assert v1["schema_version"] == 2
    for table in TABLES:
        path = shard(old_warehouse, table, "v1")
        assert v1["shards"][table] == [{
            "file": path.name, "rows": pq.read_metadata(path).num_rows,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert _manifest(old_warehouse, "seed")["lens"] == "final-scale"
    assert (old_warehouse / "runs" / "run_id=new" / "manifest.json").read_bytes() == untouched
    con = connect(Warehouse(old_warehouse))
    assert counts(con, "tokens") == dict.fromkeys(("new", "seed", "v1", "v2"), N_SEQS * SEQ_LEN)
    # shards written before the effects existed read them as NULL
    assert con.sql("select count(*), count(kl_marginal), count(ablated_top1_prob) "
                   "from component_entropy where run_id = 'v2'").fetchall()[0][1:] == (0, 0)
    assert con.sql("select count(next_token_id), count(top1_prob) from tokens"
                   ).fetchall()[0] == (0, 0)
    assert con.sql("select measures from runs where run_id = 'v2'").fetchall() == [
        (["entropy"],)]
    assert capsys.readouterr().err == ""  # nothing is left out any more
    assert query_main(["--warehouse", str(old_warehouse), "check"]) == 0
    capsys.readouterr()
    assert query_main(["--warehouse", str(old_warehouse), "migrate"]) == 0
    assert capsys.readouterr().out == "nothing to migrate: every run is current\n"


def test_a_run_being_written_is_not_migrated(old_warehouse, capsys):
    warehouse = Warehouse(old_warehouse)
    before = (old_warehouse / "runs" / "run_id=v1" / "manifest.json").read_bytes()
    with warehouse.lock("v1"):
        assert query_main(["--warehouse", str(old_warehouse), "migrate"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run 'v1' is being written by another extraction" in err
    assert (old_warehouse / "runs" / "run_id=v1" / "manifest.json").read_bytes() == before


def test_a_failed_write_leaves_the_old_manifest_whole(old_warehouse, monkeypatch):
    path = old_warehouse / "runs" / "run_id=v1" / "manifest.json"
    before = path.read_bytes()

    def failing(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space left"):
        migrate(Warehouse(old_warehouse))
    assert path.read_bytes() == before


def test_a_missing_warehouse_is_one_line(tmp_path, capsys):
    assert query_main(["--warehouse", str(tmp_path / "nowhere"), "migrate"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_the_lock_error_is_a_user_error(old_warehouse):
    warehouse = Warehouse(old_warehouse)
    with warehouse.lock("seed"), pytest.raises(UserError, match="being written"):
        migrate(warehouse)
