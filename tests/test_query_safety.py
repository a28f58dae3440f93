"""The query side is safe to point at any warehouse: views read only complete runs and the
files their manifests list, a corrupt shard costs one run (not the warehouse), ``check``
names bad files, ``sql``/``run`` are read-only, and bad output paths are one-line errors."""

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from etl.warehouse import Warehouse, migrate
from etl.warehouse.manifest import SCHEMA_VERSION
from etl.warehouse.sums import write_sums
from queries.cli import main as query_main
from queries.db import connect

N_LAYERS, N_HEADS, N_SEQS, SEQ_LEN, VOCAB = 2, 2, 2, 4, 50257
TABLES = ("component_effects", "resid_entropy", "tokens")
REPO = Path(__file__).resolve().parents[1]


def _tables(seed: int, offset: float = 0.0) -> dict[str, pa.Table]:
    """One run's rows (seq, position first; no run_id: it is the partition key)."""
    rng = np.random.default_rng(seed)
    n_tok = N_SEQS * SEQ_LEN
    seq = np.repeat(np.arange(N_SEQS, dtype=np.int32), SEQ_LEN)
    pos = np.tile(np.arange(SEQ_LEN, dtype=np.int32), N_SEQS)
    n_comp = N_LAYERS * (N_HEADS + 1)
    layer = np.repeat(np.arange(N_LAYERS, dtype=np.int16), (N_HEADS + 1) * n_tok)
    comp = np.tile(np.repeat(np.arange(N_HEADS + 1, dtype=np.int16), n_tok), N_LAYERS)
    is_mlp = comp == N_HEADS
    component = pa.table({
        "seq": np.tile(seq, n_comp), "position": np.tile(pos, n_comp), "layer": layer,
        "head": pa.array(comp, mask=is_mlp),
        "kind": pa.array(np.where(is_mlp, "mlp", "head")),
        "entropy_diff": (rng.standard_normal(n_comp * n_tok) * 0.1 + offset).astype(np.float32),
        "entropy_marginal": (rng.standard_normal(n_comp * n_tok) * 0.1).astype(np.float32),
    })
    n_points = 2 * N_LAYERS + 1
    points = np.array(["resid_pre", "resid_mid"] * N_LAYERS + ["final"])
    resid = pa.table({
        "seq": np.tile(seq, n_points), "position": np.tile(pos, n_points),
        "layer": pa.array(np.repeat(np.minimum(np.arange(n_points) // 2, N_LAYERS - 1)
                                    .astype(np.int16), n_tok),
                          mask=np.repeat(np.arange(n_points) == n_points - 1, n_tok)),
        "point": pa.array(np.repeat(points, n_tok)),
        "entropy": rng.uniform(2, 9, n_points * n_tok).astype(np.float32),
    })
    tokens = pa.table({
        "seq": seq, "position": pos, "token_id": (seq * 7 + pos).astype(np.int32),
        "token": pa.array([f"t{i}" for i in range(n_tok)]), "is_bos": pos == 0,
        "is_pad": np.zeros(n_tok, dtype=bool), "role": pa.nulls(n_tok, pa.string()),
        "variant": pa.nulls(n_tok, pa.string()), "example": pa.nulls(n_tok, pa.int32()),
    })
    return {"component_effects": component, "resid_entropy": resid, "tokens": tokens}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_run(root: Path, run_id: str, schema_version: int = SCHEMA_VERSION, seed: int = 0,
              offset: float = 0.0, gen: str = "g1", manifest: bool = True,
              lens: str = "final-scale", measures: list | None = ("entropy",),
              component_table: str = "component_effects") -> dict:
    """A small complete run written the way the ETL writes one (shards, then manifest);
    its shards have the entropy columns only (as before the effects were measured), and
    ``measures=None`` leaves them out of the manifest too (as a run of that time);
    ``component_table``: the component table's name (``component_entropy`` before it
    held the effects); ``schema_version`` 3 and later add the run's partial sums, as a
    publish does (with its manifest; schema 3 as if written before the sums had the
    suppression measures)."""
    shards = {}
    for table, data in _tables(seed, offset).items():
        table = component_table if table == "component_effects" else table
        folder = root / table / f"run_id={run_id}"
        folder.mkdir(parents=True, exist_ok=True)
        name = f"part-{gen}-00000.parquet"
        pq.write_table(data, folder / name, compression="zstd")
        shards[table] = [{"file": name, "rows": data.num_rows,
                          "sha256": _sha256(folder / name)}]
    n_tok = N_SEQS * SEQ_LEN
    data = {
        "run_id": run_id, "created_at": "2024-01-01T00:00:00+00:00",
        "completed_at": "2024-01-01T00:01:00+00:00", "schema_version": schema_version,
        "model": "synthetic", "dataset": "text", "lens": lens, "ablation": "zero",
        "n_layers": N_LAYERS, "n_heads": N_HEADS, "n_seqs": N_SEQS, "seq_len": SEQ_LEN,
        "n_tokens": n_tok, "d_vocab": VOCAB,
        "n_component_rows": N_LAYERS * (N_HEADS + 1) * n_tok,
        "n_resid_rows": (2 * N_LAYERS + 1) * n_tok, "n_token_rows": n_tok,
        "device": "cpu", "dtype": "float32", "seconds": 1.0, "tokens_per_s": 8.0,
        "dataset_fingerprint": None, "git_commit": None, "config": {"seed": seed},
        "model_identity": {}, "dataset_source": {}, "packages": {}, "timing": {},
    }
    if schema_version >= 3 and manifest:
        files = {t: [str(root / t / f"run_id={run_id}" / s["file"]) for s in entries]
                 for t, entries in shards.items()}
        shards |= write_sums(files, None, lambda t: root / t / f"run_id={run_id}", gen)
    if schema_version >= 2:
        data["shards"] = shards
    if measures is not None:
        data["measures"] = list(measures)
    if manifest:
        path = root / "runs" / f"run_id={run_id}" / "manifest.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    return data


def shard(root: Path, table: str, run_id: str, gen: str = "g1") -> Path:
    return root / table / f"run_id={run_id}" / f"part-{gen}-00000.parquet"


def scalar(con, sql: str):
    return con.sql(sql).fetchall()[0][0]


def counts(con, table: str) -> dict[str, int]:
    return dict(con.sql(f"select run_id, count(*) from {table} group by run_id").fetchall())


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.fixture()
def warehouse(tmp_path):
    """Run ``good`` (schema 2), run ``old`` (schema 1, migrated); run ``partial`` without a
    manifest, a staged run, and a newer generation of ``good`` that its manifest does not
    list."""
    root = tmp_path / "wh"
    write_run(root, "good", seed=0)
    write_run(root, "old", schema_version=1, seed=1, component_table="component_entropy")
    write_run(root, "partial", seed=2, offset=5.0, manifest=False)
    write_run(root, "good", seed=3, offset=5.0, gen="g2", manifest=False)  # stray generation
    staged = root / "_staging" / "partial" / "component_effects"
    staged.mkdir(parents=True)
    shutil.copy(shard(root, "component_effects", "partial"), staged / "part-g9-00000.parquet")
    assert [run.run_id for run in migrate(Warehouse(root))] == ["old"]
    return root


# 1. Views: complete runs only, listed files only --------------------------------------------

def test_views_read_only_the_files_manifests_list(warehouse, capsys):
    con = connect(Warehouse(warehouse))
    per_run = {"component_effects": N_LAYERS * (N_HEADS + 1) * N_SEQS * SEQ_LEN,
               "resid_entropy": (2 * N_LAYERS + 1) * N_SEQS * SEQ_LEN,
               "tokens": N_SEQS * SEQ_LEN}
    for table, n in per_run.items():
        assert counts(con, table) == {"good": n, "old": n}, table
    assert sorted(r[0] for r in con.sql("select run_id from runs").fetchall()) == ["good", "old"]
    mean = pq.read_table(shard(warehouse, "component_effects", "good")).column(
        "entropy_diff").to_numpy().mean()
    got = scalar(con, "select avg(entropy_diff) from component_effects where run_id = 'good'")
    assert got == pytest.approx(mean, abs=1e-6)  # the stray generation (offset 5) is not read
    assert query_main(["--warehouse", str(warehouse), "run", "head_summary",
                       "--param", "positions=all", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["run_id"] for r in rows} == {"good", "old"}
    assert {r["n"] for r in rows} == {N_SEQS * SEQ_LEN}
    assert max(abs(r["mean_diff"]) for r in rows) < 1.0


def test_schema_1_run_reads_every_file_of_its_partition(warehouse):
    write_run(warehouse, "older", schema_version=1, seed=4, component_table="component_entropy")
    extra = warehouse / "tokens" / "run_id=older" / "part-zz-00001.parquet"
    pq.write_table(pq.read_table(shard(warehouse, "tokens", "older")), extra)
    migrate(Warehouse(warehouse))
    assert counts(connect(Warehouse(warehouse)), "tokens")["older"] == 2 * N_SEQS * SEQ_LEN


def test_a_table_without_files_is_an_empty_view_with_its_columns(tmp_path):
    root = tmp_path / "wh"
    write_run(root, "old", schema_version=1, component_table="component_entropy")
    shutil.rmtree(root / "resid_entropy")
    migrate(Warehouse(root))
    con = connect(Warehouse(root))
    assert scalar(con, "select count(*) from resid_entropy") == 0
    assert [(c[0], c[1]) for c in con.sql("describe resid_entropy").fetchall()] == [
        ("run_id", "VARCHAR"), ("seq", "INTEGER"), ("position", "INTEGER"),
        ("layer", "SMALLINT"), ("point", "VARCHAR"), ("entropy", "FLOAT")]
    assert counts(con, "tokens") == {"old": N_SEQS * SEQ_LEN}


def _duckdb_shell():
    beside = Path(sys.executable).with_name("duckdb")
    exe = shutil.which("duckdb") or (str(beside) if beside.is_file() else None)
    if exe is None:
        pytest.skip("the duckdb shell (duckdb-cli) is not installed")
    return exe


def test_plain_duckdb_shell_views_follow_the_manifests(warehouse):
    sql = ("select string_agg(run_id || ':' || n, ',' order by run_id) from (select run_id, "
           "count(*) as n from component_effects group by run_id)")
    out = subprocess.run(
        [_duckdb_shell(), "-list", "-noheader",
         "-cmd", f"set variable warehouse = '{warehouse}'",
         "-cmd", f".read {REPO / 'queries' / 'sql' / 'views.sql'}", "-c", sql],
        capture_output=True, text=True, timeout=60, cwd=warehouse)
    assert out.returncode == 0, out.stderr
    n = N_LAYERS * (N_HEADS + 1) * N_SEQS * SEQ_LEN
    assert out.stdout.strip() == f"good:{n},old:{n}"


def test_queries_shell_reads_the_same_views(warehouse, capfd):
    _duckdb_shell()
    assert query_main(["--warehouse", str(warehouse), "shell", "-c",
                       "select string_agg(distinct run_id, ',' order by run_id) as r "
                       "from tokens"]) == 0
    out = capfd.readouterr().out
    assert "good,old" in out and "partial" not in out


# 2. A corrupt shard costs its run, not the warehouse -----------------------------------------

@pytest.mark.parametrize("damage", ["truncate", "delete", "rows"])
def test_run_with_a_bad_shard_is_left_out_with_one_warning(warehouse, capsys, damage):
    bad = shard(warehouse, "resid_entropy", "good")
    if damage == "truncate":
        bad.write_bytes(bad.read_bytes()[:-30])
    elif damage == "delete":
        bad.unlink()
    else:  # the manifest promises another row count than the footer holds
        path = warehouse / "runs" / "run_id=good" / "manifest.json"
        manifest = json.loads(path.read_text())
        manifest["shards"]["resid_entropy"][0]["rows"] += 1
        path.write_text(json.dumps(manifest))
    assert query_main(["--warehouse", str(warehouse), "sql",
                       "select distinct run_id from component_effects", "--format", "csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out.split() == ["run_id", "old"]
    warning = captured.err.strip().splitlines()
    assert len(warning) == 1 and warning[0].startswith("warning: ")
    assert "run good" in warning[0] and str(bad) in warning[0]
    assert "python -m queries check" in warning[0]


def test_every_run_bad_is_one_line_error(tmp_path, capsys):
    root = tmp_path / "wh"
    write_run(root, "only")
    shard(root, "tokens", "only").write_bytes(b"not parquet")
    assert query_main(["--warehouse", str(root), "sql", "select 1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "python -m queries check" in err[-1]


# 3. check: integrity of every listed file, data tests over sound runs, warnings -------------

def _flip_data_page_bytes(path: Path) -> None:
    """Change bytes in the middle of a column chunk; the footer stays intact."""
    meta = pq.read_metadata(path)
    column = meta.row_group(0).column(5)  # entropy_diff
    start = column.data_page_offset + column.total_compressed_size // 2
    data = bytearray(path.read_bytes())
    data[start:start + 4] = bytes(b ^ 0x5A for b in data[start:start + 4])
    path.write_bytes(bytes(data))
    pq.read_metadata(path)  # still readable: only the sha256 can tell


def test_check_names_a_file_whose_bytes_changed(warehouse, capsys):
    for table in TABLES:  # uncompressed, so the flipped bytes read back as other values
        path = shard(warehouse, table, "good")
        pq.write_table(pq.read_table(path), path, compression="none")
        manifest_file = warehouse / "runs" / "run_id=good" / "manifest.json"
        manifest = json.loads(manifest_file.read_text())
        manifest["shards"][table][0]["sha256"] = _sha256(path)
        manifest_file.write_text(json.dumps(manifest))
    assert query_main(["--warehouse", str(warehouse), "check"]) == 0
    capsys.readouterr()
    bad = shard(warehouse, "component_effects", "good")
    _flip_data_page_bytes(bad)
    assert query_main(["--warehouse", str(warehouse), "check"]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 1 and str(bad) in fails[0] and "sha256" in fails[0]
    assert "PASS finite_values" in out and "PASS entropy_bounds" in out  # over run old


def test_check_names_missing_and_miscounted_files(warehouse, capsys):
    missing = shard(warehouse, "tokens", "good")
    missing.unlink()
    path = warehouse / "runs" / "run_id=good" / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["shards"]["resid_entropy"][0]["rows"] = 7
    path.write_text(json.dumps(manifest))
    assert query_main(["--warehouse", str(warehouse), "check"]) == 1
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL files:")]
    assert any(str(missing) in line and "missing" in line for line in fails)
    resid = shard(warehouse, "resid_entropy", "good")
    assert any(str(resid) in line and "the manifest says 7" in line for line in fails)


def test_check_warns_about_partial_runs_and_stray_files(warehouse, capsys):
    assert query_main(["--warehouse", str(warehouse), "check"]) == 0
    out = capsys.readouterr().out
    warns = [line for line in out.splitlines() if line.startswith("WARN")]
    assert ("WARN partial run partial: run the same extract command again to resume it, or "
            "pass --restart") in warns
    strays = {shard(warehouse, t, "good", "g2") for t in TABLES} | \
             {shard(warehouse, t, "partial") for t in TABLES}
    assert {Path(line.split()[3].rstrip(":")) for line in warns if "stray" in line} == strays
    assert "FAIL" not in out and "6 passed, 0 failed" in out


# 4. sql and run are read-only --------------------------------------------------------------

@pytest.mark.parametrize("statement", [
    "copy (select 1 as seq) to '{shard}' (format parquet)",
    "select 1; copy (select 1 as seq) to '{shard}' (format parquet)",
    "explain analyze copy (select 1 as seq) to '{shard}' (format parquet)",
    "export database '{root}/exported'",
    "attach '{root}/new.duckdb' as other",
    "create table t as select 1",
    "insert into component_effects values (1)",
    "install httpfs",
    "load httpfs",
    "pragma version",
    "set enable_external_access = true",
])
def test_sql_refuses_everything_but_select(warehouse, capsys, statement):
    target = shard(warehouse, "component_effects", "good")
    before = target.read_bytes()
    files_before = sorted(warehouse.rglob("*"))
    sql = statement.format(shard=target, root=warehouse)
    assert query_main(["--warehouse", str(warehouse), "sql", sql]) == 2
    assert "only SELECT statements are allowed here; use python -m queries shell" in \
        one_line_error(capsys)
    assert target.read_bytes() == before and sorted(warehouse.rglob("*")) == files_before


def test_sql_cannot_read_or_write_outside_the_warehouse(warehouse, tmp_path, capsys):
    outside = tmp_path / "secret.csv"
    outside.write_text("a,b\n1,2\n")
    for sql in ["select * from read_csv('/etc/passwd')", f"select * from '{outside}'",
                f"select * from read_parquet('{warehouse}/../secret.csv')"]:
        assert query_main(["--warehouse", str(warehouse), "sql", sql]) == 2, sql
        assert "SQL error" in one_line_error(capsys)
    con = connect(Warehouse(warehouse), read_only=True)
    with pytest.raises(duckdb.Error):
        con.sql(f"copy (select 1) to '{tmp_path / 'out.csv'}'")
    with pytest.raises(duckdb.Error):
        con.sql("set enable_external_access = true")
    assert not (tmp_path / "out.csv").exists()


def test_select_explain_and_saved_queries_still_run(warehouse, capsys):
    for argv in (["sql", "explain select count(*) from tokens"],
                 ["sql", "select 1 as a; select count(*) as n from runs", "--format", "csv"],
                 *(["run", name] for name in ("top_heads", "resid_summary", "compare_runs",
                                              "token_drilldown"))):
        assert query_main(["--warehouse", str(warehouse), *argv]) == 0, argv
    out = capsys.readouterr().out
    assert "n\n2\n" in out


# 5. Output paths ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_bad_output_paths_are_one_line(warehouse, tmp_path, capsys, fmt):
    cases = {str(tmp_path / "missing" / "x.out"): "does not exist",
             str(tmp_path): "is a folder",
             str(tmp_path / ("x" * 300 + ".out")): "cannot write --output"}
    for output, expected in cases.items():
        assert query_main(["--warehouse", str(warehouse), "sql", "select 1 as a",
                           "--format", fmt, "--output", output]) == 2, output
        assert expected in one_line_error(capsys)
    assert query_main(["--warehouse", str(warehouse), "run", "top_heads", "--format", fmt,
                       "--output", str(tmp_path / "top.out")]) == 0
    assert (tmp_path / "top.out").stat().st_size > 0


def test_analysis_out_that_cannot_be_a_folder_is_one_line(warehouse, tmp_path, capsys,
                                                         monkeypatch):
    import analysis.render
    from analysis.__main__ import main as analysis_main

    def no_render(*args, **kwargs):
        raise AssertionError("rendering started")

    monkeypatch.setattr(analysis.render, "render", no_render)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    for out, expected in [(a_file, "is a file; give a folder"),
                          (a_file / "charts", "is a file")]:
        assert analysis_main(["--warehouse", str(warehouse), "--out", str(out),
                              "--no-progress"]) == 2
        assert expected in one_line_error(capsys)
