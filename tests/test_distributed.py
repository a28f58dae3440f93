"""``--workers N`` on a local Ray instance (2 CPU workers): the rows equal one process's, in
object storage, even when the driver is killed and the run resumed, and when a worker is
killed half-way; no Ray process outlives a run; errors stay one line."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from etl.config import ExtractConfig, RunOptions
from etl.errors import UserError
from etl.extract import main as extract_main
from etl.run.runner import ExtractRunner
from etl.warehouse import Warehouse
from etl.warehouse.files import KILL_AT_ENV, KILL_ONCE_ENV
from etl.warehouse.lock import STALE_ENV
from queries.db import connect

TABLES = ("component_effects", "resid_entropy", "tokens")


RAY_AGENTS = (b"ray::DashboardAgent", b"ray::RuntimeEnvAgent")
"""Ray's per-node agents: when their raylet is SIGKILLed they notice within seconds but then
try to report it to the (dead) GCS and exit only when that times out, about a minute later.
Ray's own behaviour; they hold no work and no data, so the checks leave them out."""


def _ray_processes() -> set[int]:
    """Pids of the Ray processes running on this machine (GCS, raylet, workers, helpers;
    not ``RAY_AGENTS``)."""
    found = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if (b"site-packages/ray/" in cmdline or cmdline.startswith(b"ray::")) and \
                not cmdline.startswith(RAY_AGENTS):
            found.add(int(pid))
    return found


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A local Ray instance with 2 CPUs for this module, stopped after it, leaving no
    process (started after the S3 server, so that its workers inherit the ``AWS_*``
    variables)."""
    ray = pytest.importorskip("ray")
    before = _ray_processes()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()
    assert not ray.is_initialized()
    _wait_until_gone(before, "this module's Ray")


def _run(checkpoint, root, run_id, ablation, workers, model=None):
    config = ExtractConfig(model=str(checkpoint), dataset="ioi", n_prompts=8, batch_size=2,
                           ablation=ablation)
    options = RunOptions(device="cpu", warehouse=str(root), run_id=run_id, progress=False,
                         workers=workers)
    return ExtractRunner(config, options, model).run()


def _rows(root, run_id):
    con = connect(Warehouse(root), read_only=True)
    return {t: con.sql(f"select * exclude (run_id) from {t} where run_id = '{run_id}' "
                       "order by all").fetchall() for t in TABLES}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_checkpoint, tiny_model):
    """The reference: the run extracted by one process."""
    root = tmp_path_factory.mktemp("one-process")
    _run(tiny_checkpoint, root, "mean", "mean", 1, tiny_model)
    return root


def _wait_until_gone(before: set[int], what: str) -> None:
    """Wait (up to 30 s) until no Ray process is running that was not in ``before``."""
    deadline = time.monotonic() + 30
    while left := _ray_processes() - before:
        assert time.monotonic() < deadline, f"Ray processes left by {what}: {sorted(left)}"
        time.sleep(0.5)


def _staged_batches(root, run_id) -> dict[str, set[int]]:
    """The batches staged per table: shards ``part-<gen>-<batch>.parquet`` written whole,
    with their record beside them (a worker killed between the two staged nothing)."""
    staged = {}
    for table in TABLES:
        names = set(root.fs.find(f"{root.path}/_staging/{run_id}/{table}"))
        staged[table] = {int(n.rsplit("-", 1)[1].split(".")[0]) for n in names
                         if n.endswith(".parquet") and f"{n}.json" in names}
    return staged


def test_a_killed_driver_leaves_no_ray_and_the_run_resumes_through_a_worker_death(
        ray_cluster, one_process, tiny_checkpoint, tmp_path, monkeypatch):
    """The command (the driver, with the local Ray instance it started) is SIGKILLed once a
    worker has staged a batch: its Ray processes go with it and nothing is published. The same run
    then resumes from the staged batches (on this module's Ray) once the dead driver's lease
    is stale, and a worker is SIGKILLed
    after measuring a batch and before staging it: Ray restarts it and retries the batch.
    The published rows are one process's, under mean ablation (the sums split over the
    workers), in object storage (the workers stage their shards there)."""
    url = "s3://bucket/workers"
    root = Warehouse(url).root
    before = _ray_processes()
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update({"HF_HUB_OFFLINE": "1", KILL_AT_ENV: "driver:1",  # once a batch is staged
                "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    driver = subprocess.run(
        [sys.executable, "-m", "etl.extract", "--model", str(tiny_checkpoint), "--warehouse",
         url, "--no-progress", "--device", "cpu", "--dataset", "ioi", "--n-prompts", "8",
         "--batch-size", "2", "--ablation", "mean", "--run-id", "mean", "--workers", "2"],
        env=env, capture_output=True, text=True, timeout=300)
    assert driver.returncode == -9, driver.stderr
    _wait_until_gone(before, "the killed driver")
    assert not root.fs.find(f"{root.path}/runs")
    staged = _staged_batches(root, "mean")
    assert set.intersection(*staged.values())  # at least the batch it was told of
    todo = sorted(set(range(4)) - set.union(*staged.values()))
    assert todo  # 2 workers: at most 2 batches were handed out before the driver died

    # the dead driver's lease is fresh: the run is refused; once stale, it is taken over
    with pytest.raises(UserError, match="being written by another extraction .* last "
                                        "heartbeat"):
        _run(tiny_checkpoint, url, "mean", "mean", 2)
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_AT_ENV, f"worker:{2 * todo[-1]}")  # 2 sequences a batch
    monkeypatch.setenv(KILL_ONCE_ENV, str(marker))
    monkeypatch.setenv(STALE_ENV, "1")
    time.sleep(1.1)
    result = _run(tiny_checkpoint, url, "mean", "mean", 2)
    assert marker.exists()  # a worker did die there
    assert str(result.manifest_path) == f"{url}/runs/run_id=mean/manifest.json"
    want = _rows(one_process, "mean")
    assert _rows(url, "mean") == want and len(want["tokens"]) == result.n_tokens
    manifest = json.loads(result.manifest_path.read_text())
    assert manifest["timing"]["batches_resumed"] == len(set.intersection(*staged.values()))
    assert len(manifest["shards"]["tokens"]) == 4  # 8 sequences, 2 per batch
    assert manifest["timing"]["workers"] == 2
    assert not root.fs.find(f"{root.path}/_staging") and not root.fs.find(f"{root.path}/_locks")


def test_workers_without_ray_end_in_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code = extract_main(["--model", str(tiny_checkpoint), "--warehouse", str(tmp_path),
                         "--no-progress", "--device", "cpu", "--dataset", "ioi",
                         "--n-prompts", "2", "--workers", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs Ray" in err, err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("count", ["0", str(10 ** 20)])
def test_a_worker_count_out_of_range_is_refused(tmp_path, capsys, count):
    assert extract_main(["--warehouse", str(tmp_path), "--workers", count]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--workers must be between 1 and 4,096" in err, err


@pytest.mark.parametrize("extra,says", [
    (["--ray-address", "127.0.0.1:1"], "could not reach the Ray cluster at 127.0.0.1:1: "
                                       "Connection refused"),
    (["--ray-address", "nowhere"], "--ray-address 'nowhere' is not host:port"),
    (["--device", "cuda"], "--workers 2 --device cuda needs a GPU per worker, but this "
                           "machine has 0"),
])
def test_a_cluster_that_cannot_be_had_is_one_line_at_once(tiny_checkpoint, tmp_path, capsys,
                                                          monkeypatch, extra, says):
    import time

    import torch

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    ray = pytest.importorskip("ray")
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # this module's Ray is not ours
    started = time.monotonic()
    code = extract_main(["--model", str(tiny_checkpoint), "--warehouse", str(tmp_path),
                         "--no-progress", "--dataset", "ioi", "--n-prompts", "2",
                         "--workers", "2", *extra])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and says in err, err
    assert time.monotonic() - started < 60  # not Ray's minutes of retries
    assert not (tmp_path / "runs").exists()


def test_a_workers_failure_is_one_line():
    from etl.errors import UserError
    from etl.run.ray_executor import worker_error

    class TaskError(Exception):  # how Ray hands back a worker's exception
        def __init__(self, cause):
            super().__init__(f"ray.exceptions.RayTaskError\n{cause}")
            self.cause = cause

    own = UserError("non-finite value in sequences 6–7: ...")
    assert worker_error(TaskError(own)) is own  # the worker's own message, as one process's
    died = worker_error(RuntimeError("The actor died unexpectedly\nmore lines"))
    assert isinstance(died, UserError) and "\n" not in str(died)
    assert "RuntimeError: The actor died unexpectedly" in str(died)
    assert "run the same command again to resume" in str(died)


def test_more_workers_than_devices_are_refused_before_any_starts(ray_cluster, tiny_checkpoint,
                                                                 tmp_path):
    from etl.errors import UserError

    config = ExtractConfig(model=str(tiny_checkpoint), dataset="ioi", n_prompts=2)
    for device, kind in (("cuda", "GPU"), ("cpu", "CPU")):
        options = RunOptions(device=device, warehouse=str(tmp_path), run_id=f"r-{device}",
                             progress=False, workers=2 if device == "cuda" else 3)
        with pytest.raises(UserError, match=f"needs a {kind} each, but the Ray cluster has"):
            ExtractRunner(config, options).run()
    assert not (tmp_path / "runs").exists()
