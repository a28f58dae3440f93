"""Faults for real: extractions killed with SIGKILL, SIGINT and SIGTERM, resumed; two processes
on one run id; an overwrite killed half-way; a full filesystem."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etl.extract import main as extract_main
from etl.warehouse import Warehouse
from etl.warehouse.files import KILL_AT_ENV
from queries.db import connect

TEXT = "A sentence about entropy, heads and the tokens they read. " * 60
N_BATCHES, BATCH, SEQ_LEN = 3, 1, 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "a.txt").write_text(TEXT)
    (folder / "b.txt").write_text(TEXT.upper())
    return str(folder / "*.txt")


def _command(checkpoint, root, corpus, run_id, *extra, n_batches=N_BATCHES):
    return [sys.executable, "-m", "etl.extract", "--model", str(checkpoint), "--dataset", "text",
            "--data-files", corpus, "--n-batches", str(n_batches), "--batch-size", str(BATCH),
            "--seq-len", str(SEQ_LEN), "--device", "cpu", "--no-progress", "--warehouse",
            str(root), "--run-id", run_id, *extra]


LONG = 40
"""Batches of the runs that another process must catch while they are still running; their
first ``N_BATCHES`` sequences are those of the reference run."""


def _first_rows(rows, n_seqs=N_BATCHES * BATCH):
    return {table: [r for r in found if r[0] < n_seqs] for table, found in rows.items()}


def _env(**extra):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop(KILL_AT_ENV, None)
    env.update(extra)
    return env


def _run(cmd, **env):
    return subprocess.run(cmd, env=_env(**env), capture_output=True, text=True, timeout=300)


def _run_here(cmd, capsys):
    """``cmd`` (a ``_command``) run in this process: the runs that are not killed need no
    process of their own, and skip the seconds of imports a new one costs."""
    capsys.readouterr()
    code = extract_main(cmd[3:])
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(cmd, code, out, err)


def _rows(root, run_id):
    con = connect(Warehouse(root))
    return {table: con.sql(f"select * exclude (run_id) from {table} where run_id = '{run_id}' "
                           "order by all").fetchall()
            for table in ("component_effects", "resid_entropy", "tokens")}


def _visible_runs(root):
    try:
        con = connect(Warehouse(root))
    except Exception:  # no complete run at all
        return set()
    runs = {r[0] for r in con.sql("select run_id from runs").fetchall()}
    for table in ("component_effects", "resid_entropy", "tokens"):
        runs |= {r[0] for r in con.sql(f"select distinct run_id from {table}").fetchall()}
    return runs


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, corpus, tmp_path_factory):
    """An uninterrupted run: the rows every interrupted-then-resumed run must equal."""
    root = tmp_path_factory.mktemp("reference")
    done = _run(_command(tiny_checkpoint, root, corpus, "whole"))
    assert done.returncode == 0, done.stderr
    REFERENCE_ROOT.append(root)
    return _rows(root, "whole")


REFERENCE_ROOT: list[Path] = []


def _manifest(root):
    return json.loads((root / "runs" / "run_id=whole" / "manifest.json").read_text())


def test_sigkill_at_each_point_then_the_same_command_resumes(tiny_checkpoint, corpus,
                                                             reference, tmp_path, capsys):
    cmd = _command(tiny_checkpoint, tmp_path, corpus, "whole")
    # mid-run, then while publishing (shards moved, manifest not yet written)
    for point in ("shard:resid_entropy:1", "publish:moved"):
        killed = _run(cmd, **{KILL_AT_ENV: point})
        assert killed.returncode == -signal.SIGKILL
        assert "whole" not in _visible_runs(tmp_path)  # never a half-run
        assert (tmp_path / "_staging" / "whole" / "plan.json").exists()
    # resumes (not from zero), and dies right after the manifest: the run is complete
    killed = _run(cmd, **{KILL_AT_ENV: "publish:manifest"})
    assert killed.returncode == -signal.SIGKILL
    manifest = _manifest(tmp_path)
    assert manifest["timing"]["batches_resumed"] == N_BATCHES  # every batch was staged
    assert _rows(tmp_path, "whole") == reference  # 0 lost, 0 duplicated
    for table in ("component_effects", "resid_entropy", "tokens"):
        files = sorted(p.name for p in (tmp_path / table / "run_id=whole").glob("*"))
        assert files == sorted(s["file"] for s in manifest["shards"][table])
    # the leftovers of the published attempt are not reused by the next one
    again = _run_here(cmd + ["--overwrite"], capsys)
    assert again.returncode == 0, again.stderr
    assert _manifest(tmp_path)["timing"]["batches_resumed"] == 0
    assert _rows(tmp_path, "whole") == reference
    assert not (tmp_path / "_staging").exists()


def test_other_settings_are_refused_and_restart_discards_partial_work(tiny_checkpoint, corpus,
                                                                      reference, tmp_path,
                                                                      capsys):
    cmd = _command(tiny_checkpoint, tmp_path, corpus, "whole")
    assert _run(cmd, **{KILL_AT_ENV: "shard:tokens:0"}).returncode == -signal.SIGKILL
    other = _run_here(cmd + ["--seed", "7"], capsys)  # not to be mixed with the staged rows
    assert other.returncode == 2
    lines = other.stderr.strip().splitlines()
    assert len(lines) == 1 and "partial run 'whole'" in lines[0] and "--restart" in lines[0]
    done = _run_here(cmd + ["--restart"], capsys)
    assert done.returncode == 0, done.stderr
    manifest = json.loads((tmp_path / "runs" / "run_id=whole" / "manifest.json").read_text())
    assert manifest["timing"]["batches_resumed"] == 0
    assert _rows(tmp_path, "whole") == reference


def test_overwrite_killed_half_way_keeps_the_old_run_visible(tiny_checkpoint, corpus,
                                                             reference, tmp_path, capsys):
    root = tmp_path / "wh"
    shutil.copytree(REFERENCE_ROOT[0], root)
    new_cmd = _command(tiny_checkpoint, root, corpus, "whole", "--seed", "7", "--overwrite")
    killed = _run(new_cmd, **{KILL_AT_ENV: "publish:moved"})  # new shards beside the old
    assert killed.returncode == -signal.SIGKILL
    assert _rows(root, "whole") == reference  # the old run, whole, never a mix
    done = _run_here(new_cmd, capsys)
    assert done.returncode == 0, done.stderr
    new_rows = _rows(root, "whole")
    assert new_rows != reference and len(new_rows["tokens"]) == len(reference["tokens"])
    for table in ("component_effects", "resid_entropy", "tokens"):
        assert len(list((root / table / "run_id=whole").glob("*.parquet"))) == N_BATCHES


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupt_ends_in_one_line_and_the_run_resumes(tiny_checkpoint, corpus, reference,
                                                        tmp_path, sig, code, capsys):
    cmd = _command(tiny_checkpoint, tmp_path, corpus, "whole", n_batches=LONG)
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    staging = tmp_path / "_staging" / "whole"
    deadline = time.monotonic() + 120
    while proc.poll() is None and not all(any((staging / t).glob("*.parquet"))
                                          for t in ("component_effects", "tokens")):
        assert time.monotonic() < deadline
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert "whole" not in _visible_runs(tmp_path)
    if sig == signal.SIGTERM:  # resuming after SIGKILL is tested above; once more here
        resumed = _run_here(cmd, capsys)
        assert resumed.returncode == 0, resumed.stderr
        manifest = json.loads((tmp_path / "runs" / "run_id=whole" / "manifest.json")
                              .read_text())
        assert manifest["timing"]["batches_resumed"] >= 1
        assert manifest["n_seqs"] == LONG * BATCH
        assert _first_rows(_rows(tmp_path, "whole")) == reference


def test_two_processes_on_one_run_id_one_proceeds(tiny_checkpoint, corpus, reference,
                                                  tmp_path, capsys):
    cmd = _command(tiny_checkpoint, tmp_path, corpus, "whole", n_batches=LONG)
    first = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    lock = tmp_path / "_locks" / "whole.lock"
    deadline = time.monotonic() + 120
    while f'"pid": {first.pid}' not in (lock.read_text() if lock.exists() else ""):
        assert first.poll() is None and time.monotonic() < deadline
        time.sleep(0.02)
    second = _run_here(cmd, capsys)  # this process contends with the running one
    assert first.wait(timeout=300) == 0
    assert second.returncode == 2
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and f"pid {first.pid}" in lines[0]
    assert _first_rows(_rows(tmp_path, "whole")) == reference


def test_different_run_ids_in_parallel_stay_correct(tiny_checkpoint, corpus, reference,
                                                    tmp_path):
    procs = [subprocess.Popen(_command(tiny_checkpoint, tmp_path, corpus, run_id), env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for run_id in ("left", "right")]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert _rows(tmp_path, "left") == reference == _rows(tmp_path, "right")


def test_full_filesystem_fails_in_one_line_and_publishes_nothing(tiny_checkpoint, corpus,
                                                                 tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small filesystem here: {done.stderr.strip()}")
    try:
        full = _run(_command(tiny_checkpoint, mount, corpus, "whole"))
        assert full.returncode == 2
        lines = full.stderr.strip().splitlines()
        assert len(lines) == 1 and "No space left" in lines[0], full.stderr
        assert not (mount / "runs" / "run_id=whole").exists()
    finally:
        subprocess.run(["umount", str(mount)], check=False)
