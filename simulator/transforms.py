"""What-if transforms on a traced op graph: batch / sequence, schedule, EP world size,
routing (zero-expert share, skew), then back to a normalized table the engine replays.

    g = step_graph(ops)                         one typical step of a live trace (see below)
    g = scale_work(g, model, token_scale, attention_scale)   batch / sequence size
    g = set_schedule(g, "shortcut")             sequential ↔ shortcut (ScMoE overlap)
    g = scale_experts(g, {rank: factor})        zero-expert share / routing skew
    g = set_world_size(g, 4)                    EP world size (ranks replicated)
    ops, gap_us = g.to_ops()                    → simulator.engine.simulate(..., gap_us=gap_us)

`step_graph` turns the measured steps of a live run into one step whose op durations are
what each op itself costs, with the time spent *waiting* removed, because the replay must
recompute waiting for the new configuration:
  - a collective's issuing op that returns only after the collective ends (a synchronous
    call) keeps its time minus the collective's; its lane successor waits for the collective;
  - when a collective ends while its rank's issuing lane sits idle (a gap), inside a wait
    op (`WAIT_RE`) or inside the autograd node right after the issuing op (the rest of a
    backward that issued it with a blocking call), that wait is a dependency: the op after
    the gap / the waiting op waits for the collective and keeps only the time after it
    ended; an async collective that ends under running compute is joined at the next wait
    op;
  - the idle time before each op on a lane (Python, dispatcher: `gap_us`) is kept as is,
    except on GPU lanes (`cuda:*`), whose idle time is waiting for the next launch;
  - on CUDA the backward pass runs on autograd's own thread: its first op waits for the
    main-lane op that started it and the main lane's next op for its last one;
  - a host sync (cudaStreamSynchronize ...) keeps only its time after the GPU ops it waits
    for ended; a copy call that returned only after its copy ended (device to pageable host
    memory) keeps its time after the copy, and the host's next op waits for the copy;
  - durations and gaps are averaged over the measured steps position by position (the steps
    of a run execute the same op sequence). The mean, not the median: on a shared CPU,
    preemption hits a random few ops of each step, and a per-op median would drop it from
    every op, while the mean keeps the step's total (sum of means = mean of sums);
  - collectives get group = all ranks when the trace has none, and seq = their issue order.
Durations of collectives are left to the caller (comm model; see simulator/validate.py).
"""

from __future__ import annotations

import dataclasses
import re
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from simulator.costmodel import CostModel, classify, is_view
from simulator.errors import SimulationError

WAIT_RE = re.compile(r"wait", re.I)
AUTOGRAD_NODE_PREFIX = "autograd::engine::evaluate_function"
# Labels whose work does not grow with tokens: gradient sync and the optimizer.
FIXED_LABEL_PREFIXES = ("grad_sync", "Optimizer", "optimizer")
# Collectives smaller than this are metadata (split counts), not token payloads.
METADATA_BYTES = 4096
LAYER_LABEL_RE = re.compile(r"^L(\d+)/(\w+)$")
# The blocks scale_experts moves, forward and (":bwd") backward.
EXPERT_LABEL_RE = re.compile(r"^L(\d+)/(experts|dispatch|combine)(?::bwd)?$")
# scale_experts: in dispatch / combine, a gather, scatter or elementwise op moving at least
# this much works on the FFN rows (x[token_M], y * weights, index_add); smaller ones work on
# split counts and slot indices (argsort, bincount over all T·K slots are kind "other").
ROW_OP_BYTES = 64 * 1024


@dataclass
class StepGraph:
    """One step's ops (index = op), lanes ordered by `pos`; deps are indices."""

    rank: np.ndarray  # (N,) int
    lane: list[str]
    kind: list[str]
    name: list[str]
    label: list[str]
    dur_us: np.ndarray  # own duration (waiting removed)
    gap_us: np.ndarray  # host idle time before the op on its lane
    flops: np.ndarray
    bytes: np.ndarray
    coll: list[str]
    group: list[str]
    coll_bytes: np.ndarray
    splits: list[list[float]]
    seq: np.ndarray
    deps: list[list[int]]
    pos: np.ndarray  # order within its (rank, lane)
    steps_used: int = 1
    notes: dict = field(default_factory=dict)
    # of `bytes`, what does not grow with tokens (weights; calibrate.attach_work); None: all grows
    fixed_bytes: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.name)

    def copy(self) -> "StepGraph":
        return StepGraph(**{
            f.name: (getattr(self, f.name).copy() if isinstance(getattr(self, f.name), np.ndarray)
                     else [list(x) if isinstance(x, list) else x for x in getattr(self, f.name)]
                     if isinstance(getattr(self, f.name), list)
                     else {k: list(v) if isinstance(v, list) else v for k, v in self.notes.items()} if f.name == "notes"
                     else getattr(self, f.name))
            for f in dataclasses.fields(self)
        })

    def lanes(self) -> dict[tuple[int, str], list[int]]:
        """(rank, lane) → op indices in lane order."""
        out: dict[tuple[int, str], list[int]] = defaultdict(list)
        for i in np.lexsort((self.pos,)).tolist():
            out[(int(self.rank[i]), self.lane[i])].append(i)
        return dict(out)

    def to_ops(self) -> tuple[pa.Table, np.ndarray]:
        """A normalized ops table (ids = indices; start_us only orders each lane) and the
        per-op host gaps for `simulate(..., gap_us=...)`, in the table's row order."""
        from traces.schema import make_ops

        start = np.zeros(self.n)
        for idx in self.lanes().values():
            t = np.cumsum(self.gap_us[idx] + self.dur_us[idx]) - self.dur_us[idx]
            start[idx] = t
        ops = make_ops({
            "id": np.arange(self.n, dtype=np.int64), "rank": self.rank.astype(np.int32), "lane": self.lane,
            "kind": self.kind, "name": self.name, "label": self.label, "start_us": start,
            "dur_us": np.maximum(self.dur_us, 0.0), "flops": self.flops, "bytes": self.bytes, "coll": self.coll,
            "group": self.group, "coll_bytes": self.coll_bytes, "splits": self.splits, "seq": self.seq,
            "step": np.zeros(self.n, dtype=np.int32), "deps": self.deps,
        })
        return ops, np.maximum(self.gap_us, 0.0)


