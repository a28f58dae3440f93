"""A saved query's parameters that name a run (``run_id``, ``run_a``, ``run_b``) or a
component (``component``) are checked against the warehouse before the query runs: a typo is
one line and exit code 2 naming what is valid, not an empty table. The check sits where a
bound saved query is run (``queries.db.Views.sql``), so ``queries run``, ``Warehouse.query``
and the charts all get it."""

import pytest

from analysis.api import Warehouse as ApiWarehouse
from etl.errors import UserError
from etl.warehouse import Warehouse
from queries.cli import main as query_main
from queries.db import Views
from queries.saved import get_query, saved_queries

SHAPE = ("(2 layers × 4 heads: 'L.H' with L in 0–1, H in 0–3, or 'L.mlp')")
"""What a component of the fixture's gpt2-tiny run may be."""


@pytest.fixture(scope="module")
def warehouse(ioi_warehouse):
    return ioi_warehouse


def run(warehouse, *args) -> int:
    return query_main([args[0], "--warehouse", str(warehouse), *args[1:]])


def one_line_error(capsys) -> str:
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("error: "), captured
    assert captured.err.count("\n") == 1, captured.err
    return captured.err.removeprefix("error: ").rstrip("\n")


RUN_CASES = [(name, param.name) for name, query in saved_queries().items()
             for param in query.params if param.name in ("run_id", "run_a", "run_b")]


@pytest.mark.parametrize(("name", "param"), RUN_CASES)
def test_a_run_that_is_not_in_the_warehouse_is_one_line(warehouse, capsys, name, param):
    assert run(warehouse, "run", name, "--param", f"{param}=nope") == 2
    assert one_line_error(capsys) == (f"{param} 'nope' is not a complete run in "
                                      f"{str(warehouse)!r} (runs: ioi)")


@pytest.mark.parametrize("name", ["token_drilldown", "calibration_curve"])
def test_a_component_the_run_does_not_have_is_one_line(warehouse, capsys, name):
    for component in ("1.4", "2.0", "2.mlp", "x", "1.2.3", "-1.0"):
        assert run(warehouse, "run", name, "--param", f"component={component}") == 2
        assert one_line_error(capsys) == f"component {component!r} is not in run 'ioi' {SHAPE}"
    for component, run_id in (("1.3", "ioi"), ("0.0", "null"), ("1.mlp", "null")):
        assert run(warehouse, "run", name, "--param", f"component={component}",
                   "--param", f"run_id={run_id}", "--format", "csv") == 0
        assert capsys.readouterr().out.count("\n") > 1


def test_the_python_api_checks_them_too(warehouse):
    wh = ApiWarehouse(warehouse)
    with pytest.raises(UserError, match=r"^run_id 'nope' is not a complete run in .*"
                                        r"\(runs: ioi\)$"):
        wh.query("top_heads", run_id="nope")
    with pytest.raises(UserError, match=r"^component '0\.4' is not in run 'ioi' \(2 layers"):
        wh.query("token_drilldown", run_id="ioi", component="0.4")
    assert wh.query("token_drilldown", component="0.3", k=3).height == 3


def test_charts_path_bind_then_views_sql_checks_them(warehouse):
    """``analysis.render`` runs ``views.sql(query.sql, query.bind(...))``."""
    views = Views(Warehouse(warehouse), read_only=True)
    query = get_query("calibration_curve")
    with pytest.raises(UserError, match=r"^component '9\.mlp' is not in run 'ioi'"):
        views.sql(query.sql, query.bind({"component": "9.mlp"}))
    with pytest.raises(UserError, match=r"^run_id 'r2' is not a complete run"):
        views.sql(query.sql, query.bind({"run_id": "r2"}))
    assert views.sql(query.sql, query.bind({"component": "1.mlp"})).height > 0
