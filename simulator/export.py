"""Write a simulated timeline as Kineto-style traces: `rank{r}.pt.trace.json.gz` per rank.

What other tools need (../shared/reference/kineto-traces.md, "Writing traces other tools open"):
- one file per rank named like a worker (TensorBoard's torch-tb-profiler lists each as a
  worker; HTA reads the rank from `distributedInfo.rank`);
- `X` events with `cat: "kernel"`, pid = rank, tid = one per lane (so Perfetto's tracks nest),
  `args.stream` / `args.device`; `M` events naming processes and threads;
- comm ops named `ncclDevKernel_<Collective>` unless already NCCL-named (HTA counts
  `^nccl.*Kernel` as communication; traces/classify.py does too) with the collective args
  Kineto copies onto NCCL kernels (`Collective name`, `In msg nelems`, `Group size`,
  `Process Group Ranks`, `Seq`, `In split size`, `dtype`);
- dependencies as `s`/`f` flow pairs (cat `moesim_dep`, `"bp": "e"` on the end) when the run
  has at most `max_flows` of them.
Timestamps are simulated µs from 0 (no `baseTimeNanoseconds`, as in older Kineto traces).
"""

from __future__ import annotations

import gzip
import json
import os
import re
from pathlib import Path

import numpy as np
import orjson
import pyarrow as pa

from simulator.cluster import Cluster
from simulator.collectives import parse_group
from traces.rundir import rank_trace_name

_CAMEL = {
    "all_to_all": "AllToAll",
    "all_reduce": "AllReduce",
    "all_gather": "AllGather",
    "reduce_scatter": "ReduceScatter",
    "send": "SendRecv",
    "recv": "SendRecv",
    "broadcast": "Broadcast",
    "barrier": "AllReduce",
}
_NCCL_NAME = re.compile(r"^nccl", re.I)


def _lane_tid(lane: str, fallback: int) -> int:
    """`cuda:0/stream:7` → 7 (so the tid reads like a stream id), else 1000 + lane index."""
    m = re.search(r"stream:(\d+)$", lane)
    return int(m.group(1)) if m else 1000 + fallback


