"""The warehouse: one ``Warehouse`` object (a folder or an ``s3://`` prefix and its layout),
the three tables' schemas and rows, the manifest, the run lock, the staging area and the
writer that fills it, the catalog of complete runs, and the migration of old runs.

``queries`` and ``analysis`` reach the extraction side only through this package (and
``etl.errors``)."""

from etl.warehouse.catalog import (
    Problem,
    Run,
    Shard,
    complete_runs,
    read_run,
    read_runs,
    run_problems,
    stray_files,
    sums_problems,
)
from etl.warehouse.layout import (
    DEFAULT_WAREHOUSE,
    RESERVED_RUN_IDS,
    Warehouse,
    validate_run_id,
)
from etl.warehouse.manifest import Manifest
from etl.warehouse.migration import migrate
from etl.warehouse.staging import StagingArea, shard_options
from etl.warehouse.storage import encode_parquet, seconds_from_env, storage_errors
from etl.warehouse.tables import (
    SCHEMAS,
    STORED_TABLES,
    SUMS_TABLES,
    TABLES,
    component_table,
    resid_table,
)
from etl.warehouse.token_rows import TokenRows
from etl.warehouse.writer import RunWriter

__all__ = [
    "DEFAULT_WAREHOUSE", "RESERVED_RUN_IDS", "SCHEMAS", "STORED_TABLES", "SUMS_TABLES",
    "TABLES", "Manifest", "Problem", "Run", "RunWriter", "Shard", "StagingArea", "TokenRows",
    "Warehouse", "complete_runs", "component_table", "encode_parquet", "migrate", "read_run",
    "read_runs", "resid_table", "run_problems", "seconds_from_env", "shard_options",
    "storage_errors",
    "stray_files", "sums_problems", "validate_run_id",
]
