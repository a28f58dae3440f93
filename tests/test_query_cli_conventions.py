"""``python -m queries`` conventions: the output file's extension picks the format, files are
written by polars and read back equal, ``--warehouse`` goes before or after the command,
``--version``, one-line table rows, and the docs name every saved query."""

import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from polars.testing import assert_frame_equal

from etl.warehouse import Warehouse
from queries.cli import main as query_main
from queries.db import connect, run_sql
from queries.saved import saved_queries

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
NESTED_SQL = "select 1 as i, [1, 2] as l, {'a': 3, 'b': 'x'} as s, 'p' || chr(10) || 'q' as t"


@pytest.fixture(scope="module")
def warehouse(ioi_warehouse):
    return ioi_warehouse


def expected(root, name):
    query = saved_queries()[name]
    return run_sql(connect(Warehouse(root), read_only=True), query.sql, query.bind({}))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def run(root, *argv):
    return query_main(["--warehouse", str(root), *argv])


# 1. The format follows --output's extension ------------------------------------------------

def read_back(path, fmt, like):
    """A written file read by polars, with ``like``'s column types (CSV/JSON lose them)."""
    if fmt == "parquet":
        return pl.read_parquet(path)
    if fmt == "csv":
        return pl.read_csv(path, schema=like.schema)
    return pl.read_json(path, schema=like.schema)


@pytest.mark.parametrize("name", ["top_heads", "head_summary"])
@pytest.mark.parametrize("suffix, fmt", [(".csv", "csv"), (".json", "json"),
                                         (".parquet", "parquet"), (".PQ", "parquet")])
def test_output_extension_picks_the_format(warehouse, tmp_path, name, suffix, fmt):
    out = tmp_path / f"out{suffix}"
    assert run(warehouse, "run", name, "--output", str(out)) == 0
    assert not out.read_bytes().startswith("┌".encode())
    want = expected(warehouse, name)
    assert want.height > 0
    assert_frame_equal(read_back(out, fmt, want), want)


@pytest.mark.parametrize("name", ["th.txt", "th"])
def test_txt_or_no_extension_is_a_table_with_every_row(warehouse, tmp_path, name):
    out = tmp_path / name
    assert run(warehouse, "sql", "select * from range(150) t(x)", "--output", str(out)) == 0
    text = out.read_text(encoding="utf-8")
    assert text.startswith("┌") and "│ 149 │" in text and "(150 rows)" in text


def test_explicit_format_that_contradicts_the_extension_is_one_line(warehouse, tmp_path,
                                                                    capsys):
    for fmt, name in [("csv", "th.parquet"), ("table", "th.csv"), ("parquet", "th.json"),
                      ("parquet", "th.txt")]:
        out = tmp_path / name
        assert run(warehouse, "run", "top_heads", "--format", fmt, "--output", str(out)) == 2
        assert "contradicts" in one_line_error(capsys)
        assert not out.exists()
    assert run(warehouse, "run", "top_heads", "--format", "csv", "--output",
               str(tmp_path / "th.txt")) == 0
    want = expected(warehouse, "top_heads")
    assert_frame_equal(read_back(tmp_path / "th.txt", "csv", want), want)


def test_unknown_extension_needs_a_format(warehouse, tmp_path, capsys):
    out = tmp_path / "th.xlsx"
    assert run(warehouse, "run", "top_heads", "--output", str(out)) == 2
    assert "--format" in one_line_error(capsys)
    assert not out.exists()
    assert run(warehouse, "run", "top_heads", "--format", "json", "--output", str(out)) == 0
    want = expected(warehouse, "top_heads")
    assert_frame_equal(read_back(out, "json", want), want)


def test_nested_columns_in_every_file_format(warehouse, tmp_path):
    for suffix in (".csv", ".json", ".parquet"):
        assert run(warehouse, "sql", NESTED_SQL, "--output", str(tmp_path / f"n{suffix}")) == 0
    csv = pl.read_csv(tmp_path / "n.csv")
    assert csv.row(0, named=True) == {"i": 1, "l": "[1, 2]", "s": '{"a": 3, "b": "x"}',
                                      "t": "p\nq"}
    for suffix in (".json", ".parquet"):
        row = (pl.read_json if suffix == ".json" else pl.read_parquet)(
            tmp_path / f"n{suffix}").row(0, named=True)
        assert row == {"i": 1, "l": [1, 2], "s": {"a": 3, "b": "x"}, "t": "p\nq"}, suffix


def test_json_on_stdout_is_valid_json(warehouse, capsys):
    assert run(warehouse, "sql", "select 'nan'::double as x, 1 as y", "--format", "json") == 0
    out = capsys.readouterr().out
    assert out.endswith("\n") and "NaN" not in out
    assert pl.read_json(out.encode()).to_dicts() == [{"x": None, "y": 1}]


# 2. --warehouse before or after the command, --version -------------------------------------

def test_warehouse_after_the_command(warehouse, tmp_path, capsys):
    missing = str(tmp_path / "missing")
    assert query_main(["run", "top_heads", "--warehouse", str(warehouse), "--format",
                       "csv"]) == 0
    after = capsys.readouterr().out
    assert run(warehouse, "run", "top_heads", "--format", "csv") == 0
    assert capsys.readouterr().out == after and after.count("\n") > 1
    # after the command wins over before it; a value before it stands when none follows
    assert query_main(["--warehouse", missing, "sql", "select count(*) as n from runs",
                       "--warehouse", str(warehouse), "--format", "csv"]) == 0
    assert capsys.readouterr().out == "n\n1\n"
    assert query_main(["--warehouse", missing, "check"]) == 2
    assert missing in one_line_error(capsys)
    assert query_main(["check", "--warehouse", missing]) == 2
    assert missing in one_line_error(capsys)


