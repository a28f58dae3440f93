"""What a query read: DuckDB's own profile of one run of it (``enable_profiling = 'json'``),
boiled down to the bytes read from storage and, per table of the warehouse, the Parquet
row groups its scans read out of those they could have."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from etl.warehouse import STORED_TABLES


@dataclass
class Reads:
    """What one query read."""

    bytes_read: int
    """Bytes DuckDB read from storage (its profile's ``io.total_bytes_read``)."""
    row_groups: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Table → (row groups scanned, row groups its files hold), over its scans."""


def _scans(node: dict) -> list[dict]:
    found = [node] if node.get("type") == "TABLE_SCAN" else []
    for child in node.get("children", []) + node.get("operator", []):
        found += _scans(child)
    return found


def _table_of(scan: dict) -> str | None:
    files = str(scan.get("extra_info", {}).get("Filename(s)", ""))
    return next((t for t in STORED_TABLES if f"/{t}/" in files), None)


def profiled(con: duckdb.DuckDBPyConnection, sql: str, params: dict | None = None) -> Reads:
    """Run ``sql`` with ``params`` on ``con`` once under DuckDB's profiler; what it read."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "profile.json"
        con.execute("set enable_profiling = 'json'")
        con.execute(f"set profiling_output = '{out}'")
        try:
            con.sql(sql, params=params or None).fetchall()
        finally:
            con.execute("set enable_profiling = 'no_output'")
        profile = json.loads(out.read_text())
    reads = Reads(bytes_read=int(profile.get("io", {}).get("total_bytes_read", 0)))
    for scan in _scans(profile):
        table = _table_of(scan)
        if table is not None:
            done, total = reads.row_groups.get(table, (0, 0))
            reads.row_groups[table] = (done + int(scan.get("row_groups_scanned", 0)),
                                       total + int(scan.get("total_row_groups_to_scan", 0)))
    return reads