def write_kineto_traces(
    ops: pa.Table, run_dir: str | os.PathLike, cluster: Cluster, max_flows: int = 200_000
) -> list[Path]:
    """Write one gzipped Chrome-trace JSON per rank of `ops` (simulated start/dur) into run_dir."""
    run_dir = Path(run_dir)
    d = {c: ops.column(c).to_pylist() for c in ("id", "rank", "lane", "kind", "name", "label", "coll", "group", "seq")}
    start = ops.column("start_us").to_numpy()
    dur = ops.column("dur_us").to_numpy()
    coll_bytes = ops.column("coll_bytes").to_numpy()
    splits = ops.column("splits").to_pylist()
    deps = ops.column("deps").to_pylist()
    n_deps = sum(len(x or ()) for x in deps)
    ranks = sorted(set(d["rank"]))
    world = len(ranks)
    backend = "gloo" if cluster.kind == "cpu" else "nccl"
    pos_of_id = {i: k for k, i in enumerate(d["id"])}
    tids: dict[tuple[int, str], int] = {}
    per_rank: dict[int, list[int]] = {r: [] for r in ranks}
    for k, (r, lane) in enumerate(zip(d["rank"], d["lane"])):
        per_rank[r].append(k)
        if (r, lane) not in tids:
            tids[(r, lane)] = _lane_tid(lane, sum(1 for key in tids if key[0] == r))
    events_by_rank: dict[int, list[dict]] = {r: [] for r in ranks}
    for r in ranks:
        ev = events_by_rank[r]
        ev.append({"ph": "M", "name": "process_name", "pid": r, "tid": 0, "args": {"name": f"rank {r}"}})
        ev.append({"ph": "M", "name": "process_sort_index", "pid": r, "tid": 0, "args": {"sort_index": r}})
    for (r, lane), tid in sorted(tids.items(), key=lambda kv: (kv[0][0], kv[1])):
        events_by_rank[r].append({"ph": "M", "name": "thread_name", "pid": r, "tid": tid, "args": {"name": lane}})
        events_by_rank[r].append({"ph": "M", "name": "thread_sort_index", "pid": r, "tid": tid, "args": {"sort_index": tid}})
    for r in ranks:
        ev = events_by_rank[r]
        for k in per_rank[r]:
            tid = tids[(r, d["lane"][k])]
            name = d["name"][k]
            args: dict = {
                "External id": d["id"][k],
                "correlation": d["id"][k],
                "device": r,
                "stream": tid,
                "moesim kind": d["kind"][k],
            }
            if d["label"][k]:
                args["label"] = d["label"][k]
            coll = d["coll"][k]
            if d["kind"][k] == "comm" and coll:
                if not _NCCL_NAME.match(name):
                    args["moesim name"] = name
                    name = f"ncclDevKernel_{_CAMEL.get(coll, 'Generic')}"
                group = d["group"][k]
                members = parse_group(group) if group else ()
                args.update(
                    {
                        "Collective name": coll,
                        "dtype": "Byte",
                        "In msg nelems": int(coll_bytes[k]),
                        "Out msg nelems": int(coll_bytes[k]),
                        "Group size": len(members),
                        "Process Group Ranks": "[" + ", ".join(map(str, members)) + "]",
                        "Seq": d["seq"][k],
                        "In split size": "[" + ", ".join(str(int(x)) for x in (splits[k] or [])) + "]",
                    }
                )
            ev.append(
                {
                    "ph": "X",
                    "cat": "kernel",
                    "name": name,
                    "pid": r,
                    "tid": tid,
                    "ts": round(float(start[k]), 3),
                    "dur": round(float(dur[k]), 3),
                    "args": args,
                }
            )
    if n_deps <= max_flows:
        flow_id = 0
        for k, dl in enumerate(deps):
            for j in dl or ():
                p = pos_of_id.get(j)
                if p is None:
                    continue
                flow_id += 1
                rp, rk = d["rank"][p], d["rank"][k]
                common = {"cat": "moesim_dep", "name": "dep", "id": flow_id}
                events_by_rank[rp].append(
                    {"ph": "s", "pid": rp, "tid": tids[(rp, d["lane"][p])], "ts": round(float(start[p]), 3), **common}
                )
                events_by_rank[rk].append(
                    {"ph": "f", "bp": "e", "pid": rk, "tid": tids[(rk, d["lane"][k])], "ts": round(float(start[k]), 3), **common}
                )
    written = []
    for r in ranks:
        doc = {
            "schemaVersion": 1,
            "deviceProperties": [
                {
                    "id": 0,
                    "name": cluster.gpu.name,
                    "totalGlobalMem": int(cluster.gpu.memory_bytes),
                    "numSms": cluster.gpu.sm_count,
                }
            ],
            "distributedInfo": {"backend": backend, "rank": r, "world_size": world},
            "displayTimeUnit": "ms",
            "traceName": f"moesim simulated on {cluster.name}",
            "traceEvents": events_by_rank[r],
        }
        path = run_dir / rank_trace_name(r)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            events = doc.pop("traceEvents")
            # header written by json with ": " separators: HTA finds the rank with the regex
            # '"rank":\s+(\d+)'; the events (the bulk) by orjson
            head = json.dumps(doc, indent=1)
            body = head[: head.rindex("}")].rstrip() + ',\n "traceEvents": '
            with gzip.open(tmp, "wb", compresslevel=3) as f:
                f.write(body.encode())
                f.write(orjson.dumps(events, option=orjson.OPT_SERIALIZE_NUMPY))
                f.write(b"\n}\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        written.append(path)
    return written


def step_times_us(ops: pa.Table) -> dict[str, list[float]]:
    """Per rank, the span (µs) of each profiled step (the whole table when no step markers)."""
    rank = ops.column("rank").to_numpy()
    step = ops.column("step").to_numpy()
    start = ops.column("start_us").to_numpy()
    end = start + ops.column("dur_us").to_numpy()
    out: dict[str, list[float]] = {}
    stepped = (step >= 0).any()
    for r in np.unique(rank).tolist():
        m = rank == r
        if stepped:
            spans = []
            for s in np.unique(step[m & (step >= 0)]).tolist():
                q = m & (step == s)
                spans.append(float(end[q].max() - start[q].min()))
            out[str(r)] = spans
        else:
            out[str(r)] = [float(end[m].max() - start[m].min())] if m.any() else []
    return out
