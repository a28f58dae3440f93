"""``python -m analysis``: render every chart of the chosen runs.

    python -m analysis --warehouse data/warehouse --out data/charts
    python -m analysis --list
    python -m analysis --chart heatmap --run RUN_ID --format png
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from analysis.caption import ChartOptions
from etl.errors import ArgumentParser, UserError, add_version_flag, one_line
from etl.warehouse import DEFAULT_WAREHOUSE, Warehouse, storage_errors


def build_parser():
    """The ``python -m analysis`` argument parser."""
    parser = ArgumentParser(
        prog="python -m analysis",
        description="Render the project's charts (built from saved queries) as "
                    "self-contained HTML, PNG and SVG, with an index.html.")
    parser.add_argument("--warehouse", default=DEFAULT_WAREHOUSE,
                        help="warehouse root, a folder or s3://bucket/prefix (default "
                             f"{DEFAULT_WAREHOUSE})")
    parser.add_argument("--out", default="data/charts", help="output folder (default "
                        "data/charts)")
    parser.add_argument("--run", action="append", dest="runs", metavar="RUN_ID",
                        help="run to chart (repeatable; default every complete run; the "
                             "first is compared with each other run of its model)")
    parser.add_argument("--format", default="html,png,svg",
                        help="comma-separated formats among html, png, svg (default all)")
    parser.add_argument("--chart", action="append", dest="charts", metavar="NAME",
                        help="render only this chart (repeatable; see --list)")
    parser.add_argument("--positions", choices=("real", "all"), default="real",
                        help="positions the means are taken over: 'real', the text's tokens "
                             "(BOS and padding excluded; default), or 'all' (every position, "
                             "as McDougall et al. 2023, arXiv:2310.04625, averaged)")
    parser.add_argument("--title", help="title of the chart instead of its own (with one "
                                        "--chart)")
    parser.add_argument("--label", action="append", dest="labels", default=[],
                        metavar="RUN_ID=TEXT", help="a label for a run, shown in subtitles "
                                                     "and the index (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the charts and exit")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_version_flag(parser)
    return parser


def check_out_folder(out: Path, warehouse: Warehouse) -> None:
    """Raise ``UserError`` unless ``out`` is a writable folder or can be created as one,
    outside the local ``warehouse`` (nothing is created here)."""
    from queries.output import refuse_inside_warehouse

    try:
        refuse_inside_warehouse(out, "--out", warehouse)
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {str(out)!r} is a file; give a folder")
        existing = out
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UserError(f"cannot create --out {str(out)!r}: {str(existing)!r} is a file")
    except OSError as exc:
        raise UserError(f"cannot use --out {str(out)!r}: "
                        f"{exc.strerror or ' '.join(str(exc).split())}") from exc
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"cannot write --out {str(out)!r}: {str(existing)!r} is not writable")


def chart_options(args) -> ChartOptions:
    """The ``ChartOptions`` of parsed arguments; ``UserError`` for a ``--label`` without
    ``=`` or a ``--title`` without exactly one ``--chart``."""
    labels = {}
    for text in args.labels:
        run, sep, label = text.partition("=")
        if not sep or not run or not label.strip():
            raise UserError(f"--label {text!r}: give RUN_ID=TEXT")
        labels[run] = label.strip()
    if args.title is not None and len(args.charts or []) != 1:
        raise UserError("--title names one chart: pass exactly one --chart NAME with it")
    return ChartOptions(positions=args.positions, title=args.title, labels=labels)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (2 for bad input)."""
    try:
        args = build_parser().parse_args(argv)
        from analysis.render import ALL_CHARTS, render  # Altair: after the arguments

        if args.list:
            width = max(len(n) for n in ALL_CHARTS)
            for name, spec in ALL_CHARTS.items():
                needs = f"; needs measures {', '.join(spec.needs)}" if spec.needs else ""
                print(f"{name:<{width}}  {spec.description} (query "
                      f"{' + '.join(spec.queries)}{needs})")
            return 0
        options = chart_options(args)
        formats = tuple(f.strip() for f in args.format.split(",") if f.strip())
        out = Path(args.out)
        warehouse = Warehouse(args.warehouse)
        check_out_folder(out, warehouse)
        # the bar starts only once render() has checked its inputs and knows the total
        progress = None if args.no_progress else (
            lambda total: tqdm(total=total, desc="charts", unit="chart"))
        try:
            written = render(warehouse, out, runs=args.runs, formats=formats, only=args.charts,
                             progress=progress, options=options)
        except storage_errors() as exc:
            reason = getattr(exc, "strerror", None) or one_line(exc)
            if warehouse.remote:  # the error may come from reading the warehouse
                raise UserError(f"cannot read {args.warehouse!r} or write the charts to "
                                f"{str(out)!r}: {reason}") from exc
            raise UserError(f"cannot write the charts to {str(out)!r}: {reason}") from exc
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    index = [p for p in written if p.name == "index.html"][0]
    print(f"wrote {len(written) - 1} chart files and {index} (open it in a browser)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