# ---------------------------------------------------------------------------------------
# from a live trace


def _prepare_rank_step(rows: dict[str, np.ndarray | list], idx: np.ndarray) -> tuple[list[int], np.ndarray, np.ndarray, list[list[int]]]:
    """For one rank's ops of one step (`idx` into rows): canonical order, own durations,
    gaps and deps (as positions in the canonical order). See the module docstring."""
    lane = [rows["lane"][i] for i in idx]
    start = rows["start_us"][idx]
    dur = rows["dur_us"][idx]
    order = sorted(range(len(idx)), key=lambda k: (lane[k], start[k], int(rows["id"][idx[k]])))
    idx = idx[order]
    lane = [lane[k] for k in order]
    start, dur = start[order], dur[order]
    end = start + dur
    local = {int(rows["id"][i]): k for k, i in enumerate(idx)}
    kind = [rows["kind"][i] for i in idx]
    name = [rows["name"][i] for i in idx]
    own = dur.copy()
    gap = np.zeros(len(idx))
    deps: list[list[int]] = [[local[d] for d in rows["deps"][i] if d in local] for i in idx]
    by_lane: dict[str, list[int]] = defaultdict(list)
    for k, ln in enumerate(lane):
        by_lane[ln].append(k)
    for ln, ks in by_lane.items():
        if kind[ks[0]] == "comm" and all(kind[k] == "comm" for k in ks):
            continue  # comm lanes: their ops wait on issuers, not on host time
        if ln.startswith("cuda:"):
            continue  # a GPU idles only until its next launch arrives: the launch dep says when
        for a, b in zip(ks, ks[1:]):
            gap[b] = max(start[b] - end[a], 0.0)
    _join_backward_thread(by_lane, [rows["label"][i] for i in idx], kind, start, end, gap, deps)
    next_on_lane = {a: b for ks in by_lane.values() for a, b in zip(ks, ks[1:])}
    for k in range(len(idx)):  # a host sync waits for GPU ops: only the time after them is its own
        gpu_deps = [d for d in deps[k] if lane[d].startswith("cuda:")]
        if kind[k] == "sync" and gpu_deps:
            own[k] = max(end[k] - max(start[k], max(end[d] for d in gpu_deps)), 0.0)
        if lane[k].startswith("cuda:") and kind[k] == "memory":
            # a copy whose launch call returned only after it (to pageable host memory): the
            # call waited for the stream; the op after the call waits for the copy instead
            for d in deps[k]:
                if not lane[d].startswith("cuda:") and end[d] >= end[k]:
                    own[d] = 0.0  # it waited for the stream, then the copy
                    if d in next_on_lane:  # its time after the copy comes before the next op
                        deps[next_on_lane[d]].append(k)
                        gap[next_on_lane[d]] += end[d] - end[k]
    joined: set[int] = set()
    for c in (k for k in range(len(idx)) if kind[k] == "comm"):
        issuers = [d for d in deps[c] if kind[d] != "comm"]
        if not issuers:
            continue
        i = issuers[0]
        e = end[c]
        lane_ops = by_lane[lane[i]]
        if end[i] >= e:  # synchronous: the issuing call returned after the collective
            own[i] = max(own[i] - (e - max(start[c], start[i])), 0.0)
            nxt = next_on_lane.get(i)
            if nxt is not None:
                deps[nxt].append(c)
            continue
        after = [k for k in lane_ops if start[k] > start[i]]
        holder = next((k for k in after if start[k] <= e < end[k]), None)
        gap_hit = next((k for k in after if start[k] > e), None)
        if holder is None and gap_hit is not None and (gap_hit == after[0] or end[after[after.index(gap_hit) - 1]] <= e):
            deps[gap_hit].append(c)  # idle until the collective ended: waited in a gap
            gap[gap_hit] = max(start[gap_hit] - e, 0.0)
        elif holder is not None and (WAIT_RE.search(name[holder]) or (
                holder == after[0] and kind[holder] == "host" and name[holder].startswith(AUTOGRAD_NODE_PREFIX))):
            # a wait op, or the rest of an autograd node that issued the collective with a
            # blocking call (a synchronous all_to_all in a backward: the c10d op returns at
            # once, the node when the collective is done)
            deps[holder].append(c)
            own[holder] = end[holder] - e
            joined.add(holder)
        else:  # finished under other work: joined by the next wait op not yet used
            w = next((k for k in after if WAIT_RE.search(name[k]) and k not in joined and start[k] >= e), None)
            if w is not None:
                deps[w].append(c)
                joined.add(w)
    return idx.tolist(), own, gap, deps


