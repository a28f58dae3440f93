"""``--workers N`` on a local Ray instance (2 CPU workers): the rows equal one process's, even
when a worker is killed half-way, and in object storage; errors stay one line."""

import json
import sys

import pytest

from etl.config import ExtractConfig, RunOptions
from etl.extract import main as extract_main
from etl.files import KILL_AT_ENV, KILL_ONCE_ENV
from etl.runner import ExtractRunner
from etl.storage import warehouse_root
from queries.db import connect

TABLES = ("component_entropy", "resid_entropy", "tokens")


@pytest.fixture(scope="module")
def ray_cluster(s3_server):
    """A local Ray instance with 2 CPUs for this module, stopped after it (started after the
    S3 server, so that its workers inherit the ``AWS_*`` variables)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    yield ray
    ray.shutdown()
    assert not ray.is_initialized()


def _run(checkpoint, root, run_id, ablation, workers, model=None):
    config = ExtractConfig(model=str(checkpoint), dataset="ioi", n_prompts=8, batch_size=2,
                           ablation=ablation)
    options = RunOptions(device="cpu", warehouse=str(root), run_id=run_id, progress=False,
                         workers=workers)
    return ExtractRunner(config, options, model).run()


def _rows(root, run_id):
    con = connect(root, read_only=True)
    return {t: con.sql(f"select * exclude (run_id) from {t} where run_id = '{run_id}' "
                       "order by all").fetchall() for t in TABLES}


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tiny_checkpoint, tiny_model):
    """The reference: the run extracted by one process."""
    root = tmp_path_factory.mktemp("one-process")
    _run(tiny_checkpoint, root, "mean", "mean", 1, tiny_model)
    return root


def test_two_workers_store_the_rows_of_one_process_even_when_one_is_killed(
        ray_cluster, one_process, tiny_checkpoint, tmp_path, monkeypatch):
    """Under mean ablation (the sums split over the workers), one worker is SIGKILLed after
    measuring a batch and before staging it: Ray restarts it and retries the batch, and the
    published rows are one process's. The warehouse is in object storage: the workers stage
    their shards there and the driver publishes there (a local warehouse stages through the
    same ``write_shard`` as a single process)."""
    marker = tmp_path / "killed"
    monkeypatch.setenv(KILL_AT_ENV, "worker:6")  # the batch of sequences 6 and 7
    monkeypatch.setenv(KILL_ONCE_ENV, str(marker))
    url = "s3://bucket/workers"
    result = _run(tiny_checkpoint, url, "mean", "mean", 2)
    assert marker.exists()  # a worker did die there
    assert str(result.manifest_path) == f"{url}/runs/run_id=mean/manifest.json"
    want = _rows(one_process, "mean")
    assert _rows(url, "mean") == want and len(want["tokens"]) == result.n_tokens
    manifest = json.loads(result.manifest_path.read_text())
    assert len(manifest["shards"]["tokens"]) == 4  # 8 sequences, 2 per batch
    assert manifest["timing"]["workers"] == 2
    root = warehouse_root(url)
    assert not root.fs.find(f"{root.path}/_staging") and not root.fs.find(f"{root.path}/_locks")


def test_workers_without_ray_end_in_one_line(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # as if Ray were not installed
    code = extract_main(["--model", str(tiny_checkpoint), "--warehouse", str(tmp_path),
                         "--no-progress", "--device", "cpu", "--dataset", "ioi",
                         "--n-prompts", "2", "--workers", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "needs Ray" in err, err
    assert not (tmp_path / "runs").exists()


def test_fewer_than_one_worker_is_refused(tmp_path, capsys):
    assert extract_main(["--warehouse", str(tmp_path), "--workers", "0"]) == 2
    assert "--workers must be at least 1" in capsys.readouterr().err


def test_a_workers_failure_is_one_line():
    from etl.distributed import worker_error
    from etl.errors import UserError

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
