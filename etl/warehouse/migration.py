"""``python -m queries migrate``: rewrite the manifests that earlier versions wrote, in
place, one atomic write per run, so that every other reader knows one form only.

What changed since those versions:

- **schema 1** manifests had no ``shards``: the run was every ``*.parquet`` file of its
  partition folders. Migrated, they list those files with their row counts and sha256
  (``schema_version`` 2), exactly as a run published today does.
- the lens modes ``seed`` and ``recomputed`` are now ``final-scale`` and
  ``recomputed-ln`` (``etl.lens.modes.LENS_ALIASES``).
- manifests name the ``measures`` a run holds; a run from before had the entropies only
  (its shards have no effect columns, which the views read as NULL).
- the component table, ``component_entropy`` while it held the entropies alone, is
  ``component_effects`` (``RENAMED_TABLES``): the run's files move to the new folder and
  its manifest lists them under the new name. The views keep ``component_entropy`` as
  another name of the same rows.
- runs are published with their partial sums (``etl.warehouse.sums``; manifest schema 3),
  which the saved summaries read. Migrated, a run gets them from its rows, exactly as a
  publish sums them.
- the partial sums have columns for the ``suppression`` and ``cspa`` measures (manifest
  schema 4): a
  run's sums are written again from its rows (the measures it did not take sum to NULL),
  under a new name, and the earlier file is deleted once the manifest lists the new one;
  the same for a schema-4 run without the per-sequence sums (``component_seq_sums``, which
  the copy-suppression shares' intervals read): all its sums are written again, those too.

Until it is migrated, such a run is left out of the views with a warning that says so.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from etl.errors import UserError
from etl.lens.modes import LENS_ALIASES
from etl.warehouse.files import sha256_of, write_json_atomically
from etl.warehouse.manifest import SCHEMA_VERSION, load_manifest, manifest_problem
from etl.warehouse.storage import make_dirs, read_parquet_metadata, remove_empty_dir, replace
from etl.warehouse.sums import write_sums
from etl.warehouse.tables import SUMS_TABLES, TABLES

if TYPE_CHECKING:
    from etl.warehouse.layout import Warehouse

MIGRATE = "python -m queries migrate"
"""The command that rewrites them."""

RENAMED_TABLES = {"component_entropy": "component_effects"}
"""Tables an earlier version wrote under another name: that name → today's."""

SCHEMA_1_TABLES = {"component_entropy": "n_component_rows", "resid_entropy": "n_resid_rows",
                   "tokens": "n_token_rows"}
"""The tables as schema 1 named them → the manifest field that counts their rows."""


def outdated(data: dict) -> str | None:
    """Why the manifest ``data`` is in a form an earlier version wrote (and must be
    migrated before it is read), or None."""
    found = []
    if "shards" not in data:
        found.append(f"manifest schema {data.get('schema_version', 1)}")
    if data.get("lens") in LENS_ALIASES:
        found.append(f"lens name {data['lens']!r}")
    if "measures" not in data:
        found.append("no measures listed")
    shards = data.get("shards")
    found += [f"table {old}" for old in RENAMED_TABLES
              if isinstance(shards, dict) and old in shards]
    if not isinstance(shards, dict) or not all(t in shards for t in SUMS_TABLES):
        found.append("no partial sums")
    elif _older(data):
        found.append(f"partial sums of schema {data['schema_version']}")
    if not found:
        return None
    return f"written by an earlier version ({', '.join(found)})"


def _older(data: dict) -> bool:
    """Whether ``data`` records a schema older than ``SCHEMA_VERSION`` (or none)."""
    version = data.get("schema_version", 1)
    return not isinstance(version, int) or version < SCHEMA_VERSION


@dataclass(frozen=True)
class Migrated:
    """One run whose manifest was rewritten, and what changed."""

    run_id: str
    changes: tuple[str, ...]

    def __str__(self) -> str:
        return f"migrated run {self.run_id}: {'; '.join(self.changes)}"


