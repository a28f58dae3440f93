"""``python -m queries migrate``: runs written by earlier versions (schema-1 manifests without
``shards``, the lens names ``seed`` and ``recomputed``, manifests without ``measures`` and
shards without the effect columns, the component table under its earlier name
``component_entropy``) are left out of the views with a warning until it rewrites their
manifests, in place, atomically, under the run's lock, and moves a renamed table's files;
nothing else reads the old forms."""

import hashlib
import json
import os

import pyarrow.parquet as pq
import pytest

from etl.errors import UserError
from etl.warehouse import SUMS_TABLES, Warehouse, migrate
from etl.warehouse.manifest import SCHEMA_VERSION
from queries.cli import main as query_main
from queries.db import connect
from tests.test_query_safety import N_SEQS, SEQ_LEN, TABLES, counts, shard, write_run


def _manifest(root, run_id):
    return json.loads((root / "runs" / f"run_id={run_id}" / "manifest.json").read_text())


@pytest.fixture()
def old_warehouse(tmp_path):
    """``new`` as written today; in the component table's earlier name
    (``component_entropy``): ``v1`` (schema 1, no shards), ``seed`` (an old lens name),
    ``v2`` (no measures listed, shards without the effect columns) and ``v3`` (nothing else
    old)."""
    root = tmp_path / "wh"
    write_run(root, "new", seed=0)
    for seed, (run_id, options) in enumerate((
            ("v1", {"schema_version": 1}), ("seed", {"lens": "seed"}),
            ("v2", {"measures": None}), ("v3", {})), start=1):
        options = {"schema_version": 2} | options
        write_run(root, run_id, seed=seed, component_table="component_entropy", **options)
    return root


def test_old_runs_are_left_out_with_a_warning_naming_migrate(old_warehouse, capsys):
    con = connect(Warehouse(old_warehouse))
    assert counts(con, "tokens") == {"new": N_SEQS * SEQ_LEN}
    warnings = capsys.readouterr().err.strip().splitlines()
    assert len(warnings) == 4 and all(w.startswith("warning: left out run ") for w in warnings)
    assert "(lens name 'seed', table component_entropy, no partial sums)" in warnings[0]
    assert "(manifest schema 1, no partial sums)" in warnings[1]
    assert "(no measures listed, table component_entropy, no partial sums)" in warnings[2]
    assert "(table component_entropy, no partial sums)" in warnings[3]
    assert all(w.endswith("; run python -m queries migrate") for w in warnings)
    assert query_main(["--warehouse", str(old_warehouse), "check"]) == 1
    assert "FAIL files: run v1: " in capsys.readouterr().out


