"""What a query may ask of the machine, and input that used to answer wrongly: the timeout
(``--timeout``, ``timeout=``), DuckDB's memory and spill limits, the declared ranges of the
saved queries' numeric parameters, ``--max-rows`` beyond its maximum, control characters in
table output, and a saved query that picks a component from a run holding no rows. Each ends
in one line and exit code 2, or in the correct result."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import polars as pl
import pyarrow.parquet as pq
import pytest

from analysis.api import Warehouse as ApiWarehouse
from etl.errors import UserError
from etl.warehouse.files import sha256_of
from queries import commands
from queries.cli import MAX_ROWS
from queries.cli import main as query_main
from queries.limits import GRACE_S, MEMORY_ENV, SPILL_ENV, TIMEOUT_ENV
from queries.saved import parse_sql_file, saved_queries

ENDLESS = ("with recursive t(n) as (select 1 union all select n + 1 from t) "
           "select count(*) from t")
"""A query that never ends by itself."""
SLOW_SECONDS = 5.0 + GRACE_S
"""Wall time a 1 s timeout may take in all, the views' opening included."""


@pytest.fixture(scope="module")
def warehouse(ioi_warehouse):
    return ioi_warehouse


def run(root, *argv) -> int:
    return query_main(["--warehouse", str(root), *argv])


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: "), captured
    assert captured.err.count("\n") == 1, captured.err
    return captured.err.removeprefix("error: ").rstrip("\n")


def duckdb_shows(setting: str, value: str) -> str:
    """How DuckDB shows ``setting`` once set to ``value`` (``'50%'`` → ``'11.7 GiB'``)."""
    con = duckdb.connect()
    con.execute(f"set {setting} = '{value}'")
    return con.sql(f"select current_setting('{setting}')").fetchall()[0][0]


# 6. The timeout ----------------------------------------------------------------------------

def test_sql_timeout_interrupts_an_endless_query(warehouse, capsys):
    started = time.monotonic()
    assert run(warehouse, "sql", ENDLESS, "--timeout", "1") == 2
    assert time.monotonic() - started < SLOW_SECONDS
    assert one_line_error(capsys) == "query interrupted after 1 s (--timeout)"


def test_run_timeout_interrupts_a_saved_query(warehouse, capsys, monkeypatch):
    endless = parse_sql_file("endless", f"-- endless: never ends.\n{ENDLESS}\n")
    monkeypatch.setattr(commands, "get_query", lambda name: endless)
    started = time.monotonic()
    assert run(warehouse, "run", "endless", "--timeout", "1.5", "--format", "csv") == 2
    assert time.monotonic() - started < SLOW_SECONDS + 0.5
    assert one_line_error(capsys) == "query interrupted after 1.5 s (--timeout)"


def test_the_timeout_comes_from_the_environment(warehouse, capsys, monkeypatch):
    monkeypatch.setenv(TIMEOUT_ENV, "1")
    assert run(warehouse, "sql", ENDLESS) == 2
    assert one_line_error(capsys) == "query interrupted after 1 s (--timeout)"


def test_python_timeout_interrupts_and_the_warehouse_still_answers(warehouse):
    wh = ApiWarehouse(warehouse, timeout=1)
    started = time.monotonic()
    with pytest.raises(UserError, match=r"^query interrupted after 1 s \(timeout=\)$"):
        wh.sql(ENDLESS)
    assert time.monotonic() - started < SLOW_SECONDS
    assert wh.sql("select count(*) as n from tokens")["n"][0] == 88
    assert wh.query("top_heads", k=2).height == 2