def _list_shards(warehouse: Warehouse, run_id: str) -> dict[str, list[dict]]:
    """Every ``*.parquet`` file of the run's partitions, as a manifest lists its shards (under
    the tables' names of schema 1)."""
    shards = {}
    for table in SCHEMA_1_TABLES:
        paths = sorted(warehouse.partition(table, run_id).glob("*.parquet"))
        shards[table] = [{"file": p.name, "rows": read_parquet_metadata(p).num_rows,
                          "sha256": sha256_of(p)} for p in paths]
    return shards


def migrated(warehouse: Warehouse, run_id: str, data: dict) -> tuple[dict, list[str]]:
    """The manifest ``data`` of ``run_id`` in today's form but for its tables' names
    (``moved``), and what changed."""
    data, changes = dict(data), []
    if "shards" not in data:
        data["shards"] = _list_shards(warehouse, run_id)
        n_files = sum(len(v) for v in data["shards"].values())
        changes.append(f"schema {data.get('schema_version', 1)} → {SCHEMA_VERSION} "
                       f"({n_files} files listed with their rows and sha256)")
        data["schema_version"] = SCHEMA_VERSION
        for table, key in SCHEMA_1_TABLES.items():
            data[key] = sum(s["rows"] for s in data["shards"][table])
    old = data.get("lens")
    if old in LENS_ALIASES:
        data["lens"] = LENS_ALIASES[old]
        if isinstance(data.get("config"), dict):
            data["config"] = dict(data["config"], lens=data["lens"])
        changes.append(f"lens {old!r} → {data['lens']!r}")
    if "measures" not in data:
        data["measures"] = ["entropy"]
        changes.append("measures: entropy (the only group measured then)")
    return data, changes


def moved(warehouse: Warehouse, run_id: str, data: dict) -> tuple[dict, list[str]]:
    """Move the files of ``run_id``'s renamed tables (``RENAMED_TABLES``) that ``data`` lists
    (plain names in the run's own partitions: ``migration_problem``) to their new partition;
    returns ``data`` listing them under the new name, and what changed. A file already moved
    (a migration stopped half-way) is left where it is."""
    if not isinstance(data.get("shards"), dict):
        return data, []
    data, changes = dict(data), []
    shards = dict(data["shards"])
    for old, new in RENAMED_TABLES.items():
        if old not in shards:
            continue
        entries = shards.pop(old)
        source, target = warehouse.partition(old, run_id), warehouse.partition(new, run_id)
        make_dirs(target)
        for entry in entries:
            if (source / entry["file"]).exists():
                replace(source / entry["file"], target / entry["file"])
        remove_empty_dir(source)
        remove_empty_dir(source.parent)  # the old table's folder, once its last run moved
        shards[new] = entries
        changes.append(f"table {old} → {new} (its files moved)")
    data["shards"] = shards
    return data, changes


def summed(warehouse: Warehouse, run_id: str, data: dict) -> tuple[dict, list[str]]:
    """Write the partial sums of ``run_id`` from the files ``data`` lists (once its tables
    have today's names) into its partitions; returns ``data`` listing them, and what
    changed."""
    shards = data.get("shards")
    if not isinstance(shards, dict) or not all(t in shards for t in TABLES) \
            or (all(t in shards for t in SUMS_TABLES) and not _older(data)):
        return data, []
    files = {table: [str(warehouse.shard_path(table, run_id, s["file"])) for s in shards[table]]
             for table in TABLES}
    config = data.get("config") or {}
    sums = write_sums(files, config.get("batch_size"),
                      lambda table: warehouse.partition(table, run_id),
                      _generation(data), warehouse.filesystem)
    rows = ", ".join(f"{t} {v[0]['rows']:,} rows" for t, v in sums.items())
    return dict(data, shards=shards | sums, schema_version=SCHEMA_VERSION), [
        f"partial sums written ({rows})"]


