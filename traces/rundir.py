"""The run directory: one layout for live and simulated runs (../shared/DESIGN.md).

    RUN/
      run.json                  what ran (stable keys: source, preset, config, schedule, mode,
                                world_size, backend, step_times_us, step_time_us_median)
      rank{r}.pt.trace.json.gz  Kineto traces, one per rank
      ops.parquet               the normalized trace
      metrics.json              step time, overlap, throughput, cost
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from traces.errors import TraceError

RUN_JSON = "run.json"
METRICS_JSON = "metrics.json"
OPS_PARQUET = "ops.parquet"
VALIDATION_JSON = "validation.json"

# torch-tb-profiler's worker-name pattern: `{worker}[.{span}].pt.trace.json[.gz]`
TRACE_FILE_RE = re.compile(r"^(.*?)(\.\d+)?\.pt\.trace\.json(?:\.gz)?$")


def rank_trace_name(rank: int) -> str:
    return f"rank{rank}.pt.trace.json.gz"


def trace_files(run_dir: str | os.PathLike) -> list[Path]:
    """The Kineto trace files of a run dir, sorted by name."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise TraceError(f"{run_dir}: not a directory")
    return sorted(p for p in run_dir.iterdir() if p.is_file() and TRACE_FILE_RE.match(p.name))


def write_json_atomic(path: str | os.PathLike, obj: object) -> Path:
    """Write JSON via a temp file + rename, so a failure never leaves half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=False, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _json_default(obj: object) -> object:
    # numpy scalars and arrays
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def read_json(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise TraceError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise TraceError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(obj, dict):
        raise TraceError(f"{path}: expected a JSON object")
    return obj


def read_run_json(run_dir: str | os.PathLike) -> dict:
    return read_json(Path(run_dir) / RUN_JSON)


def is_run_dir(path: str | os.PathLike) -> bool:
    """A run dir holds run.json, ops.parquet or at least one Kineto trace."""
    path = Path(path)
    if not path.is_dir():
        return False
    return (path / RUN_JSON).is_file() or (path / OPS_PARQUET).is_file() or bool(trace_files(path))
