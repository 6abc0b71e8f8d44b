"""`moesim overlap`: how much communication is hidden, per rank, per label and per step."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HELP = "compute / comm / hidden / exposed time and overlap % of a run (reads ops.parquet or parses its traces)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from moesim.cmd_parse import add_classify_arguments

    parser.add_argument("run", metavar="RUN", help="run dir (or one trace file)")
    parser.add_argument("--json", action="store_true", help="print the metrics.json object instead of tables")
    add_classify_arguments(parser)


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def print_metrics(metrics: dict) -> None:
    """Human tables: per rank, per label, per step."""
    print(f"step time {_fmt(metrics['step_time_us'])} us over {metrics.get('n_steps', 1)} step(s); "
          f"overlap mean {_fmt(metrics['overlap_pct_mean'])}%  (times are per step)")
    cols = ("compute_us", "comm_us", "hidden_comm_us", "exposed_comm_us", "memory_us", "idle_us", "overlap_pct")
    print(f"{'rank':>5} " + " ".join(f"{c:>15}" for c in cols))
    for rank, fig in sorted(metrics["ranks"].items(), key=lambda kv: int(kv[0])):
        print(f"{rank:>5} " + " ".join(f"{_fmt(fig.get(c)):>15}" for c in cols))
    if metrics["labels"]:
        print(f"\n{'label':<40} {'comm_us':>12} {'hidden_us':>12} {'window_us':>12}")
        for row in metrics["labels"]:
            print(f"{row['label'][:40]:<40} {_fmt(row['comm_us']):>12} {_fmt(row['hidden_comm_us']):>12} {_fmt(row['window_us']):>12}")
    if metrics.get("steps"):
        print(f"\n{'step':>8} {'step_time_us':>14} {'comm_us':>12} {'hidden_us':>12} {'overlap_pct':>12}")
        for row in metrics["steps"]:
            print(f"{row['step']:>8} {_fmt(row['step_time_us']):>14} {_fmt(row['comm_us']):>12} "
                  f"{_fmt(row['hidden_comm_us']):>12} {_fmt(row['overlap_pct']):>12}")


def run(args: argparse.Namespace) -> int:
    from moesim.cmd_parse import classify_config, collect_trace_files
    from traces.kineto import parse_traces
    from traces.overlap import compute_metrics
    from traces.rundir import OPS_PARQUET
    from traces.schema import read_ops

    path = Path(args.run)
    if (path / OPS_PARQUET).is_file():
        ops = read_ops(path / OPS_PARQUET)
    else:
        ops = parse_traces(collect_trace_files([args.run]), classify_config(args))
    metrics = compute_metrics(ops)
    if args.json:
        print(json.dumps(metrics, indent=1))
    else:
        print_metrics(metrics)
    return 0