def _generation(data: dict) -> str:
    """What names the sums files of a migrated run (``sums-<it>.parquet``): its generation
    and the schema they are written in, never the name of the sums it had."""
    return f"{data.get('generation') or 'migrated'}-v{SCHEMA_VERSION}"


def _remove_unlisted_sums(warehouse: Warehouse, run_id: str, data: dict) -> None:
    """Delete the sums files in ``run_id``'s partitions that ``data`` does not list (those
    its migration replaced)."""
    for table in SUMS_TABLES:
        listed = {s["file"] for s in data["shards"][table]}
        for path in warehouse.partition(table, run_id).glob("sums-*.parquet"):
            if path.name not in listed:
                path.unlink()


def migration_problem(warehouse: Warehouse, run_id: str, data: dict) -> str | None:
    """Why the manifest ``data`` that an earlier version wrote for ``run_id`` cannot be
    migrated, or None: checked as today's ``Manifest`` once migrated (``manifest_problem``;
    its partial sums aside), and every file the migration reads, moves or writes must lie
    in the run's own partitions (``Warehouse.shard_path``)."""
    preview, _ = migrated(warehouse, run_id, data)
    shards = preview.get("shards")
    if isinstance(shards, dict):
        preview["shards"] = {RENAMED_TABLES.get(t, t): v for t, v in shards.items()}
    why = manifest_problem(preview, run_id, TABLES)
    if why:
        return why
    try:
        for table, entries in shards.items():
            new = RENAMED_TABLES.get(table, table)
            for entry in entries if new in TABLES else []:
                warehouse.shard_path(table, run_id, entry["file"])
                warehouse.shard_path(new, run_id, entry["file"])
        for table in SUMS_TABLES:
            warehouse.shard_path(table, run_id, f"sums-{_generation(preview)}.parquet")
    except ValueError as exc:
        return str(exc)
    return None


def _check_migratable(warehouse: Warehouse, run_id: str, data: dict) -> None:
    why = migration_problem(warehouse, run_id, data)
    if why:
        raise UserError(f"cannot migrate run {run_id!r}: {why}; nothing was migrated (mend or "
                        "remove that run's manifest, then run python -m queries migrate again)")


def migrate(warehouse: Warehouse) -> list[Migrated]:
    """Rewrite every manifest of ``warehouse`` that an earlier version wrote, each under
    its run's lock: its fields in one atomic write, then, if a table was renamed, its files
    moved and the manifest written again, then its partial sums written and the manifest
    written again (so a migration stopped at any point is taken up where it stopped by the
    next); returns the runs migrated (none: nothing was to do). Every manifest to migrate is
    checked first (``migration_problem``), and again under its lock: one that cannot be
    migrated stops the migration before anything is written.

    Raises:
        UserError: a run is being written by an extraction (its lock is held), or its
            manifest cannot be migrated.
        OSError: a manifest or shard cannot be read, or a manifest cannot be written.
    """
    todo = []
    for path in warehouse.manifest_paths():
        run_id = warehouse.run_id_of(path)
        try:
            data = load_manifest(path)
        except ValueError:
            continue  # unusable, not old: python -m queries check reports it
        if outdated(data) is not None:
            _check_migratable(warehouse, run_id, data)
            todo.append((path, run_id))
    return [_migrate_run(warehouse, path, run_id) for path, run_id in todo]


def _migrate_run(warehouse: Warehouse, path: Path, run_id: str) -> Migrated:
    """Migrate the run ``run_id`` whose manifest is ``path``, under its lock."""
    with warehouse.lock(run_id):
        data = load_manifest(path)
        _check_migratable(warehouse, run_id, data)
        data, changes = migrated(warehouse, run_id, data)
        if changes:
            write_json_atomically(path, data)
        data, renamed = moved(warehouse, run_id, data)
        if renamed:
            write_json_atomically(path, data)
        data, sums = summed(warehouse, run_id, data)
        if sums:
            write_json_atomically(path, data)
            _remove_unlisted_sums(warehouse, run_id, data)
    return Migrated(run_id, tuple(changes + renamed + sums))
