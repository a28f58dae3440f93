"""A run's manifest, declared once: ``runs/run_id=<id>/manifest.json``, written last, when
the run is published. What the run was (configuration, model, data, code, timings) comes
from the extraction; what it holds (its shards, with row counts and sha256) from
publishing. The ``runs`` view shows these fields as columns (``queries/sql/views.sql``)."""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime
from pathlib import Path

from etl.lens.modes import MEASURES
from etl.warehouse.tables import STORED_TABLES

SCHEMA_VERSION = 4
"""The manifest's layout: version 2 lists the run's files under ``shards``; version 3 adds
the run's partial sums (``SUMS_TABLES``) to them; in version 4 those sums hold the
``suppression`` and ``cspa`` measures' columns too, and the copy-suppression pairs' sums
per sequence (``component_seq_sums``; ``etl.warehouse.sums``). Older
manifests are rewritten by ``python -m queries migrate`` (``etl.warehouse.migration``)."""
MANIFEST = "manifest.json"


@dataclass(frozen=True)
class Manifest:
    """Everything a complete run records about itself."""

    run_id: str
    created_at: str
    """When the extraction started (ISO 8601, UTC)."""
    completed_at: str
    """When its last batch was measured (ISO 8601, UTC)."""
    model: str
    """``--model`` as given: a hub id or a checkpoint directory."""
    dataset: str
    lens: str
    ablation: str
    measures: list
    """The measure groups the run holds (``etl.lens.effects.MEASURES``); the effect
    columns of the others are NULL."""
    n_layers: int
    n_heads: int
    d_vocab: int
    n_seqs: int
    seq_len: int
    n_tokens: int
    device: str
    """Where the batches were measured (``cpu``, ``cuda``)."""
    dtype: str
    seconds: float
    """From the mean pass (if any) to the last shard written."""
    tokens_per_s: float | None
    """Tokens measured in the attempt that published the run, per second; None when that
    attempt measured none (every batch was staged by an earlier one; ``timing`` says so)."""
    timing: dict
    """Busy and waiting seconds of the phases, and how the run was done (workers,
    pipelining, sequences per forward pass, batches resumed)."""
    config: dict
    """The ``ExtractConfig`` fields."""
    model_identity: dict
    """Architecture, sizes, weight fingerprint and tokenizer identity."""
    dataset_fingerprint: str
    """sha256 of the run's token ids and padding mask."""
    dataset_source: dict
    packages: dict
    git_commit: str | None
    host: str
    schema_version: int = SCHEMA_VERSION
    generation: str = ""
    """The publishing attempt whose files the run holds (part of every shard's name)."""
    shards: dict = field(default_factory=dict)
    """Per table, ``[{"file", "rows", "sha256"}, ...]``, relative to the run's partition."""
    n_component_rows: int = 0
    n_resid_rows: int = 0
    n_token_rows: int = 0

    def published(self, generation: str, shards: dict[str, list[dict]]) -> Manifest:
        """This manifest with the files of the published attempt ``generation``, and each
        table's row count."""
        rows = {t: sum(s["rows"] for s in entries) for t, entries in shards.items()}
        return replace(self, schema_version=SCHEMA_VERSION, generation=generation,
                       shards=shards, n_component_rows=rows.get("component_effects", 0),
                       n_resid_rows=rows.get("resid_entropy", 0),
                       n_token_rows=rows.get("tokens", 0))

    def to_json(self) -> dict:
        """The manifest as the JSON object written to disk."""
        return asdict(self)


MAX_MANIFEST_BYTES = 8 << 20
"""The largest manifest read (8 MiB: about 60,000 shards); DuckDB reads JSON objects of at
most 16 MB."""


def load_manifest(path: Path) -> dict:
    """The JSON object of the manifest file ``path``.

    Raises:
        OSError: it cannot be read (``FileNotFoundError`` when it is missing).
        ValueError: it is larger than ``MAX_MANIFEST_BYTES``, not JSON, or not a JSON
            object.
    """
    with path.open("rb") as f:
        text = f.read(MAX_MANIFEST_BYTES + 1)
    if len(text) > MAX_MANIFEST_BYTES:
        raise ValueError(f"it is larger than {MAX_MANIFEST_BYTES >> 20} MiB")
    try:
        data = json.loads(text.decode("utf-8"))
    except RecursionError:
        raise ValueError("it nests too deeply to be read") from None
    if not isinstance(data, dict):
        raise ValueError("it is not a JSON object")
    return data


_TYPES = {"str": (str,), "int": (int,), "float": (int, float), "dict": (dict,),
          "list": (list,),
          "str | None": (str, type(None)), "float | None": (int, float, type(None))}