def _join_backward_thread(by_lane: dict[str, list[int]], label: list[str], kind: list[str], start: np.ndarray,
                          end: np.ndarray, gap: np.ndarray, deps: list[list[int]]) -> None:
    """CUDA autograd runs the backward pass on a thread of its own (a CPU lane other than
    cpu:main whose own work is labelled ":bwd", traces/lanes.py) while the Python thread waits
    in backward(): the worker's first op waits for the main-lane op that started the
    backward, and the first main-lane op after the worker's last op waits for it; neither
    idle time is host time of its own. A collective lane (gloo's workers, whose transfers
    take the ":bwd" label of the backward op that issued them) is not such a thread."""
    main = by_lane.get("cpu:main")
    if not main:
        return
    main_start = start[main]
    for ln, ks in by_lane.items():
        if (not ln.startswith("cpu:") or ln == "cpu:main"
                or not any(label[k].endswith(":bwd") and kind[k] != "comm" for k in ks)):
            continue
        first, last = ks[0], ks[-1]
        j_start = int(np.searchsorted(main_start, start[first], side="right")) - 1
        if j_start >= 0 and end[main[j_start]] <= start[first]:  # (a main op still running is no start signal)
            deps[first].append(main[j_start])
            gap[first] = start[first] - end[main[j_start]]
        j_end = int(np.searchsorted(main_start, end[last], side="left"))
        # a later main op than the one that started the pass (else a zero-length pass could loop)
        if j_start < j_end < len(main) and (j_end == 0 or end[main[j_end - 1]] <= end[last]):
            deps[main[j_end]].append(last)
            gap[main[j_end]] = max(start[main[j_end]] - end[last], 0.0)


def step_graph(ops: pa.Table, steps: list[int] | None = None, stat: str = "mean", per_step: bool = False,
               every_step: bool = False) -> StepGraph | list[StepGraph]:
    """One typical step of a live trace (module docstring); `stat` ("mean" or "median") over
    `steps` (default: every step ≥ 0 whose op sequence matches the most common one).
    per_step=True: one graph per such step instead (replaying each and taking the median
    keeps the straggler effect of per-step noise: a synchronous step waits for the slowest
    rank in every exchange, which an averaged step smooths away); with every_step=True, one
    per step whatever its op sequence (e.g. for totals: an expert that received no tokens
    in a step runs no ops)."""
    if stat not in ("mean", "median"):
        raise SimulationError(f"step_graph: stat {stat!r}, expected mean or median")
    reduce = np.mean if stat == "mean" else np.median
    rows = {c: ops.column(c).to_numpy() if c in ("id", "rank", "start_us", "dur_us", "flops", "bytes", "coll_bytes", "seq", "step",
                                                 "fixed_bytes")
            else ops.column(c).to_pylist() for c in ops.column_names}
    # gloo runs a collective on whichever of its worker threads is free ("cpu:gloo",
    # "cpu:gloo/1"), differently from step to step; the code under test never has two
    # collectives in flight at once, so one comm lane per backend keeps steps comparable
    rows["lane"] = [ln.split("/")[0] if k == "comm" and ln.startswith("cpu:") else ln
                    for ln, k in zip(rows["lane"], rows["kind"])]
    step_col = rows["step"]
    all_steps = sorted(int(s) for s in np.unique(step_col) if s >= 0) if steps is None else list(steps)
    if not all_steps:
        raise SimulationError("trace has no profiler steps (step column all -1); capture with a step schedule")
    ranks = sorted(int(r) for r in np.unique(rows["rank"]))
    prepared: dict[int, dict[int, tuple]] = {}
    signatures: dict[int, tuple] = {}
    for s in all_steps:
        per_rank = {}
        for r in ranks:
            idx = np.flatnonzero((step_col == s) & (rows["rank"] == r))
            per_rank[r] = _prepare_rank_step(rows, idx)
        prepared[s] = per_rank
        signatures[s] = tuple(
            (r, tuple((rows["lane"][i], rows["name"][i]) for i in per_rank[r][0])) for r in ranks
        )
    counts: dict[tuple, int] = defaultdict(int)
    for sig in signatures.values():
        counts[sig] += 1
    template_sig = max(counts, key=lambda sig: counts[sig])
    used = [s for s in all_steps if signatures[s] == template_sig]
    skipped = [s for s in all_steps if s not in used]
    if per_step:
        return [_assemble(rows, ranks, prepared, [s], reduce, skipped) for s in (all_steps if every_step else used)]
    return _assemble(rows, ranks, prepared, used, reduce, skipped)


def _assemble(rows: dict, ranks: list[int], prepared: dict, used: list[int], reduce, skipped: list[int]) -> StepGraph:
    """Build the StepGraph of `used` steps (durations and gaps reduced position-wise)."""
    first = used[0]
    cols: dict[str, list] = defaultdict(list)
    offset = 0
    for r in ranks:
        idx0, _, _, deps0 = prepared[first][r]
        own = reduce(np.stack([prepared[s][r][1] for s in used]), axis=0)
        gap = reduce(np.stack([prepared[s][r][2] for s in used]), axis=0)
        cols["own"].append(own)
        cols["gap"].append(gap)
        for k, i in enumerate(idx0):
            for c in ("rank", "lane", "kind", "name", "label", "flops", "bytes", "coll", "group", "coll_bytes", "splits"):
                cols[c].append(rows[c][i])
            if "fixed_bytes" in rows:
                cols["fixed_bytes"].append(rows["fixed_bytes"][i])
            cols["deps"].append(sorted({d + offset for d in deps0[k]}))
            cols["pos"].append(k)
        offset += len(idx0)
    n = offset
    g = StepGraph(
        rank=np.asarray(cols["rank"], dtype=np.int64), lane=cols["lane"], kind=cols["kind"], name=cols["name"],
        label=cols["label"], dur_us=np.concatenate(cols["own"]) if n else np.zeros(0),
        gap_us=np.concatenate(cols["gap"]) if n else np.zeros(0), flops=np.asarray(cols["flops"], dtype=float),
        bytes=np.asarray(cols["bytes"], dtype=float), coll=cols["coll"], group=cols["group"],
        coll_bytes=np.asarray(cols["coll_bytes"], dtype=float), splits=[list(s or []) for s in cols["splits"]],
        seq=np.full(n, -1, dtype=np.int64), deps=cols["deps"], pos=np.asarray(cols["pos"], dtype=float),
        steps_used=len(used), notes={"steps": used, "steps_skipped": skipped},
        fixed_bytes=np.asarray(cols["fixed_bytes"], dtype=float) if "fixed_bytes" in rows else None,
    )
    if len(used) == 1:  # one step: where its ops ran (one clock for all ranks of a host)
        idx = np.asarray([i for r in ranks for i in prepared[first][r][0]], dtype=np.int64)
        g.notes["trace_start_us"] = rows["start_us"][idx].astype(float)
        g.notes["trace_end_us"] = g.notes["trace_start_us"] + rows["dur_us"][idx]
    _number_collectives(g)
    return g


