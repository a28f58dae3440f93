"""The extraction loop: pipelined and sequential runs store the same rows; errors surface."""

import json
import threading
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from etl.extract import main as extract_main
from etl.lens.types import BatchMeasures
from etl.run.loop import LoopTiming, run_loop
from etl.sources.corpus import TokenSet, ioi_token_set
from etl.warehouse import RunWriter, Warehouse
from etl.warehouse import staging as staging_module
from etl.warehouse import storage as storage_module
from etl.warehouse.tables import component_table
from etl.warehouse.token_rows import TokenRows
from queries.db import connect

TEXT = "The warehouse keeps every number it is given, and the numbers keep coming. " * 40


@pytest.fixture(scope="module")
def text_glob(tmp_path_factory):
    folder = tmp_path_factory.mktemp("text")
    (folder / "story.txt").write_text(TEXT)
    return str(folder / "*.txt")


def _extract(checkpoint, root, *args):
    return extract_main(["--model", str(checkpoint), "--warehouse", str(root), "--no-progress",
                         "--device", "cpu", "--dataset", "text", *args])


def _rows(root, run_id):
    con = connect(Warehouse(root))
    out = {}
    for table in ("component_effects", "resid_entropy", "tokens"):
        out[table] = con.sql(f"select * exclude (run_id) from {table} where run_id = "
                             f"'{run_id}' order by all").fetchall()
    return out


@pytest.mark.parametrize("lens,ablation", [("final-scale", "zero"), ("recomputed-ln", "mean")])
def test_pipelined_and_sequential_loops_store_identical_shards(tiny_checkpoint, text_glob,
                                                               tmp_path, lens, ablation):
    common = ["--data-files", text_glob, "--n-batches", "3", "--batch-size", "2",
              "--seq-len", "24", "--lens", lens, "--ablation", ablation]
    assert _extract(tiny_checkpoint, tmp_path, *common, "--pipeline", "off",
                    "--run-id", "seq") == 0
    assert _extract(tiny_checkpoint, tmp_path, *common, "--pipeline", "on",
                    "--run-id", "pipe") == 0
    for table in ("component_effects", "resid_entropy", "tokens"):
        seq_files = sorted((tmp_path / table / "run_id=seq").glob("*.parquet"))
        pipe_files = sorted((tmp_path / table / "run_id=pipe").glob("*.parquet"))
        assert len(seq_files) == 3
        assert [p.name[-13:] for p in seq_files] == [p.name[-13:] for p in pipe_files]
        for a, b in zip(seq_files, pipe_files, strict=True):
            assert a.read_bytes() == b.read_bytes(), f"{table}/{a.name} differs"
    seq_rows, pipe_rows = _rows(tmp_path, "seq"), _rows(tmp_path, "pipe")
    assert seq_rows == pipe_rows
    assert len(seq_rows["component_effects"]) == 6 * 24 * 2 * 5  # seqs·positions·layers·comps


def test_forward_size_changes_shards_not_rows(tiny_checkpoint, text_glob, tmp_path):
    common = ["--data-files", text_glob, "--n-batches", "3", "--batch-size", "2",
              "--seq-len", "24"]
    assert _extract(tiny_checkpoint, tmp_path, *common, "--run-id", "by2") == 0
    assert _extract(tiny_checkpoint, tmp_path, *common, "--forward-tokens", "72",
                    "--pipeline", "on", "--run-id", "by3") == 0
    assert len(list((tmp_path / "tokens" / "run_id=by3").glob("*.parquet"))) == 2
    a, b = _rows(tmp_path, "by2"), _rows(tmp_path, "by3")
    assert a["tokens"] == b["tokens"]
    for table in ("component_effects", "resid_entropy"):
        # every measure (entropies and the default effects; NULL as NaN)
        first = 4 if table == "resid_entropy" else 5
        x = np.array([[np.nan if v is None else v for v in r[first:]] for r in a[table]],
                     dtype=float)
        y = np.array([[np.nan if v is None else v for v in r[first:]] for r in b[table]],
                     dtype=float)
        assert x.shape == y.shape and np.allclose(x, y, atol=1e-5, rtol=0, equal_nan=True)


def _fake_measures(n_tokens: int, value: float) -> BatchMeasures:
    return BatchMeasures(diff=torch.full((n_tokens, 2, 3), value),
                         marginal=torch.full((n_tokens, 2, 3), -value),
                         resid=torch.full((n_tokens, 5), value))


