"""``python -m analysis``: render every chart of the chosen runs.

    python -m analysis --warehouse data/warehouse --out data/charts
    python -m analysis --list
    python -m analysis --chart heatmap --run RUN_ID --format png
"""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm.auto import tqdm

from etl.cli import ArgumentParser
from etl.errors import UserError


def build_parser():
    """The ``python -m analysis`` argument parser."""
    parser = ArgumentParser(
        prog="python -m analysis",
        description="Render the project's charts (built from saved queries) as "
                    "self-contained HTML, PNG and SVG, with an index.html.")
    parser.add_argument("--warehouse", default="data/warehouse",
                        help="warehouse root (default data/warehouse)")
    parser.add_argument("--out", default="data/charts", help="output folder (default "
                        "data/charts)")
    parser.add_argument("--run", action="append", dest="runs", metavar="RUN_ID",
                        help="run to chart (repeatable; default every complete run; the "
                             "first is compared with each other one)")
    parser.add_argument("--format", default="html,png,svg",
                        help="comma-separated formats among html, png, svg (default all)")
    parser.add_argument("--chart", action="append", dest="charts", metavar="NAME",
                        help="render only this chart (repeatable; see --list)")
    parser.add_argument("--list", action="store_true", help="list the charts and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input)."""
    from analysis.render import CHARTS, render

    try:
        args = build_parser().parse_args(argv)
        if args.list:
            width = max(len(n) for n in CHARTS)
            for name, spec in CHARTS.items():
                print(f"{name:<{width}}  {spec.description} (query {spec.query})")
            return 0
        formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
        bar = tqdm(desc="charts", unit="chart", disable=args.no_progress)
        written = render(Path(args.warehouse), Path(args.out), runs=args.runs,
                         formats=formats, only=args.charts,
                         progress=lambda name, runs: bar.update())
        bar.close()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    index = [p for p in written if p.name == "index.html"][0]
    print(f"wrote {len(written) - 1} chart files and {index} (open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
