"""``python -m queries migrate`` on hostile manifests: a path built from a manifest field (the
generation, a shard's file name) that leaves the run's own partitions, or a configuration
field that the sums read and that no run could have, stops the migration in one line (exit
2) before anything is written; the read path leaves such a run out."""

import json
import shutil

import pytest

from queries.cli import main as query_main
from tests.test_query_safety import write_run


def _edit(root, run_id, change):
    path = root / "runs" / f"run_id={run_id}" / "manifest.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def snapshot(folder):
    """Every file under ``folder``: relative path → bytes."""
    return {str(p.relative_to(folder)): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture()
def warehouse(tmp_path):
    """Under ``tmp_path/wh``: run ``good`` as written today (generation ``g1``) and run
    ``old``, written by an earlier version (schema 2, the component table under its earlier
    name), to be made hostile by each test."""
    root = tmp_path / "wh"
    write_run(root, "good", seed=0)
    write_run(root, "old", seed=1, schema_version=2, component_table="component_entropy")
    return root


def refused(tmp_path, root, capsys, says: str) -> None:
    """``migrate`` exits 2 with one line that says ``says``, and nothing under ``tmp_path``
    changed."""
    before = snapshot(tmp_path)
    assert query_main(["--warehouse", str(root), "migrate"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: cannot migrate run 'old': ") and says in err, err
    assert "nothing was migrated" in err
    assert snapshot(tmp_path) == before


def test_a_generation_that_reaches_another_runs_sums_is_refused(tmp_path, warehouse, capsys):
    _edit(warehouse, "old", lambda d: d.update(generation="x/../../run_id=good/sums-g1"))
    refused(tmp_path, warehouse, capsys,
            "its field 'generation' is \"x/../../run_id=good/sums-g1\", not a plain name")
    assert query_main(["--warehouse", str(warehouse), "check"]) == 1  # only old is outdated
    out = capsys.readouterr().out
    assert "run old: " in out and "run good" not in out


def test_a_generation_that_leaves_the_warehouse_is_refused(tmp_path, warehouse, capsys):
    _edit(warehouse, "old", lambda d: d.update(generation="x/../../../../../ESCAPED"))
    refused(tmp_path, warehouse, capsys, "not a plain name")
    assert not list(tmp_path.rglob("ESCAPED*"))


def test_a_shard_outside_the_partition_is_never_read(tmp_path, warehouse, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.copy(warehouse / "tokens" / "run_id=good" / "part-g1-00000.parquet",
                outside / "secret.parquet")
    _edit(warehouse, "old", lambda d: d["shards"]["tokens"].append(
        dict(d["shards"]["tokens"][0], file="../../../outside/secret.parquet")))
    refused(tmp_path, warehouse, capsys,
            "it lists a bad tokens file name \"../../../outside/secret.parquet\"")


def test_a_shard_that_is_a_link_outside_is_never_read(tmp_path, warehouse, capsys):
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = outside / "secret.parquet"
    shutil.copy(warehouse / "tokens" / "run_id=good" / "part-g1-00000.parquet", secret)
    (warehouse / "tokens" / "run_id=old" / "link.parquet").symlink_to(secret)
    _edit(warehouse, "old", lambda d: d["shards"]["tokens"].append(
        dict(d["shards"]["tokens"][0], file="link.parquet")))
    refused(tmp_path, warehouse, capsys,
            "its tokens file 'link.parquet' is reached through a symbolic link")


def test_a_sums_folder_that_is_a_link_to_another_run_is_never_written(tmp_path, warehouse,
                                                                       capsys):
    _edit(warehouse, "old", lambda d: d.update(generation="g1"))
    (warehouse / "component_sums" / "run_id=old").symlink_to(
        warehouse / "component_sums" / "run_id=good", target_is_directory=True)
    refused(tmp_path, warehouse, capsys,
            "its component_sums file 'sums-g1-v4.parquet' is reached through a symbolic link")


@pytest.mark.parametrize(("batch_size", "says"), [
    (-1, "its config field 'batch_size' is -1, not a whole number of at least 1"),
    (0, "its config field 'batch_size' is 0, not a whole number of at least 1"),
    ("4", "its config field 'batch_size' is \"4\", not of type int"),
    (2.5, "its config field 'batch_size' is 2.5, not of type int"),
])
def test_a_batch_size_no_run_could_have_is_refused(tmp_path, warehouse, capsys, batch_size,
                                                   says):
    _edit(warehouse, "old", lambda d: d["config"].update(batch_size=batch_size))
    refused(tmp_path, warehouse, capsys, says)


def test_a_hostile_run_stops_the_migration_of_the_others_too(tmp_path, warehouse, capsys):
    write_run(warehouse, "also-old", seed=2, schema_version=2,
              component_table="component_entropy")
    _edit(warehouse, "old", lambda d: d["config"].update(batch_size=-1))
    refused(tmp_path, warehouse, capsys, "'batch_size' is -1")


def test_the_migration_still_migrates_a_sound_run(warehouse, capsys):
    _edit(warehouse, "old", lambda d: d["config"].update(batch_size=1))
    assert query_main(["--warehouse", str(warehouse), "migrate"]) == 0
    assert capsys.readouterr().out.endswith("1 runs migrated\n")
    data = json.loads((warehouse / "runs" / "run_id=old" / "manifest.json").read_text())
    assert [s["file"] for s in data["shards"]["component_sums"]] == ["sums-migrated-v4.parquet"]
    from etl.warehouse import Warehouse
    from queries.db import connect

    con = connect(Warehouse(warehouse))
    assert con.sql("select run_id, count(distinct batch) from component_batch_sums "
                   "group by run_id order by run_id").fetchall() == [("good", 0), ("old", 2)]


def test_a_staged_plan_whose_generation_is_a_path_is_discarded(tmp_path):
    from etl.warehouse import Warehouse

    plan = {"run_id": "r", "config_fingerprint": "x", "n_batches": 2}
    area = Warehouse(tmp_path / "wh").open_staging("r", plan)
    path = area.folder / "plan.json"
    path.write_text(json.dumps(dict(json.loads(path.read_text()),
                                    generation="x/../../../../ESCAPED")))
    again = Warehouse(tmp_path / "wh").open_staging("r", plan)
    assert again.generation != "x/../../../../ESCAPED" and again.done_batches == set()
    assert again.shard_path("tokens", 0).parent == again.folder / "tokens"


def test_a_run_id_that_is_not_a_plain_name_is_left_out(tmp_path, capsys):
    from analysis.__main__ import main as analysis_main

    root = tmp_path / "wh"
    write_run(root, "good", seed=0)
    write_run(root, "..", seed=1)  # runs/run_id=../manifest.json, run_id ".."
    assert query_main(["sql", "select run_id from runs", "--warehouse", str(root),
                       "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert out.splitlines() == ["run_id", "good"]
    assert "its run id \"..\" is not a plain name" in err
    assert analysis_main(["--warehouse", str(root), "--out", str(tmp_path / "charts"),
                          "--format", "svg", "--chart", "heatmap", "--no-progress"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["charts", "wh"]