@pytest.mark.parametrize("pipelined", [False, True])
def test_loop_hands_every_batch_to_the_host_in_order(pipelined):
    seen = []

    def compute(start, stop, mark):
        mark()
        return _fake_measures(stop - start, float(start))

    def publish(start, stop, arrays):
        assert arrays["diff"].shape == (stop - start, 2, 3)
        assert np.all(arrays["diff"] == start) and np.all(arrays["marginal"] == -start)
        seen.append((start, stop, threading.current_thread().name))

    timing = LoopTiming()
    spans = [(i, i + 2) for i in range(0, 20, 2)]
    run_loop(spans, compute, publish, torch.device("cpu"), pipelined, timing)
    assert [(a, b) for a, b, _ in seen] == spans
    assert timing.batches == len(spans)
    threads = {name for _, _, name in seen}
    assert (threads == {threading.current_thread().name}) != pipelined


def test_back_pressure_bounds_the_batches_waiting_for_the_host():
    computed, published, most = [0], [0], [0]

    def compute(start, stop, mark):
        computed[0] += 1
        most[0] = max(most[0], computed[0] - published[0])
        mark()
        return _fake_measures(1, 0.0)

    def publish(start, stop, arrays):
        time.sleep(0.02)
        published[0] += 1

    timing = LoopTiming()
    run_loop([(i, i + 1) for i in range(12)], compute, publish, torch.device("cpu"), True,
             timing, depth=2)
    assert published[0] == 12
    assert most[0] <= 3  # `depth` waiting for the host, plus the one being computed
    assert timing.device_waited_on_host_s > 0.05


def test_a_host_error_stops_the_loop_and_is_raised():
    computed = []

    def compute(start, stop, mark):
        computed.append(start)
        mark()
        return _fake_measures(1, 0.0)

    def publish(start, stop, arrays):
        if start == 3:
            raise OSError("disk full while writing batch 3")

    with pytest.raises(OSError, match="batch 3"):
        run_loop([(i, i + 1) for i in range(50)], compute, publish, torch.device("cpu"),
                 True, LoopTiming(), depth=2)
    assert len(computed) <= 3 + 2 + 2  # stopped within `depth` batches of the failure


def test_a_device_error_cancels_queued_host_work():
    published = []

    def compute(start, stop, mark):
        if start == 4:
            raise RuntimeError("CUDA out of memory (simulated)")
        mark()
        return _fake_measures(1, 0.0)

    def publish(start, stop, arrays):
        time.sleep(0.05)
        published.append(start)

    with pytest.raises(RuntimeError, match="out of memory"):
        run_loop([(i, i + 1) for i in range(10)], compute, publish, torch.device("cpu"),
                 True, LoopTiming(), depth=2)
    assert published == sorted(published) and max(published) < 4