def test_migrate_rewrites_the_old_manifests_and_then_has_nothing_to_do(old_warehouse, capsys):
    untouched = (old_warehouse / "runs" / "run_id=new" / "manifest.json").read_bytes()
    assert query_main(["--warehouse", str(old_warehouse), "migrate"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    moved = ("table component_entropy → component_effects (its files moved); partial sums "
             "written (component_sums 12 rows, component_batch_sums 12 rows, "
             "component_seq_sums 24 rows, resid_sums 10 rows)")
    assert out == [f"migrated run seed: lens 'seed' → 'final-scale'; {moved}",
                   f"migrated run v1: schema 1 → {SCHEMA_VERSION} (3 files listed with their rows "
                   f"and sha256); {moved}",
                   f"migrated run v2: measures: entropy (the only group measured then); {moved}",
                   f"migrated run v3: {moved}",
                   "4 runs migrated"]
    assert not (old_warehouse / "component_entropy").exists()
    v1 = _manifest(old_warehouse, "v1")
    assert v1["schema_version"] == SCHEMA_VERSION
    assert set(v1["shards"]) == {*TABLES, *SUMS_TABLES}
    for table in TABLES:
        path = shard(old_warehouse, table, "v1")
        assert v1["shards"][table] == [{
            "file": path.name, "rows": pq.read_metadata(path).num_rows,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}]
    assert _manifest(old_warehouse, "seed")["lens"] == "final-scale"
    assert (old_warehouse / "runs" / "run_id=new" / "manifest.json").read_bytes() == untouched
    con = connect(Warehouse(old_warehouse))
    assert counts(con, "tokens") == dict.fromkeys(("new", "seed", "v1", "v2", "v3"),
                                                  N_SEQS * SEQ_LEN)
    n_rows = con.sql("select n_component_rows from runs where run_id = 'v1'").fetchall()[0][0]
    assert counts(con, "component_effects") == dict.fromkeys(
        ("new", "seed", "v1", "v2", "v3"), n_rows)
    # shards written before the effects existed read them as NULL
    assert con.sql("select count(*), count(kl_marginal), count(ablated_top1_prob) "
                   "from component_effects where run_id = 'v2'").fetchall()[0][1:] == (0, 0)
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


def test_the_earlier_name_is_a_view_of_the_same_rows(old_warehouse):
    migrate(Warehouse(old_warehouse))
    con = connect(Warehouse(old_warehouse))
    ordered = "select * from {} order by all"
    assert con.sql(ordered.format("component_entropy")).fetchall() == \
        con.sql(ordered.format("component_effects")).fetchall()
    assert con.sql("select count(*) from component_entropy").fetchall()[0][0] > 0


def migrate_until_disk_full(root, monkeypatch, name, full) -> None:
    """Run a migration of ``root`` whose ``etl.warehouse.migration.<name>`` fails with a full
    disk on the calls ``full(*args)`` picks, and see it stop with that error."""
    import etl.warehouse.migration as migration

    real = getattr(migration, name)

    def failing(*args):
        if full(*args):
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(migration, name, failing)
    with pytest.raises(OSError, match="No space left"):
        migrate(Warehouse(root))
    monkeypatch.undo()


def _stop_at_manifest_listing(table: str, writes: list):
    """A ``migrate_until_disk_full`` predicate: the first manifest write that lists
    ``table`` fails (its path appended to ``writes``)."""
    def stopping(path, data):
        if table in data.get("shards", {}):
            writes.append(path)
            return True
        return False
    return stopping


def test_a_migration_stopped_after_the_move_is_finished_by_the_next(old_warehouse,
                                                                    monkeypatch, capsys):
    writes = []
    migrate_until_disk_full(old_warehouse, monkeypatch, "write_json_atomically",
                            _stop_at_manifest_listing("component_effects", writes))
    stopped = Warehouse.run_id_of(writes[0])
    assert shard(old_warehouse, "component_effects", stopped).exists()  # moved, not listed
    assert not shard(old_warehouse, "component_entropy", stopped).exists()
    assert "component_entropy" in _manifest(old_warehouse, stopped)["shards"]
    assert len(migrate(Warehouse(old_warehouse))) == 4
    capsys.readouterr()
    assert query_main(["--warehouse", str(old_warehouse), "check"]) == 0
    con = connect(Warehouse(old_warehouse))
    assert set(counts(con, "component_effects")) == {"new", "seed", "v1", "v2", "v3"}
    assert capsys.readouterr().err == ""


def test_a_migration_stopped_after_writing_the_sums_is_finished_by_the_next(old_warehouse,
                                                                         monkeypatch, capsys):
    writes = []
    migrate_until_disk_full(old_warehouse, monkeypatch, "write_json_atomically",
                            _stop_at_manifest_listing("component_sums", writes))
    stopped = Warehouse.run_id_of(writes[0])
    partition = old_warehouse / "component_sums" / f"run_id={stopped}"
    assert list(partition.glob("*.parquet"))  # written, not listed
    assert "component_sums" not in _manifest(old_warehouse, stopped)["shards"]
    assert len(migrate(Warehouse(old_warehouse))) == 4
    assert len(list(partition.glob("*.parquet"))) == 1  # written again in place
    capsys.readouterr()
    assert query_main(["--warehouse", str(old_warehouse), "check"]) == 0
    assert "PASS partial_sums" in capsys.readouterr().out
    con = connect(Warehouse(old_warehouse))
    assert set(counts(con, "component_sums")) == {"new", "seed", "v1", "v2", "v3"}


def test_files_left_under_the_earlier_name_are_reported(tmp_path, capsys):
    """A run written before the rename, then replaced by ``--overwrite`` (a new generation
    under today's names) before it was migrated: its old component files are invisible, and
    ``check`` says so."""
    root = tmp_path / "wh"
    write_run(root, "r1", component_table="component_entropy")
    write_run(root, "r1", gen="g2")
    assert query_main(["--warehouse", str(root), "check"]) == 0
    out = capsys.readouterr().out
    stray = shard(root, "component_entropy", "r1")
    assert f"WARN stray file {stray}: no manifest lists it, so no view reads it" in out


def test_a_migration_stopped_between_two_moves_is_finished_by_the_next(old_warehouse,
                                                                      monkeypatch, capsys):
    """v3's component rows are in two files; the first moves, the second fails to (a full
    disk, or a kill): the next migration moves the other and lists both."""
    manifest = old_warehouse / "runs" / "run_id=v3" / "manifest.json"
    data = json.loads(manifest.read_text())
    first = shard(old_warehouse, "component_entropy", "v3")
    second = first.with_name("part-g1-00001.parquet")
    rows = pq.read_table(first)
    half = rows.num_rows // 2
    entries = []
    for path, part in ((first, rows.slice(0, half)), (second, rows.slice(half))):
        pq.write_table(part, path)
        entries.append({"file": path.name, "rows": part.num_rows,
                        "sha256": hashlib.sha256(path.read_bytes()).hexdigest()})
    data["shards"]["component_entropy"] = entries
    manifest.write_text(json.dumps(data))
    migrate_until_disk_full(old_warehouse, monkeypatch, "replace",
                            lambda src, dst: src.name == second.name)
    assert not first.exists() and second.exists()  # stopped between the two moves
    assert [m.run_id for m in migrate(Warehouse(old_warehouse))] == ["v3"]
    capsys.readouterr()
    assert query_main(["--warehouse", str(old_warehouse), "check"]) == 0
    assert not (old_warehouse / "component_entropy").exists()
    con = connect(Warehouse(old_warehouse))
    assert counts(con, "component_effects")["v3"] == rows.num_rows
    assert capsys.readouterr().err == ""


def _sums_of_schema_3(root, run_id):
    """Make the sums files of ``run_id`` as schema 3 wrote them: without the suppression
    measures' columns, the manifest saying so (rows and sha256 as the files are)."""
    data = _manifest(root, run_id)
    for table in SUMS_TABLES:
        entry = data["shards"][table][0]
        path = root / table / f"run_id={run_id}" / entry["file"]
        old = pq.read_table(path)
        pq.write_table(old.select([c for c in old.column_names if "suppression" not in c]),
                       path)
        entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    data["schema_version"] = 3
    (root / "runs" / f"run_id={run_id}" / "manifest.json").write_text(json.dumps(data))


def test_sums_of_schema_3_are_summed_again_with_the_suppression_columns(tmp_path, capsys):
    root = tmp_path / "wh"
    write_run(root, "now", seed=0)
    write_run(root, "then", seed=0)
    now = {t: pq.read_table(shard(root, t, "now").with_name("sums-g1.parquet"))
           for t in SUMS_TABLES}
    _sums_of_schema_3(root, "then")
    connect(Warehouse(root))
    err = capsys.readouterr().err
    assert err.startswith("warning: left out run then: ") and err.endswith(
        ": written by an earlier version (partial sums of schema 3); run python -m queries "
        "migrate\n")
    assert query_main(["--warehouse", str(root), "migrate"]) == 0
    assert capsys.readouterr().out.startswith("migrated run then: partial sums written")
    data = _manifest(root, "then")
    assert data["schema_version"] == SCHEMA_VERSION
    for table in SUMS_TABLES:
        assert [s["file"] for s in data["shards"][table]] == [f"sums-migrated-v{SCHEMA_VERSION}"
                                                             ".parquet"]
        folder = root / table / "run_id=then"
        assert [p.name for p in folder.glob("sums-*")] == [data["shards"][table][0]["file"]]
        assert pq.read_table(folder / data["shards"][table][0]["file"]).equals(now[table])
    assert query_main(["--warehouse", str(root), "check"]) == 0


def test_a_schema_4_run_without_sequence_sums_is_summed_again(tmp_path, capsys):
    """Schema 4 runs published before the per-sequence sums (component_seq_sums) existed
    are left out until migrate writes every sums file again, the per-sequence ones too."""
    root = tmp_path / "wh"
    write_run(root, "now", seed=0)
    write_run(root, "then", seed=0)
    now = {t: pq.read_table(shard(root, t, "now").with_name("sums-g1.parquet"))
           for t in SUMS_TABLES}
    data = _manifest(root, "then")
    (root / "component_seq_sums" / "run_id=then"
     / data["shards"].pop("component_seq_sums")[0]["file"]).unlink()
    (root / "runs" / "run_id=then" / "manifest.json").write_text(json.dumps(data))
    connect(Warehouse(root))
    assert capsys.readouterr().err.endswith(
        ": written by an earlier version (no partial sums); run python -m queries migrate\n")
    assert query_main(["--warehouse", str(root), "migrate"]) == 0
    assert capsys.readouterr().out.startswith("migrated run then: partial sums written")
    data = _manifest(root, "then")
    for table in SUMS_TABLES:
        folder = root / table / "run_id=then"
        assert [p.name for p in folder.glob("sums-*")] == [data["shards"][table][0]["file"]]
        assert pq.read_table(folder / data["shards"][table][0]["file"]).equals(now[table])
    assert query_main(["--warehouse", str(root), "check"]) == 0
