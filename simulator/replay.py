"""Replay a normalized trace on a cluster and write the result as a run dir.

    replay(ops, cluster, comm_from_trace=..., seed=...) -> simulated ops table
    write_sim_run(out_dir, sim_ops, cluster, ...)        -> RUN/ with traces, ops, run.json, metrics

Replay first drops deps the traced timeline contradicts (`consistent_deps`), then keeps
what the trace shows but the graph does not explain: an op that started later
than its lane predecessor and its deps allowed was held by the host (Python, launch queues);
that gap is replayed as a fixed delay (`replay_gaps`). On the trace's own hardware, with comm
from the trace, a self-consistent timeline is therefore reproduced exactly; with comm from
the network model only the comm durations (and what waits on them) change.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa

from simulator.cluster import Cluster
from simulator.engine import ComputeTimeFn, FlowModel, Simulation
from simulator.errors import SimulationError
from simulator.export import step_times_us, write_kineto_traces
from traces.rundir import METRICS_JSON, OPS_PARQUET, RUN_JSON, write_json_atomic
from traces.schema import write_ops


def replay_gaps(ops: pa.Table) -> np.ndarray:
    """Per-op host delay (µs, ≥ 0, input row order): start − max(lane predecessor end, deps' ends);
    a lane's first op: start − earliest start in the table."""
    n = ops.num_rows
    if n == 0:
        return np.zeros(0)
    import pyarrow.compute as pc

    rank = ops.column("rank").to_numpy().astype(np.int64)
    lane = pc.dictionary_encode(ops.column("lane")).combine_chunks().indices.to_numpy().astype(np.int64)
    start = ops.column("start_us").to_numpy().astype(np.float64)
    end = start + ops.column("dur_us").to_numpy()
    ids = ops.column("id").to_numpy()
    order = np.lexsort((ids, start, lane, rank))
    ready = np.full(n, start.min())
    same_lane = (rank[order][1:] == rank[order][:-1]) & (lane[order][1:] == lane[order][:-1])
    prev_end = end[order][:-1]
    ready_sorted = ready[order]
    ready_sorted[1:] = np.where(same_lane, prev_end, ready_sorted[1:])
    ready[order] = ready_sorted
    pos = {int(i): k for k, i in enumerate(ids.tolist())}
    for k, dl in enumerate(ops.column("deps").to_pylist()):
        for j in dl or ():
            p = pos.get(int(j))
            if p is not None and end[p] > ready[k]:
                ready[k] = end[p]
    return np.maximum(start - ready, 0.0)


def consistent_deps(ops: pa.Table, tolerance_us: float = 0.5) -> tuple[pa.Table, int]:
    """Drop deps the traced timeline contradicts: a dep that ended after the op started (e.g. a
    blocking CPU call such as `c10d::alltoall_base_` enclosing the gloo work it issued) cannot
    be an end-to-start dependency. Returns the table with the kept deps and how many were dropped."""
    start = ops.column("start_us").to_numpy()
    end = start + ops.column("dur_us").to_numpy()
    pos = {int(i): k for k, i in enumerate(ops.column("id").to_numpy().tolist())}
    dropped = 0
    kept_lists = []
    for k, dl in enumerate(ops.column("deps").to_pylist()):
        kept = []
        for j in dl or ():
            p = pos.get(int(j))
            if p is not None and end[p] > start[k] + tolerance_us:
                dropped += 1
            else:
                kept.append(j)
        kept_lists.append(kept)
    if not dropped:
        return ops, 0
    index = ops.schema.get_field_index("deps")
    return ops.set_column(index, ops.schema.field("deps"), pa.array(kept_lists, type=pa.list_(pa.int64()))), dropped


def replay(
    ops: pa.Table,
    cluster: Cluster,
    *,
    comm_from_trace: bool = False,
    seed: int = 0,
    keep_gaps: bool = True,
    compute_time: ComputeTimeFn | None = None,
    flow_model: FlowModel = "auto",
    unsized_from_trace: bool = True,
    notes: dict | None = None,
) -> pa.Table:
    """Simulate a traced op graph; trace durations for compute (and comm with comm_from_trace).
    Deps the trace contradicts are dropped first (`consistent_deps`); the result keeps the
    original deps column. Collectives the trace gives no byte counts for take their traced
    time (`unsized_from_trace`). `notes`, when given, receives `replay_dropped_deps` and
    `unsized_collectives_from_trace` counts."""
    graph, dropped = consistent_deps(ops)
    gaps = replay_gaps(graph) if keep_gaps else None
    engine = Simulation(
        graph,
        cluster,
        comm_from_trace=comm_from_trace,
        seed=seed,
        compute_time=compute_time,
        flow_model=flow_model,
        gap_us=gaps,
        unsized_from_trace=unsized_from_trace,
        trace_tails=True,
    )
    sim = engine.run()
    if notes is not None:
        notes["replay_dropped_deps"] = dropped
        notes["unsized_collectives_from_trace"] = engine.stats.notes.get("unsized_collectives_from_trace", 0)
    index = sim.schema.get_field_index("deps")
    return sim.set_column(index, sim.schema.field("deps"), ops.column("deps"))


def write_sim_run(
    out_dir: str | os.PathLike,
    sim_ops: pa.Table,
    cluster: Cluster,
    *,
    seed: int = 0,
    run_info: dict | None = None,
) -> Path:
    """Write a simulated run dir (same layout as a live one) atomically: built in a sibling
    temp dir, then renamed over `out_dir`. Returns `out_dir` as a Path.

    Writes ops.parquet (sim_ops), rank{r}.pt.trace.json.gz, run.json and metrics.json
    (`traces.overlap.compute_metrics(sim_ops)` plus `"source": "simulated"`).

    run_info: extra run.json keys (input, preset, config, mode, ...); `source`, `cluster`,
    `seed`, `world_size`, `backend`, `step_times_us`, `step_time_us_median` are set here.
    """
    from traces.overlap import compute_metrics

    def fill(tmp: Path) -> None:
        write_ops(sim_ops, tmp / OPS_PARQUET)
        write_kineto_traces(sim_ops, tmp, cluster)
        steps = step_times_us(sim_ops)
        all_steps = [t for v in steps.values() for t in v]
        per_step_max = _per_step_max(steps)
        run = dict(run_info or {})
        run.update(
            {
                "source": "simulated",
                "cluster": cluster.name,
                "cluster_gpus": cluster.num_gpus,
                "seed": seed,
                "world_size": len(steps),
                "backend": "gloo" if cluster.kind == "cpu" else "nccl",
                "step_times_us": steps,
                "step_time_us_median": float(np.median(per_step_max)) if all_steps else 0.0,
            }
        )
        write_json_atomic(tmp / RUN_JSON, run)
        metrics = compute_metrics(sim_ops)
        metrics["source"] = "simulated"
        write_json_atomic(tmp / METRICS_JSON, metrics)

    return write_dir_atomic(out_dir, fill)


def write_dir_atomic(out_dir: str | os.PathLike, fill: Callable[[Path], None]) -> Path:
    """Build a directory with `fill(tmp)` in a sibling temp dir, then rename it over `out_dir`
    (an existing dir is replaced only once the new one is whole). Returns `out_dir` as a Path."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SimulationError(f"{out}: exists and is not a directory")
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        fill(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _per_step_max(steps: dict[str, list[float]]) -> list[float]:
    """Step time per step = max over ranks (synchronous step)."""
    n = max((len(v) for v in steps.values()), default=0)
    return [max(v[i] for v in steps.values() if i < len(v)) for i in range(n)]
