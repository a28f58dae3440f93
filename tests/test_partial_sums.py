"""The runs' partial sums (``etl.warehouse.sums``): the saved summaries read them and give
the very bytes of the same queries scanning every row (``tests/sql/full_scan``: the saved
queries as they were before the sums); publish, migration and ``queries check`` keep them
true to the rows; the layout lets a one-component query read one layer."""

import hashlib
import json
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl.warehouse import SUMS_TABLES, Warehouse, read_run
from etl.warehouse.sums import FIXED_POINT, run_sums, shard_files
from queries.cli import main as query_main
from queries.db import Views, views_sql
from queries.profile import profiled
from queries.saved import get_query

FULL_SCAN = Path(__file__).parent / "sql" / "full_scan"

CASES = [
    ("head_summary", {}), ("head_summary", {"positions": "all"}),
    ("head_summary", {"weighting": "batch"}), ("head_summary", {"run_id": "text-all"}),
    ("top_heads", {}), ("top_heads", {"measure": "marginal", "positions": "all", "k": "3"}),
    ("top_heads", {"dataset": "ioi"}),
    ("resid_summary", {}), ("resid_summary", {"positions": "all"}),
    ("ioi_roles", {}), ("ioi_roles", {"variant": "abc"}), ("ioi_roles", {"variant": "NULL"}),
    ("loss_effects", {}), ("loss_effects", {"positions": "all"}),
    ("copy_suppression", {}), ("copy_suppression", {"run_id": "text-all"}),
    ("copy_suppression", {"run_id": "ioi-entropy", "positions": "all"}),
    ("copy_suppression", {"run_id": "ioi-all", "positions": "all"}),
    ("compare_runs", {"run_a": "ioi-entropy", "run_b": "ioi-all"}),
    ("token_drilldown", {}), ("token_drilldown", {"run_id": "ioi-all", "measure": "loss"}),
    ("calibration_curve", {"run_id": "text-all"}),
    ("head_distribution", {}), ("head_distribution", {"measure": "marginal", "k": "3"}),
    ("study_comparison", {"run_id": "text-all"}), ("study_comparison", {"run_id": "ioi-entropy"}),
    ("study_comparison", {"run_id": "ioi-all", "mismatch": "mark"}),
]


@pytest.fixture(scope="module")
def warehouse(build_warehouse, tmp_path_factory):
    """Three runs: text with every measure in batches of 2 sequences, IOI (both variants:
    roles, padding) with every measure and with the entropies alone."""
    text_dir = tmp_path_factory.mktemp("sums-text")
    (text_dir / "a.txt").write_text("The cat sat on the mat and looked at the dog. " * 30)
    (text_dir / "b.txt").write_text("Numbers like 3, 5 and 8 are small; 1024 is not. " * 30)
    return build_warehouse(
        "sums",
        ["--dataset", "text", "--data-files", str(text_dir / "*.txt"), "--n-batches", "3",
         "--batch-size", "2", "--seq-len", "24", "--measures", "all", "--run-id", "text-all"],
        ["--dataset", "ioi", "--n-prompts", "6", "--ioi-variant", "both", "--batch-size", "4",
         "--measures", "all", "--ablation", "mean", "--run-id", "ioi-all"],
        ["--dataset", "ioi", "--n-prompts", "4", "--measures", "entropy",
         "--run-id", "ioi-entropy"])


