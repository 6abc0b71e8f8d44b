"""The normalized trace: one row per executed op, the contract between traces/ and simulator/.

Live traces (traces/kineto.py), analytic workloads (simulator/workload.py) and simulated
runs all produce this table; the simulator, overlap analysis and dashboards only read it.
See ../shared/DESIGN.md, "The normalized trace".

Columns (one row per op):
    id          int64    unique within the run
    rank        int32    global rank
    lane        str      ordered execution lane: "cuda:0/stream:7", "cpu:main", "cpu:gloo"...
                         ops on one lane run one at a time, in `start_us` order
    kind        str      one of KINDS
    name        str      kernel / operator name as traced (or analytic op name)
    label       str      model annotation path "L3/dispatch", "" if none
    start_us    float64  measured (live) or simulated start, µs
    dur_us      float64  measured or simulated duration, µs
    flops       float64  work of the op where known, else 0
    bytes       float64  bytes moved (HBM / memcpy) where known, else 0
    coll        str      collective type for comm ops (one of COLLECTIVES), "" otherwise
    group       str      ranks of the collective's group, comma separated ("0,1,2,3"), "" if none
    coll_bytes  float64  bytes this rank sends in the collective (its input message)
    splits      list<float64>  per-peer bytes this rank sends, in group order (all-to-all-v);
                         empty when the collective is even
    seq         int64    matches the same collective across the ranks of `group`; -1 if none
    step        int32    profiler step the op belongs to; -1 if unknown
    deps        list<int64>  ids this op waits for besides its lane predecessor

Stored as Parquet (`ops.parquet`) with a JSONL export for people.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from traces.errors import TraceError

SCHEMA_VERSION = 1

KINDS = ("compute", "comm", "memory", "sync", "host")
COLLECTIVES = (
    "all_to_all",
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "send",
    "recv",
    "broadcast",
    "barrier",
)

SCHEMA = pa.schema(
    [
        ("id", pa.int64()),
        ("rank", pa.int32()),
        ("lane", pa.string()),
        ("kind", pa.string()),
        ("name", pa.string()),
        ("label", pa.string()),
        ("start_us", pa.float64()),
        ("dur_us", pa.float64()),
        ("flops", pa.float64()),
        ("bytes", pa.float64()),
        ("coll", pa.string()),
        ("group", pa.string()),
        ("coll_bytes", pa.float64()),
        ("splits", pa.list_(pa.float64())),
        ("seq", pa.int64()),
        ("step", pa.int32()),
        ("deps", pa.list_(pa.int64())),
    ],
    metadata={b"moesim_schema_version": str(SCHEMA_VERSION).encode()},
)

COLUMNS = tuple(SCHEMA.names)

# Defaults for columns a producer may leave out.
_DEFAULTS = {
    "label": "",
    "flops": 0.0,
    "bytes": 0.0,
    "coll": "",
    "group": "",
    "coll_bytes": 0.0,
    "splits": [],
    "seq": -1,
    "step": -1,
    "deps": [],
}
_REQUIRED = ("id", "rank", "lane", "kind", "name", "start_us", "dur_us")


def make_ops(columns: dict[str, object]) -> pa.Table:
    """Build a validated ops table from a dict of column name → sequence / numpy array.

    Required columns: id, rank, lane, kind, name, start_us, dur_us. The others default
    (see module docstring). Raises TraceError naming the first problem found.
    """
    missing = [c for c in _REQUIRED if c not in columns]
    if missing:
        raise TraceError(f"normalized trace: missing column(s) {', '.join(missing)}")
    unknown = sorted(set(columns) - set(COLUMNS))
    if unknown:
        raise TraceError(f"normalized trace: unknown column(s) {', '.join(unknown)}")
    n = len(columns["id"])  # type: ignore[arg-type]
    arrays = []
    for field in SCHEMA:
        values = columns.get(field.name)
        if values is None:
            default = _DEFAULTS[field.name]
            values = [list(default) for _ in range(n)] if isinstance(default, list) else np.full(n, default)
        if len(values) != n:  # type: ignore[arg-type]
            raise TraceError(f"normalized trace: column {field.name} has {len(values)} rows, expected {n}")
        arrays.append(pa.array(values, type=field.type))
    table = pa.Table.from_arrays(arrays, schema=SCHEMA)
    validate_ops(table)
    return table


def validate_ops(table: pa.Table, source: str = "normalized trace") -> None:
    """Check kinds, durations and id uniqueness; raise TraceError naming `source`."""
    if table.num_rows == 0:
        return
    ids = table.column("id").to_numpy()
    if len(np.unique(ids)) != len(ids):
        raise TraceError(f"{source}: duplicate op ids")
    dur = table.column("dur_us").to_numpy()
    bad = np.flatnonzero(~(dur >= 0))
    if len(bad):
        raise TraceError(f"{source}: op id {ids[bad[0]]} has negative or NaN dur_us {dur[bad[0]]}")
    kinds = set(table.column("kind").unique().to_pylist())
    if not kinds <= set(KINDS):
        raise TraceError(f"{source}: unknown kind(s) {sorted(kinds - set(KINDS))}, expected {KINDS}")
    colls = set(table.column("coll").unique().to_pylist()) - {""}
    if not colls <= set(COLLECTIVES):
        raise TraceError(f"{source}: unknown collective(s) {sorted(colls)}, expected {COLLECTIVES}")


def write_ops(table: pa.Table, path: str | os.PathLike) -> Path:
    """Write `table` as Parquet atomically (temp file + rename): no half-written file on error."""
    path = Path(path)
    table = table.cast(SCHEMA)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        pq.write_table(table, tmp, compression="zstd")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def read_ops(path: str | os.PathLike) -> pa.Table:
    """Read an ops.parquet, checking its schema version and columns."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"{path}: no normalized trace (run `moesim parse` first)")
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise TraceError(f"{path}: not a readable Parquet file ({err})") from None
    version = (table.schema.metadata or {}).get(b"moesim_schema_version", b"?").decode()
    if version != str(SCHEMA_VERSION):
        raise TraceError(f"{path}: schema version {version}, this moesim reads {SCHEMA_VERSION}")
    missing = [c for c in COLUMNS if c not in table.column_names]
    if missing:
        raise TraceError(f"{path}: missing column(s) {', '.join(missing)}")
    table = table.select(list(COLUMNS)).cast(SCHEMA)
    validate_ops(table, source=str(path))
    return table


def write_ops_jsonl(table: pa.Table, path: str | os.PathLike) -> Path:
    """A human-readable export: one JSON object per op."""
    import orjson

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            for row in table.to_pylist():
                f.write(orjson.dumps(row) + b"\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