def test_version(capsys):
    with pytest.raises(SystemExit) as exc:
        query_main(["--version"])
    assert exc.value.code == 0
    version = importlib.metadata.version("entropy-warehouse")
    assert capsys.readouterr().out == f"entropy-warehouse {version}\n"


# 3. Tables: no dtype row, one line per row --------------------------------------------------

def test_table_has_no_dtype_row(warehouse, capsys):
    assert run(warehouse, "run", "head_summary") == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[1]
    assert "mean_diff" in header and "ci95_low_diff" in header
    assert not any(re.search(r"│\s*(f64|i64|str|---)\s*┆", line) for line in lines)
    n = expected(warehouse, "head_summary").height
    # top border, header, separator, one line per row, bottom border, row count
    assert len(lines) == n + 5


def test_table_cells_with_line_breaks_are_one_line(warehouse, capsys):
    assert run(warehouse, "sql", NESTED_SQL) == 0
    out = capsys.readouterr().out
    assert "p\\nq" in out and "p\nq" not in out
    assert len(out.splitlines()) == 6
    assert run(warehouse, "sql", NESTED_SQL, "--format", "csv") == 0
    assert '"p\nq"' in capsys.readouterr().out


def table_cells(warehouse, sql, capsys) -> list[str]:
    """The cells of the first row of ``sql``'s table output."""
    assert run(warehouse, "sql", sql) == 0
    row = capsys.readouterr().out.splitlines()[3]
    return [cell.strip() for cell in row.strip("│").split("┆")]


def test_table_floats_have_four_significant_digits_and_files_keep_all(warehouse, capsys):
    sql = ("select 0.0123456789::double as a, -0.0000123456789::double as b, "
           "2.3456789::double as c, 1234567.0::double as d")
    assert table_cells(warehouse, sql, capsys) == ["0.01235", "-0.00001235", "2.346", "1235000"]
    assert run(warehouse, "sql", sql, "--format", "csv") == 0
    assert capsys.readouterr().out.splitlines()[1] == \
        "0.0123456789,-0.0000123456789,2.3456789,1234567.0"


def test_table_float32_columns_have_four_significant_digits_too(warehouse, capsys):
    """DuckDB FLOAT (polars Float32) prints like DOUBLE, not as the float32 value's full
    decimal expansion (0.015850000083446503)."""
    sql = ("select 0.01585::float as a, -0.0000123456789::float as b, 2.3456789::float as c, "
           "null::float as d")
    assert table_cells(warehouse, sql, capsys) == ["0.01585", "-0.00001235", "2.346", "null"]


def test_head_summary_table_is_as_narrow_as_its_column_names(warehouse, capsys):
    assert run(warehouse, "run", "head_summary") == 0
    lines = capsys.readouterr().out.splitlines()
    names = [cell.strip() for cell in lines[1].strip("│").split("┆")]
    # every column is as wide as its name or its longest value, and floats take at most
    # 11 characters ("-0.00001235"), so the names set the width
    values = [max(len(cell.strip()) for cell in column)
              for column in zip(*(line.strip("│").split("┆") for line in lines[3:-2]),
                                strict=True)]
    assert all(v <= 11 for name, v in zip(names, values, strict=True)
               if name not in ("run_id", "kind")), values
    assert len(lines[1]) <= sum(max(len(n), v) + 3 for n, v in zip(names, values,
                                                                    strict=True)) + 1


# 4. Docs ------------------------------------------------------------------------------------

def test_readme_lists_every_saved_query():
    section = README.split("### `python -m queries`", 1)[1].split("\n### ", 1)[0]
    listed = set(re.findall(r"^\| `(\w+)` \|", section, flags=re.MULTILINE))
    assert set(saved_queries()) <= listed, set(saved_queries()) - listed


def _duckdb_shell() -> str:
    beside = Path(sys.executable).with_name("duckdb")
    exe = shutil.which("duckdb") or (str(beside) if beside.is_file() else None)
    if exe is None:
        pytest.skip("duckdb shell not installed")
    return exe


def test_views_sql_shell_example_works_outside_the_repository(warehouse, tmp_path):
    header = (REPO / "queries" / "sql" / "views.sql").read_text(encoding="utf-8").split("\n\n")[0]
    assert "python -m queries --warehouse /path/to/warehouse shell" in header
    example = re.search(r"duckdb -cmd \"(set variable warehouse = '/path/to/warehouse')\" "
                        r"\\\n--\s+-cmd \"\.read (/path/to/[\w-]+)/(queries/sql/views\.sql)\"",
                        header)
    assert example, header
    out = subprocess.run(
        [_duckdb_shell(), "-list", "-noheader",
         "-cmd", example.group(1).replace("/path/to/warehouse", str(warehouse)),
         "-cmd", f".read {REPO / example.group(3)}", "-c", "select run_id from runs"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ioi"
    cli = subprocess.run(
        [sys.executable, "-m", "queries", "--warehouse", str(warehouse), "shell", "-c",
         "select run_id from runs"],
        capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert cli.returncode == 0, cli.stderr
    assert "ioi" in cli.stdout


def test_shell_prints_only_the_result(warehouse, capfd):
    assert query_main(["--warehouse", str(warehouse), "shell", "-c",
                       "select count(*) as n from runs"]) == 0
    out, err = capfd.readouterr()
    assert "Loading resources" not in out + err and "│" in out