def _number_collectives(g: StepGraph) -> None:
    """group = all ranks where missing; seq = issue order per rank (issuer's lane position)."""
    everyone = ",".join(str(r) for r in sorted(set(g.rank.tolist())))
    order_key = {}
    for i in range(g.n):
        if g.kind[i] == "comm" and g.coll[i]:
            if not g.group[i]:
                g.group[i] = everyone
            issuer = next((d for d in g.deps[i] if g.kind[d] != "comm"), None)
            order_key[i] = (g.pos[issuer] if issuer is not None else g.pos[i], g.pos[i])
    for r in set(g.rank.tolist()):
        mine = sorted((k for k in order_key if g.rank[k] == r), key=lambda k: order_key[k])
        for s, k in enumerate(mine):
            g.seq[k] = s


# ---------------------------------------------------------------------------------------
# transforms


def _fixed(label: str) -> bool:
    return label.startswith(FIXED_LABEL_PREFIXES)


def scale_work(g: StepGraph, model: CostModel, token_scale: float, attention_scale: float | None = None) -> StepGraph:
    """Batch / sequence what-if: work per rank grows by `token_scale` (tokens per rank,
    new / old); attention FLOPs by `attention_scale` (prefill / train causal attention:
    token_scale · seq_scale; default token_scale). Gradient sync and optimizer stay fixed.

    Each compute op's duration is rescaled by the cost model's ratio
    predict(new work) / predict(old work), so a fixed per-op overhead does not grow, nor do
    the bytes of weights (g.fixed_bytes, from calibrate.attach_work); ops without known work
    keep min(dur, overhead) and scale the rest. Token payload
    collectives scale their bytes; metadata ones (< METADATA_BYTES) do not.
    """
    if token_scale <= 0:
        raise SimulationError(f"scale_work: token_scale must be positive, got {token_scale}")
    attention_scale = token_scale if attention_scale is None else attention_scale
    if any(lane.startswith("cuda:") for lane in g.lane):
        return _scale_gpu_work(g, model, token_scale, attention_scale)
    g = g.copy()
    for i in range(g.n):
        if _fixed(g.label[i]):
            continue
        if g.kind[i] == "comm":
            if g.coll[i] == "all_to_all" and g.coll_bytes[i] >= METADATA_BYTES:
                g.coll_bytes[i] *= token_scale
                g.splits[i] = [s * token_scale for s in g.splits[i]]
            continue
        if g.kind[i] not in ("compute", "host", "sync", "memory"):
            continue
        attn = classify(g.name[i]) == "attention"
        _rescale(g, model, i, attention_scale if attn else token_scale, token_scale)
    g.notes.setdefault("transforms", []).append({"scale_work": {"token_scale": token_scale, "attention_scale": attention_scale}})
    return g


def _scale_gpu_work(g: StepGraph, model: CostModel, token_scale: float, attention_scale: float) -> StepGraph:
    """scale_work on a GPU trace. The host side (CPU lanes: dispatch and launches) keeps its
    time, which does not grow with tokens; kernels scale as _scale_kernels says (attention
    kernels' FLOPs by attention_scale)."""
    g = g.copy()

    def pick(i: int, op: int) -> tuple[float, float] | None:
        if _fixed(g.label[i]) or g.kind[i] == "comm":
            return None
        attn = classify(g.name[op] if op >= 0 else g.name[i]) == "attention"
        return (attention_scale if attn else token_scale), token_scale

    _scale_kernels(g, model, pick)
    g.notes.setdefault("transforms", []).append(
        {"scale_work": {"token_scale": token_scale, "attention_scale": attention_scale, "gpu": True}})
    return g


