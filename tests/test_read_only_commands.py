"""The read-only commands stay read-only and answer in one line: no ``--output`` inside the
warehouse, no partial output file, no reads outside the warehouse (DuckDB's temporary folder
included), no glob characters in the warehouse's path, binary columns written as hex, and
parameters checked."""

import errno
import os

import pytest

from analysis.__main__ import main as analysis_main
from analysis.api import Warehouse as AnalysisWarehouse
from etl.errors import UserError
from etl.warehouse import Warehouse
from queries.cli import main as query_main
from tests.test_query_safety import one_line_error, write_run


@pytest.fixture()
def root(tmp_path):
    root = tmp_path / "wh"
    write_run(root, "base", seed=0)
    return root


@pytest.mark.parametrize("target,fmt", [
    ("tokens/run_id=base/part-g1-00000.parquet", "parquet"),
    ("runs/run_id=base/manifest.json", "json"),
    ("notes.csv", "csv"),
])
def test_output_inside_the_warehouse_is_refused_and_nothing_changes(root, capsys, target, fmt):
    before = {p: p.read_bytes() for p in root.rglob("*") if p.is_file()}
    code = query_main(["sql", "select 1 as a", "--warehouse", str(root), "--format", fmt,
                       "--output", str(root / target)])
    assert code == 2
    assert "is inside the warehouse" in one_line_error(capsys)
    assert {p: p.read_bytes() for p in root.rglob("*") if p.is_file()} == before


def test_a_full_disk_leaves_no_partial_output_file(root, tmp_path, capsys, monkeypatch):
    import polars as pl

    def full(self, file, **kwargs):
        file.write(b"a,b\n1,")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(pl.DataFrame, "write_csv", full)
    out = tmp_path / "out.csv"
    assert query_main(["sql", "select 1 as a", "--warehouse", str(root), "--output",
                       str(out)]) == 2
    assert "No space left on device" in one_line_error(capsys)
    assert list(tmp_path.glob("*out.csv*")) == []


@pytest.mark.parametrize("fmt", ["json", "csv", "table"])
def test_a_binary_column_is_written_as_hex(root, capsys, fmt):
    assert query_main(["sql", "select 'ab'::blob as b, 1 as n", "--warehouse", str(root),
                       "--format", fmt]) == 0
    assert "6162" in capsys.readouterr().out or fmt == "table"


def test_duckdbs_temporary_folder_is_not_a_way_out(root, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".tmp").mkdir()
    (tmp_path / ".tmp" / "secret.csv").write_text("a\nthe-secret-value\n")
    for sql in ("select * from read_csv('.tmp/secret.csv')",
                f"select * from read_csv('{tmp_path}/.tmp/secret.csv')",
                f"select * from glob('{tmp_path}/.tmp/*')"):
        assert query_main(["sql", sql, "--warehouse", str(root)]) == 2, sql
        assert "the-secret-value" not in one_line_error(capsys)


@pytest.mark.parametrize("name", ["w*", "w[1]", "w?"])
def test_glob_characters_in_the_warehouse_path_are_refused(tmp_path, capsys, name):
    write_run(tmp_path / name, "base", seed=0)
    write_run(tmp_path / "wCopy", "base", seed=1)  # a folder the pattern would also match
    write_run(tmp_path / "w1", "base", seed=2)
    assert query_main(["sql", "select count(*) from tokens", "--warehouse",
                       str(tmp_path / name)]) == 2
    assert "has the glob character" in one_line_error(capsys)
    with pytest.raises(UserError, match="has the glob character"):
        AnalysisWarehouse(tmp_path / name)


def test_an_upper_case_scheme_is_a_scheme():
    pytest.importorskip("s3fs")
    assert str(Warehouse("S3://bucket/x")) == str(Warehouse("s3://bucket/x"))
    assert Warehouse("file:///tmp/x").root == Warehouse("/tmp/x").root


@pytest.mark.parametrize("value", ["-1", "0", "many"])
def test_max_rows_must_be_a_positive_number(root, capsys, value):
    assert query_main(["sql", "select 1", "--warehouse", str(root), "--max-rows", value]) == 2
    assert "--max-rows" in capsys.readouterr().err


def test_an_unknown_ioi_variant_is_an_error_not_zero_rows(root, capsys):
    assert query_main(["run", "ioi_roles", "--warehouse", str(root), "--param",
                       "variant=zzz"]) == 2
    assert "variant must be 'clean', 'abc' or null" in one_line_error(capsys)


def test_a_chart_of_an_unknown_run_is_an_error(root):
    with pytest.raises(UserError, match="run 'nope' is not a complete run"):
        AnalysisWarehouse(root).chart("heatmap", "nope")


def test_a_run_named_like_the_index_page_is_left_out_of_the_charts(root, tmp_path, capsys):
    write_run(root, "index.html", seed=1)
    out = tmp_path / "charts"
    assert analysis_main(["--warehouse", str(root), "--out", str(out), "--format", "svg",
                          "--chart", "heatmap", "--no-progress"]) == 0
    assert "left out run index.html" in capsys.readouterr().err
    assert (out / "index.html").is_file() and (out / "base" / "heatmap.svg").is_file()
    assert analysis_main(["--warehouse", str(root), "--out", str(out), "--run",
                          "index.html", "--no-progress"]) == 2
    assert "cannot be drawn" in capsys.readouterr().err


def test_a_new_run_cannot_take_the_index_pages_name():
    from etl.warehouse import validate_run_id

    with pytest.raises(UserError, match="is the name of the charts' index page"):
        validate_run_id("index.html")


def test_output_through_a_link_writes_the_file_it_points_to(root, tmp_path, capsys):
    target = tmp_path / "target.csv"
    target.write_text("old\n")
    link = tmp_path / "link.csv"
    link.symlink_to(target)
    assert query_main(["sql", "select 7 as a", "--warehouse", str(root), "--output",
                       str(link)]) == 0
    assert link.is_symlink() and target.read_text() == "a\n7\n"


def test_a_glob_character_in_the_current_folder_counts(tmp_path, monkeypatch):
    folder = tmp_path / "a[1]"
    folder.mkdir()
    monkeypatch.chdir(folder)
    with pytest.raises(UserError, match="has the glob character '\\['"):
        Warehouse("wh")
