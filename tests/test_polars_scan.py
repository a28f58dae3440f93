"""``analysis.api.Warehouse.scan``: a polars LazyFrame over exactly the files the complete
runs' manifests list (the files the DuckDB views read), where a glob of the table's folder
also reads files no manifest lists; locally and in object storage."""

import re
import shutil
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from analysis.api import Warehouse
from etl.errors import UserError

README = Path(__file__).resolve().parents[1] / "README.md"
TABLES = ("component_effects", "resid_entropy", "tokens", "component_sums", "resid_sums")


def _sorted(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.sort(pl.all())


def _plant(root: Path) -> None:
    """Files no manifest lists: an earlier generation of run ``ioi`` beside its current one,
    a partition of a run that was never published, and a staged shard."""
    for table in TABLES:
        shard = next((root / table / "run_id=ioi").glob("*.parquet"))
        shutil.copy(shard, shard.with_name("part-0ldgener-00000.parquet"))
        ghost = root / table / "run_id=ghost"
        ghost.mkdir()
        shutil.copy(shard, ghost / shard.name)
        staged = root / "_staging" / "next" / table
        staged.mkdir(parents=True)
        shutil.copy(shard, staged / "part-5ta9ed00-00000.parquet")


@pytest.fixture(scope="module")
def planted(ioi_warehouse, tmp_path_factory):
    """A copy of the one-run ``ioi`` warehouse with files ``_plant`` added."""
    root = tmp_path_factory.mktemp("planted") / "wh"
    shutil.copytree(ioi_warehouse, root)
    _plant(root)
    return root


@pytest.mark.parametrize("table", TABLES)
def test_scan_reads_the_views_rows_where_a_glob_reads_unlisted_files(planted, table):
    wh = Warehouse(planted)
    view = wh.sql(f"select * from {table}")
    naive = pl.scan_parquet(planted / table / "**" / "*.parquet",
                            hive_partitioning=True).collect()
    assert naive.height == 3 * view.height  # ioi twice, and ghost
    assert set(naive["run_id"]) == {"ioi", "ghost"}
    scanned = wh.scan(table)
    assert isinstance(scanned, pl.LazyFrame)
    got = scanned.collect()
    assert got.schema == view.schema
    assert_frame_equal(_sorted(got), _sorted(view))
    assert_frame_equal(_sorted(wh.scan(table, runs="ioi").collect()), _sorted(view))


def test_scan_errors_are_one_line(planted):
    wh = Warehouse(planted)
    with pytest.raises(UserError, match=r"^unknown table 'runs'; known: component_effects, "):
        wh.scan("runs")
    with pytest.raises(UserError, match=r"^run 'ghost' is not a complete run in .*"
                                        r"\(runs: ioi\)$"):
        wh.scan("tokens", runs=["ioi", "ghost"])


def test_readme_polars_recipe_runs(planted):
    section = README.read_text(encoding="utf-8").split("### From polars", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'Warehouse("data/warehouse")' in code
    scope: dict = {}
    exec(compile(code.replace("data/warehouse", str(planted)), "README", "exec"), scope)
    heads = scope["heads"]
    assert isinstance(heads, pl.DataFrame) and heads.height == 2 * 4  # 2 layers × 4 heads
    want = Warehouse(planted).sql("select layer, head, avg(entropy_diff) as mean_diff from "
                                  "component_effects where kind = 'head' group by all")
    assert_frame_equal(heads.sort("layer", "head"), want.sort("layer", "head"),
                       check_dtypes=False, check_column_order=False, rel_tol=1e-6)


def test_scan_of_an_s3_warehouse_reads_the_listed_objects(s3_server, planted):
    import s3fs

    s3fs.S3FileSystem().put(f"{planted}/", "bucket/scan/", recursive=True)
    wh = Warehouse("s3://bucket/scan")
    naive = pl.scan_parquet("s3://bucket/scan/tokens/**/*.parquet",
                            hive_partitioning=True).collect()
    got = wh.scan("tokens").collect()
    assert naive.height == 3 * got.height
    assert_frame_equal(_sorted(got), _sorted(Warehouse(planted).sql("select * from tokens")))