def _scale_kernels(g: StepGraph, model: CostModel, pick) -> None:
    """Scale the GPU ops of g in place. pick(i, op) → (FLOP scale, byte scale), or None to
    leave op i alone; op is the CPU op that launched it (or -1). A kernel's duration follows
    the cost model's ratio for that op: the first piece of the top-level CPU op holding the
    launch call, where the trace's shapes put the FLOPs and bytes (calibrate.attach_work; a
    GPU calibration's fits are kernel times). A kernel whose op has no known work, and a copy
    of a token payload, keep their kind's overhead and scale the rest; copies under
    METADATA_BYTES stay as they are."""
    order: dict[int, tuple[list[int], int]] = {}  # op → (its lane's ops in order, its position)
    for (_, lane), ops in g.lanes().items():
        if lane.startswith("cpu:"):
            for k, i in enumerate(ops):
                order[i] = (ops, k)

    def owner(launch: int) -> int:
        """The first piece of the top-level op that made the launch call (or -1). The
        pieces of one top-level op follow each other with no gap between them; the walk
        back stops at the first gap, so a same-named op before it is another op."""
        ops, k = order[launch]

        def joined(j: int) -> bool:  # piece j starts where piece j - 1 ended
            return j > 0 and g.gap_us[ops[j]] <= 1e-6

        while joined(k) and g.name[ops[k - 1]].startswith("cu"):  # runtime / driver calls in between
            k -= 1
        if not joined(k):
            return -1  # a launch call of its own, outside any op
        k -= 1
        name = g.name[ops[k]]
        while joined(k) and (g.name[ops[k - 1]] == name or g.name[ops[k - 1]].startswith("cu")):
            k -= 1
        while g.name[ops[k]] != name:
            k += 1
        return ops[k]

    owners: dict[int, tuple[float, float]] = {}  # launching op → its scales, applied once at the end
    for i in range(g.n):
        if not g.lane[i].startswith("cuda:"):
            continue
        launches = [d for d in g.deps[i] if d in order]
        op = owner(launches[0]) if launches else -1
        scales = pick(i, op)
        if scales is None:
            continue
        f_scale, b_scale = scales
        if op >= 0 and g.flops[op] + g.bytes[op] > 0:
            old = model.predict_op_us(g.name[op], g.flops[op], g.bytes[op])
            new = model.predict_op_us(g.name[op], g.flops[op] * f_scale, _scaled_bytes(g, op, b_scale))
            if old > 0:
                g.dur_us[i] *= new / old
                owners[op] = scales
                continue
        if g.kind[i] == "memory" and g.bytes[i] < METADATA_BYTES:
            continue
        fixed = min(g.dur_us[i], model.overhead_us(g.name[op] if op >= 0 else g.name[i]))
        g.dur_us[i] = fixed + (g.dur_us[i] - fixed) * f_scale
        g.bytes[i] *= b_scale if g.kind[i] == "memory" else 1.0
    for op, (f_scale, b_scale) in owners.items():  # the host op keeps its time; its work moved
        g.bytes[op] = _scaled_bytes(g, op, b_scale)
        g.flops[op] *= f_scale


def _scaled_bytes(g: StepGraph, i: int, scale: float) -> float:
    """Op i's bytes with the part that grows with tokens scaled (weights stay)."""
    fixed = min(float(g.fixed_bytes[i]), float(g.bytes[i])) if g.fixed_bytes is not None else 0.0
    return fixed + (float(g.bytes[i]) - fixed) * scale


def _rescale(g: StepGraph, model: CostModel, i: int, f_scale: float, b_scale: float) -> None:
    """Op i (in place): FLOPs × f_scale, its token bytes × b_scale, its duration by the cost
    model's ratio new / old; without known work it keeps min(dur, overhead) and scales the
    rest by f_scale. A view op keeps its time (costmodel.is_view)."""
    if is_view(g.name[i]):
        return
    new_bytes = _scaled_bytes(g, i, b_scale)
    dur, flops, nbytes, name = float(g.dur_us[i]), float(g.flops[i]), float(g.bytes[i]), g.name[i]
    g.flops[i], g.bytes[i] = flops * f_scale, new_bytes
    if flops + nbytes > 0:
        old = model.predict_op_us(name, flops, nbytes)
        if old > 0:
            g.dur_us[i] = dur * model.predict_op_us(name, flops * f_scale, new_bytes) / old
            return
    fixed = min(dur, model.overhead_us(name))
    g.dur_us[i] = fixed + (dur - fixed) * f_scale


def scale_experts(g: StepGraph, model: CostModel, rows_scale: dict[int, float] | None = None,
                  layer_scale: dict[int, float] | None = None) -> StepGraph:
    """Routing what-if: layer l's FFN-expert rows on rank r grow by
    rows_scale[r] · layer_scale[l] (a missing key: 1). Zero-expert share z → z':
    layer_scale[l] = (1 − z') / (1 − z_l) (FFN rows per token are top_k · (1 − z)); skew:
    per-rank load ratios in rows_scale.

    Scales each layer's expert compute (`L{l}/experts` and its backward, `L{l}/experts:bwd`,
    which traces.lanes labels from the fwdbwd flows; an older trace's plain `backward` range
    stays as it is), the row
    gathers / scatters / products of dispatch and combine (movement or elementwise ops of at
    least ROW_OP_BYTES) and the dispatch / combine payloads (`L{l}/dispatch`, `L{l}/combine`,
    forward and backward). View ops and weight bytes stay (as in scale_work). On a GPU trace
    the kernels scale by their launching op's cost-model ratio and host ops keep their time,
    as in scale_work; collective kernels keep their traced time."""
    rows_scale, layer_scale = rows_scale or {}, layer_scale or {}

    def scale_of(i: int) -> float:
        m = EXPERT_LABEL_RE.match(g.label[i])
        return rows_scale.get(int(g.rank[i]), 1.0) * layer_scale.get(int(m.group(1)), 1.0)

    def block(i: int) -> str:
        m = EXPERT_LABEL_RE.match(g.label[i])
        return m.group(2) if m else ""

    def on_rows(i: int, op: int) -> bool:
        """An op (i, or the op that launched kernel i) whose work grows with the FFN rows."""
        b, w = block(i), (op if op >= 0 else i)
        return b == "experts" or (b in ("dispatch", "combine") and classify(g.name[w]) in ("movement", "elementwise")
                                  and g.bytes[w] >= ROW_OP_BYTES)

    gpu = any(lane.startswith("cuda:") for lane in g.lane)
    g = g.copy()
    for i in range(g.n):
        b = block(i)
        if b in ("dispatch", "combine") and g.kind[i] == "comm" and g.coll_bytes[i] >= METADATA_BYTES:
            s = scale_of(i)
            g.coll_bytes[i] *= s
            g.splits[i] = [x * s for x in g.splits[i]]
        elif g.kind[i] == "compute" and not gpu and on_rows(i, -1):
            s = scale_of(i)
            _rescale(g, model, i, s, s)
    if gpu:
        def pick(i: int, op: int) -> tuple[float, float] | None:
            if g.kind[i] == "comm" or not on_rows(i, op):
                return None
            s = scale_of(i)
            return s, s
        _scale_kernels(g, model, pick)
    note = {"rows_scale": {str(k): v for k, v in rows_scale.items()}, "layer_scale": {str(k): v for k, v in layer_scale.items()}}
    g.notes.setdefault("transforms", []).append({"scale_experts": note})
    return g