def test_a_query_deaf_to_the_interrupt_still_ends_at_the_timeout(warehouse):
    """DuckDB checks for an interrupt between vectors; one value built in one step (a 1 GB
    string) does not see it, so the command stops waiting for it ``GRACE_S`` later."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "queries", "--warehouse", str(warehouse), "sql", "--timeout",
         "1", "select length(repeat('x', 1000000000)) as n"],
        capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (
        2, "", "error: query interrupted after 1 s (--timeout)\n")
    assert time.monotonic() - started < SLOW_SECONDS + 5  # the interpreter's start included


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--timeout", "0", "argument --timeout: '0' is not a number of seconds above 0 and at "
                       "most a week (604800)"),
    ("--timeout", "nan", "argument --timeout: 'nan' is not a number of seconds above 0 and "
                         "at most a week (604800)"),
    ("--timeout", "1e99", "argument --timeout: '1e99' is not a number of seconds above 0 "
                          "and at most a week (604800)"),
    ("--memory-limit", "5", "argument --memory-limit: takes a size such as 4GB, 512MiB or "
                            "50% (of the machine's memory), not '5'"),
    ("--memory-limit", "0GB", "argument --memory-limit: takes a size such as 4GB, 512MiB or "
                              "50% (of the machine's memory), not '0GB'"),
    ("--memory-limit", "150%", "argument --memory-limit: takes a size such as 4GB, 512MiB "
                               "or 50% (of the machine's memory), not '150%'"),
    ("--spill-limit", "50%", "argument --spill-limit: takes a size such as 10GB or 512MiB, "
                             "not '50%'"),
])
def test_a_bad_limit_is_one_line(warehouse, capsys, flag, value, message):
    assert run(warehouse, "sql", "select 1", flag, value) == 2
    assert one_line_error(capsys) == f"{message} (see python -m queries sql --help)"


@pytest.mark.parametrize(("name", "value", "message"), [
    (TIMEOUT_ENV, "-3", f"{TIMEOUT_ENV}='-3' is not a positive number of seconds"),
    (MEMORY_ENV, "lots", f"{MEMORY_ENV} takes a size such as 4GB, 512MiB or 50% (of the "
                         "machine's memory), not 'lots'"),
    (SPILL_ENV, "1 parsec", f"{SPILL_ENV} takes a size such as 10GB or 512MiB, not "
                            "'1 parsec'"),
])
def test_a_bad_limit_in_the_environment_is_one_line(warehouse, capsys, monkeypatch, name,
                                                    value, message):
    monkeypatch.setenv(name, value)
    assert run(warehouse, "sql", "select 1") == 2
    assert one_line_error(capsys) == message


def test_a_bad_python_limit_is_an_error(warehouse):
    with pytest.raises(UserError, match=r"^timeout= takes seconds above 0 and at most "
                                        r"604800 \(a week\), not -1$"):
        ApiWarehouse(warehouse, timeout=-1)
    with pytest.raises(UserError, match=r"^memory_limit= takes a size such as 4GB"):
        ApiWarehouse(warehouse, memory_limit="4 bananas")


# 6. Memory and spill limits -----------------------------------------------------------------

SETTINGS = ("select current_setting('memory_limit') as memory, "
            "current_setting('max_temp_directory_size') as spill")


def settings(root, capsys, *argv) -> tuple[str, str]:
    assert run(root, "sql", SETTINGS, "--format", "csv", *argv) == 0
    memory, spill = capsys.readouterr().out.splitlines()[1].split(",")
    return memory, spill


def test_the_default_limits_are_half_the_memory_and_a_bounded_spill(warehouse, capsys):
    memory, spill = settings(warehouse, capsys)
    assert memory == duckdb_shows("memory_limit", "50%")
    number, unit = spill.split(" ")
    assert unit in ("KiB", "MiB", "GiB") and (unit != "GiB" or float(number) <= 16.0), spill


def test_the_limits_come_from_the_flags_and_the_environment(warehouse, capsys, monkeypatch):
    assert settings(warehouse, capsys, "--memory-limit", "300MB", "--spill-limit", "2GB") == (
        duckdb_shows("memory_limit", "300MB"), duckdb_shows("max_temp_directory_size", "2GB"))
    monkeypatch.setenv(MEMORY_ENV, "25%")
    monkeypatch.setenv(SPILL_ENV, "1GiB")
    assert settings(warehouse, capsys) == (duckdb_shows("memory_limit", "25%"), "1.0 GiB")
    assert settings(warehouse, capsys, "--memory-limit", "1GB") == (
        duckdb_shows("memory_limit", "1GB"), "1.0 GiB")


def test_python_limits_are_set_on_its_connection(warehouse):
    wh = ApiWarehouse(warehouse, memory_limit="400MB", spill_limit="3GB")
    assert wh.sql(SETTINGS).row(0) == (duckdb_shows("memory_limit", "400MB"),
                                       duckdb_shows("max_temp_directory_size", "3GB"))


def test_a_query_over_the_memory_limit_is_one_line(warehouse, capsys):
    assert run(warehouse, "sql", "select list(repeat('x', 1000000)) as l from range(100000)",
               "--memory-limit", "50MB") == 2
    message = one_line_error(capsys)
    assert message.startswith("the query needs more than the memory limit (47.6 MiB): "
                              "failed to allocate data of size "), message
    assert message.endswith(f"; raise --memory-limit (or {MEMORY_ENV})"), message


def test_a_query_over_the_spill_limit_is_one_line(warehouse, capsys):
    assert run(warehouse, "sql", "select count(*) from (select * from range(20000000) "
               "order by hash(range))", "--memory-limit", "60MB", "--spill-limit", "20MB") == 2
    message = one_line_error(capsys)
    assert message.startswith("the query needs more than the spill limit (19.0 MiB): "
                              "failed to offload data block of size "), message
    assert message.endswith(f"; raise --spill-limit (or {SPILL_ENV})"), message


def test_python_over_the_memory_limit_is_one_line(warehouse):
    wh = ApiWarehouse(warehouse, memory_limit="50MB")
    with pytest.raises(UserError, match=r"^the query needs more than the memory limit "
                                        r"\(47\.6 MiB\): .*; raise memory_limit= \(or "):
        wh.sql("select list(repeat('x', 1000000)) as l from range(100000)")


# 7. The numeric parameters of saved queries take their declared range -----------------------

def test_every_numeric_parameter_of_every_saved_query_declares_its_range():
    numeric = [(name, p) for name, query in saved_queries().items() for p in query.params
               if isinstance(p.default, int | float)]
    assert {(name, p.name) for name, p in numeric} >= {
        ("calibration", "n_bins"), ("calibration_curve", "top_k"), ("top_heads", "k"),
        ("token_drilldown", "context"), ("component_tokens", "k")}
    for name, param in numeric:
        assert param.low is not None and param.high is not None, (name, param.name)
        assert param.low <= param.default <= param.high, (name, param.name)


def test_a_numeric_parameter_without_a_range_is_refused_when_read():
    with pytest.raises(ValueError, match=r"numeric parameter k needs a range"):
        parse_sql_file("q", "-- q: rows.\n-- @param k 10 how many\nselect $k\n")
    with pytest.raises(ValueError, match=r"numeric parameter k needs a range"):
        parse_sql_file("q", "-- q: rows.\n-- @param k 10 [1..5] how many\nselect $k\n")
    with pytest.raises(ValueError, match=r"parameter m takes text; only numbers"):
        parse_sql_file("q", "-- q: rows.\n-- @param m 'a' [1..5] which\nselect $m\n")


OUT_OF_RANGE = [
    ("calibration_curve", "n_bins", "100000000", "1 to 10000"),
    ("calibration", "n_bins", "0", "1 to 10000"),
    ("calibration", "top_k", "4", "1 to 3"),
    ("top_heads", "k", "-1", "1 to 10000"),
    ("head_distribution", "k", "-3", "1 to 10000"),
    ("token_drilldown", "k", "-1", "1 to 100000"),
    ("token_drilldown", "k", "-3", "1 to 100000"),
    ("token_drilldown", "context", "-5", "0 to 1000"),
    ("component_tokens", "context", "-1", "0 to 1000"),
    ("component_tokens", "k", "null", "1 to 1000"),
    ("top_heads", "k", "99999999999999999999999", "1 to 10000"),
]


@pytest.mark.parametrize(("name", "param", "value", "bounds"), OUT_OF_RANGE)
def test_a_parameter_outside_its_range_is_one_line(warehouse, capsys, name, param, value,
                                                   bounds):
    assert run(warehouse, "run", name, "--param", f"{param}={value}") == 2
    assert one_line_error(capsys) == (f"parameter {param} takes a whole number from "
                                      f"{bounds}, not {value!r}")


def test_the_ends_of_a_range_run(warehouse, capsys):
    assert run(warehouse, "run", "token_drilldown", "--param", "k=1", "--param", "context=0",
               "--format", "csv") == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and ',"",' in lines[1]  # one row, no context
    assert run(warehouse, "run", "calibration", "--param", "n_bins=10000", "--param",
               "top_k=3", "--format", "csv") == 0
    assert capsys.readouterr().out.count("\n") == 11  # header and one row per component


def test_python_parameters_take_their_range_too(warehouse):
    wh = ApiWarehouse(warehouse)
    with pytest.raises(UserError, match=r"^parameter k takes a whole number from 1 to "
                                        r"10000, not '-1'$"):
        wh.query("top_heads", k=-1)
    with pytest.raises(UserError, match=r"^parameter context takes a whole number from 0 "
                                        r"to 1000, not 'null'$"):
        wh.query("token_drilldown", context=None)


# 8. --max-rows beyond its maximum ------------------------------------------------------------

@pytest.mark.parametrize("value", ["99999999999999999999999", str(MAX_ROWS + 1), "0"])
def test_max_rows_beyond_its_range_is_one_line(warehouse, capsys, value):
    assert run(warehouse, "sql", "select 1", "--max-rows", value) == 2
    assert one_line_error(capsys) == (
        f"argument --max-rows: {value!r} is not a whole number from 1 to {MAX_ROWS:,} (write "
        "more rows with --output FILE) (see python -m queries sql --help)")
    assert run(warehouse, "sql", "select 1 as x", "--max-rows", str(MAX_ROWS)) == 0
    assert "(1 rows)" in capsys.readouterr().out


# 10. Control characters: escaped in tables, kept in files -----------------------------------

RAW = "a\u202e\x1b[31mred\x07\t\x00\x7f\x85\u2028\u2066z"
"""A value with a bidi override, a terminal colour sequence, BEL, tab, NUL, DEL, NEL, a line
separator and an isolate."""
ESCAPED = r"a\u202e\x1b[31mred\x07\t\x00\x7f\x85\u2028\u2066z"
RAW_SQL = ("select " + " || ".join(f"chr({ord(c)})" for c in RAW) + " as v, ["
           + " || ".join(f"chr({ord(c)})" for c in RAW[:4]) + "] as l, 'fine' as \"h"
           + "\x1b[1m\"")


def test_a_table_shows_control_characters_escaped(warehouse, capsys):
    assert run(warehouse, "sql", RAW_SQL) == 0
    out = capsys.readouterr().out
    assert ESCAPED in out and r'["a\u202e\x1b["]' in out and r"h\x1b[1m" in out, out
    shown = out.replace("\n", "")
    assert not any(c in shown for c in RAW if c not in "a[31mredz"), repr(out)


def test_a_table_file_shows_them_escaped_too(warehouse, tmp_path):
    assert run(warehouse, "sql", RAW_SQL, "--output", str(tmp_path / "t.txt")) == 0
    text = (tmp_path / "t.txt").read_text(encoding="utf-8")
    assert ESCAPED in text and "\x1b" not in text and "\u202e" not in text


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_csv_json_and_parquet_keep_the_characters(warehouse, tmp_path, fmt):
    out = tmp_path / f"v.{fmt}"
    assert run(warehouse, "sql", RAW_SQL, "--output", str(out)) == 0
    if fmt == "parquet":
        frame = pl.read_parquet(out)
        assert frame["v"][0] == RAW and frame["l"][0].to_list() == [RAW[:4]]
        assert frame.columns[2] == "h\x1b[1m"
    elif fmt == "json":
        assert json.loads(out.read_text(encoding="utf-8"))[0]["v"] == RAW
    else:
        assert RAW in out.read_text(encoding="utf-8")


def test_csv_on_stdout_keeps_the_characters(warehouse, capsys):
    assert run(warehouse, "sql", RAW_SQL, "--format", "csv") == 0
    assert RAW in capsys.readouterr().out


# 14. A run that holds no rows ----------------------------------------------------------------

def empty_run(root: Path, run_id: str) -> None:
    """Rewrite run ``run_id`` of the warehouse ``root`` as a run that holds no rows: each
    shard a zero-row Parquet file of its own schema, the manifest's row counts and sha256
    updated to match (``python -m queries check`` passes it)."""
    manifest_path = root / "runs" / f"run_id={run_id}" / "manifest.json"
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    for table, entries in manifest["shards"].items():
        for entry in entries:
            path = root / table / f"run_id={run_id}" / entry["file"]
            pq.write_table(pq.read_schema(path).empty_table(), path)
            entry.update(rows=0, sha256=sha256_of(path))
    manifest.update(n_component_rows=0, n_resid_rows=0, n_token_rows=0, n_seqs=0,
                    n_tokens=0)
    manifest_path.write_text(json.dumps(manifest), encoding="utf-8")


@pytest.fixture(scope="module")
def empty_warehouse(warehouse, tmp_path_factory):
    root = tmp_path_factory.mktemp("empty") / "wh"
    shutil.copytree(warehouse, root)
    empty_run(root, "ioi")
    return root


def test_the_empty_run_is_sound(empty_warehouse, capsys):
    assert run(empty_warehouse, "check") == 0
    assert run(empty_warehouse, "run", "top_heads", "--format", "csv") == 0
    assert capsys.readouterr().out.endswith("6 passed, 0 failed\nrun_id,dataset,rank,layer,"
                                            "head,component,measure,n,mean,sd,ci95_low,"
                                            "ci95_high\n")


@pytest.mark.parametrize("name", ["calibration_curve", "token_drilldown"])
def test_picking_a_component_of_an_empty_run_says_it_holds_no_rows(empty_warehouse, capsys,
                                                                    name):
    assert run(empty_warehouse, "run", name) == 2
    assert one_line_error(capsys) == ("run 'ioi' holds no rows, so it has no component to "
                                      "choose; choose a run that has rows")
    assert run(empty_warehouse, "run", name, "--param", "component=0.1", "--format",
               "csv") == 0
    rows = pl.read_csv(capsys.readouterr().out.encode())
    if name == "calibration_curve":  # every bin of both curves, none holding a prediction
        assert rows.height == 2 * 50 and (rows["n"] == 0).all()
    else:
        assert rows.height == 0