def test_a_failed_shard_write_fails_the_run_then_the_run_resumes(tiny_checkpoint, text_glob,
                                                                 tmp_path, monkeypatch, capsys):
    real = storage_module.encode_parquet
    calls = [0]

    def failing(table, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise OSError(28, "No space left on device")
        return real(table, **kwargs)

    args = ["--data-files", text_glob, "--n-batches", "3", "--batch-size", "2",
            "--seq-len", "24", "--pipeline", "on"]
    monkeypatch.setattr(storage_module, "encode_parquet", failing)
    assert _extract(tiny_checkpoint, tmp_path, *args, "--run-id", "doomed") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and "resume" in err[0]
    assert calls[0] >= 4
    assert not (tmp_path / "runs" / "run_id=doomed").exists()
    assert not (tmp_path / "component_effects" / "run_id=doomed").exists()
    staged = list((tmp_path / "_staging" / "doomed").rglob("*.parquet"))
    assert len(staged) >= 3  # what was written before the failure stays, for a resume
    monkeypatch.undo()
    assert _extract(tiny_checkpoint, tmp_path, *args, "--run-id", "doomed") == 0
    assert _extract(tiny_checkpoint, tmp_path, *args, "--run-id", "whole") == 0
    manifest = json.loads((tmp_path / "runs" / "run_id=doomed" / "manifest.json").read_text())
    assert manifest["timing"]["batches_resumed"] >= 1
    assert _rows(tmp_path, "doomed") == _rows(tmp_path, "whole")
    assert not (tmp_path / "_staging").exists()


def test_a_failed_write_of_the_sums_at_publish_publishes_nothing_and_resumes(
        tiny_checkpoint, text_glob, tmp_path, monkeypatch, capsys):
    real = storage_module.encode_parquet

    def failing(table, **kwargs):
        if "n" in table.column_names:  # a sums table, written at publish
            raise OSError(28, "No space left on device")
        return real(table, **kwargs)

    args = ["--data-files", text_glob, "--n-batches", "3", "--batch-size", "2",
            "--seq-len", "24"]
    monkeypatch.setattr(storage_module, "encode_parquet", failing)
    assert _extract(tiny_checkpoint, tmp_path, *args, "--run-id", "doomed") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "No space left on device" in err[0]
    assert not (tmp_path / "runs" / "run_id=doomed").exists()
    assert len(list((tmp_path / "_staging" / "doomed").rglob("part-*.parquet"))) == 9
    monkeypatch.undo()
    assert _extract(tiny_checkpoint, tmp_path, *args, "--run-id", "doomed") == 0
    assert _extract(tiny_checkpoint, tmp_path, *args, "--run-id", "whole") == 0
    manifest = json.loads((tmp_path / "runs" / "run_id=doomed" / "manifest.json").read_text())
    assert manifest["timing"]["batches_resumed"] == 3  # every batch staged, none measured again
    assert _rows(tmp_path, "doomed") == _rows(tmp_path, "whole")
    con = connect(Warehouse(tmp_path))
    sums = {run: con.sql(f"select * exclude (run_id) from component_sums where run_id = "
                         f"'{run}' order by all").fetchall() for run in ("doomed", "whole")}
    assert sums["doomed"] == sums["whole"] and sums["doomed"]
    assert not (tmp_path / "_staging").exists()


def test_writer_raises_a_failed_shard_at_the_next_write(tmp_path, monkeypatch):
    def failing(table, **kwargs):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(storage_module, "encode_parquet", failing)
    writer = RunWriter(Warehouse(tmp_path).open_staging("w"), workers=1)
    diff = np.zeros((4, 1, 2), np.float32)
    table = component_table(diff, diff, np.zeros(4), np.arange(4))
    with pytest.raises(OSError, match="Input/output"):
        for _ in range(10):  # a failure is reported by a later write, or else by flush
            writer.write("component_effects", table)
        writer.flush()
    writer.abort()


def test_shards_are_cut_into_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(staging_module, "ROW_GROUP_ROWS", 100)
    writer = RunWriter(Warehouse(tmp_path).open_staging("rg"), workers=2)
    diff = np.random.default_rng(0).random((25, 2, 5), dtype=np.float32)
    table = component_table(diff, diff, np.zeros(25), np.arange(25))
    writer.write("component_effects", table)
    writer.flush()
    (shard,) = (writer.staging.folder / "component_effects").glob("*.parquet")
    meta = pq.ParquetFile(shard).metadata
    # 125 rows a layer: a row group at each layer, and at most 100 rows each
    assert meta.num_rows == 250 and meta.num_row_groups == 4
    assert writer.busy_s > 0
    writer.abort()


def _tokens_reference(token_set, tokenizer, start, stop):
    """One row at a time, as plain Python: the oracle for ``TokenRows``."""
    rows = []
    for s in range(start, stop):
        for p in range(token_set.seq_len):
            tid = int(token_set.token_ids[s, p])
            has_next = (p + 1 < token_set.seq_len and not token_set.is_pad[s, p]
                        and not token_set.is_pad[s, p + 1])
            rows.append({
                "seq": s, "position": p, "token_id": tid,
                "token": tokenizer.decode([tid]), "is_bos": p == 0,
                "is_pad": bool(token_set.is_pad[s, p]),
                "role": token_set.roles.get((s, p)),
                "variant": None if token_set.variant is None else token_set.variant[s],
                "example": None if token_set.example is None else token_set.example[s],
                "next_token_id": int(token_set.token_ids[s, p + 1]) if has_next else None,
                "top1_prob": None, "top2_prob": None, "top3_prob": None, "target_rank": None,
                "final_scale": None, "resid_norm": None,
            })
    return rows


def test_token_rows_equal_a_row_by_row_reference(tokenizer):
    ioi = ioi_token_set(tokenizer, 7, 420, "both")
    ids = np.random.default_rng(1).integers(0, 50257, (5, 9))
    text = TokenSet(token_ids=ids, is_pad=np.zeros_like(ids, bool))
    for token_set, spans in ((ioi, [(0, 3), (3, 14), (13, 14)]), (text, [(0, 2), (2, 5)])):
        rows = TokenRows(token_set, tokenizer)
        for start, stop in spans:
            assert rows.table(start, stop).to_pylist() == _tokens_reference(
                token_set, tokenizer, start, stop)
    assert any(r["role"] == "S2" for r in TokenRows(ioi, tokenizer).table(0, 14).to_pylist())


def test_e2e_bench_reports_both_loops_and_checks_their_rows(tiny_checkpoint):
    from etl.bench.e2e import report, run_e2e

    r = run_e2e(str(tiny_checkpoint), "cpu", 64, seq_len=16, batch_size=2, sweep=(16,))
    assert r["tokens"] == 64 and r["seq_len"] == 16
    assert r["loops_store_identical_rows"] is True
    assert r["max_abs_err_vs_cpu_path"] < 1e-6
    for mode, run in r["runs"].items():
        assert run["pipelined"] == (mode == "on")
        assert run["rows"] == 64 * (2 * 5 + 2 * 2 + 1 + 1)  # components, residuals, tokens
        assert run["batches"] == 2 and run["tokens_per_s"] > 0 and run["forward_s"] > 0
    assert r["sweep"]["16"]["sequences_per_forward"] == 1 and r["sweep"]["16"]["batches"] == 4
    assert r["forward_floor"]["hooked_over_plain"] > 0
    text = report(r)
    assert "pipelined / sequential" in text and "identical rows: True" in text


def test_a_non_finite_measure_fails_the_run_naming_it(tiny_checkpoint, text_glob, tmp_path,
                                                      monkeypatch, capsys):
    import etl.run.steps as steps

    real = steps.measure_batch

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        out.marginal[5, 1, 2] = float("nan")
        return out

    monkeypatch.setattr(steps, "measure_batch", poisoned)
    code = _extract(tiny_checkpoint, tmp_path, "--data-files", text_glob, "--n-batches", "2",
                    "--batch-size", "2", "--seq-len", "24", "--run-id", "nan")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "entropy_marginal of head 1.2 at token 5" in err[0]
    assert not (tmp_path / "runs" / "run_id=nan").exists()


def test_token_ids_beyond_the_model_vocabulary_are_one_line(tmp_path, text_glob, capsys):
    from etl.model.random_init import Architecture, gpt2_tokenizer, random_gpt2

    small = tmp_path / "small-vocab"
    arch = Architecture(n_layer=1, n_head=2, n_embd=16, n_positions=32)
    random_gpt2(arch, seed=0, vocab_size=1001).save_pretrained(small)
    gpt2_tokenizer().save_pretrained(small)
    code = _extract(small, tmp_path / "wh", "--data-files", text_glob, "--n-batches", "1",
                    "--batch-size", "1", "--seq-len", "16")
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("error: ")]  # (transformers warns too)
    assert code == 2 and len(errors) == 1 and "does not belong to its weights" in errors[0]
    assert not (tmp_path / "wh" / "runs").exists()