def _layer_runs(g: StepGraph, lane_ops: list[int]) -> dict[int, tuple[int, int, list[tuple[str, list[int]]]]]:
    """Per layer: (first, last) positions in lane_ops of its forward ops and the runs of
    consecutive equal blocks; unlabelled ops join the run before them."""
    layers: dict[int, list[int]] = defaultdict(list)
    for p, i in enumerate(lane_ops):
        m = LAYER_LABEL_RE.match(g.label[i])
        if m:
            layers[int(m.group(1))].append(p)
    out = {}
    for layer, ps in layers.items():
        lo, hi = min(ps), max(ps)
        runs: list[tuple[str, list[int]]] = []
        for p in range(lo, hi + 1):
            i = lane_ops[p]
            m = LAYER_LABEL_RE.match(g.label[i])
            block = m.group(2) if m and int(m.group(1)) == layer else (runs[-1][0] if runs else "")
            if runs and runs[-1][0] == block:
                runs[-1][1].append(i)
            else:
                runs.append((block, [i]))
        out[layer] = (lo, hi, runs)
    return out


def _split_at_wait(g: StepGraph, ops_: list[int]) -> tuple[list[int], list[int]]:
    """(issue part, wait part): the wait part starts at the last wait op of the run."""
    waits = [k for k, i in enumerate(ops_) if WAIT_RE.search(g.name[i])]
    if not waits:
        return ops_, []
    return ops_[: waits[-1]], ops_[waits[-1]:]


def set_schedule(g: StepGraph, schedule: str) -> StepGraph:
    """Reorder each layer's forward blocks on the issuing lane to `schedule`:
        sequential  attn0 router dispatch(issue, wait) experts combine(issue, wait) mlp0 attn1 mlp1
        shortcut    attn0 router dispatch(issue) mlp0 attn1 dispatch(wait) experts combine(issue) mlp1 combine(wait)
    Dependencies stay attached to ops, so waits keep waiting for their collective."""
    if schedule not in ("sequential", "shortcut"):
        raise SimulationError(f"set_schedule: schedule {schedule!r}, expected sequential or shortcut")
    g = g.copy()
    for (rank, lane), lane_ops in g.lanes().items():
        new_order = list(lane_ops)
        for layer, (lo, hi, runs) in sorted(_layer_runs(g, lane_ops).items()):
            parts: dict[str, list[int]] = defaultdict(list)
            for block, ops_ in runs:
                parts[block] += ops_
            known = {"attn0", "router", "dispatch", "experts", "combine", "mlp0", "attn1", "mlp1"}
            if not {"dispatch", "combine", "mlp0"} <= set(parts) or set(parts) - known - {""}:
                continue  # not an MoE layer of the expected shape (or a dense one): leave it
            d_issue, d_wait = _split_at_wait(g, parts["dispatch"])
            c_issue, c_wait = _split_at_wait(g, parts["combine"])
            head = parts[""] if runs[0][0] == "" else []
            if schedule == "shortcut":
                seq = [head, parts["attn0"], parts["router"], d_issue, parts["mlp0"], parts["attn1"], d_wait,
                       parts["experts"], c_issue, parts["mlp1"], c_wait]
            else:
                seq = [head, parts["attn0"], parts["router"], d_issue, d_wait, parts["experts"], c_issue, c_wait,
                       parts["mlp0"], parts["attn1"], parts["mlp1"]]
            flat = [i for part in seq for i in part]
            if sorted(flat) != sorted(lane_ops[lo: hi + 1]):
                continue  # unlabelled ops inside the layer we could not place: leave it
            new_order[lo: hi + 1] = flat
        for p, i in enumerate(new_order):
            g.pos[i] = p
    g.notes.setdefault("transforms", []).append({"set_schedule": schedule})
    return g


