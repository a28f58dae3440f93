"""A resume that finds every batch staged measures nothing: it records no rate (NULL, with
the reason in the manifest's ``timing``) and says so, instead of 0 tokens/s; a resume that
measures some batches records their rate."""

import json

from etl.extract import main as extract_main
from etl.warehouse import Warehouse
from etl.warehouse import storage as storage_module
from etl.warehouse.manifest import manifest_problem
from queries.db import connect

TEXT = "The warehouse keeps every number it is given, and the numbers keep coming. " * 40


def _extract(checkpoint, root, *args):
    return extract_main(["--model", str(checkpoint), "--warehouse", str(root), "--no-progress",
                         "--device", "cpu", "--dataset", "text", *args])


def _manifest(root, run_id):
    return json.loads((root / "runs" / f"run_id={run_id}" / "manifest.json").read_text())


def _stage_without_publishing(checkpoint, root, monkeypatch, args, run_id):
    """Run ``run_id`` until its publication fails on the sums (every batch staged)."""
    real = storage_module.encode_parquet

    def failing(table, **kwargs):
        if "n" in table.column_names:  # a sums table, written at publish
            raise OSError(28, "No space left on device")
        return real(table, **kwargs)

    monkeypatch.setattr(storage_module, "encode_parquet", failing)
    assert _extract(checkpoint, root, *args, "--run-id", run_id) == 2
    monkeypatch.undo()


def test_a_resume_with_every_batch_staged_records_no_rate(tiny_checkpoint, tmp_path,
                                                          monkeypatch, capsys):
    (tmp_path / "story.txt").write_text(TEXT)
    args = ["--data-files", str(tmp_path / "story.txt"), "--n-batches", "3",
            "--batch-size", "2", "--seq-len", "24"]
    root = tmp_path / "wh"
    _stage_without_publishing(tiny_checkpoint, root, monkeypatch, args, "resumed")
    capsys.readouterr()
    assert _extract(tiny_checkpoint, root, *args, "--run-id", "resumed") == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "tokens/s" not in out[0], out
    assert ("144 tokens (no batch was measured in this attempt: every batch was staged by an "
            "earlier one) -> ") in out[0]
    manifest = _manifest(root, "resumed")
    assert manifest["timing"]["batches_resumed"] == 3
    assert manifest["tokens_per_s"] is None
    assert manifest["timing"]["tokens_per_s_reason"] == (
        "no batch was measured in this attempt: every batch was staged by an earlier one")
    assert manifest_problem(manifest, "resumed") is None
    assert connect(Warehouse(root)).sql(
        "select tokens_per_s, typeof(tokens_per_s) from runs").fetchall() == [(None, "DOUBLE")]

    assert _extract(tiny_checkpoint, root, *args, "--run-id", "fresh") == 0
    fresh = _manifest(root, "fresh")
    assert fresh["tokens_per_s"] > 0 and "tokens_per_s_reason" not in fresh["timing"]
    rates = dict(connect(Warehouse(root)).sql(
        "select run_id, tokens_per_s from runs").fetchall())
    assert rates["resumed"] is None and rates["fresh"] == fresh["tokens_per_s"]
