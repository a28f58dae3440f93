"""Open a DuckDB connection with the warehouse views defined."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import duckdb

from etl.errors import UserError


def views_sql() -> str:
    """The text of ``queries/views.sql``."""
    return resources.files("queries").joinpath("views.sql").read_text(encoding="utf-8")


def has_runs(warehouse: Path) -> bool:
    """True when ``warehouse`` holds at least one complete run (a manifest)."""
    return any(Path(warehouse).glob("runs/*/manifest.json"))


def connect(warehouse: Path | str) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB connection with ``runs``, ``tokens``, ``component_entropy`` and
    ``resid_entropy`` defined over ``warehouse``.

    Raises:
        UserError: the warehouse does not exist or holds no complete run.
    """
    root = Path(warehouse)
    if not root.is_dir():
        raise UserError(f"warehouse {str(root)!r} does not exist; write a run with "
                        "python -m etl.extract --warehouse DIR first")
    if not has_runs(root):
        raise UserError(f"warehouse {str(root)!r} has no complete run yet; write one with "
                        "python -m etl.extract --warehouse DIR")
    con = duckdb.connect()
    con.execute("set variable warehouse = $root", {"root": str(root.resolve())})
    try:
        con.execute(views_sql())
    except duckdb.Error as exc:
        raise UserError(f"could not open the views over {str(root)!r}: "
                        f"{str(exc).splitlines()[0]}") from exc
    return con