def set_world_size(g: StepGraph, world_size: int) -> StepGraph:
    """EP world size what-if: rank r' runs a copy of rank r' mod W's graph; collectives span
    all new ranks. Pair with scale_work(token_scale = W / W') for a fixed global batch
    (each rank then holds W / W' times the tokens and experts' rows)."""
    if world_size < 1:
        raise SimulationError(f"set_world_size: world size must be ≥ 1, got {world_size}")
    old_ranks = sorted(set(g.rank.tolist()))
    w_old = len(old_ranks)
    everyone = ",".join(str(r) for r in range(world_size))
    pieces = []
    for r_new in range(world_size):
        src = old_ranks[r_new % w_old]
        idx = np.flatnonzero(g.rank == src)
        pieces.append((r_new, idx))
    remap_all = []
    offset = 0
    for r_new, idx in pieces:
        remap_all.append({int(i): offset + k for k, i in enumerate(idx)})
        offset += len(idx)
    cols: dict[str, list] = defaultdict(list)
    for (r_new, idx), remap in zip(pieces, remap_all):
        for i in idx.tolist():
            cols["rank"].append(r_new)
            for c in ("lane", "kind", "name", "label", "coll", "splits"):
                cols[c].append(getattr(g, c)[i])
            cols["group"].append(everyone if g.coll[i] else g.group[i])
            for c in ("dur_us", "gap_us", "flops", "bytes", "coll_bytes", "seq", "pos"):
                cols[c].append(getattr(g, c)[i])
            cols["fixed_bytes"].append(g.fixed_bytes[i] if g.fixed_bytes is not None else 0.0)
            cols["deps"].append([remap[d] for d in g.deps[i] if d in remap])
    out = StepGraph(
        rank=np.asarray(cols["rank"], dtype=np.int64), lane=cols["lane"], kind=cols["kind"], name=cols["name"],
        label=cols["label"], dur_us=np.asarray(cols["dur_us"], dtype=float), gap_us=np.asarray(cols["gap_us"], dtype=float),
        flops=np.asarray(cols["flops"], dtype=float), bytes=np.asarray(cols["bytes"], dtype=float), coll=cols["coll"],
        group=cols["group"], coll_bytes=np.asarray(cols["coll_bytes"], dtype=float),
        splits=[[] for _ in cols["splits"]],  # per-peer splits no longer fit the new group size
        seq=np.asarray(cols["seq"], dtype=np.int64), deps=cols["deps"], pos=np.asarray(cols["pos"], dtype=float),
        steps_used=g.steps_used,  # per-op notes (arrays) no longer match the ops
        fixed_bytes=np.asarray(cols["fixed_bytes"], dtype=float) if g.fixed_bytes is not None else None,
        notes={k: v for k, v in g.notes.items() if not isinstance(v, np.ndarray)},
    )
    out.notes.setdefault("transforms", []).append({"set_world_size": world_size})
    return out


# ---------------------------------------------------------------------------------------
# per-op scaling through reference sizes (no shapes needed)


@dataclass
class OpScaling:
    """Per op of a graph: its duration, the host gap before it and its collective payload
    as piecewise-linear functions of x, through two or more reference sizes, where x =
    tokens per rank (attention ops' durations: tokens · sequence length, their causal
    FLOPs' driver). Each function is a ratio to the base reference's value; between two
    references it runs along their segment, beyond the outermost ones along the nearest
    segment (new = old · max(ratio(x), 0)). With two references that is one straight line.

    Ratios are fitted per group, not per op: ops of one name in one block kind (e.g. every
    `aten::linear` of every `L*/mlp0`, over all ranks) share the ratio of the group's
    total at each reference to its total at the base. Pooling averages out the noise of
    single ops on a shared machine, and the relative form keeps a duration's per-step
    noise from the base reference."""

    x_attn: np.ndarray  # (N,) bool: True where x = tokens · seq (attention durations)
    tokens: np.ndarray  # (K,) tokens per rank of the references, base first
    seqs: np.ndarray  # (K,)
    dur_ratio: np.ndarray  # (K, N): group total at reference k / at the base (row 0 = 1)
    gap_ratio: np.ndarray
    bytes_ratio: np.ndarray
    # collectives: the in-situ time beyond the comm model (graph notes comm_insitu_us −
    # comm_model_ref_us, see simulator.validate.note_insitu_comm), grouped like payloads;
    # None when the references carry no such notes
    stall_ratio: np.ndarray | None = None

    @property
    def base_tokens(self) -> float:
        return float(self.tokens[0])

    @property
    def base_seq(self) -> float:
        return float(self.seqs[0])


def _x(attn: np.ndarray, tokens: float, seq: float) -> np.ndarray:
    return np.where(attn, tokens * seq, tokens)


def _block(label: str) -> str:
    """The block kind of a label, layer dropped: "L3/experts" → "experts", "L3/experts:bwd" →
    "experts:bwd"; other labels as they are."""
    m = LAYER_LABEL_RE.match(label.removesuffix(":bwd"))
    return (m.group(2) + label[len(label.removesuffix(":bwd")):]) if m else label


def _group_keys(g: StepGraph) -> tuple[list, list, list]:
    """Per op of g: its duration group (block kind, name), gap group (block kind) and
    payload group (block kind, collective); None where the quantity does not scale (fixed
    labels: optimizer, gradient sync; metadata-sized collectives)."""
    fixed = [_fixed(lbl) for lbl in g.label]
    is_comm = [k == "comm" for k in g.kind]
    dur = [None if fixed[i] or is_comm[i] else (_block(g.label[i]), g.name[i]) for i in range(g.n)]
    gap = [None if fixed[i] or is_comm[i] else (_block(g.label[i]), "gap") for i in range(g.n)]
    payload = [(_block(g.label[i]), g.coll[i]) if is_comm[i] and not fixed[i] and g.coll_bytes[i] >= METADATA_BYTES
               else None for i in range(g.n)]
    return dur, gap, payload


def comm_stall_us(g: StepGraph) -> np.ndarray | None:
    """Per op: how much longer the collective ran in situ than the comm model says (0 where
    it ran faster, and for every other op); None without the notes."""
    insitu, model = g.notes.get("comm_insitu_us"), g.notes.get("comm_model_ref_us")
    if insitu is None or model is None:
        return None
    return np.where(np.asarray(model) > 0, np.maximum(np.asarray(insitu) - np.asarray(model), 0.0), 0.0)


