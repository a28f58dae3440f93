"""Reads racing ``--overwrite``: queries made while the same run is extracted again and
again, each attempt killed (SIGKILL) at a random moment or left to publish (the last one
always is).

Every read opens the views anew, as a ``python -m queries`` command does, and must return
the run's rows as the first extraction wrote them (every attempt repeats the same command,
so the old run and the new one hold the same rows): an error or any other answer counts as
a failure.

    python scripts/overwrite_race.py --model data/models/gpt2-tiny-random --attempts 20

Prints one JSON line (reads, failures, publishes, kills); exits 1 on any failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from etl.warehouse import Warehouse
from queries.db import Views

READ = ("select count(*) as n, sum(entropy_diff) as diff, sum(entropy_marginal) as marginal "
        "from component_effects join tokens using (run_id, seq, position)")
"""A read of every component row joined to its token: any missing or mixed file shows."""


def _extract(model: str, root: Path, run_id: str) -> list[str]:
    return [sys.executable, "-m", "etl.extract", "--model", model, "--dataset", "ioi",
            "--n-prompts", "16", "--batch-size", "2", "--device", "cpu", "--no-progress",
            "--warehouse", str(root), "--run-id", run_id, "--overwrite"]


def _generation(warehouse: Warehouse, run_id: str) -> str:
    return json.loads(warehouse.manifest_path(run_id).read_text())["generation"]


def _reader(warehouse: Warehouse, want: tuple, stop: threading.Event, counts: dict) -> None:
    """Read until ``stop``, counting reads and failures (an error, or rows not ``want``)."""
    while not stop.is_set():
        try:
            got = Views(warehouse, read_only=True).sql(READ).row(0)
        except Exception as exc:  # noqa: BLE001  (any error is a failure of the read)
            got = f"error: {type(exc).__name__}: {exc}"
        counts["reads"] += 1
        if got != want:
            counts["failures"] += 1
            counts.setdefault("first_failure", str(got))


def main(argv: list[str] | None = None) -> int:
    """Run the race; 0 when every read returned the run's rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="checkpoint folder to extract with")
    parser.add_argument("--attempts", type=int, default=20, help="extractions (default 20)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as folder:
        warehouse, run_id = Warehouse(folder), "race"
        started = time.perf_counter()
        subprocess.run(_extract(args.model, warehouse.root, run_id), env=env, check=True,
                       capture_output=True)
        duration = time.perf_counter() - started
        want = Views(warehouse).sql(READ).row(0)
        counts = {"reads": 0, "failures": 0, "publishes": 0, "kills": 0}
        stop = threading.Event()
        reader = threading.Thread(target=_reader, args=(warehouse, want, stop, counts))
        reader.start()
        try:
            for attempt in range(1, args.attempts + 1):
                before = _generation(warehouse, run_id)
                proc = subprocess.Popen(_extract(args.model, warehouse.root, run_id), env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                last = attempt == args.attempts  # left to publish: the race ends on a publish
                try:
                    proc.wait(timeout=None if last else rng.uniform(0.5, 1.5) * duration)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                    counts["kills"] += 1
                counts["publishes"] += _generation(warehouse, run_id) != before
        finally:
            stop.set()
            reader.join()
    print(json.dumps(counts))
    return 1 if counts["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
