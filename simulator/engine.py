"""The SimPy engine: replays an op graph (the normalized trace) on a Cluster.

    simulate(ops, cluster, ...) -> ops with simulated start_us / dur_us

Model (../shared/DESIGN.md, "Simulator model"):
- one SimPy process per lane (rank, lane); a lane runs its ops in `start_us` order (ties by
  id); an op starts when its lane predecessor has finished and every op in `deps` is done,
  plus `gap_us` (host time the trace shows but does not explain, used by replay);
- non-comm ops take their compute duration (`compute_time(ops, cluster)`; default: the trace
  duration when > 0, else a roofline from flops/bytes);
- comm ops with a collective rendezvous by (group, seq): the collective starts when every rank
  of the group has reached it, runs its phases over the network (simulator/collectives.py,
  simulator/network.py) and ends on every rank at once. With `comm_from_trace` the transfer
  takes the shortest traced duration of its ops instead (the last rank to arrive waits least,
  so that is the pure transfer time; with `trace_tails` each rank keeps its own traced tail
  after the last arrival). Comm ops without a collective keep their duration.
- interference: on GPU clusters, while a comm op is in flight on a rank, compute ops of that
  rank whose duration came from a model (not measured) run at 1 - comm_compute_share speed;
  on CPU clusters, compute ops and in-flight transfers (one thread per rank) share `cores`
  (processor sharing: each job's share is min(1, cores / jobs); a transfer timed from the
  trace progresses at share ** e and takes that, or its calibrated `comm_core_use`, from
  compute, which gets the rest); measured durations already include the contention they
  ran under, so they are not slowed again, but they do occupy cores.
- a collective some rank never reaches, a lock-step ordering deadlock, a dependency cycle,
  an unreachable GPU pair or a rank the cluster lacks → SimulationError naming it.
- flows: `flow_model="exact"` gives every GPU pair its own flow (and every ring round its own
  phase); "aggregate" one flow per collective phase carrying all its link loads (bounded by
  its bottleneck link; within 2 % of exact on 16-GPU presets, tests/simulator); "auto" uses
  exact for phases of ≤ 64 pairs and ≤ 16 rounds, aggregate beyond. Group "" = all ranks.

Hot path (tests/benchmarks/bench_sim.py): stretches of a lane with no deps, gaps or
collectives inside are one timeout ("runs", filled in afterwards; `fuse=False` for one
event per op, tested equal); a comm op starting on a rank does not interrupt its compute
(the compute timer fires early and re-arms from the rank's comm-busy integral), only a comm
op ending interrupts compute armed at the slow speed; collectives are one event per
rendezvous; aggregated loads are cached per (collective, group, sizes).

Deterministic: ordered containers only; the one random draw (comm_load_stall, which
transfers stall) comes from a generator seeded with `seed` and drawn in event order.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import simpy

from simulator.cluster import Cluster
from simulator.collectives import Phase, parse_group, plan_collective
from simulator.errors import SimulationError
from simulator.network import FluidNetwork
from simulator.routing import Router

ComputeTimeFn = Callable[[pa.Table, Cluster], np.ndarray]
FlowModel = Literal["auto", "exact", "aggregate"]

# roofline efficiency used when an op has no measured duration: achieved / peak
DEFAULT_EFFICIENCY = 0.6
# auto flow model: per-pair flows for phases this small, one aggregated flow beyond
EXACT_MAX_PAIRS = 64
EXACT_MAX_STEPS = 16


def roofline_time_us(ops: pa.Table, cluster: Cluster, efficiency: float = DEFAULT_EFFICIENCY) -> np.ndarray:
    """Default compute duration per op (µs): the traced dur_us when > 0, else
    max(flops / bf16 peak, bytes / memory bandwidth) / efficiency."""
    dur = ops.column("dur_us").to_numpy().astype(np.float64)
    flops = ops.column("flops").to_numpy().astype(np.float64)
    nbytes = ops.column("bytes").to_numpy().astype(np.float64)
    spec = cluster.gpu
    model = np.maximum(flops / spec.bf16_flops, nbytes / spec.hbm_bytes_per_s) * 1e6 / efficiency
    return np.where(dur > 0, dur, model)


@dataclass
class SimStats:
    ops: int = 0
    lanes: int = 0
    collectives: int = 0
    network_recomputes: int = 0
    makespan_us: float = 0.0
    wall_s: float = 0.0
    notes: dict = field(default_factory=dict)


class _Rdv:
    """One collective instance: the ops of every rank that must meet."""

    __slots__ = ("key", "members", "expected", "arrived", "event")

    def __init__(self, key: tuple, expected: int, event: simpy.Event):
        self.key = key
        self.members: list[int] = []  # op positions, in arrival order
        self.expected = expected
        self.arrived = 0
        self.event = event


class _CpuPool:
    """Processor sharing of `cores` among compute ops and in-flight transfers (CPU clusters).

    factor: the share per job, min(1, cores / jobs). A transfer's ranks each use `core_use`
    of a core while it is in flight (a calibrated share), or, without one, factor ** e (its
    progress rate, e its load exponent). Compute gets the rest: compute_speed =
    min(1, (cores − what the transfers use) / compute jobs), never below factor (with e = 1
    and no core use: plain processor sharing, compute_speed = factor)."""

    def __init__(self, cores: int):
        self.cores = cores
        self.jobs = 0
        self.factor = 1.0
        self.compute_speed = 1.0
        self.transfers: dict[int, tuple[int, float, float | None]] = {}  # in flight: id → (ranks, e, core use)

    def update(self) -> bool:
        """Recompute factor and compute_speed from jobs and transfers; True if either changed."""
        factor = min(1.0, self.cores / self.jobs) if self.jobs > 0 else 1.0
        compute_jobs = self.jobs - sum(n for n, _, _ in self.transfers.values())
        speed = factor
        if compute_jobs > 0 and factor < 1.0:
            used = sum(n * (factor**e if use is None else use) for n, e, use in self.transfers.values())
            speed = min(1.0, max(factor, (self.cores - used) / compute_jobs))
        changed = factor != self.factor or speed != self.compute_speed
        self.factor, self.compute_speed = factor, speed
        return changed


class Simulation:
    """Build once from an ops table and a cluster, then `run()`.

    compute_time(ops, cluster) -> float64[n] µs for non-collective ops (default
    roofline_time_us). gap_us: per-op host delay after the op becomes ready (replay).
    unsized_from_trace: collectives whose ops carry no byte counts take their traced time
    (as with comm_from_trace) instead of the network model's latency-only answer.
    trace_tails: with traced times (comm_from_trace / unsized_from_trace) each rank keeps its
    own traced tail after the last arrival, so a live trace replays exactly (replay sets it);
    without it every rank ends after the shortest duration of the collective's ops (what a
    table whose comm dur_us holds predicted transfer times needs).
    comm_load_exponent: on a cpu cluster, a collective timed from dur_us (comm_from_trace /
    unsized_from_trace) progresses at speed factor ** exponent, factor being the cores'
    share per job (compute ops plus one job per rank in a transfer): 0 keeps the traced time
    whatever the load; 1 is plain processor sharing, as modelled transfers get; above 1 the
    transfer threads lose more than their share (as threads that sleep on the network and
    wait for a core at every wake-up can). Or a function of the collective's payload bytes
    (mean over its ranks) giving the exponent (CommModel.load_exponent_at).
    comm_tail_us: per op (row order), how long a rank stays in its collective after the
    collective ends (a live rank that noticed the end late: its thread off the core); the
    others are released at the end. With trace_tails the traced tails decide instead.
    comm_core_use: on a cpu cluster, the share of a core each rank of a collective timed from
    dur_us takes from compute while in flight, as a function of its payload bytes
    (CommModel.core_use_at); without it a transfer takes what it progresses at
    (factor ** exponent). Only ops the engine may slow (modelled durations) feel it.
    comm_load_delay_us: on a cpu cluster, instead of the exponent: what a collective timed
    from dur_us waits for a core, in µs per runnable job beyond one per core (1 / factor − 1),
    as a function of its payload bytes (CommModel.load_delay_at). A transfer of t µs under a
    constant load then takes t + delay · (1 / factor − 1): its threads sleep on the network
    and wait a scheduler quantum for a core when they wake, whatever the payload, so the
    loss is added time, not a share of t (calibrate: loaded − idle 2.3–3.0 ms from 256 KiB
    to 4 MiB). Under a changing load it progresses at t / (t + delay · (1 / factor − 1)).
    comm_load_stall: on a cpu cluster, a function of a collective's payload bytes giving
    (probability, longest stall µs). A collective timed from dur_us that starts while every
    core has a busy host lane (a lane of ops that take a core, not waiting for a dependency)
    stalls with that probability (drawn from the generator seeded with `seed`) until a core
    frees or the longest stall passes, then takes its time as without the stall (the load
    exponent still slows it while the cores are shared); one of its ranks (drawn) records its
    op as starting at the stall's end. Its threads woke to full cores: a calibration's loaded
    transfers take about their idle time or about a scheduler quantum more, rarely between,
    and in a live w2 shortcut step (prefill 4 × 128) half the overlapped exchanges end about
    their idle time after issue, the rest soon after the first rank stops computing or a
    quantum on, and 14–23 % of the ranks' gloo ops begin over 1 ms after their issue (what
    the drawn rank's late start stands for: 30–40 % of ops at the sweep's probabilities).
    """

    def __init__(
        self,
        ops: pa.Table,
        cluster: Cluster,
        *,
        comm_from_trace: bool = False,
        seed: int = 0,
        compute_time: ComputeTimeFn | None = None,
        flow_model: FlowModel = "auto",
        gap_us: np.ndarray | None = None,
        interference: bool = True,
        fuse: bool = True,
        unsized_from_trace: bool = False,
        trace_tails: bool = False,
        comm_load_exponent: float | Callable[[float], float] = 0.0,
        comm_tail_us: np.ndarray | None = None,
        comm_core_use: Callable[[float], float] | None = None,
        comm_load_delay_us: Callable[[float], float] | None = None,
        comm_load_stall: Callable[[float], tuple[float, float]] | None = None,
    ):
        self.ops = ops
        self.cluster = cluster
        self.comm_from_trace = comm_from_trace
        self.seed = seed
        self.flow_model = flow_model
        self.stats = SimStats()
        n = ops.num_rows
        self.n = n
        rank = ops.column("rank").to_numpy().astype(np.int64)
        if n and rank.max() >= cluster.num_gpus:
            raise SimulationError(
                f"trace has rank {int(rank.max())} but cluster {cluster.name} has {cluster.num_gpus} GPUs"
            )
        lane_codes = pc.dictionary_encode(ops.column("lane")).combine_chunks().indices.to_numpy()
        start = ops.column("start_us").to_numpy().astype(np.float64)
        ids = ops.column("id").to_numpy()
        order = np.lexsort((ids, start, lane_codes, rank)) if n else np.zeros(0, np.int64)
        self.order = order
        self.ids = ids[order]  # numpy: only error messages read it
        self.rank = rank[order]
        kind_col = ops.column("kind")
        is_comm = pc.equal(kind_col, "comm").to_numpy(zero_copy_only=False)[order]
        is_work = pc.is_in(kind_col, value_set=pa.array(["compute", "memory"])).to_numpy(zero_copy_only=False)[order]
        self.names = ops.column("name")
        # lanes = runs of equal (rank, lane)
        lane_key = rank[order] * (int(lane_codes.max()) + 1 if n else 1) + lane_codes[order]
        cuts = np.flatnonzero(np.diff(lane_key)) + 1 if n else np.zeros(0, np.int64)
        self.lane_bounds = list(zip(np.concatenate([[0], cuts]).tolist(), np.concatenate([cuts, [n]]).tolist())) if n else []
        # durations
        fn = compute_time or roofline_time_us
        dur_all = np.asarray(fn(ops, cluster), dtype=np.float64)
        if dur_all.shape != (n,) or not np.all(np.isfinite(dur_all)) or (dur_all < 0).any():
            raise SimulationError("compute_time returned durations that are not finite, non-negative, one per op")
        self.dur = dur_all[order].tolist()
        measured = ops.column("dur_us").to_numpy()[order] > 0
        self.gap = None
        if gap_us is not None:
            g = np.asarray(gap_us, dtype=np.float64)[order]
            self.gap = g.tolist() if (g > 0).any() else None
        # interference
        self.share = cluster.comm_compute_share if interference else 0.0
        self.cpu = _CpuPool(cluster.cores) if (interference and cluster.kind == "cpu" and cluster.cores > 0) else None
        slowable = (~measured) & is_work
        self._slowable_np = slowable
        self.slowable = slowable.tolist()
        self.uses_core = ((~is_comm) & (dur_all[order] > 0)).tolist() if self.cpu is not None else None
        self.sharing = self.share > 0 or self.cpu is not None
        # deps → positions
        self.deps = self._deps(ops, order, ids)
        # collectives
        self.router = Router(cluster)
        self._host_of = self._hosts()
        self.ckey, self.rdv = self._collectives(ops, order, is_comm)
        self._plain_comm_np = is_comm & np.array([k is None for k in self.ckey], dtype=bool)
        self.plain_comm = self._plain_comm_np.tolist()
        self.run_end = self._runs(fuse)
        self._tail_extra: dict[int, float] = {}
        self.unsized_from_trace = unsized_from_trace
        self.trace_tails = trace_tails
        if not callable(comm_load_exponent):
            if comm_load_exponent < 0:
                raise SimulationError(f"comm_load_exponent must be ≥ 0, got {comm_load_exponent}")
            comm_load_exponent = (lambda e: lambda _bytes: e)(float(comm_load_exponent))
        self.comm_load_exponent = comm_load_exponent if self.cpu is not None else (lambda _bytes: 0.0)
        self.comm_core_use = comm_core_use
        self.comm_load_delay_us = comm_load_delay_us if self.cpu is not None else None
        self.comm_load_stall = comm_load_stall if self.cpu is not None else None
        # host lanes: a lane with an op that takes a core keeps one busy unless it waits
        self._host_lane = (
            [any(self.uses_core[lo:hi]) for lo, hi in self.lane_bounds] if self.comm_load_stall else None
        )
        self._comm_tail: list[float] | None = None
        if comm_tail_us is not None:
            tail = np.asarray(comm_tail_us, dtype=np.float64)
            if tail.shape != (n,) or not (tail >= 0).all():
                raise SimulationError(f"comm_tail_us: expected {n} values ≥ 0, one per op")
            self._comm_tail = tail[order].tolist()
        if trace_tails:
            self._trace_start = start[order].tolist()
            self._trace_end = (start + ops.column("dur_us").to_numpy())[order].tolist()
        self.coll_bytes = ops.column("coll_bytes").to_numpy()[order]
        self.has_splits = pc.list_value_length(ops.column("splits")).to_numpy(zero_copy_only=False)[order] > 0
        self._splits_flat: tuple[np.ndarray, np.ndarray] | None = None
        self._agg_cache: dict[tuple, list[tuple[list, float]]] = {}

    # --- setup ---------------------------------------------------------------------------------

    def _deps(self, ops: pa.Table, order: np.ndarray, ids: np.ndarray) -> list:
        n = self.n
        deps_col = ops.column("deps").combine_chunks()
        offsets = deps_col.offsets.to_numpy()
        flat = deps_col.values.to_numpy()
        counts = np.diff(offsets)
        out: list = [None] * n
        if not len(flat):
            return out
        sorted_ids = np.argsort(ids, kind="stable")
        where = np.searchsorted(ids[sorted_ids], flat)
        where = np.minimum(where, n - 1)
        found = ids[sorted_ids][where] == flat
        if not found.all():
            k = int(np.flatnonzero(~found)[0])
            owner = int(np.searchsorted(offsets, k, side="right") - 1)
            raise SimulationError(f"op id {int(ids[owner])} depends on unknown op id {int(flat[k])}")
        inv = np.empty(n, dtype=np.int64)
        inv[order] = np.arange(n)
        dep_pos = inv[sorted_ids[where]]
        # one-dep ops (the common case) as 1-tuples built in C; the rest as slices
        single = np.flatnonzero(counts == 1)
        for p, dep in zip(inv[single].tolist(), zip(dep_pos[offsets[single]].tolist())):
            out[p] = dep
        multi = np.flatnonzero(counts > 1)
        if len(multi):
            dep_list = dep_pos.tolist()
            off = offsets.tolist()
            for i in multi.tolist():
                out[int(inv[i])] = dep_list[off[i] : off[i + 1]]
        return out

    def _hosts(self) -> np.ndarray | None:
        g = self.cluster.graph
        hosts = [g.nodes[f"gpu{r}"].get("host") for r in range(self.cluster.num_gpus)]
        return None if any(h is None for h in hosts) else np.array(hosts, dtype=np.int64)

    def _collectives(self, ops: pa.Table, order: np.ndarray, is_comm: np.ndarray):
        """ckey[pos] = (group id, seq, collective) for collective ops (None otherwise), and the
        rendezvous table; checks every rank of a group reaches each collective exactly once."""
        n = self.n
        ckey: list = [None] * n
        rdv: dict[tuple, _Rdv] = {}
        coll_col = ops.column("coll")
        has_coll = pc.not_equal(coll_col, "").to_numpy(zero_copy_only=False)
        inv = np.empty(n, dtype=np.int64)
        inv[order] = np.arange(n)
        orig = np.flatnonzero(is_comm[inv] & has_coll)  # original rows, then in lane order
        pos = inv[orig]
        by_pos = np.argsort(pos, kind="stable")
        orig, pos = orig[by_pos], pos[by_pos]
        idx = pa.array(orig)
        colls = coll_col.take(idx).to_pylist()
        groups = ops.column("group").take(idx).to_pylist()
        seqs = ops.column("seq").take(idx).to_numpy().tolist()
        self._coll: dict[int, str] = {}
        self._group_ranks: list[tuple[int, ...]] = []
        gid_of: dict[str, int] = {}
        member_sets: list[frozenset] = []
        counters: dict[tuple, int] = {}
        reached: dict[tuple, list[int]] = {}
        rank_list = self.rank.tolist()
        num_gpus = self.cluster.num_gpus
        for i, c, gs, sq in zip(pos.tolist(), colls, groups, seqs):
            gid = gid_of.get(gs)
            if gid is None:
                try:
                    # "" = the default group: every rank of the table (traces without group args)
                    ranks = parse_group(gs) if gs else tuple(range(int(self.rank.max()) + 1))
                except ValueError:
                    raise SimulationError(f"op id {int(self.ids[i])}: group {gs!r} is not a comma-separated rank list") from None
                if len(set(ranks)) != len(ranks) or not ranks or ranks[-1] >= num_gpus:
                    raise SimulationError(
                        f"op id {int(self.ids[i])}: group {gs!r} is empty, repeats a rank or names a rank beyond the "
                        f"{num_gpus} GPUs of cluster {self.cluster.name}"
                    )
                gid = gid_of[gs] = len(self._group_ranks)
                self._group_ranks.append(ranks)
                member_sets.append(frozenset(ranks))
            r = rank_list[i]
            if r not in member_sets[gid]:
                raise SimulationError(f"op id {int(self.ids[i])}: rank {r} runs a {c} on group {gs} it is not in")
            if sq < 0:  # no sequence number: match by order per (rank, group, collective)
                ck = (r, gid, c)
                sq = counters.get(ck, 0)
                counters[ck] = sq + 1
            key = (gid, sq, "p2p" if c in ("send", "recv") else c)
            ckey[i] = key
            self._coll[i] = c
            got = reached.get(key)
            if got is None:
                reached[key] = [r]
            else:
                got.append(r)
        for key, got in reached.items():
            ranks = self._group_ranks[key[0]]
            if len(got) == len(ranks) and len(set(got)) == len(got):
                rdv[key] = None  # type: ignore[assignment]
                continue
            missing = sorted(set(ranks) - set(got))
            what = f"never reached by rank(s) {','.join(map(str, missing))}" if missing else "reached twice by one rank"
            raise SimulationError(
                f"deadlock: collective {key[2]} on group {','.join(map(str, ranks))} seq {key[1]} is {what}"
            )
        return ckey, rdv

    # --- run -----------------------------------------------------------------------------------

    def run(self) -> pa.Table:
        """Simulate; return the ops table (input order) with simulated start_us and dur_us."""
        t0 = time.perf_counter()
        env = simpy.Environment()
        self.env = env
        self.net = FluidNetwork(env, self.router.cap_bytes_per_us)
        for key in self.rdv:
            self.rdv[key] = _Rdv(key, len(self._group_ranks[key[0]]), env.event())
        n = self.n
        self.start = [-1.0] * n
        self.end = [-1.0] * n
        self.done_ev: list = [None] * n
        g = self.cluster.num_gpus
        self.comm_active = [0] * g  # comm ops in flight per rank
        self.busy_total = [0.0] * g  # µs with ≥ 1 comm op in flight, up to busy_since
        self.busy_since = [0.0] * g  # when the current busy stretch began
        self.toggles: list[list[float]] = [[] for _ in range(g)]  # times comm went on, off, on...
        self.running: dict[int, dict] = {}  # rank (GPU) or -1 (CPU pool) → {process: None}
        self._rng = random.Random(self.seed)
        self.host_busy = 0  # host lanes running, not waiting for a dependency (comm_load_stall)
        self._late_start: dict[int, float] = {}  # op position → when its rank's thread began a stalled transfer
        self._core_free: simpy.Event | None = None  # succeeds when host_busy drops below the cores
        for k, (lo, hi) in enumerate(self.lane_bounds):
            host = self._host_lane is not None and self._host_lane[k]
            env.process(self._lane(lo, hi, int(self.rank[lo]), host))
        env.run()
        if n and min(self.end) < 0:
            self._diagnose()
        self.stats.ops = n
        self.stats.lanes = len(self.lane_bounds)
        self.stats.collectives = len(self.rdv)
        self.stats.network_recomputes = self.net.recomputes
        self.stats.makespan_us = max(self.end) if n else 0.0
        self.stats.wall_s = time.perf_counter() - t0
        start = np.empty(n)
        end = np.empty(n)
        start[self.order] = self.start
        end[self.order] = self.end
        table = self.ops.set_column(self.ops.schema.get_field_index("start_us"), "start_us", pa.array(start))
        return table.set_column(table.schema.get_field_index("dur_us"), "dur_us", pa.array(end - start))

    def _runs(self, fuse: bool) -> list[int]:
        """run_end[i]: last op of the run that op i heads. A run is a stretch of one lane whose
        ops after the first have no deps, no host gap, no collective, and whose ops before the
        last are nobody's dependency: its timeline follows from the durations alone, so it is
        simulated as one timeout (exactly; `fuse=False` gives one timeout per op)."""
        n = self.n
        if not fuse or self.cpu is not None or n < 2:
            return list(range(n))
        depended = np.zeros(n, dtype=bool)
        flat = [j for dl in self.deps if dl is not None for j in dl]
        depended[np.array(flat, dtype=np.int64)] = True
        no_deps = np.array([dl is None for dl in self.deps])
        no_coll = np.array([k is None for k in self.ckey]) & ~self._plain_comm_np
        no_gap = np.ones(n, dtype=bool) if self.gap is None else np.array(self.gap) <= 0
        slow = self._slowable_np
        lane_start = np.zeros(n, dtype=bool)
        lane_start[[lo for lo, _ in self.lane_bounds]] = True
        joins = np.zeros(n, dtype=bool)
        joins[1:] = (
            no_deps[1:] & no_coll[1:] & no_coll[:-1] & ~depended[:-1] & no_gap[1:] & (slow[1:] == slow[:-1])
        )
        joins &= ~lane_start
        heads = np.flatnonzero(~joins)
        run_end = np.arange(n)
        run_end[heads] = np.concatenate([heads[1:], [n]]) - 1
        return run_end.tolist()

    def _lane(self, lo: int, hi: int, rank: int, host: bool = False):
        env = self.env
        timeout = env.timeout
        deps, dur, gap, ckey = self.deps, self.dur, self.gap, self.ckey
        start, end, done_ev = self.start, self.end, self.done_ev
        run_end = self.run_end
        cpu_sharing = self.cpu is not None
        plain_comm = self.plain_comm
        # GPU interference, inlined below (the hot path): slowable compute registers itself
        # so a comm op starting or ending on this rank can interrupt it and change its speed
        gpu_sharing = self.share > 0 and not cpu_sharing
        slowable = self.slowable
        slow_speed = 1.0 - self.share
        comm_active = self.comm_active
        busy_total, busy_since, toggles = self.busy_total, self.busy_since, self.toggles
        share = self.share
        running = self.running.setdefault(rank, {})
        proc = env.active_process
        Interrupt = simpy.Interrupt
        if host:
            self._host(+1)
        i = lo
        while i < hi:
            dl = deps[i]
            if dl is not None:
                for j in dl:
                    if end[j] < 0:
                        ev = done_ev[j]
                        if ev is None:
                            ev = done_ev[j] = env.event()
                        if host:
                            self._host(-1)
                        yield ev
                        if host:
                            self._host(+1)
            if gap is not None and gap[i] > 0:
                yield timeout(gap[i])
            last = run_end[i]
            key = ckey[i]
            t_begin = env.now
            if key is not None:
                start[i] = t_begin
                yield from self._comm(i, key, rank)
                end[i] = env.now
                if self._late_start:
                    start[i] = max(t_begin, self._late_start.pop(i, t_begin))
            elif plain_comm[i]:  # a comm kernel without collective args: its traced duration
                start[i] = t_begin
                self._comm_enter(rank, +1)
                if dur[i] > 0:
                    yield timeout(dur[i])
                self._comm_enter(rank, -1)
                end[i] = env.now
            elif cpu_sharing:
                start[i] = t_begin
                if dur[i] > 0:
                    yield from self._compute(i, dur[i], rank)
                end[i] = env.now
            else:
                work = dur[i] if last == i else sum(dur[i : last + 1])
                if work > 0 and gpu_sharing and slowable[i]:
                    # Progress = elapsed − share · (time a comm op was active on this rank),
                    # from the rank's comm-busy integral. A comm op starting makes this op's
                    # timer fire early (then it re-arms for the rest: no interrupt); a comm op
                    # ending interrupts only ops armed at the slow speed.
                    log = toggles[rank]
                    log_at_start = len(log)
                    left = work
                    while True:
                        slow = comm_active[rank] > 0
                        speed = slow_speed if slow else 1.0
                        t0 = env.now
                        b0 = busy_total[rank] + (t0 - busy_since[rank] if slow else 0.0)
                        if slow:
                            running[proc] = None
                            try:
                                yield timeout(left / speed)
                            except Interrupt:
                                pass
                            running.pop(proc, None)
                        else:
                            yield timeout(left)
                        now = env.now
                        b1 = busy_total[rank] + (now - busy_since[rank] if comm_active[rank] > 0 else 0.0)
                        left -= (now - t0) - share * (b1 - b0)
                        if left <= 1e-9 * (1.0 + work):
                            break
                    if last == i:
                        start[i] = t_begin
                        end[i] = env.now
                    elif len(log) == log_at_start and log_at_start % 2 == 0:
                        self._fill_run(i, last, t_begin, 1.0)
                    else:
                        # speed segments from the toggle log: entry k switches comm on if k is even
                        segments = [(t_begin, slow_speed if log_at_start % 2 else 1.0)]
                        for k in range(log_at_start, len(log)):
                            segments.append((log[k], 1.0 if k % 2 else slow_speed))
                        self._fill_segments(i, last, segments, env.now)
                else:
                    if work > 0:
                        yield timeout(work)
                    if last == i:
                        start[i] = t_begin
                        end[i] = env.now
                    else:
                        self._fill_run(i, last, t_begin, 1.0)
            ev = done_ev[last]
            if ev is not None:
                ev.succeed()
            i = last + 1
        if host:
            self._host(-1)

    def _host(self, delta: int) -> None:
        self.host_busy += delta
        if self.host_busy < self.cpu.cores and self._core_free is not None:
            self._core_free.succeed()
            self._core_free = None

    def _fill_run(self, i: int, last: int, t: float, speed: float) -> None:
        """Start/end of the ops of a run at constant speed from time t."""
        dur, start, end = self.dur, self.start, self.end
        for k in range(i, last + 1):
            start[k] = t
            t += dur[k] / speed
            end[k] = t
        end[last] = self.env.now  # exact, whatever the rounding of the sum

    def _fill_segments(self, i: int, last: int, segments: list[tuple[float, float]], t_end: float) -> None:
        """Start/end of the ops of a run whose speed changed at the segment boundaries."""
        dur, start, end = self.dur, self.start, self.end
        seg = 0
        t, speed = segments[0]
        for k in range(i, last + 1):
            start[k] = t
            need = dur[k]
            while True:
                seg_end = segments[seg + 1][0] if seg + 1 < len(segments) else float("inf")
                can = (seg_end - t) * speed
                if need <= can or seg + 1 >= len(segments):
                    t += need / speed
                    break
                need -= can
                seg += 1
                t, speed = segments[seg]
            end[k] = min(t, t_end)
        end[last] = t_end

    # --- interference ------------------------------------------------------------------------

    def _speed(self, rank: int) -> float:
        if self.cpu is not None:
            return self.cpu.compute_speed
        return 1.0 - self.share if self.comm_active[rank] else 1.0

    def _interrupt(self, pool: int) -> None:
        for proc in list(self.running.get(pool, ())):
            proc.interrupt()

    def _cpu_jobs(self, delta: int) -> None:
        cpu = self.cpu
        cpu.jobs += delta
        before = cpu.factor
        if cpu.update():
            self._interrupt(-1)
            if cpu.factor != before:
                self.net.set_scale(cpu.factor)

    def _compute(self, i: int, work_us: float, rank: int):
        env = self.env
        cpu = self.cpu
        if cpu is not None and self.uses_core[i]:
            self._cpu_jobs(+1)
        if not self.slowable[i]:
            yield env.timeout(work_us)
        else:
            yield from self._shared_work(-1 if cpu is not None else rank, work_us, lambda: self._speed(rank))
        if cpu is not None and self.uses_core[i]:
            self._cpu_jobs(-1)

    def _shared_work(self, pool: int, work_us: float, speed_now):
        """Run work_us (µs at full speed) at speed_now(); registered in `pool` so that a
        change of speed interrupts it and the rest is re-armed at the new speed."""
        env = self.env
        running = self.running.setdefault(pool, {})
        proc = env.active_process
        running[proc] = None
        while True:
            speed = speed_now()
            t0 = env.now
            try:
                yield env.timeout(work_us / speed)
                break
            except simpy.Interrupt:
                work_us = max(work_us - (env.now - t0) * speed, 0.0)
        del running[proc]

    def _comm_enter(self, rank: int, delta: int) -> None:
        if self.share > 0:
            before = self.comm_active[rank]
            after = before + delta
            self.comm_active[rank] = after
            now = self.env.now
            if before == 0 and after > 0:
                self.busy_since[rank] = now
                self.toggles[rank].append(now)
            elif after == 0:
                self.busy_total[rank] += now - self.busy_since[rank]
                self.toggles[rank].append(now)
                self._interrupt(rank)  # ops armed at the slow speed speed up

    def _comm(self, i: int, key: tuple, rank: int):
        self._comm_enter(rank, +1)
        rdv = self.rdv[key]
        rdv.members.append(i)
        rdv.arrived += 1
        if rdv.arrived == rdv.expected:
            self.env.process(self._collective(rdv))
        yield rdv.event
        extra = self._tail_extra.get(i) if self._tail_extra else None
        if extra:
            yield self.env.timeout(extra)
        self._comm_enter(rank, -1)

    # --- collectives -------------------------------------------------------------------------

    def _collective(self, rdv: _Rdv):
        env = self.env
        members = sorted(rdv.members, key=lambda p: self.rank[p])
        if self._comm_tail is not None:  # (trace_tails below replaces these with the traced ones)
            for p in members:
                self._tail_extra[p] = self._comm_tail[p]
        unsized = (
            self.unsized_from_trace
            and not self.comm_from_trace
            and rdv.key[2] != "barrier"
            and not self.coll_bytes[members].any()
            and not self.has_splits[members].any()
        )
        if unsized:
            self.stats.notes["unsized_collectives_from_trace"] = self.stats.notes.get("unsized_collectives_from_trace", 0) + 1
        traced = self.comm_from_trace or unsized
        # modelled transfers share the cores plainly (exponent 1); traced ones by their load exponent
        payload = float(np.mean(self.coll_bytes[members])) if traced else 0.0
        exponent = self.comm_load_exponent(payload) if traced else 1.0
        delay = self.comm_load_delay_us(payload) if traced and self.comm_load_delay_us else None
        if delay is not None and not (math.isfinite(delay) and delay >= 0):
            raise SimulationError(f"comm_load_delay_us: expected a finite delay ≥ 0 at {payload:.0f} bytes, got {delay}")
        if traced and self.comm_load_stall is not None:
            yield from self._stall(payload, members)
        if self.cpu is not None:
            use = self.comm_core_use(payload) if traced and self.comm_core_use else None
            self.cpu.transfers[id(rdv)] = (len(members), exponent, use)
            self._cpu_jobs(+len(members))
        if traced:
            if self.trace_tails:
                # each rank keeps its traced tail after the last arrival (own end − last start):
                # the collective releases all after the shortest tail, the others keep the rest
                last_start = max(self._trace_start[q] for q in members)
                tails = {p: self._trace_end[p] - last_start for p in members}
                t = max(min(tails.values()), 0.0)
                for p, tail in tails.items():
                    self._tail_extra[p] = max(tail, 0.0) - t
            else:
                # the shortest duration: the last rank to arrive waited least, so its duration
                # is the transfer (also right when dur_us holds a predicted transfer time)
                t = max(min(self.dur[p] for p in members), 0.0)
            if t > 0:
                if delay is not None:  # a wait for a core added while the cores are shared
                    cpu = self.cpu
                    yield from self._shared_work(-1, t, lambda: t / (t + delay * (1.0 / cpu.factor - 1.0)))
                elif exponent > 0:  # slowed while the cores are shared
                    yield from self._shared_work(-1, t, lambda: self.cpu.factor**exponent)
                else:
                    yield env.timeout(t)
        else:
            for latency_us, flows in self._plan(rdv.key, members):
                if latency_us > 0:
                    yield env.timeout(latency_us)
                if flows:
                    yield self.net.transfer(flows)
        if self.cpu is not None:
            del self.cpu.transfers[id(rdv)]
            self._cpu_jobs(-len(members))
        rdv.event.succeed()

    def _stall(self, payload: float, members: list[int]):
        """comm_load_stall: with its probability, a collective that starts while every core
        has a busy host lane waits until a core frees or its longest stall passes; one member
        (drawn) then records its op as starting there (its thread had not begun the transfer;
        the others' were in flight, waiting for it)."""
        probability, longest = self.comm_load_stall(payload)
        if not (0.0 <= probability <= 1.0 and math.isfinite(longest) and longest >= 0):
            raise SimulationError(f"comm_load_stall: expected a probability in [0, 1] and a finite stall ≥ 0 µs "
                                  f"at {payload:.0f} bytes, got {probability}, {longest}")
        if self.host_busy < self.cpu.cores or longest == 0 or self._rng.random() >= probability:
            return
        env = self.env
        if self._core_free is None:
            self._core_free = env.event()
        yield self._core_free | env.timeout(longest)
        self._late_start[members[self._rng.randrange(len(members))]] = env.now

    def ops_dur_trace(self, pos: int) -> float:
        return float(self.dur[pos])

    def _plan(self, key: tuple, members: list[int]) -> list[tuple[float, list]]:
        """(latency, flows) rounds of a collective, flows as (link ids, bytes per link)."""
        gid, _seq, coll = key
        ranks = self._group_ranks[gid]
        table = self.ops
        orig = self.order[members]
        coll_bytes = self.coll_bytes[members]
        sender = -1
        splits = None
        if coll == "p2p":
            kinds = [self._coll[p] for p in members]
            if kinds.count("send") != 1:
                raise SimulationError(f"send/recv on group {','.join(map(str, ranks))} seq {key[1]}: needs one send and one recv")
            sender = int(self.rank[members[kinds.index("send")]])
            coll = "send"
        elif coll == "all_to_all" and self.has_splits[members].any():
            if self._splits_flat is None:  # once: the list column as flat values + offsets
                col = table.column("splits").combine_chunks()
                self._splits_flat = (col.values.to_numpy(zero_copy_only=False), col.offsets.to_numpy())
            values, offsets = self._splits_flat
            splits = [values[offsets[o] : offsets[o + 1]] for o in orig.tolist()]
        cache_key = None
        if splits is None:
            cache_key = (coll, ranks, coll_bytes.tobytes(), sender)
            hit = self._agg_cache.get(cache_key)
            if hit is not None:
                return hit
        phases = plan_collective(coll, ranks, coll_bytes, splits, self._host_of, sender)
        rounds: list[tuple[float, list]] = []
        for ph in phases:
            rounds.extend(self._phase_rounds(ph))
        if cache_key is not None:
            self._agg_cache[cache_key] = rounds
        return rounds

    def _phase_rounds(self, ph: Phase) -> list[tuple[float, list]]:
        router = self.router
        exact = self.flow_model == "exact" or (
            self.flow_model == "auto" and len(ph.src) <= EXACT_MAX_PAIRS and ph.steps <= EXACT_MAX_STEPS
        )
        if exact:
            flows = []
            lat = 0.0
            for s, d, b in zip(ph.src.tolist(), ph.dst.tolist(), ph.nbytes.tolist()):
                r = router.pair_route(s, d)
                lat = max(lat, r.latency_us)
                if b > 0:
                    flows.append((r.links, r.frac * (b / ph.steps)))
            return [(lat, flows)] * ph.steps
        loads, lat = router.aggregate_loads(ph.src, ph.dst, ph.nbytes)
        nz = np.flatnonzero(loads > 0)
        return [(lat * ph.steps, [(nz, loads[nz])] if len(nz) else [])]

    # --- failure reports ---------------------------------------------------------------------

    def _diagnose(self) -> None:
        """Explain why ops never finished (simulator/diagnose.py); always raises."""
        from simulator.diagnose import explain_stall

        explain_stall(self)

    def _name(self, pos: int) -> str:
        return str(self.names[int(self.order[pos])].as_py())


def simulate(ops: pa.Table, cluster: Cluster, **options: Any) -> pa.Table:
    """Simulate `ops` (a normalized trace table) on `cluster`; return it with simulated
    start_us / dur_us (same rows, same order). `options`: the keyword arguments of
    `Simulation` (documented there). See the module docstring for the model."""
    return Simulation(ops, cluster, **options).run()