def test_resume_drops_corrupt_and_half_written_staged_shards(tmp_path):
    plan = {"run_id": "r", "config_fingerprint": "x", "n_batches": 2}
    diff = np.random.default_rng(2).random((6, 1, 3), dtype=np.float32)
    table = component_table(diff, diff, np.zeros(6), np.arange(6))
    writer = RunWriter(Warehouse(tmp_path).open_staging("r", plan), workers=1)
    for batch in (0, 1):
        for name in ("component_effects", "resid_entropy", "tokens"):
            writer.write(name, table if name == "component_effects" else
                         _empty_table(name), batch)
    writer.flush()
    writer.abort()
    folder = writer.staging.folder / "component_effects"
    bad = folder / f"part-{writer.staging.generation}-00001.parquet"
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])  # truncated on disk
    (folder / "part-x.parquet.tmp").write_bytes(b"half")  # a write the kill interrupted
    again = RunWriter(Warehouse(tmp_path).open_staging("r", plan), workers=1)
    assert again.staging.generation == writer.staging.generation
    assert again.staging.done_batches == {0}
    assert not bad.exists() and not list(folder.glob("*.tmp"))
    again.abort(keep=False)
    assert not again.staging.folder.exists()


def _empty_table(name):
    """No rows, with the schema of table ``name``."""
    import pyarrow as pa

    from etl.warehouse.tables import SCHEMAS

    return pa.Table.from_pylist([], schema=SCHEMAS[name])