def both_ways(views: Views, name: str, params: dict) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The saved query ``name`` as it is (from the sums) and as it was (a scan of the rows)."""
    query = get_query(name)
    bound = query.bind(params)
    return views.sql(query.sql, bound), views.sql((FULL_SCAN / f"{name}.sql").read_text(), bound)


@pytest.mark.parametrize(("name", "params"), CASES,
                         ids=[f"{n}-{'-'.join(p.values()) or 'defaults'}" for n, p in CASES])
def test_summaries_from_sums_equal_full_scans_to_the_byte(warehouse, name, params):
    summed, scanned = both_ways(Views(Warehouse(warehouse)), name, params)
    assert summed.height > 0
    assert summed.schema == scanned.schema
    assert summed.equals(scanned, null_equal=True), (summed, scanned)


def test_the_effect_columns_are_measured_so_the_comparison_means_something(warehouse):
    summed, _ = both_ways(Views(Warehouse(warehouse)), "copy_suppression",
                          {"run_id": "ioi-all"})
    assert summed["context_share"].is_not_null().all()
    assert summed["suppression_share"].is_not_null().all()
    assert summed["context_share_ci95_low"].is_not_null().all()
    assert summed["entropy_context_share_ci_unbounded"].is_not_null().all()
    assert summed["cspa_share_ci_unbounded"].is_not_null().sum() == 8  # the heads
    views = Views(Warehouse(warehouse))
    rows = views.sql(
        "select count(*) as n, count(distinct class) as classes, count(role) as roles, "
        "count(distinct variant) as variants from component_sums where run_id = 'ioi-all'"
    ).row(0, named=True)
    assert rows["classes"] == 3 and rows["roles"] > 0 and rows["variants"] == 2
    batches = views.sql("select count(distinct batch) as n from component_batch_sums "
                        "where run_id = 'ioi-all'")
    assert batches["n"][0] == 3
    sequences = views.sql("select count(distinct seq) as n from component_seq_sums "
                          "where run_id = 'ioi-all'")
    assert sequences["n"][0] == 12


def test_head_distribution_reads_the_rows_of_the_top_heads_only_and_keeps_their_means(
        warehouse):
    views = Views(Warehouse(warehouse))
    query = get_query("head_distribution")
    spread = views.sql(query.sql, query.bind({"run_id": "text-all", "k": "2"}))
    top = views.sql(get_query("top_heads").sql,
                    get_query("top_heads").bind({"run_id": "text-all", "k": "2"}))
    assert spread["component"].to_list() == top["component"].to_list()
    assert spread["mean"].to_list() == top["mean"].to_list()
    assert spread["n"].to_list() == top["n"].to_list()
    values = views.sql("select c.entropy_diff from component_rows('real', 'text-all') as c "
                       f"where c.layer = {top['layer'][0]} and c.head = {top['head'][0]}")
    assert spread["n"][0] == values.height
    assert spread["min"][0] == values["entropy_diff"].min()
    assert spread["max"][0] == values["entropy_diff"].max()


def test_fixed_point_is_spelt_alike_in_the_writer_and_the_views():
    for line in FIXED_POINT.strip().splitlines():
        assert line in views_sql()


def stored_sums(root: Path, run_id: str) -> dict:
    run = read_run(Warehouse(root), Warehouse(root).manifest_path(run_id))
    return {s.table: pq.read_table(s.path) for s in run.shards if s.table.endswith("_sums")}


def test_the_sums_published_are_those_of_the_rows(warehouse):
    wh = Warehouse(warehouse)
    for run_id in ("text-all", "ioi-all"):
        run = read_run(wh, wh.manifest_path(run_id))
        config = json.loads(run.manifest.read_text())["config"]
        again = run_sums(shard_files(run.shards), config["batch_size"])
        stored = stored_sums(warehouse, run_id)
        assert set(stored) == set(SUMS_TABLES)
        for table, data in again.items():
            assert data.equals(stored[table]), table


def test_component_shards_start_a_row_group_at_every_layer(warehouse):
    for path in sorted((warehouse / "component_effects").glob("*/*.parquet")):
        meta = pq.ParquetFile(path).metadata
        layer = meta.schema.to_arrow_schema().get_field_index("layer")
        ranges = [(meta.row_group(i).column(layer).statistics.min,
                   meta.row_group(i).column(layer).statistics.max)
                  for i in range(meta.num_row_groups)]
        assert all(low == high for low, high in ranges), (path, ranges)
        assert sorted({low for low, _ in ranges}) == [0, 1]


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    """A synthetic GPT-2-small-shaped run (12 layers) of 2 M component rows."""
    from queries.bench import write_synthetic_run

    root = tmp_path_factory.mktemp("layered")
    write_synthetic_run(Warehouse(root), "synthetic", 2_000_000)
    return root


@pytest.mark.parametrize(("name", "params"), [
    ("token_drilldown", {"component": "10.7"}), ("token_drilldown", {}),
    ("head_distribution", {"k": "1"}),
])
def test_a_one_component_query_reads_one_layer_of_the_component_rows(layered, name, params):
    query = get_query(name)
    reads = profiled(Views(Warehouse(layered)).con, query.sql, query.bind(params))
    scanned, total = reads.row_groups["component_effects"]
    assert total == 24 and scanned * 12 <= total, reads


def test_a_summary_reads_the_sums_alone(layered):
    query = get_query("head_summary")
    reads = profiled(Views(Warehouse(layered)).con, query.sql, query.bind({}))
    assert "component_sums" in reads.row_groups, reads
    assert set(reads.row_groups) <= set(SUMS_TABLES), reads


def copied(warehouse: Path, tmp_path: Path) -> Path:
    """A copy of the session's warehouse that a test may change."""
    import shutil

    return Path(shutil.copytree(warehouse, tmp_path / "wh"))


