"""``RunWriter`` and the staging area on their own: staging, aborting (kept for a resume, or
discarded) and publishing, without a model."""

import json
import threading

import numpy as np
import pyarrow as pa
import pytest

from etl.warehouse import (
    SUMS_TABLES,
    TABLES,
    Manifest,
    RunWriter,
    Warehouse,
    component_table,
    resid_table,
)
from etl.warehouse.tables import TOKENS_SCHEMA

N_LAYERS, N_HEADS, SEQ_LEN = 2, 3, 4
PLAN = {"run_id": "r", "config_fingerprint": "abc", "n_batches": 2}
WHEN = "2026-01-01T00:00:00+00:00"


def _writer(root, run_id: str, workers: int, plan: dict | None = PLAN) -> RunWriter:
    return RunWriter(Warehouse(root).open_staging(run_id, plan), workers=workers)


def manifest_path(root, run_id: str):
    return Warehouse(root).manifest_path(run_id)


def bare_manifest(run_id: str) -> Manifest:
    """A manifest with every field of what was run left empty."""
    return Manifest(run_id, WHEN, WHEN, "", "", "", "", ["entropy"], 0, 0, 0, 0, 0, 0, "", "",
                    0.0, 0.0, {},
                    {}, {}, "", {}, {}, None, "")


def _batch(writer: RunWriter, batch: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed + batch)
    n_tok = SEQ_LEN
    seqs, positions = np.full(n_tok, batch), np.arange(n_tok)
    diff = rng.normal(size=(n_tok, N_LAYERS, N_HEADS + 1)).astype(np.float32)
    marginal = rng.normal(size=(n_tok, N_LAYERS, N_HEADS + 1)).astype(np.float32)
    resid = rng.normal(size=(n_tok, 2 * N_LAYERS + 1)).astype(np.float32)
    writer.write("component_effects", component_table(diff, marginal, seqs, positions), batch)
    writer.write("resid_entropy", resid_table(resid, seqs, positions), batch)
    known = {"seq": pa.array(seqs, pa.int32()), "position": pa.array(positions, pa.int32()),
             "token_id": pa.array(positions, pa.int32())}
    tokens = pa.Table.from_arrays([known.get(f.name, pa.nulls(n_tok, f.type))
                                   for f in TOKENS_SCHEMA], schema=TOKENS_SCHEMA)
    writer.write("tokens", tokens, batch)


def _staged(root) -> list[str]:
    return sorted(p.relative_to(root / "_staging").as_posix()
                  for p in (root / "_staging").rglob("*.parquet"))


def test_abort_keeps_the_staged_batches_for_a_resume(tmp_path):
    writer = _writer(tmp_path, "r", workers=2)
    _batch(writer, 0)
    writer.abort()
    assert len(_staged(tmp_path)) == 3  # every table's shard of batch 0
    assert not manifest_path(tmp_path, "r").exists()
    again = _writer(tmp_path, "r", workers=2)
    assert again.staging.done_batches == {0}
    _batch(again, 1)
    again.close()
    again.staging.publish(bare_manifest("r"), n_batches=2)
    manifest = json.loads(manifest_path(tmp_path, "r").read_text())
    assert {len(manifest["shards"][t]) for t in TABLES} == {2}
    assert {len(manifest["shards"][t]) for t in SUMS_TABLES} == {1}
    assert not (tmp_path / "_staging" / "r").exists()


def test_abort_without_keep_discards_the_staging_folder(tmp_path):
    writer = _writer(tmp_path, "r", workers=2)
    _batch(writer, 0)
    writer.abort(keep=False)
    assert not (tmp_path / "_staging" / "r").exists()
    assert _writer(tmp_path, "r", workers=2).staging.done_batches == set()


def test_abort_drops_the_queued_shards_errors_and_publishes_nothing(tmp_path, monkeypatch):
    writer = _writer(tmp_path, "r", workers=8)  # room for 16 queued shards

    release = threading.Event()

    def failing(*args, **kwargs):
        release.wait(10)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(writer, "_write_file", failing)
    _batch(writer, 0)  # three shards queued, none finished yet
    release.set()
    writer.abort()  # the shards' own errors are not raised here: the run's error is
    assert _staged(tmp_path) == []
    assert not manifest_path(tmp_path, "r").exists()
    assert not (tmp_path / "runs").exists()


def test_a_failed_shard_fails_the_flush(tmp_path, monkeypatch):
    writer = _writer(tmp_path, "r", workers=8)

    release = threading.Event()

    def failing(*args, **kwargs):
        release.wait(10)
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(writer, "_write_file", failing)
    _batch(writer, 0)
    release.set()
    with pytest.raises(OSError, match="Input/output error"):
        writer.flush()
    writer.abort()
    assert not manifest_path(tmp_path, "r").exists()
