"""Overlap metrics of a normalized trace: one definition for live and simulated runs.

`compute_metrics(ops)` turns an ops table (traces/schema.py) into the metrics.json object of
../shared/DESIGN.md. Only the schema's columns are read (rank, lane, kind, label, start_us,
dur_us, step, deps, id), so it works the same on tables parsed from Kineto traces and on
tables the simulator produced.

Definitions (per rank; all figures in µs):
    compute_us / comm_us / memory_us   length of the union of that kind's intervals
    hidden_comm_us                     length of (comm ∪) ∩ (compute ∪)
    exposed_comm_us                    comm_us − hidden_comm_us
    idle_us                            window − length of (compute ∪ comm ∪ memory); the
                                       window is the rank's span per profiled step
    overlap_pct                        hidden / comm · 100 (HTA's definition); None when
                                       the rank has no comm
Per-rank times are per step: totals over the rank's measured steps divided by their number
(1 when the rank has no step markers), so they compare with `step_time_us`. On a rank with
step markers (`step` ≥ 0) only ops inside a step count.

Per label (layer × block, e.g. "L3/dispatch"; ops with an empty label are skipped):
    comm_us, hidden_comm_us   as above, restricted to the label's comm ops (hidden against
                              all compute of the rank)
    window_us                 the overlap window: total duration of the compute ops on
                              *other* lanes of the rank that the dependency graph lets run
                              concurrently (neither ancestor nor descendant) with at least
                              one of the label's comm ops; each compute op counted once
Label figures are the mean over the ranks that hold the label, per step.

The dependency graph: each op depends on its lane predecessor (lane order = start_us order)
and on its `deps`. Ancestry is computed with per-lane vector clocks: because a lane is a
chain, the ancestors of an op on lane L are a prefix of L and its descendants a suffix.
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import pyarrow as pa

from traces.errors import TraceError

_KIND_CODE = {"compute": 0, "comm": 1, "memory": 2, "sync": 3, "host": 4}


# ---------------------------------------------------------------------------------------
# interval arithmetic (the core every figure rests on)


def union_intervals(start_us: np.ndarray, end_us: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Merge intervals [start, end) into sorted disjoint ones (touching intervals merge).

    Args: start_us, end_us: (N,) float arrays. Returns (M,) starts and ends, M ≤ N.
    """
    start_us = np.asarray(start_us, dtype=np.float64)
    end_us = np.asarray(end_us, dtype=np.float64)
    if start_us.size == 0:
        return start_us[:0], end_us[:0]
    order = np.argsort(start_us, kind="stable")
    s, e = start_us[order], end_us[order]
    reach = np.maximum.accumulate(e)
    new = np.empty(s.size, dtype=bool)
    new[0] = True
    new[1:] = s[1:] > reach[:-1]
    first = np.flatnonzero(new)
    last = np.append(first[1:] - 1, s.size - 1)
    return s[first], reach[last]


def union_length(start_us: np.ndarray, end_us: np.ndarray) -> float:
    """Total length of the union of intervals, µs."""
    s, e = union_intervals(start_us, end_us)
    return float(np.sum(e - s))