"""The JSON types each annotation of ``Manifest`` admits (bool is never a number)."""
REQUIRED = ("run_id", "created_at", "model", "dataset", "lens", "ablation", "measures",
            "n_layers", "n_heads")
"""The fields every reader relies on; any other may be absent or null (not recorded)."""
_TIMES = ("created_at", "completed_at")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
RUN_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
"""A run id: a plain name, the value of its partitions' ``run_id=`` and of its charts'
folder."""
GENERATION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
"""A publishing attempt's name (``uuid4().hex[:8]`` when written): a plain name, because it
is part of every shard's file name."""
CONFIG_FIELDS = {"batch_size": (int, 1), "seed": (int, 0), "lens": (str, None),
                 "ioi_variant": (str, None)}
"""The ``config`` fields (``etl.config.ExtractConfig``) that publishing, the migration and
the queries read: name → (type, least value of a number). Each may be absent or null (an
earlier version did not record it)."""
_ISO_TIME = re.compile(r"^\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?"
                       r"(Z|[+-]\d{2}(:?\d{2})?)?$")


def manifest_problem(data: dict, run_id: str,
                     tables: tuple[str, ...] = STORED_TABLES) -> str | None:
    """What makes the manifest ``data`` of run ``run_id`` unusable, checked against
    ``Manifest``: a ``REQUIRED`` field missing, a field of another type, a negative count,
    another run's id, a ``generation`` that is not a plain name, a ``config`` field that is
    read and unusable (``CONFIG_FIELDS``), a time that is not ISO 8601, one of ``tables``
    without its ``shards`` list, or a shard entry that is malformed, names a file outside its
    partition folder or is listed twice; None when it is sound."""
    why = _fields_problem(data)
    if why:
        return why
    if data["run_id"] != run_id:
        return f"it is the manifest of run {shown(data['run_id'])}"
    if not RUN_ID_PATTERN.match(run_id):
        return f"its run id {shown(run_id)} is not a plain name (letters, digits, '.', '_', '-')"
    if data.get("generation") and not GENERATION.match(data["generation"]):
        return (f"its field 'generation' is {shown(data['generation'])}, not a plain name "
                "(letters, digits, '_' and '-')")
    if not all(m in MEASURES for m in data["measures"]) or "entropy" not in data["measures"]:
        return f"its field 'measures' is {shown(data['measures'])}, not groups of {MEASURES}"
    for name in _TIMES:
        if data.get(name) is not None and not _is_time(data[name]):
            return f"its field {name!r} is {shown(data[name])}, not an ISO 8601 time"
    return _config_problem(data.get("config") or {}) \
        or _shards_problem(data.get("shards") or {}, tables)


def _fields_problem(data: dict) -> str | None:
    """A ``REQUIRED`` field missing, a field not of its declared type, or a negative
    count."""
    for spec in fields(Manifest):
        value = data.get(spec.name)
        if value is None:
            if spec.name in REQUIRED:
                return f"its field {spec.name!r} is missing"
            continue
        if isinstance(value, bool) or not isinstance(value, _TYPES[spec.type]):
            return f"its field {spec.name!r} is {shown(value)}, not of type {spec.type}"
        if spec.type == "int" and value < 0:
            return f"its field {spec.name!r} is {value}, not a count (0 or more)"
    return None


def _config_problem(config: dict) -> str | None:
    """What makes the fields of ``config`` that are read (``CONFIG_FIELDS``) unusable."""
    for name, (kind, least) in CONFIG_FIELDS.items():
        value = config.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            return f"its config field {name!r} is {shown(value)}, not of type {kind.__name__}"
        if least is not None and value < least:
            return f"its config field {name!r} is {value}, not a whole number of at least {least}"
    return None


def _is_time(text: str) -> bool:
    """Whether ``text`` is a date and time as ISO 8601 writes it (what DuckDB reads too)."""
    if not _ISO_TIME.match(text):
        return False
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _shards_problem(shards: dict, tables: tuple[str, ...]) -> str | None:
    for table in tables:
        entries = shards.get(table)
        if not isinstance(entries, list):
            return f"it lists no {table} shards"
        names = set()
        for entry in entries:
            ok = isinstance(entry, dict) and isinstance(entry.get("rows"), int) \
                and not isinstance(entry["rows"], bool) and entry["rows"] >= 0 \
                and isinstance(entry.get("sha256"), str) and _SHA256.match(entry["sha256"])
            if not ok:
                return f"it lists a malformed {table} shard {shown(entry)}"
            name = entry.get("file")
            if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
                return f"it lists a bad {table} file name {shown(name)}"
            if entry["file"] in names:
                return f"it lists the {table} shard {entry['file']!r} twice"
            names.add(entry["file"])
    return None


def shown(value: object) -> str:
    """``value`` (a field of a manifest) as JSON, cut to 60 characters."""
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "..."
