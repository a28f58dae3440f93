"""The warehouse is one object: built once per command from its path or URL and passed
down; the tables' schemas and the manifest are declared once, and the views' empty-table
macros (``queries/sql/views.sql``) agree with them."""

import dataclasses
import pickle

import duckdb
import pyarrow as pa
import pytest

import etl.warehouse.layout
from analysis.__main__ import main as analysis_main
from analysis.api import Warehouse as NotebookWarehouse
from etl.extract import main as extract_main
from etl.warehouse import SCHEMAS, TABLES, Manifest, Warehouse
from queries.cli import main as query_main
from queries.db import connect, open_views

DERIVED = {"normalization", "parallel_blocks", "n_kv_heads", "variant"}
"""Columns of the ``runs`` view computed from the manifest's ``model_identity`` and
``config``."""
NOT_SHOWN = {"schema_version", "generation", "shards", "host"}
"""Manifest fields the ``runs`` view leaves out (the files are the other views' rows)."""


@pytest.fixture()
def parses(monkeypatch):
    """The warehouse paths parsed so far (``etl.warehouse.storage.parse_root`` calls)."""
    seen = []
    real = etl.warehouse.layout.parse_root

    def counted(text):
        seen.append(text)
        return real(text)

    monkeypatch.setattr(etl.warehouse.layout, "parse_root", counted)
    return seen


def test_each_command_parses_the_warehouse_once(tiny_checkpoint, tmp_path, parses, capsys):
    root = str(tmp_path / "wh")
    assert extract_main(["--model", str(tiny_checkpoint), "--warehouse", root, "--device",
                         "cpu", "--no-progress", "--dataset", "ioi", "--n-prompts", "2",
                         "--run-id", "r"]) == 0
    assert parses == [root]
    for command in (["run", "top_heads"], ["check"], ["migrate"]):
        parses.clear()
        assert query_main(["--warehouse", root, *command]) == 0
        assert parses == [root], command
    parses.clear()
    assert analysis_main(["--warehouse", root, "--out", str(tmp_path / "charts"), "--chart",
                          "heatmap", "--format", "html", "--no-progress"]) == 0
    assert parses == [root]
    parses.clear()
    assert NotebookWarehouse(root).runs()["run_id"].to_list() == ["r"]
    assert parses == [root]
    capsys.readouterr()


def test_a_warehouse_pickles_as_its_url_and_knows_its_layout(tmp_path):
    warehouse = Warehouse(tmp_path / "wh")
    again = pickle.loads(pickle.dumps(warehouse))
    assert isinstance(again, Warehouse) and again.root == warehouse.root
    assert warehouse.partition("tokens", "r") == tmp_path / "wh" / "tokens" / "run_id=r"
    assert warehouse.manifest_path("r") == tmp_path / "wh" / "runs" / "run_id=r" / \
        "manifest.json"
    assert warehouse.staging_folder("r") == tmp_path / "wh" / "_staging" / "r"
    assert warehouse.lock_path("r") == tmp_path / "wh" / "_locks" / "r.lock"


def _describe(con, sql: str) -> list[tuple[str, str]]:
    return [(row[0], row[1]) for row in con.sql(f"describe {sql}").fetchall()]


def _empty_views():
    """A connection with the views over no run at all: every view is an empty-table macro."""
    return open_views(Warehouse("unused"), [])


@pytest.mark.parametrize("table", TABLES)
def test_empty_views_have_the_arrow_schemas(table):
    arrow = duckdb.connect().from_arrow(pa.Table.from_pylist([], schema=SCHEMAS[table]))
    want = [("run_id", "VARCHAR"), *zip(arrow.columns, map(str, arrow.types), strict=True)]
    assert _describe(_empty_views(), table) == want


@pytest.mark.parametrize("view", [*TABLES, "runs"])
def test_empty_views_have_the_columns_and_types_of_real_ones(ioi_warehouse, view):
    """(The nested fields of a manifest are JSON when there is no run, and whatever structs
    ``read_json`` infers from the runs there are.)"""
    empty = _describe(_empty_views(), view)
    real = _describe(connect(Warehouse(ioi_warehouse)), view)
    assert [name for name, _ in empty] == [name for name, _ in real]
    assert [c for c in empty if c[1] != "JSON"] == [c for c, e in zip(real, empty, strict=True)
                                                    if e[1] != "JSON"]


def test_the_runs_view_shows_the_manifest_fields():
    shown = {name for name, _ in _describe(_empty_views(), "runs")}
    fields = {f.name for f in dataclasses.fields(Manifest)}
    assert shown - DERIVED <= fields
    assert fields - shown == NOT_SHOWN