def intersection_length(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
    """Length of (∪a) ∩ (∪b) for two interval sets given as (starts, ends)."""
    a_s, a_e = union_intervals(*a)
    b_s, b_e = union_intervals(*b)
    if a_s.size == 0 or b_s.size == 0:
        return 0.0
    # Sweep: +1/-1 for a, +2/-2 for b; time where the running sum is 3 is in both.
    times = np.concatenate([a_s, a_e, b_s, b_e])
    steps = np.concatenate([np.full(a_s.size, 1), np.full(a_e.size, -1), np.full(b_s.size, 2), np.full(b_e.size, -2)])
    order = np.argsort(times, kind="stable")
    times, running = times[order], np.cumsum(steps[order])
    both = running[:-1] == 3
    return float(np.sum((times[1:] - times[:-1])[both]))


# ---------------------------------------------------------------------------------------
# dependency windows


def _vector_clocks(
    lane_idx: np.ndarray, pos: np.ndarray, preds: list[list[int]], n_lanes: int, start_us: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Per-lane ancestry bounds for the ops of one rank.

    Args:
        lane_idx: (N,) lane of each op (0..n_lanes-1); pos: (N,) position on its lane.
        preds: for each op, the local indices it depends on (lane predecessor included).
        start_us: (N,) start times (only to break a cycle, should deps close one).
    Returns:
        anc (N, L): highest lane position on each lane that is an ancestor-or-self (-1 none)
        desc (N, L): lowest lane position on each lane that is a descendant-or-self
                     (lane length when none)
    """
    n = lane_idx.size
    succs: list[list[int]] = [[] for _ in range(n)]
    indeg = np.zeros(n, dtype=np.int64)
    for i, ps in enumerate(preds):
        indeg[i] = len(ps)
        for p in ps:
            succs[p].append(i)
    # Kahn's topological order. A real schedule has no cycle, but deps inferred from a
    # trace are heuristics (which wait waited for which collective): should they close a
    # cycle, the earliest-starting blocked op goes next with its open deps ignored.
    order = []
    ready = list(np.flatnonzero(indeg == 0))
    done = np.zeros(n, dtype=bool)
    by_start = np.argsort(start_us, kind="stable")
    cursor = 0
    while len(order) < n:
        if not ready:
            while done[by_start[cursor]]:
                cursor += 1
            ready.append(int(by_start[cursor]))
        i = ready.pop()
        if done[i]:
            continue
        done[i] = True
        order.append(i)
        for j in succs[i]:
            indeg[j] -= 1
            if indeg[j] == 0 and not done[j]:
                ready.append(j)
    lane_len = np.bincount(lane_idx, minlength=n_lanes)
    anc = np.full((n, n_lanes), -1, dtype=np.int64)
    for i in order:
        row = anc[i]
        for p in preds[i]:
            np.maximum(row, anc[p], out=row)
        row[lane_idx[i]] = pos[i]
    desc = np.tile(lane_len, (n, 1)).astype(np.int64)
    for i in reversed(order):
        row = desc[i]
        for j in succs[i]:
            np.minimum(row, desc[j], out=row)
        row[lane_idx[i]] = pos[i]
    return anc, desc


def _label_windows(rank_ops: dict[str, np.ndarray], deps: list[list[int]]) -> dict[str, float]:
    """Overlap window (µs, total over the table) of each label's comm ops on one rank."""
    ids = rank_ops["id"]
    lanes, lane_idx = np.unique(rank_ops["lane"], return_inverse=True)
    n, n_lanes = ids.size, lanes.size
    order = np.lexsort((ids, rank_ops["start_us"], lane_idx))
    pos = np.empty(n, dtype=np.int64)
    local_of_id = {int(op_id): k for k, op_id in enumerate(ids)}
    preds: list[list[int]] = [[] for _ in range(n)]
    lane_members: list[np.ndarray] = []
    for lane in range(n_lanes):
        members = order[lane_idx[order] == lane]
        lane_members.append(members)
        pos[members] = np.arange(members.size)
        for a, b in zip(members[:-1], members[1:]):
            preds[b].append(int(a))
    for k, dep_ids in enumerate(deps):
        for d in dep_ids:
            j = local_of_id.get(int(d))
            if j is not None and j != k:  # deps on other ranks are rendezvous, not ancestry
                preds[k].append(j)
    anc, desc = _vector_clocks(lane_idx, pos, preds, n_lanes, rank_ops["start_us"])
    # prefix sums of compute duration along each lane
    is_compute = rank_ops["kind_code"] == _KIND_CODE["compute"]
    compute_prefix = []
    for members in lane_members:
        d = np.where(is_compute[members], rank_ops["dur_us"][members], 0.0)
        compute_prefix.append(np.concatenate([[0.0], np.cumsum(d)]))
    windows: dict[str, float] = {}
    comm = np.flatnonzero((rank_ops["kind_code"] == _KIND_CODE["comm"]) & (rank_ops["label"] != ""))
    by_label: dict[str, list[int]] = defaultdict(list)
    for k in comm:
        by_label[str(rank_ops["label"][k])].append(int(k))
    steps = rank_ops["step"]
    lane_steps = [steps[members] for members in lane_members]
    for label, members in by_label.items():
        total = 0.0
        for lane in range(n_lanes):
            # concurrent positions on `lane` for op k: anc[k, lane] < p < desc[k, lane],
            # and (when the table has steps) in the same step as k
            mask = np.zeros(lane_members[lane].size, dtype=bool)
            for k in members:
                if lane_idx[k] == lane:
                    continue
                lo, hi = anc[k, lane] + 1, desc[k, lane]
                if hi > lo:
                    span = np.zeros(mask.size, dtype=bool)
                    span[lo:hi] = True
                    if steps[k] >= 0:
                        span &= lane_steps[lane] == steps[k]
                    mask |= span
            prefix = compute_prefix[lane]
            total += float(np.sum(np.diff(prefix)[mask]))
        windows[label] = total
    return windows


# ---------------------------------------------------------------------------------------
# metrics


def _figures(start: np.ndarray, end: np.ndarray, kind: np.ndarray) -> dict[str, float]:
    """Union-based totals (µs) of one rank over one set of ops."""
    comp = (start[kind == 0], end[kind == 0])
    comm = (start[kind == 1], end[kind == 1])
    mem = (start[kind == 2], end[kind == 2])
    busy = kind <= 2
    comm_us = union_length(*comm)
    hidden = intersection_length(comm, comp) if comm_us > 0 else 0.0
    return {
        "compute_us": union_length(*comp),
        "comm_us": comm_us,
        "memory_us": union_length(*mem),
        "hidden_comm_us": hidden,
        "busy_us": union_length(start[busy], end[busy]),
    }


def _pct(hidden_us: float, comm_us: float) -> float | None:
    return 100.0 * hidden_us / comm_us if comm_us > 0 else None


def _columns(ops: pa.Table) -> dict[str, np.ndarray]:
    missing = [c for c in ("id", "rank", "lane", "kind", "start_us", "dur_us") if c not in ops.column_names]
    if missing:
        raise TraceError(f"normalized trace: missing column(s) {', '.join(missing)}")
    n = ops.num_rows

    def col(name: str, default: object) -> np.ndarray:
        if name in ops.column_names:
            return ops.column(name).to_numpy(zero_copy_only=False)
        return np.full(n, default)

    kind_names = col("kind", "compute")
    unknown = set(np.unique(kind_names)) - set(_KIND_CODE)
    if unknown:
        raise TraceError(f"normalized trace: unknown kind(s) {sorted(unknown)}")
    kind_code = np.zeros(n, dtype=np.int8)
    for name, code in _KIND_CODE.items():
        kind_code[kind_names == name] = code
    start = col("start_us", 0.0).astype(np.float64)
    dur = col("dur_us", 0.0).astype(np.float64)
    return {
        "id": col("id", 0).astype(np.int64),
        "rank": col("rank", 0).astype(np.int64),
        "lane": col("lane", "").astype(object),
        "kind_code": kind_code,
        "label": col("label", "").astype(object),
        "start_us": start,
        "dur_us": dur,
        "end_us": start + dur,
        "step": col("step", -1).astype(np.int64),
    }


def compute_metrics(ops: pa.Table) -> dict:
    """The metrics.json object (DESIGN.md stable keys) of a normalized ops table.

    Returns a dict with:
        step_time_us        median over steps of the max over ranks of the rank's step span
        n_steps             number of profiled steps (1 without step markers)
        ranks               {str(rank): {compute_us, comm_us, memory_us, hidden_comm_us,
                             exposed_comm_us, idle_us, overlap_pct}} (per step; overlap_pct
                             None when the rank has no comm)
        overlap_pct_mean    mean of the ranks' overlap_pct (ranks without comm left out;
                             None when no rank has comm)
        labels              [{label, comm_us, hidden_comm_us, window_us}] sorted by label
        steps               [{step, step_time_us, comm_us, hidden_comm_us, overlap_pct}]
                            (comm figures summed over ranks) when step markers exist
    """
    c = _columns(ops)
    bad = np.flatnonzero(~(c["dur_us"] >= 0))
    if bad.size:
        raise TraceError(f"normalized trace: op id {c['id'][bad[0]]} has negative or NaN dur_us")
    # a rank with step markers counts only the ops inside its steps; one without counts all
    stepped_ranks = set(np.unique(c["rank"][c["step"] >= 0]).tolist())
    stepped = bool(stepped_ranks)
    keep = (c["step"] >= 0) | ~np.isin(c["rank"], list(stepped_ranks))
    c = {k: v[keep] for k, v in c.items()}
    deps_all = ops.column("deps").to_pylist() if "deps" in ops.column_names else [[] for _ in range(ops.num_rows)]
    keep_idx = np.flatnonzero(keep)
    deps_all = [deps_all[i] or [] for i in keep_idx]
    ranks = np.unique(c["rank"])
    n_steps = int(np.unique(c["step"][c["step"] >= 0]).size) if stepped else (1 if c["id"].size else 0)

    # step spans: span[rank][step]
    step_spans: dict[int, dict[int, float]] = defaultdict(dict)
    ranks_out: dict[str, dict] = {}
    label_acc: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])  # comm, hidden, window, ranks
    per_step: dict[int, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for rank in ranks:
        in_rank = c["rank"] == rank
        r = {k: v[in_rank] for k, v in c.items()}
        totals = defaultdict(float)
        window_us = 0.0
        rank_steps = np.unique(r["step"])
        for step in rank_steps:
            in_step = r["step"] == step
            s, e, k = r["start_us"][in_step], r["end_us"][in_step], r["kind_code"][in_step]
            if s.size == 0:
                continue
            span = float(e.max() - s.min())
            step_spans[int(step)][int(rank)] = span
            window_us += span
            fig = _figures(s, e, k)
            for key, value in fig.items():
                totals[key] += value
            per_step[int(step)][0] += fig["comm_us"]
            per_step[int(step)][1] += fig["hidden_comm_us"]
        div = max(rank_steps.size, 1)
        comm_us = totals["comm_us"] / div
        hidden = totals["hidden_comm_us"] / div
        ranks_out[str(int(rank))] = {
            "compute_us": totals["compute_us"] / div,
            "comm_us": comm_us,
            "memory_us": totals["memory_us"] / div,
            "hidden_comm_us": hidden,
            "exposed_comm_us": comm_us - hidden,
            "idle_us": (window_us - totals["busy_us"]) / div,
            "overlap_pct": _pct(hidden, comm_us),
        }
        # labels
        labelled = (r["kind_code"] == 1) & (r["label"] != "")
        if np.any(labelled):
            rank_deps = [deps_all[i] for i in np.flatnonzero(in_rank)]
            windows = _label_windows(r, rank_deps)
            comp = (r["start_us"][r["kind_code"] == 0], r["end_us"][r["kind_code"] == 0])
            for label in np.unique(r["label"][labelled]):
                m = labelled & (r["label"] == label)
                comm = (r["start_us"][m], r["end_us"][m])
                acc = label_acc[str(label)]
                acc[0] += union_length(*comm) / div
                acc[1] += intersection_length(comm, comp) / div
                acc[2] += windows.get(str(label), 0.0) / div
                acc[3] += 1

    step_times = [max(spans.values()) for step, spans in sorted(step_spans.items()) if step >= 0 or not stepped]
    pcts = [v["overlap_pct"] for v in ranks_out.values() if v["overlap_pct"] is not None]
    metrics: dict = {
        "step_time_us": float(np.median(step_times)) if step_times else 0.0,
        "n_steps": n_steps,
        "ranks": ranks_out,
        "overlap_pct_mean": float(np.mean(pcts)) if pcts else None,
        "labels": [
            {"label": label, "comm_us": a[0] / a[3], "hidden_comm_us": a[1] / a[3], "window_us": a[2] / a[3]}
            for label, a in sorted(label_acc.items(), key=lambda kv: _label_sort_key(kv[0]))
        ],
    }
    if stepped:
        metrics["steps"] = [
            {
                "step": step,
                "step_time_us": max(step_spans[step].values()),
                "comm_us": per_step[step][0],
                "hidden_comm_us": per_step[step][1],
                "overlap_pct": _pct(per_step[step][1], per_step[step][0]),
            }
            for step in sorted(step_spans)
            if step >= 0
        ]
    return metrics


def _label_sort_key(label: str) -> tuple:
    """L2/attn0 before L10/attn0: numeric layer order, then the label text."""
    head = label.split("/", 1)[0]
    if head.startswith("L") and head[1:].isdigit():
        return (0, int(head[1:]), label)
    return (1, math.inf, label)
