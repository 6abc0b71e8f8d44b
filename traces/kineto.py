"""Read PyTorch profiler (Kineto) Chrome-trace JSON into columns, one file per rank.

`read_trace(path)` loads one file (plain or gzipped, orjson) and returns its timed events
(`ph: X`) as numpy columns; `parse_traces(paths)` reads all ranks of a run and builds the
normalized ops table (traces/schema.py) through traces/lanes.py.

Timestamps: Kineto writes `ts`/`dur` in µs, either absolute epoch µs (older traces) or
relative to `baseTimeNanoseconds` (absolute ns = base + ts·1000). Ranks are aligned on the
absolute clock and the run's earliest op becomes t = 0.

Rank of a file: `distributedInfo.rank`, else `rank<N>` in the file name, else 0 when the
run has a single file; otherwise an error. Every problem is a TraceError that names the
file and, where it applies, the index of the event in `traceEvents`.
"""

from __future__ import annotations

import gc
import gzip
import os
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from traces.errors import TraceError

# event categories we read; everything else (python_function, Trace, overhead ...) is skipped
KERNEL, MEMCPY, MEMSET, CPU_OP, RUNTIME, DRIVER, USER_ANN, CUDA_SYNC, GPU_USER_ANN = range(9)
CATEGORIES = {
    "kernel": KERNEL,
    "Kernel": KERNEL,
    "gpu_memcpy": MEMCPY,
    "Memcpy": MEMCPY,
    "gpu_memset": MEMSET,
    "Memset": MEMSET,
    "cpu_op": CPU_OP,
    "Operator": CPU_OP,
    "cuda_runtime": RUNTIME,
    "Runtime": RUNTIME,
    "cuda_driver": DRIVER,
    "user_annotation": USER_ANN,
    "cuda_sync": CUDA_SYNC,
    "gpu_user_annotation": GPU_USER_ANN,
}
_RANK_IN_NAME = re.compile(r"rank[-_]?(\d+)", re.I)


@dataclass
class TraceFile:
    """The timed events of one Kineto file, as columns (N = kept `X` events)."""

    path: Path
    meta: dict  # top-level keys other than traceEvents
    cat: np.ndarray  # (N,) int8, one of the category codes above
    name: list[str]  # (N,)
    thread: np.ndarray  # (N,) int32 index into `threads`
    threads: list[tuple]  # (pid, tid) of each thread code
    ts_us: np.ndarray  # (N,) float64, as written (see base_ns)
    dur_us: np.ndarray  # (N,) float64
    corr: np.ndarray  # (N,) int64 args.correlation, -1 when absent
    device: np.ndarray  # (N,) int64 GPU events: args.device, else the pid if a number, else 0
    stream: np.ndarray  # (N,) int64 GPU events: args.stream, else the tid if a number, else 0
    nbytes: np.ndarray  # (N,) float64 GPU events: args.bytes (memcpy / memset), else 0
    args: list  # (N,) the args dict where later steps need more than the columns, else None
    base_ns: int = 0  # baseTimeNanoseconds, 0 when ts is absolute
    n_events: int = 0  # len(traceEvents)
    rank: int = -1
    world_size: int = -1
    pg_ranks: dict[str, list[int]] = field(default_factory=dict)
    # autograd's forward → backward links (`fwdbwd` flow events, ph s on the forward op's
    # start, ph f on the backward node's start; F = their number)
    flow_id: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))  # (F,)
    flow_is_start: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))  # (F,) ph s
    flow_ts_us: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.float64))  # (F,) as ts_us
    flow_thread: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int32))  # (F,) into `threads`


CHUNK_BYTES = 4 << 20  # parse the events array in pieces of about this size (bounds memory)
_EVENTS_KEY = b'"traceEvents"'
_SPLIT = b",\n  {"  # Kineto writes one event per "  {" block; JSON strings cannot hold a newline


