"""Start-up time of the command-line entry points: the wall time of each one's ``--help``
(and of the listing commands), best of N fresh processes, optionally beside a baseline git
revision measured in the same rounds.

Usage::

    python -m etl.bench.startup [--runs 7] [--baseline REV] [--json]

Each command runs as ``python -m ...`` with its output discarded, from the project root
(``PYTHONPATH`` set to it, so that its packages are the ones imported). ``--baseline REV``
extracts REV with ``git archive`` into a temporary folder and times the same commands there,
alternating with this tree command by command, so that both see the same load; one
unmeasured run of each command first writes the ``.pyc`` files of both trees.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from etl.errors import ArgumentParser, UserError

ROOT = Path(__file__).resolve().parents[2]
"""The project root: this tree."""
COMMANDS = (
    ("-c", "pass"),
    ("-m", "etl.extract", "--help"),
    ("-m", "etl.checkpoint", "--help"),
    ("-m", "analysis", "--help"),
    ("-m", "queries", "--help"),
    ("-m", "queries", "list"),
    ("-m", "analysis", "--list"),
)
"""What is timed: the interpreter alone (``-c pass``, the floor), then the entry points."""


def seconds(root: Path, args: tuple[str, ...]) -> float:
    """Wall time of one ``python ARGS`` run from ``root``; ``UserError`` when it fails."""
    env = {**os.environ, "PYTHONPATH": str(root)}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], cwd=root, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=600)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        last = (proc.stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
        raise UserError(f"python {' '.join(args)} in {root} exited with {proc.returncode}: "
                        f"{last}")
    return elapsed


def extract_revision(revision: str, into: Path) -> Path:
    """The files of git ``revision`` of this repository, written under ``into``."""
    proc = subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", revision],
                          capture_output=True, timeout=300)
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        raise UserError(f"--baseline {revision!r}: {reason[-1] if reason else 'git failed'}")
    # the archive is this repository's own; "data" refuses links out of ``into`` (3.11.4+)
    safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as archive:
        archive.extractall(into, **safe)
    return into


def measure(trees: dict[str, Path], runs: int) -> list[dict]:
    """For every command, the best of ``runs`` wall times in each tree (name → root), the
    trees alternating within each round."""
    rows = []
    for args in COMMANDS:
        for root in trees.values():
            seconds(root, args)  # writes the .pyc files; not counted
        best = {name: float("inf") for name in trees}
        for _ in range(runs):
            for name, root in trees.items():
                best[name] = min(best[name], seconds(root, args))
        rows.append({"command": "python " + " ".join(args),
                     **{name: round(value, 3) for name, value in best.items()}})
    return rows


def table(rows: list[dict], baseline: str | None) -> str:
    """``rows`` as a fixed-width table; with a baseline, its time over this tree's."""
    width = max(len(row["command"]) for row in rows)
    head = f"{'command':<{width}}  {'this tree':>9}"
    if baseline:
        head += f"  {baseline[:12]:>12}  {'speed-up':>8}"
    lines = [head]
    for row in rows:
        line = f"{row['command']:<{width}}  {row['this tree']:>8.3f}s"
        if baseline:
            ratio = row["baseline"] / row["this tree"]
            line += f"  {row['baseline']:>11.3f}s  {ratio:>7.2f}x"
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table (or one JSON object per command); 0 on
    success, 2 when a command or ``--baseline`` fails."""
    parser = ArgumentParser(prog="python -m etl.bench.startup",
                            description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7,
                        help="timed runs of each command in each tree; the best counts "
                             "(default 7)")
    parser.add_argument("--baseline", metavar="REV",
                        help="also time the git revision REV (e.g. main), alternating")
    parser.add_argument("--json", action="store_true", help="one JSON object per command")
    try:
        args = parser.parse_args(argv)
        if args.runs < 1:
            raise UserError("--runs must be at least 1")
        with tempfile.TemporaryDirectory(prefix="startup-baseline-") as tmp:
            trees = {"this tree": ROOT}
            if args.baseline:
                trees["baseline"] = extract_revision(args.baseline, Path(tmp))
            rows = measure(trees, args.runs)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(table(rows, args.baseline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