def typical_steps(graphs: list[StepGraph]) -> list[StepGraph]:
    """The middle half of `graphs` by busy time (durations plus gaps), all of them when
    fewer than four: a step the machine stalled (a descheduled process, a neighbour on the
    memory bus) moves a mean by tens of percent, and the curves through the references
    are applied to the base's steps, whose replays are compared by their median."""
    if len(graphs) < 4:
        return list(graphs)
    busy = np.array([float(g.dur_us.sum() + g.gap_us.sum()) for g in graphs])
    lo, hi = np.quantile(busy, [0.25, 0.75])
    return [g for g, b in zip(graphs, busy) if lo <= b <= hi]


def _group_totals(graphs: list[StepGraph]) -> tuple[dict, dict, dict, dict | None]:
    """Mean over the typical steps (typical_steps) of each group's total duration, gap,
    payload and comm stall (None when a graph has no stall notes)."""
    graphs = typical_steps(graphs)
    totals: tuple[dict, dict, dict] = (defaultdict(float), defaultdict(float), defaultdict(float))
    stalls: dict | None = defaultdict(float)
    for g in graphs:
        keys = _group_keys(g)
        for group_keys, values, out in zip(keys, (g.dur_us, g.gap_us, g.coll_bytes), totals):
            for k, v in zip(group_keys, values):
                if k is not None:
                    out[k] += float(v) / len(graphs)
        stall = comm_stall_us(g) if stalls is not None else None
        if stall is None:
            stalls = None
            continue
        for k, v in zip(keys[2], stall):
            if k is not None:
                stalls[k] += float(v) / len(graphs)
    return (*totals, stalls)


def _ratios(keys: list, per_point: list[dict]) -> np.ndarray:
    """(K, N): each op's group total at point k over its total at point 0 (1 for ops
    without a group or with no time at the base)."""
    out = np.ones((len(per_point), len(keys)))
    for i, key in enumerate(keys):
        base = per_point[0].get(key, 0.0) if key is not None else 0.0
        if base > 0:
            out[:, i] = [t.get(key, 0.0) / base for t in per_point]
    return out


def piecewise_ratio(xs: np.ndarray, ratios: np.ndarray, x: float) -> np.ndarray:
    """Ratios (K, M) at knots xs (K,) → (M,) at x: linear between the two knots around x,
    along the nearest end segment outside them."""
    order = np.argsort(xs)
    xs, ratios = xs[order], ratios[order]
    j = int(np.clip(np.searchsorted(xs, x) - 1, 0, len(xs) - 2))
    w = (x - xs[j]) / (xs[j + 1] - xs[j])
    return ratios[j] + (ratios[j + 1] - ratios[j]) * w


def fit_scaling(template: StepGraph, points: list[tuple[list[StepGraph], float, float]]) -> OpScaling:
    """Group-wise ratios (see OpScaling) for the ops of `template` (a graph of the base
    reference) from the steps of two or more reference sizes, each (its per-step graphs,
    tokens per rank, seq); the first is the base. Groups are matched by key, not op by op,
    so references may run different op sequences (an expert with no tokens runs no ops),
    and averaged over each reference's typical steps (typical_steps). Ops with a fixed
    label (optimizer, gradient sync) keep their duration."""
    if len(points) < 2:
        raise SimulationError("fit_scaling: needs at least two reference sizes")
    if any(not graphs for graphs, _, _ in points):
        raise SimulationError("fit_scaling: a reference has no steps")
    tokens = np.array([float(t) for _, t, _ in points])
    seqs = np.array([float(q) for _, _, q in points])
    if len(set(tokens)) < len(tokens) or len(set(tokens * seqs)) < len(tokens):
        raise SimulationError("fit_scaling: the references need different token counts (and tokens · seq)")
    totals = [_group_totals(graphs) for graphs, _, _ in points]
    keys = _group_keys(template)
    attn = np.array([classify(n) == "attention" for n in template.name])
    stalls = [t[3] for t in totals]
    stall_ratio = _ratios(keys[2], stalls) if all(st is not None for st in stalls) else None
    return OpScaling(attn, tokens, seqs, *(_ratios(keys[q], [t[q] for t in totals]) for q in range(3)), stall_ratio)


def apply_scaling(g: StepGraph, scaling: OpScaling, tokens: float, seq: float) -> StepGraph:
    """`g` (a graph of the base reference's structure, e.g. one of its steps) moved to
    `tokens` per rank and sequence length `seq` along the fitted ratios."""
    if g.n != scaling.dur_ratio.shape[1]:
        raise SimulationError("apply_scaling: graph and scaling have different op counts")
    g = g.copy()
    attn = scaling.x_attn
    dur = np.where(attn, piecewise_ratio(scaling.tokens * scaling.seqs, scaling.dur_ratio, tokens * seq),
                   piecewise_ratio(scaling.tokens, scaling.dur_ratio, tokens))
    g.dur_us = g.dur_us * np.maximum(dur, 0.0)
    g.gap_us = g.gap_us * np.maximum(piecewise_ratio(scaling.tokens, scaling.gap_ratio, tokens), 0.0)
    g.coll_bytes = g.coll_bytes * np.maximum(piecewise_ratio(scaling.tokens, scaling.bytes_ratio, tokens), 0.0)
    stall = comm_stall_us(g)
    if stall is not None and scaling.stall_ratio is not None:
        # the part of a collective's in-situ time the model does not explain follows its
        # group's curve too (a local copy grows with the payload, a scheduler stall not)
        ratio = np.maximum(piecewise_ratio(scaling.tokens, scaling.stall_ratio, tokens), 0.0)
        g.notes["comm_insitu_us"] = np.where(stall > 0, g.notes["comm_model_ref_us"] + stall * ratio,
                                             g.notes["comm_insitu_us"])
    g.notes.setdefault("transforms", []).append({"scaled_to": {"tokens": tokens, "seq": seq}})
    return g
