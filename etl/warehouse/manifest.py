"""A run's manifest, declared once: ``runs/run_id=<id>/manifest.json``, written last, when
the run is published. What the run was (configuration, model, data, code, timings) comes
from the extraction; what it holds (its shards, with row counts and sha256) from
publishing. The ``runs`` view shows these fields as columns (``queries/sql/views.sql``)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

SCHEMA_VERSION = 2
"""The manifest's layout: version 2 lists the run's files under ``shards``. Older
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
    tokens_per_s: float
    """Tokens measured in the attempt that published the run, per second."""
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
                       shards=shards, n_component_rows=rows.get("component_entropy", 0),
                       n_resid_rows=rows.get("resid_entropy", 0),
                       n_token_rows=rows.get("tokens", 0))

    def to_json(self) -> dict:
        """The manifest as the JSON object written to disk."""
        return asdict(self)


def load_manifest(path: Path) -> dict:
    """The JSON object of the manifest file ``path``.

    Raises:
        OSError: it cannot be read (``FileNotFoundError`` when it is missing).
        ValueError: it is not JSON, or not a JSON object.
    """
    data = json.loads(path.read_text(encoding="utf-8"))
    if not isinstance(data, dict):
        raise ValueError("it is not a JSON object")
    return data