def _read_bytes(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, expected a trace file") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
            raise TraceError(f"{path}: truncated or corrupt gzip ({err})") from None
    return raw


def _load_whole(path: Path, raw: bytes) -> tuple[dict, list[list]]:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise TraceError(f"{path}: invalid JSON ({err})") from None
    if isinstance(doc, list):  # the Chrome "JSON array" form
        doc = {"traceEvents": doc}
    if not isinstance(doc, dict) or not isinstance(doc.get("traceEvents"), list):
        raise TraceError(f"{path}: not a Kineto/Chrome trace (expected an object with a traceEvents list)")
    events = doc.pop("traceEvents")
    return doc, [events]


def _raw_blocks(path: Path, block_bytes: int):
    """The file's (decompressed) bytes in blocks of at most `block_bytes`."""
    with open(path, "rb") as f:
        data = f.read(1 << 20)
        if data[:2] != b"\x1f\x8b":
            while data:
                yield data
                data = f.read(block_bytes)
            return
        inflate = zlib.decompressobj(wbits=31)
        while True:
            if not data:
                data = f.read(1 << 20)
                if not data:
                    break
            out = inflate.decompress(data, block_bytes)
            data = inflate.unconsumed_tail
            if out:
                yield out
            if inflate.eof:
                data = inflate.unused_data  # (unconsumed_tail repeats these bytes at eof)
                if not data:
                    data = f.read(1 << 20)
                if not data:
                    return
                inflate = zlib.decompressobj(wbits=31)  # concatenated gzip members
        if not inflate.eof:
            raise ValueError("truncated gzip")


def _load_streamed(path: Path):
    """Yield (meta dict or None, events list) pieces of the events array while decompressing.

    Pieces end at a "," between two "  {" event blocks (Kineto's layout). The first piece
    is the file's head closed after some events, the last the tail opened before its
    events; each parse either reads exactly the original text or fails (a split anywhere
    but between two events of traceEvents leaves unbalanced brackets), and then the caller
    falls back to one whole-file parse. Raises ValueError when there is nothing to split.
    """
    buf = b""
    head_done = False
    for block in _raw_blocks(path, CHUNK_BYTES):
        buf += block
        if len(buf) < CHUNK_BYTES:
            continue
        key = buf.find(_EVENTS_KEY) if not head_done else 0
        if key < 0:
            continue
        hit = buf.rfind(_SPLIT, key + 1)
        if hit < 0:
            continue
        piece, buf = buf[:hit], buf[hit + 1 :]
        if not head_done:
            head = orjson.loads(piece + b"]}")
            del piece
            if not isinstance(head, dict) or not isinstance(head.get("traceEvents"), list):
                raise ValueError("head")
            events = head.pop("traceEvents")
            head_done = True
            yield head, events
        else:
            yield None, orjson.loads(b"[" + piece + b"]")
    if not head_done:
        raise ValueError("small or not in Kineto's layout")
    tail = orjson.loads(b'{"traceEvents": [' + buf)
    if not isinstance(tail, dict) or not isinstance(tail.get("traceEvents"), list):
        raise ValueError("tail")
    events = tail.pop("traceEvents")
    yield tail, events


def read_trace(path: str | os.PathLike, streamed: bool = True) -> TraceFile:
    """Read one Kineto trace file. Raises TraceError naming the file (and event index).

    Files in Kineto's layout are decompressed and parsed in ~4 MB pieces of the events
    array, each turned into columns before the next is read, so peak memory stays a small
    multiple of one piece plus the columns; anything else is read and parsed whole.
    """
    path = Path(path)
    parts: list[dict] = []
    meta: dict = {}
    try:
        if not streamed:
            raise ValueError("whole-file read asked for")
        offset = 0
        for piece_meta, events in _load_streamed(path):
            meta.update(piece_meta or {})
            parts.append(_events_columns(path, events, offset))
            offset += len(events)
            del events
    except TraceError:
        raise
    except IsADirectoryError:
        raise TraceError(f"{path}: is a directory, expected a trace file") from None
    except (orjson.JSONDecodeError, ValueError, zlib.error, EOFError):
        parts, meta = [], {}
    if not parts:
        meta, pieces = _load_whole(path, _read_bytes(path))
        parts = [_events_columns(path, pieces[0], 0)]
        del pieces
    tf = _merge_parts(path, meta, parts)
    _read_dist_info(tf)
    return tf


def _events_columns(path: Path, events: list, offset: int) -> dict:
    try:
        return _columns(events)
    except Exception as err:  # noqa: BLE001 - locate the event that broke the fast path
        _raise_first_bad_event(path, events, err, offset)


_COLLECTIVE_ARG = "Collective name"


def _keep_args(cat: int, name: str, args: object) -> bool:
    """Whether later steps need the whole args dict of this event (the columns cover the rest)."""
    if args.__class__ is not dict:
        return False
    if cat == CUDA_SYNC:
        return True
    if cat == CPU_OP:
        return name == "record_param_comms" or name.startswith("c10d::")
    if cat == USER_ANN:  # a gloo worker's annotation records the collective's input shapes
        return name.startswith("gloo:")
    return cat == KERNEL and _COLLECTIVE_ARG in args


def _as_int(value: object, default: int) -> int:
    return value if value.__class__ is int and -(2**62) < value < 2**62 else default


def _columns(events: list) -> dict:
    """Fast path: list comprehensions over the event dicts, then numpy."""
    if not all(e.__class__ is dict for e in events):
        raise ValueError("non-object event")
    timed = [e for e in events if e.get("ph") == "X"]
    ts = np.array([e.get("ts") for e in timed], dtype=np.float64)
    dur = np.array([e.get("dur") for e in timed], dtype=np.float64)
    if not (np.all(np.isfinite(ts)) and np.all(np.isfinite(dur)) and np.all(dur >= 0)):
        raise ValueError("bad ts/dur")
    cats = CATEGORIES
    cat = np.array([cats.get(e.get("cat"), -1) for e in timed], dtype=np.int8)
    keep = np.flatnonzero(cat >= 0)
    kept = [timed[i] for i in keep.tolist()]
    cat = cat[keep]
    names = [e.get("name") for e in kept]
    if not all(n.__class__ is str for n in names):
        raise ValueError("non-string name")
    threads = [(e.get("pid"), e.get("tid")) for e in kept]
    hash(tuple(threads))
    args = [e.get("args") for e in kept]
    args = [a if a.__class__ is dict else None for a in args]
    empty: dict = {}
    n = len(kept)
    corr = np.full(n, -1, dtype=np.int64)
    device = np.zeros(n, dtype=np.int64)
    stream = np.zeros(n, dtype=np.int64)
    nbytes = np.zeros(n, dtype=np.float64)
    # per-category extraction: only the events that use a field pay for it
    gpu = np.flatnonzero(cat <= MEMSET).tolist()  # kernel, memcpy, memset
    linked = np.flatnonzero((cat <= MEMSET) | (cat == RUNTIME) | (cat == DRIVER) | (cat == CUDA_SYNC)).tolist()
    corr[linked] = [_as_int((args[i] or empty).get("correlation"), -1) for i in linked]
    device[gpu] = [_as_int((args[i] or empty).get("device"), _as_int(threads[i][0], 0)) for i in gpu]
    stream[gpu] = [_as_int((args[i] or empty).get("stream"), _as_int(threads[i][1], 0)) for i in gpu]
    moved = [(args[i] or empty).get("bytes", 0) for i in gpu]
    nbytes[gpu] = [b if b.__class__ in (int, float) and 0 <= b < 1e300 else 0 for b in moved]
    cat_list = cat.tolist()
    flows = [e for e in events if e.get("cat") == "fwdbwd" and e.get("ph") in ("s", "f")
             and e.get("ts").__class__ in (int, float) and -1e300 < e["ts"] < 1e300 and e.get("id").__class__ is int
             and e.get("pid").__class__ in (int, str) and e.get("tid").__class__ in (int, str)]
    return {
        "flow_id": np.array([_as_int(e.get("id"), -1) for e in flows], dtype=np.int64),
        "flow_is_start": np.array([e["ph"] == "s" for e in flows], dtype=bool),
        "flow_ts": np.array([e["ts"] for e in flows], dtype=np.float64),
        "flow_threads": [(e.get("pid"), e.get("tid")) for e in flows],
        "cat": cat,
        "name": names,
        "threads": threads,
        "ts": ts[keep],
        "dur": dur[keep],
        "corr": corr,
        "device": device,
        "stream": stream,
        "nbytes": nbytes,
        "args": [a if _keep_args(c, n, a) else None for c, n, a in zip(cat_list, names, args)],
        "n_events": len(events),
    }


def _merge_parts(path: Path, meta: dict, parts: list[dict]) -> TraceFile:
    base = meta.get("baseTimeNanoseconds", 0)
    if not isinstance(base, int) or isinstance(base, bool) or base < 0:
        raise TraceError(f"{path}: baseTimeNanoseconds must be a non-negative integer, got {base!r}")
    thread_of: dict[tuple, int] = {}
    thread = np.array([thread_of.setdefault(t, len(thread_of)) for p in parts for t in p["threads"]], dtype=np.int32)
    flow_thread = np.array([thread_of.setdefault(t, len(thread_of)) for p in parts for t in p["flow_threads"]],
                           dtype=np.int32)
    return TraceFile(
        path=path,
        meta=meta,
        cat=np.concatenate([p["cat"] for p in parts]),
        name=[n for p in parts for n in p["name"]],
        thread=thread,
        threads=list(thread_of),
        ts_us=np.concatenate([p["ts"] for p in parts]),
        dur_us=np.concatenate([p["dur"] for p in parts]),
        corr=np.concatenate([p["corr"] for p in parts]),
        device=np.concatenate([p["device"] for p in parts]),
        stream=np.concatenate([p["stream"] for p in parts]),
        nbytes=np.concatenate([p["nbytes"] for p in parts]),
        args=[a for p in parts for a in p["args"]],
        flow_id=np.concatenate([p["flow_id"] for p in parts]),
        flow_is_start=np.concatenate([p["flow_is_start"] for p in parts]),
        flow_ts_us=np.concatenate([p["flow_ts"] for p in parts]),
        flow_thread=flow_thread,
        base_ns=base,
        n_events=sum(p["n_events"] for p in parts),
    )


def _raise_first_bad_event(path: Path, events: list, err: Exception, offset: int = 0) -> None:
    """Slow path: find the first event the fast path could not take and name it."""
    for i, e in enumerate(events, start=offset):
        if not isinstance(e, dict):
            raise TraceError(f"{path}: event {i}: expected a JSON object, got {type(e).__name__}")
        if e.get("ph") != "X":
            continue
        label = f"{path}: event {i} ({str(e.get('name'))[:60]!r})"
        for key in ("ts", "dur"):
            value = e.get(key)
            if value is None:
                raise TraceError(f"{label}: missing {key}")
            try:
                number = float(value)
            except (TypeError, ValueError, OverflowError):
                raise TraceError(f"{label}: {key} is not a number: {value!r}") from None
            if not np.isfinite(number):
                raise TraceError(f"{label}: {key} is not finite: {value!r}")
            if key == "dur" and number < 0:
                raise TraceError(f"{label}: negative dur {value!r}")
        if not isinstance(e.get("name"), str):
            raise TraceError(f"{label}: name must be a string")
        try:
            hash((e.get("pid"), e.get("tid"), e.get("cat")))
        except TypeError:
            raise TraceError(f"{label}: pid, tid and cat must be strings or numbers") from None
    raise TraceError(f"{path}: unreadable events ({type(err).__name__}: {err})")


def _read_dist_info(tf: TraceFile) -> None:
    info = tf.meta.get("distributedInfo")
    if not isinstance(info, dict):
        return
    rank, world = info.get("rank"), info.get("world_size")
    if isinstance(rank, int) and not isinstance(rank, bool) and rank >= 0:
        tf.rank = rank
    if isinstance(world, int) and not isinstance(world, bool) and world > 0:
        tf.world_size = world
    for pg in info.get("pg_config") or []:
        if isinstance(pg, dict) and isinstance(pg.get("ranks"), list):
            ranks = [r for r in pg["ranks"] if isinstance(r, int)]
            tf.pg_ranks[str(pg.get("pg_name", ""))] = ranks


def assign_ranks(files: list[TraceFile]) -> None:
    """Fill each file's rank (distributedInfo, else `rankN` in the name, else 0 if alone)
    and check the files describe one run: distinct ranks, one world size."""
    for tf in files:
        if tf.rank >= 0:
            continue
        match = _RANK_IN_NAME.search(tf.path.name)
        if match:
            tf.rank = int(match.group(1))
        elif len(files) == 1:
            tf.rank = 0
        else:
            raise TraceError(f"{tf.path}: no distributedInfo.rank and no rank<N> in the file name; cannot tell its rank")
    seen: dict[int, Path] = {}
    for tf in files:
        if tf.rank in seen:
            raise TraceError(f"{tf.path}: claims rank {tf.rank}, already claimed by {seen[tf.rank]}")
        seen[tf.rank] = tf.path
    worlds = {tf.world_size: tf.path for tf in files if tf.world_size > 0}
    if len(worlds) > 1:
        (w1, p1), (w2, p2) = list(worlds.items())[:2]
        raise TraceError(f"{p2}: world_size {w2}, but {p1} has world_size {w1}; files from different runs")
    for tf in files:
        if tf.world_size > 0 and tf.rank >= tf.world_size:
            raise TraceError(f"{tf.path}: rank {tf.rank} is outside world_size {tf.world_size}")


def parse_traces(paths: list[str | os.PathLike], config: object | None = None) -> pa.Table:
    """Read the Kineto files of one run (one per rank) into one normalized ops table.

    `config` is a traces.classify.ClassifyConfig (default rules when None).
    """
    from traces.classify import ClassifyConfig

    if not paths:
        raise TraceError("no trace files given")
    config = config or ClassifyConfig()
    # The parsed JSON is millions of small objects that all stay alive until the table is
    # built; the cyclic GC would walk them again and again for nothing (2x the run time).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        return _parse(paths, config)
    finally:
        if gc_was_enabled:
            gc.enable()


def _parse(paths: list, config: object) -> pa.Table:
    from traces.lanes import rank_ops
    from traces.schema import make_ops

    files = [read_trace(p) for p in paths]
    assign_ranks(files)
    files.sort(key=lambda tf: tf.rank)
    ref_ns = min(tf.base_ns for tf in files)
    parts = []
    next_id = 0
    for tf in files:
        cols = rank_ops(tf, config)
        n = len(cols["name"])
        if n == 0:
            continue
        cols["start_us"] = cols["start_us"] + (tf.base_ns - ref_ns) / 1000.0
        cols["deps_flat"] = cols["deps_flat"] + next_id
        cols["id"] = np.arange(next_id, next_id + n, dtype=np.int64)
        cols["rank"] = np.full(n, tf.rank, dtype=np.int32)
        next_id += n
        parts.append(cols)
    if not parts:
        raise TraceError(f"{files[0].path}: no ops (no kernels, CPU ops or collectives) in {len(files)} file(s)")
    t0 = min(float(p["start_us"].min()) for p in parts)
    merged: dict[str, object] = {}
    for key in parts[0]:
        if key in ("deps_offsets", "deps_flat"):
            continue
        values = [p[key] for p in parts]
        if isinstance(values[0], np.ndarray):
            merged[key] = np.concatenate(values)
        else:
            merged[key] = [v for part in values for v in part]
    merged["start_us"] = merged["start_us"] - t0  # type: ignore[operator]
    # deps as one arrow list array: shift each part's offsets by the values before it
    offsets, base = [np.zeros(1, dtype=np.int64)], 0
    for p in parts:
        offsets.append(p["deps_offsets"][1:] + base)
        base += int(p["deps_offsets"][-1])
    merged["deps"] = pa.ListArray.from_arrays(
        pa.array(np.concatenate(offsets), type=pa.int32()) if base < 2**31 else pa.array(np.concatenate(offsets)),
        pa.array(np.concatenate([p["deps_flat"] for p in parts]), type=pa.int64()),
    )
    return make_ops(merged)