def test_check_fails_on_sums_that_are_not_those_of_the_rows(warehouse, tmp_path, capsys):
    root = copied(warehouse, tmp_path)
    path, = (root / "component_sums" / "run_id=text-all").glob("*.parquet")
    sums = pq.read_table(path)
    n = sums.column("n").to_pylist()
    sums = sums.set_column(sums.schema.get_field_index("n"), "n",
                           pa.array([n[0] + 1, *n[1:]], pa.int64()))
    pq.write_table(sums, path)
    manifest = root / "runs" / "run_id=text-all" / "manifest.json"
    data = json.loads(manifest.read_text())  # a manifest that agrees with the changed file
    data["shards"]["component_sums"][0]["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    data["shards"]["component_sums"][0]["rows"] = sums.num_rows
    manifest.write_text(json.dumps(data))
    assert query_main(["--warehouse", str(root), "check"]) == 1
    out = capsys.readouterr().out
    assert "PASS files:" in out and "FAIL partial_sums: 1 offending rows" in out
    assert "text-all" in out and "5 passed, 1 failed" in out


def test_a_run_published_before_the_sums_is_left_out_until_migrate_sums_it(
        warehouse, tmp_path, capsys):
    root = copied(warehouse, tmp_path)
    manifest = root / "runs" / "run_id=ioi-all" / "manifest.json"
    data = json.loads(manifest.read_text())
    published = {t: pq.read_table(root / t / "run_id=ioi-all" / data["shards"][t][0]["file"])
                 for t in SUMS_TABLES}
    for table in SUMS_TABLES:
        (root / table / "run_id=ioi-all" / data["shards"].pop(table)[0]["file"]).unlink()
    manifest.write_text(json.dumps(dict(data, schema_version=2)))
    capsys.readouterr()
    views = Views(Warehouse(root))
    assert "left out run ioi-all" in capsys.readouterr().err
    assert views.sql("select distinct run_id from runs order by 1")["run_id"].to_list() == [
        "ioi-entropy", "text-all"]
    assert query_main(["--warehouse", str(root), "migrate"]) == 0
    assert capsys.readouterr().out.startswith("migrated run ioi-all: partial sums written")
    assert stored_sums(root, "ioi-all") == published
    summed, scanned = both_ways(Views(Warehouse(root)), "ioi_roles", {"run_id": "ioi-all"})
    assert summed.height > 0 and summed.equals(scanned, null_equal=True)


def test_the_benchmarks_run_and_report_what_they_read(tmp_path, capsys):
    from queries.bench import main as bench_main
    from queries.bench_layout import main as layout_main

    assert bench_main(["--warehouse", str(tmp_path / "bench"), "--component-rows", "1000000",
                       "2000000", "--repeats", "1", "--queries", "head_summary",
                       "token_drilldown:component=10.7"]) == 0
    out = capsys.readouterr().out
    assert "full scan" in out and "growth from 1,014,000 to 2,028,000 rows" in out
    assert "row groups 1/12" in out and "row groups 2/24" in out  # one layer of 12
    assert layout_main(["--folder", str(tmp_path / "layouts"), "--component-rows", "1000000",
                        "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "layer row groups: 1 files" in out and "layer= folders: 12 files" in out
