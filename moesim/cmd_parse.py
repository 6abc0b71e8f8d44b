"""`moesim parse`: Kineto traces → RUN/ops.parquet (+ metrics.json, run.json)."""

from __future__ import annotations

import argparse
from pathlib import Path

HELP = "read Kineto traces (a run dir or files) into RUN/ops.parquet and RUN/metrics.json"


def add_classify_arguments(parser: argparse.ArgumentParser) -> None:
    """The classification options `parse` and `overlap` share."""
    from traces.classify import DEFAULT_COMM_KERNEL_REGEX, DEFAULT_COMM_STREAM_KERNEL_REGEX

    parser.add_argument("--comm-regex", default=DEFAULT_COMM_KERNEL_REGEX,
                        help="kernel names that are communication (default: %(default)s)")
    parser.add_argument("--comm-stream-regex", default=DEFAULT_COMM_STREAM_KERNEL_REGEX,
                        help="kernel names that are communication when on a comm stream (default: %(default)s)")
    parser.add_argument("--comm-stream", type=int, action="append", default=[], metavar="STREAM",
                        help="treat this CUDA stream id as a comm stream (repeatable)")


def classify_config(args: argparse.Namespace):
    from traces.classify import ClassifyConfig

    return ClassifyConfig(args.comm_regex, args.comm_stream_regex, list(args.comm_stream))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="RUN_OR_FILES", help="a run dir, or trace files (one per rank)")
    parser.add_argument("-o", "--output", metavar="RUN", help="run dir to write (default: the input run dir)")
    parser.add_argument("--jsonl", action="store_true", help="also write RUN/ops.jsonl for people")
    add_classify_arguments(parser)


def collect_trace_files(inputs: list[str]) -> list[Path]:
    """Expand run dirs into their Kineto files; keep files as given."""
    from traces.errors import TraceError
    from traces.rundir import trace_files

    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = trace_files(path)
            if not found:
                raise TraceError(f"{path}: no Kineto trace files (*.pt.trace.json[.gz]) in this directory")
            files.extend(found)
        elif path.exists():
            files.append(path)
        else:
            raise TraceError(f"{path}: no such file or directory")
    return files


def run(args: argparse.Namespace) -> int:
    from moesim.cli import UsageError
    from moesim.cmd_overlap import print_metrics
    from traces.kineto import parse_traces
    from traces.overlap import compute_metrics
    from traces.rundir import METRICS_JSON, OPS_PARQUET, RUN_JSON, read_json, write_json_atomic
    from traces.schema import SCHEMA_VERSION, write_ops, write_ops_jsonl

    dirs = [Path(i) for i in args.inputs if Path(i).is_dir()]
    if args.output is None:
        if len(args.inputs) != 1 or not dirs:
            raise UsageError("give -o RUN when the inputs are files or several dirs")
        out = dirs[0]
    else:
        out = Path(args.output)
    files = collect_trace_files(args.inputs)
    ops = parse_traces(files, classify_config(args))
    metrics = compute_metrics(ops)  # everything computed before anything is written
    out.mkdir(parents=True, exist_ok=True)
    write_ops(ops, out / OPS_PARQUET)
    if args.jsonl:
        write_ops_jsonl(ops, out / "ops.jsonl")
    old_metrics = read_json(out / METRICS_JSON) if (out / METRICS_JSON).is_file() else {}
    write_json_atomic(out / METRICS_JSON, {**old_metrics, **metrics})
    if not (out / RUN_JSON).is_file():
        source_run = next((d / RUN_JSON for d in dirs if (d / RUN_JSON).is_file()), None)
        run_info = read_json(source_run) if source_run else {
            "source": "live",
            "world_size": len(set(ops.column("rank").to_pylist())),
            "traces": [str(f) for f in files],
            "schema_version": SCHEMA_VERSION,
        }
        write_json_atomic(out / RUN_JSON, run_info)
    print(f"{out / OPS_PARQUET}: {ops.num_rows} ops from {len(files)} trace file(s)")
    print_metrics(metrics)
    return 0
