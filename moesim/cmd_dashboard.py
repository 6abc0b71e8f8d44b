"""`moesim dashboard RUN [RUN ...] -o out.html`: one self-contained HTML dashboard."""

from __future__ import annotations

import argparse
import time

HELP = "build a self-contained HTML dashboard from run dirs, a train log, validation.json or sweep results"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="*", metavar="RUN",
                        help="run dirs (live or simulated); several are stacked / compared side by side")
    parser.add_argument("--train-log", metavar="CSV", help="a `moesim train` log: router PID curves")
    parser.add_argument("--validation", metavar="JSON", help="a validation.json: simulated vs measured")
    parser.add_argument("--sweep", metavar="RESULTS", help="sweep results (.parquet or .csv)")
    parser.add_argument("--title", default="moesim dashboard", help="page title")
    parser.add_argument("-o", "--output", required=True, metavar="HTML", help="the HTML file to write")


def run(args: argparse.Namespace) -> int:
    from dashboards.assemble import build

    t0 = time.perf_counter()
    built = build(args.runs, args.output, train_log=args.train_log, validation=args.validation,
                  sweep=args.sweep, title=args.title)
    elapsed_s = time.perf_counter() - t0
    for note in built.notes:
        print(f"  note: {note}")
    print(f"views: {', '.join(built.views)} ({built.n_figures} figures)")
    print(f"wrote {built.path} ({built.size_bytes / 1e6:.1f} MB) in {elapsed_s:.1f} s")
    return 0
