"""Validation against live runs: predict configs from the calibration and one reference
trace per (world size, mode), run them live, compare.

    validate(out_dir, calibration, quick=False, repeats=24) -> the validation.json object

For every (world size, mode) of the matrix three references are captured, sequential
schedule, at sizes that are not in the matrix (REFERENCE_SIZE, the base, and
EXTRA_REFERENCE_SIZES, one below and one above every matrix size).
One set of ranks runs the group: `repeats` rounds, each visiting the references and the
configs once in serpentine order, each visit its own run dir VAL/runs/NAME/rep{k}
(traces.capture.capture_interleaved). This 2-core VM's speed drifts by tens of percent
within a minute, so what is compared is measured in the same minutes by the same
processes, and each figure pools every round. Each matrix config is predicted without its
own runs, two ways:
    piecewise (reported as predicted_step_us): base reference → step_graph (one graph per
        measured step, waiting removed) → every op's duration, host gap and payload moved
        along its group's piecewise-linear curve through the references (x = tokens per
        rank; tokens · seq for attention; simulator.transforms.fit_scaling) → set_schedule
    one-trace (predicted_step_us_one_trace): the base reference alone → scale_work (tokens,
        attention) with a cost model fitted on its own ops over the calibration → set_schedule
then collectives are timed by the calibrated comm model plus what the same collective
lost in the reference step beyond the model (note_insitu_comm: stalls the idle
microbenchmark never sees; along the piecewise path that excess follows its group's
curve through the references too, as a local copy grows with its payload; each rank's
late return from a collective and late start of the step come along unchanged),
simulator.engine replays the graphs on a cpu-loopback cluster (processor sharing over
this machine's cores; a transfer in flight while its ranks compute is slowed by the
cores' share too, by the calibration's comm load exponent at its payload, and takes the
calibrated share of a core from their compute); the median
replayed step is the prediction. A second figure (predicted_step_us_corrected) multiplies
it by the measured / replayed step time of the references themselves, piecewise-linear
through the references' ratios (`Reference.replay_factor_at`). It was the headline until
six runs (two full, four --quick, 2026-12-04) showed it adds the references' own noise:
the smallest w2 prefill reference replays 7-18 % long in every run while the configs next
to it do not, and the corrected median |error| was the larger in 5 of the 6.
Measured: the median over the pooled steps of its live visits (a step lasts as long as
its slowest rank), and the overlap of the pooled traces (at most MAX_PARSED_VISITS
visits). Overlap uses traces.overlap.compute_metrics on both sides, after marking the ops
that only wait for or issue collectives (`_ExchangeWait`, c10d::*) as "sync": a rank
blocked in a wait is not computing, whichever way the trace classified it.

validation.json (DESIGN.md keys + extras):
    configs → [{name, predicted_step_us, measured_step_us, error_pct, predicted_overlap_pct,
                measured_overlap_pct, world_size, mode, schedule, batch, seq, reference,
                measured_step_us_min, measured_step_us_max, measured_steps, repeats,
                measured_step_us_per_repeat, load_1min (mean over repeats), method,
                predicted_step_us_corrected, error_pct_corrected, reference_replay_factor,
                predicted_step_us_one_trace, error_pct_one_trace, predicted_overlap_pct_one_trace}]
    median_abs_error_pct, max_abs_error_pct, (same)_one_trace, _corrected and _fastest,
    overlap_max_abs_diff_pts
    (world size > 1; _all includes world size 1), overlap_median_abs_diff_pts,
    speedups → [{name, predicted, measured, diff_pts, measured_alternating, measured_alternating_ci95,
    alternating_pairs, diff_pts_alternating}]
    (sequential / shortcut step time; "alternating": one extra live run per size that switches
    schedule every step, median of the pairs' ratios with its distribution-free 95 % interval:
    as many pairs as fit in `--speedup-seconds` (default 60) or `--speedup-pairs`, --quick
    none, profiler off unless `--speedup-profiled`; "measured" is the ratio of the two configs'
    medians), speedup_within_3pts_alternating (how many sizes), comm_load_model ("stall",
    "exponent" or "delay": validate / repredict comm_load, CommModel.load_model; the default
    "auto" records "stall" where the calibration has the load sweep, else "exponent"),
    references → [{name, run_dirs, measured_step_us, load_1min (one per repeat), replayed_step_us
    (the base moved to this reference's size and replayed; the base: its own replay), base
    (true for the base), steps_used, steps_replayed}], calibration, quick,
    steps, warmup, repeats
"""

from __future__ import annotations

import math
import os
import shutil
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from simulator.calibrate import attach_work, fit_from_ops, load_calibration
from simulator.costmodel import CommModel, CostModel
from simulator.errors import SimulationError
from simulator.transforms import OpScaling, StepGraph, apply_scaling, fit_scaling, scale_work, set_schedule, step_graph

PRESET = "small"
REFERENCE_SIZE = (4, 48)  # (global batch, seq): the base reference, captured, never predicted
# the other points of the per-op curves: one below every matrix size (small sizes sit above
# a straight line through larger ones: per-op overheads), one above
EXTRA_REFERENCE_SIZES = ((2, 32), (8, 96))
SIZES = ((4, 32), (4, 128), (8, 64))  # matrix sizes: other batch and sequence lengths
QUICK_SIZES = ((4, 32), (8, 64))
SYNC_NAME_PREFIXES = ("_ExchangeWait", "_ExchangeStart", "c10d::", "record_param_comms")
_EXCHANGE_BACKWARD = "evaluate_function: _Exchange"  # autograd nodes running the transposed exchange


@dataclass(frozen=True)
class LiveConfig:
    world_size: int
    mode: str
    schedule: str
    batch: int
    seq: int

    @property
    def name(self) -> str:
        return f"w{self.world_size}-{self.mode}-{self.schedule}-b{self.batch}-t{self.seq}"

    @property
    def tokens_per_rank(self) -> int:
        return self.batch // self.world_size * self.seq


def matrix(quick: bool = False) -> list[LiveConfig]:
    """Full: world size 1, 2 × prefill, train × both schedules × 3 sizes (24 configs).
    Quick: world size 2 prefill, both schedules × 2 sizes (4 configs)."""
    # the two schedules of a size run back to back, in alternating order, so a drift in the
    # machine's load does not always favour the same schedule
    def both(k: int) -> tuple[str, str]:
        return ("sequential", "shortcut") if k % 2 == 0 else ("shortcut", "sequential")

    if quick:
        return [LiveConfig(2, "prefill", s, b, t) for k, (b, t) in enumerate(QUICK_SIZES) for s in both(k)]
    return [LiveConfig(w, m, s, b, t) for w in (1, 2) for m in ("prefill", "train") for k, (b, t) in enumerate(SIZES)
            for s in both(k)]


def reference_of(cfg: LiveConfig) -> LiveConfig:
    """The base reference of cfg's group."""
    return LiveConfig(cfg.world_size, cfg.mode, "sequential", *REFERENCE_SIZE)


def references_of(cfg: LiveConfig) -> list[LiveConfig]:
    """Every reference of cfg's group, the base first."""
    return [reference_of(cfg)] + [LiveConfig(cfg.world_size, cfg.mode, "sequential", b, t)
                                  for b, t in EXTRA_REFERENCE_SIZES]


# ---------------------------------------------------------------------------------------
# live side


def capture_group(group: list[LiveConfig], runs: Path, steps: int, warmup: int, repeats: int,
                  log=print) -> dict[LiveConfig, list[dict]]:
    """Run a group (its references first) live in one set of ranks, `repeats` rounds,
    each visiting every config once in serpentine order (forwards, then backwards), into
    runs/NAME/rep{k} (traces.capture.capture_interleaved); {config: its run.json objects,
    one per round}. References run twice the steps: every prediction of the group leans
    on them."""
    from traces.capture import CaptureSpec, capture_interleaved
    from traces.rundir import read_run_json

    refs = references_of(group[0])
    specs = [CaptureSpec(out_dir=str(runs / _run_name(c, refs)), preset=PRESET, world_size=c.world_size,
                         schedule=c.schedule, mode=c.mode, batch=c.batch, seq=c.seq,
                         steps=2 * steps if c in refs else steps, warmup=warmup, backend="gloo", threads=1)
             for c in group]
    order = list(range(len(group)))
    visits = [(k, Path(specs[k].out_dir) / f"rep{rep}") for rep in range(repeats)
              for k in (order if rep % 2 == 0 else order[::-1])]
    shown = [""]

    def progress(line: str) -> None:  # one line per visit
        head = line.split(":")[0]
        if head.startswith("visit") and head != shown[0]:
            shown[0] = head
            log(f"  {head}")

    # a visit takes seconds (a train step of `small` ~0.5 s on this machine); the deadline
    # only catches a hang
    capture_interleaved(specs, visits, runs, timeout_s=300 + 60 * len(visits), progress=progress)
    return {c: [read_run_json(Path(specs[k].out_dir) / f"rep{rep}") for rep in range(repeats)]
            for k, c in enumerate(group)}


def live_ops(run_dir: Path) -> pa.Table:
    from traces.kineto import parse_traces
    from traces.rundir import trace_files

    return parse_traces(trace_files(run_dir))


def rep_dirs(runs: Path, name: str) -> list[Path]:
    """The run dirs of one config: runs/NAME/rep0, rep1, ... (or runs/NAME itself, as
    validation dirs written before repeats existed hold it)."""
    base = runs / name
    reps = sorted((d for d in base.glob("rep*") if d.is_dir()), key=lambda d: int(d.name[3:]) if d.name[3:].isdigit() else -1)
    return reps or [base]


def pooled_ops(tables: list[pa.Table]) -> pa.Table:
    """Ops of several runs of one config as one table: ids (and the deps naming them) and
    step numbers are shifted so that no two runs share any, so step_graph sees every step
    of every run."""
    import pyarrow.compute as pc

    if len(tables) == 1:
        return tables[0]
    parts, id_offset, step_offset = [], 0, 0
    for t in tables:
        ids = t.column("id").to_numpy()
        steps = t.column("step").to_numpy()
        deps = t.column("deps").combine_chunks()
        shifted = pa.ListArray.from_arrays(deps.offsets, pc.add(deps.flatten(), pa.scalar(id_offset, pa.int64())))
        t = t.set_column(t.schema.get_field_index("id"), "id", pa.array(ids + id_offset, type=pa.int64()))
        t = t.set_column(t.schema.get_field_index("deps"), "deps", shifted.cast(t.schema.field("deps").type))
        t = t.set_column(t.schema.get_field_index("step"), "step",
                         pa.array(np.where(steps >= 0, steps + step_offset, steps), type=t.schema.field("step").type))
        parts.append(t)
        id_offset += int(ids.max()) + 1 if ids.size else 0
        step_offset += int(steps.max()) + 1 if steps.size and steps.max() >= 0 else 0
    return pa.concat_tables(parts)


def pooled_steps_us(runs: list[dict]) -> list[float]:
    """Every measured step of the runs (a step lasts as long as its slowest rank)."""
    return [max(ts) for run in runs for ts in zip(*run["step_times_us"].values())]


def mark_sync(ops: pa.Table) -> pa.Table:
    """Ops that only issue or wait for collectives → kind "sync" (see module docstring)."""
    names = ops.column("name").to_pylist()
    kinds = ops.column("kind").to_pylist()
    new = ["sync" if k in ("compute", "host") and (n.startswith(SYNC_NAME_PREFIXES) or _EXCHANGE_BACKWARD in n) else k
           for n, k in zip(names, kinds)]
    return ops.set_column(ops.schema.get_field_index("kind"), "kind", pa.array(new, type=pa.string()))


def measured_overlap_pct(ops: pa.Table) -> float | None:
    from traces.overlap import compute_metrics

    steps = ops.column("step").to_numpy()
    return compute_metrics(mark_sync(ops.filter(pa.array(steps >= 0))))["overlap_pct_mean"]


# ---------------------------------------------------------------------------------------
# prediction side


@dataclass
class RefPoint:
    """A reference other than the base: its config, measured median step, and the base
    moved to its size and replayed."""

    config: LiveConfig
    measured_step_us: float
    replayed_step_us: float | None = None


@dataclass
class Reference:
    """What a prediction may use: the base reference's per-step graphs, a cost model fitted
    on its own ops, and (when captured) per-op curves through the other reference sizes."""

    config: LiveConfig
    graphs: list[StepGraph]  # one per measured step of the base reference run
    model: CostModel
    measured_step_us: float
    scaling: OpScaling | None = None
    scaling_error: str = ""
    replayed_step_us: float | None = None  # the reference's own graphs replayed (median)
    steps_pooled: int = 0  # steps whose op sequence matched, of which `graphs` is an even spread
    points: list[RefPoint] = field(default_factory=list)

    @property
    def replay_factor(self) -> float:
        """measured / replayed step time of the reference itself: what the replay misses
        on this machine (contention it does not model), carried to every prediction of the
        group. 1 until the reference has been replayed."""
        if not self.replayed_step_us:
            return 1.0
        return self.measured_step_us / self.replayed_step_us

    def replay_factor_at(self, cfg: LiveConfig) -> float:
        """The replay factor for `cfg`: piecewise-linear in tokens per rank (like the per-op
        curves) through the factors of the base and every replayed reference point, held
        at the outermost ones' beyond them; the base's alone when no point was replayed."""
        knots = {self.config.tokens_per_rank: self.replay_factor}
        for p in self.points:
            if p.replayed_step_us and p.measured_step_us:
                knots.setdefault(p.config.tokens_per_rank, p.measured_step_us / p.replayed_step_us)
        xs = sorted(knots)
        return float(np.interp(cfg.tokens_per_rank, xs, [knots[x] for x in xs]))


def build_reference(cfg: LiveConfig, run_dirs: list[Path], base: CostModel, measured_step_us: float,
                    others: list[tuple[LiveConfig, list[Path], float]] = (), insitu_comm: CommModel | None = None
                    ) -> Reference:
    """The reference of a group from all its runs (every step of every repeat); `others`:
    (config, run dirs, measured median step) of the other reference sizes."""
    def steps_of(ops: pa.Table) -> list[StepGraph]:  # every step: the per-op curves' totals read all
        steps = step_graph(ops, per_step=True, every_step=True)
        return [note_insitu_comm(g, insitu_comm) for g in steps] if insitu_comm is not None else steps

    ops = pooled_ops([attach_work(live_ops(d), d) for d in spread(run_dirs, MAX_PARSED_VISITS)])
    every_step = steps_of(ops)
    # replays need the steps that ran the common op sequence
    graphs = [g for g in every_step if g.notes["steps"][0] not in g.notes["steps_skipped"]]
    pooled = len(graphs)
    graphs = spread(graphs, MAX_REPLAYED_STEPS)
    ref = Reference(cfg, graphs, fit_from_ops(ops, base), measured_step_us, steps_pooled=pooled)
    if others:
        points = [(every_step, cfg.tokens_per_rank, cfg.seq)]
        points += [(steps_of(pooled_ops([live_ops(d) for d in spread(dirs, MAX_PARSED_VISITS)])), c.tokens_per_rank,
                    c.seq) for c, dirs, _ in others]
        try:
            ref.scaling = fit_scaling(graphs[0], points)
            ref.points = [RefPoint(c, meas) for c, _, meas in others]
        except SimulationError as err:
            ref.scaling_error = str(err)
    return ref


def predict_graphs(ref: Reference, cfg: LiveConfig, method: str = "piecewise", limit: int | None = None
                   ) -> list[StepGraph]:
    """Each base-reference step moved to `cfg` (same world size and mode).

    method "piecewise": per-op curves through the references (falls back to "one-trace"
    when they are missing); "one-trace": the cost model's work scaling from the base
    reference alone (simulator.transforms.scale_work)."""
    if (cfg.world_size, cfg.mode) != (ref.config.world_size, ref.config.mode):
        raise SimulationError(f"{cfg.name}: reference {ref.config.name} has another world size or mode")
    graphs = spread(ref.graphs, limit) if limit else ref.graphs
    if method == "piecewise" and ref.scaling is not None:
        moved = [apply_scaling(g, ref.scaling, cfg.tokens_per_rank, cfg.seq) for g in graphs]
    else:
        token_scale = cfg.tokens_per_rank / ref.config.tokens_per_rank
        seq_scale = cfg.seq / ref.config.seq
        moved = [scale_work(g, ref.model, token_scale, token_scale * seq_scale) for g in graphs]
    return [set_schedule(g, cfg.schedule) for g in moved]


# Per reference: graphs replayed (an even spread over its pooled steps; a replay of `small`
# takes ~70 ms here) and run dirs parsed (an even spread over its rounds; ~0.6 s each); the
# configs' overlap reads at most MAX_PARSED_VISITS of their run dirs too. Step times always
# come from every round's run.json.
MAX_REPLAYED_STEPS = 64
MAX_PARSED_VISITS = 16
ONE_TRACE_REPLAYS = 16  # the secondary, cost-model path replays fewer
# The fewest and most pairs a time-budgeted alternating run takes (median_ci's 95 %
# interval needs 6)
MIN_SPEEDUP_PAIRS, MAX_SPEEDUP_PAIRS = 16, 100_000
# A collective's time comes from the references' sequential steps, where the ranks wait in
# it with the cores idle. Under the shortcut schedule the ranks compute while it is in
# flight and gloo's transfer threads share the cores with them: the replay runs the
# transfer at share ** e of its speed (simulator.engine comm_load_exponent), e measured
# by `moesim calibrate` per payload size (an all_to_all at the matrix's payloads, idle and
# beside a compute loop: the calibration's comm_load; CommModel.load_exponent_at between
# the sizes; 1, plain processor sharing, for calibrations without it). Without it a w2
# shortcut step replays its all-to-alls at idle speed and under-predicts overlap -- see
# README "Calibration and validation".


def spread(items: list, n: int) -> list:
    """At most n items, evenly spaced over the list (first and last included)."""
    if len(items) <= n:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, n).round().astype(int)]


def simulate_steps(graphs: list[StepGraph], comm: CommModel, cores: int, slow_under_comm: bool | None = None
                   ) -> tuple[float, float | None, float]:
    """Median replayed step time (µs), overlap % and the fastest replayed step (µs) over the
    per-step graphs. Overlap is pooled as the live side's is (measured_overlap_pct: one
    compute_metrics over all steps): per rank, hidden comm time over comm time summed over
    the replays, then the mean over ranks. A mean of per-replay figures would overweight
    the replays where a rank arrived last at every collective and its few µs of comm hid
    under compute."""
    times, comm_us, hidden_us = [], defaultdict(float), defaultdict(float)
    for k, g in enumerate(graphs):
        step_us, metrics, _ = simulate_graph(g, comm, cores, slow_under_comm, seed=k)
        times.append(step_us)
        for rank, m in metrics["ranks"].items():
            comm_us[rank] += m["comm_us"]
            hidden_us[rank] += m["hidden_comm_us"]
    overlaps = [100.0 * hidden_us[r] / comm_us[r] for r in comm_us if comm_us[r] > 0]
    return statistics.median(times), (float(np.mean(overlaps)) if overlaps else None), min(times)


def _model_us(g: StepGraph, i: int, comm: CommModel) -> float:
    members = g.group[i].split(",")
    me = str(int(g.rank[i]))
    return comm.predict_us(g.coll[i], len(members), g.coll_bytes[i], g.splits[i],
                           members.index(me) if me in members else -1)


def note_insitu_comm(g: StepGraph, comm: CommModel) -> StepGraph:
    """Record in g.notes each collective's in-situ transfer time, the comm model's figure for
    the same payload, and each rank's tail beyond the transfer; simulate_graph then carries
    the difference between the first two (stalls of the live run the microbenchmark
    calibration never saw) to whatever payload the op has by then, and the tails as they are.

    A graph of one traced step (its notes hold where its ops ran) times the transfer from the
    last rank's arrival to the first rank's return; a rank that returned later (its thread
    was off the core when the data came) keeps the difference as its tail. Without those
    notes the transfer is the shortest duration over the ranks (the last to arrive waited
    for nobody) and no rank has a tail."""
    insitu = np.zeros(g.n)
    model_ref = np.zeros(g.n)
    tail = np.zeros(g.n)
    start, end = g.notes.get("trace_start_us"), g.notes.get("trace_end_us")
    by_instance: dict[tuple, list[int]] = defaultdict(list)
    for i in range(g.n):
        if g.kind[i] == "comm" and g.coll[i]:
            by_instance[(g.coll[i], g.group[i], int(g.seq[i]))].append(i)
    for ops in by_instance.values():
        if start is not None:
            last_arrival = max(float(start[i]) for i in ops)
            returns = {i: max(float(end[i]) - last_arrival, 0.0) for i in ops}
            transfer = min(returns.values())
        else:
            returns, transfer = {}, min(float(g.dur_us[i]) for i in ops)
        for i in ops:
            insitu[i] = transfer
            tail[i] = returns.get(i, transfer) - transfer
            model_ref[i] = _model_us(g, i, comm)
    g.notes["comm_insitu_us"] = insitu
    g.notes["comm_model_ref_us"] = model_ref
    g.notes["comm_tail_us"] = tail
    # where each rank began the step: the first to begin waits for the others at the first exchange
    first = {int(r): float(start[g.rank == r].min()) for r in np.unique(g.rank)} if start is not None else {}
    g.notes["rank_start_us"] = {r: t - min(first.values()) for r, t in first.items()}
    return g


COMM_LOAD_MODELS = ("auto", "exponent", "delay", "stall")


def _set_load_model(comm: CommModel, model: str) -> str:
    """Set comm.load_model; "auto" (the default) is "stall" where the calibration measured the
    load sweep, else "exponent". Returns the model set."""
    if model not in COMM_LOAD_MODELS:
        raise SimulationError(f"comm load model: expected one of {', '.join(COMM_LOAD_MODELS)}, got {model!r}")
    if model == "auto":
        model = "stall" if comm.load_stall_points else "exponent"
    comm.load_model = model
    if model != "exponent":
        _uses_load_model(comm, model)  # "delay" or "stall" without points fails here, before anything runs
    return model


def _uses_load_model(comm: CommModel, model: str) -> bool:
    """Whether a replay uses load model `model` ("delay": the additive delay instead of the
    load exponent; "stall": stalls before it, simulator.engine comm_load_stall); either one
    set without the calibration's points from the load sweep is an error."""
    if getattr(comm, "load_model", "exponent") != model:
        return False
    if not (comm.load_delay_points if model == "delay" else comm.load_stall_points):
        raise SimulationError(f"comm load model {model}: the calibration has no measured load sweep "
                              "(run `moesim calibrate --backend gloo --world-size 2 -o CAL`)")
    return True


def simulate_graph(g: StepGraph, comm: CommModel, cores: int, slow_under_comm: bool | None = None,
                   seed: int = 0) -> tuple[float, dict, pa.Table]:
    """Replay a step graph on cpu-loopback: (step time µs, its traces.overlap metrics,
    simulated ops). With note_insitu_comm's notes each collective takes its in-situ time,
    each rank keeps its traced tail after it, and a rank that began its traced step late
    begins late here too.

    slow_under_comm: let the engine slow compute while transfers are in flight, each taking
    the calibrated share of a core (CommModel.core_use_at) from its ranks' compute: the
    references' compute ran beside none (sequential schedule), a shortcut step's dense
    branch runs beside the all-to-all. Default: on when the calibration measured the core
    use (calibrations before 2026-12-05 did not: then off, the older behaviour).
    A transfer in flight while the cores are shared slows by the calibration's load exponent
    at its payload, or, with comm.load_model "delay" (validate --comm-load delay), waits the
    sweep's loaded − idle time instead (simulator.engine comm_load_delay_us); with "stall"
    (--comm-load stall) it may first stall until a core frees (simulator.engine
    comm_load_stall, its draws seeded with `seed`; simulate_steps passes each graph's index)."""
    from simulator.cluster import cpu_loopback
    from simulator.engine import simulate
    from traces.overlap import compute_metrics

    core_use = bool(getattr(comm, "core_use_points", None))
    if slow_under_comm is None:
        slow_under_comm = core_use
    g = g.copy()
    insitu, model_ref = g.notes.get("comm_insitu_us"), g.notes.get("comm_model_ref_us")
    for i in range(g.n):
        if g.kind[i] == "comm" and g.coll[i]:
            g.dur_us[i] = _model_us(g, i, comm)
            if insitu is not None and model_ref[i] > 0:
                # the reference's own collective, as it ran in the step (its last-arriving
                # rank): faster than the model → the same ratio; slower → the same stall
                g.dur_us[i] = (g.dur_us[i] * insitu[i] / model_ref[i] if insitu[i] < model_ref[i]
                               else g.dur_us[i] + insitu[i] - model_ref[i])
    late = g.notes.get("rank_start_us")
    if late:
        for (rank, lane), lane_ops in g.lanes().items():
            if g.kind[lane_ops[0]] != "comm":
                g.gap_us[lane_ops[0]] += late.get(rank, 0.0)
    ops, gap = g.to_ops()
    durations = ops.column("dur_us").to_numpy().astype(np.float64)
    if slow_under_comm:
        # dur_us = 0 marks a duration as modelled, not measured: the engine then slows the
        # op while in-flight transfers share the cores (measured ones already include that)
        zero = pa.array(np.where(np.asarray(g.kind) == "comm", durations, 0.0))
        ops = ops.set_column(ops.schema.get_field_index("dur_us"), "dur_us", zero)
    cluster = cpu_loopback(int(g.rank.max()) + 1, cores)
    sim = simulate(ops, cluster, comm_from_trace=True, gap_us=gap, compute_time=lambda _t, _c: durations,
                   comm_load_exponent=comm.load_exponent_at, comm_tail_us=g.notes.get("comm_tail_us"),
                   comm_core_use=comm.core_use_at if core_use else None,
                   comm_load_delay_us=comm.load_delay_at if _uses_load_model(comm, "delay") else None,
                   comm_load_stall=comm.load_stall_at if _uses_load_model(comm, "stall") else None, seed=seed)
    # as live: a step lasts as long as its slowest rank, each from its own start
    end = sim.column("start_us").to_numpy() + sim.column("dur_us").to_numpy()
    rank = sim.column("rank").to_numpy()
    step_us = max(float(end[rank == r].max()) - (late or {}).get(int(r), 0.0) for r in np.unique(rank))
    return step_us, compute_metrics(mark_sync(sim)), sim


# ---------------------------------------------------------------------------------------
# the whole comparison


def _err(pred: float, meas: float) -> float:
    return 100.0 * (pred - meas) / meas


def validate(out_dir: str | os.PathLike, calibration: str | os.PathLike, quick: bool = False, steps: int = 4,
             warmup: int = 2, cores: int | None = None, configs: list[LiveConfig] | None = None,
             log=print, repeats: int = 24, speedup_pairs: int = 0, speedup_seconds: float = 0.0,
             speedup_profiled: bool = False, comm_load: str = "auto") -> dict:
    """Capture references and the matrix live (`repeats` rounds), predict each config from
    its group's references, write VAL/validation.json. Per size with both schedules, an
    alternating run measures the speedup a second way: `speedup_pairs` pairs, or (when 0)
    as many as fit in about `speedup_seconds`; neither → none; `speedup_profiled`: its steps
    under the profiler."""
    from traces.rundir import VALIDATION_JSON, write_json_atomic

    cal, compute_model, comm_model = load_calibration(calibration, backend="gloo")
    comm_load = _set_load_model(comm_model, comm_load)
    configs = configs or matrix(quick)
    needed_ws = max(c.world_size for c in configs)
    if cal["world_size"] < needed_ws:
        raise SimulationError(
            f"{calibration}: calibrated for world size {cal['world_size']}, the matrix needs {needed_ws}; "
            f"run `moesim calibrate --backend gloo --world-size {needed_ws} -o {calibration}`")
    if repeats < 1:
        raise SimulationError(f"repeats: must be at least 1, got {repeats}")
    cores = cores or os.cpu_count() or 1
    out = Path(out_dir)
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ref_rows: list[dict] = []
    rows: list[dict] = []
    # Per (world size, mode) group: one set of ranks runs `repeats` rounds, each visiting the
    # group's references and its configs once (capture_group). The machine's speed
    # drifts by tens of percent over a minute (README), so a config and the references it is
    # predicted from are measured interleaved, in the same minutes, by the same processes,
    # and every figure pools all rounds. Predictions read only the references' runs.
    for key in sorted({(c.world_size, c.mode) for c in configs}):
        refs = references_of(LiveConfig(key[0], key[1], "sequential", 0, 0))
        group = refs + [c for c in configs if (c.world_size, c.mode) == key]
        for c in group:  # rounds of an earlier, longer validate into this VAL must not be pooled
            for stale in rep_dirs(runs, _run_name(c, refs))[repeats:]:
                shutil.rmtree(stale)
        live = capture_group(group, runs, steps, warmup, repeats, log)
        log(f"{key[0]} rank(s), {key[1]}: {repeats} rounds of {len(group)} configs live "
            f"(load {live[group[-1]][-1]['load_1min']}, {time.time() - t0:.0f} s)")
        alternating = {}
        for size in sorted({(c.batch, c.seq) for c in group[len(refs):]}):
            pair = {c.schedule: c for c in group[len(refs):] if (c.batch, c.seq) == size}
            if set(pair) != {"sequential", "shortcut"} or (speedup_pairs <= 0 and speedup_seconds <= 0):
                continue
            n, budget = (speedup_pairs, 0.0) if speedup_pairs > 0 else (MAX_SPEEDUP_PAIRS, speedup_seconds)
            alternating[size] = m = measure_speedup(pair["sequential"], n, warmup, runs, budget,
                                                    profiled=speedup_profiled)
            log(f"alternating schedules, {key[0]} rank(s) {key[1]} b{size[0]}-t{size[1]}: sequential / shortcut "
                f"{m['speedup']:.3f} (95 % interval {m['ci95'][0]:.3f}-{m['ci95'][1]:.3f}, median of {m['pairs']} pairs)")
        rows_ref, ref = _group_rows(runs, refs, live, compute_model, comm_model, cores, log)
        ref_rows += rows_ref
        for cfg in group[len(refs):]:
            rows.append(_predict_and_measure(cfg, ref, comm_model, cores, runs, live[cfg], log))
            if (cfg.batch, cfg.seq) in alternating:
                rows[-1].update(_alternating_fields(alternating[(cfg.batch, cfg.seq)]))
    result = summarise(rows)
    result.update({"references": ref_rows, "calibration": str(calibration), "quick": quick, "preset": PRESET,
                   "steps": steps, "warmup": warmup, "repeats": repeats, "speedup_pairs": speedup_pairs,
                   "speedup_seconds": speedup_seconds, "speedup_profiled": speedup_profiled,
                   "cores": cores, "wall_s": round(time.time() - t0, 1), "comm_load_model": comm_load})
    write_json_atomic(out / VALIDATION_JSON, result)
    write_table(out / "validation.md", result)
    return result


def measure_speedup(cfg: LiveConfig, pairs: int, warmup: int, runs: Path, budget_s: float = 0.0,
                    profiled: bool = False) -> dict:
    """Measured shortcut speedup of cfg's size: one live run alternating the schedules step
    by step (traces.capture.alternating_schedules; `pairs` pairs, or with budget_s > 0 as
    many as fit in about budget_s seconds, at least MIN_SPEEDUP_PAIRS): the median over
    pairs of sequential / shortcut step time, its distribution-free 95 % interval
    (median_ci) and the pair count. profiled: under the profiler, as the configs' traced
    steps ran; off by default: a profiled pair costs 2-4x the time here (a recording per
    window) and its ratio scatters more, so the interval in a given time is 2-3x wider,
    while the two intervals overlapped at all 12 sizes (README)."""
    from traces.capture import CaptureSpec, alternating_schedules

    spec = CaptureSpec(out_dir=str(runs), preset=PRESET, world_size=cfg.world_size, schedule="sequential",
                       mode=cfg.mode, batch=cfg.batch, seq=cfg.seq, steps=pairs, warmup=warmup, backend="gloo",
                       threads=1, timeout_s=max(600.0, 3 * budget_s), profiler=profiled)
    times = alternating_schedules(spec, pairs, budget_s, MIN_SPEEDUP_PAIRS)
    ratios = [a / b for a, b in zip(times["sequential"], times["shortcut"])]
    return {"speedup": statistics.median(ratios), "ci95": list(median_ci(ratios)), "pairs": len(ratios)}


def median_ci(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """A distribution-free confidence interval of the median of `values`: the order
    statistics k and n + 1 - k (1-based), k the largest with P(Binomial(n, 1/2) < k) <=
    (1 - level) / 2 (each value falls below the median with probability 1/2, whatever the
    distribution). Where n is too small for that level (n < 6 at 95 %): (min, max)."""
    xs = sorted(values)
    n = len(xs)
    if n == 0:
        raise SimulationError("median_ci: no values")
    alpha, below, k = (1.0 - level) / 2, 0.0, 0
    while k < n and below + (p := math.comb(n, k) / 2 ** n) <= alpha:
        below += p
        k += 1
    k = max(k, 1)
    return xs[k - 1], xs[n - k]


ALTERNATING_FIELDS = ("measured_speedup_alternating", "measured_speedup_alternating_ci95", "speedup_alternating_pairs")


def _alternating_fields(m: dict) -> dict:
    return dict(zip(ALTERNATING_FIELDS, (m["speedup"], m["ci95"], m["pairs"])))


def _run_name(c: LiveConfig, refs: list[LiveConfig]) -> str:
    return f"ref-{c.name}" if c in refs else c.name


def _group_rows(runs: Path, refs: list[LiveConfig], live: dict, compute_model: CostModel,
                comm_model: CommModel, cores: int, log) -> tuple[list[dict], Reference]:
    """Build the group's Reference from the runs of its references (`refs`, the base first;
    those without runs in `live` are left out); rows for validation.json `references` and
    the Reference itself."""
    base, others = refs[0], [c for c in refs[1:] if live.get(c)]
    used = [base] + others
    dirs = {c: rep_dirs(runs, f"ref-{c.name}") for c in used}
    meas = {c: statistics.median(pooled_steps_us(live[c])) for c in used}
    ref = build_reference(base, dirs[base], compute_model, meas[base], [(c, dirs[c], meas[c]) for c in others],
                          insitu_comm=comm_model)
    ref.replayed_step_us = simulate_steps(ref.graphs, comm_model, cores)[0]
    replayed = {base: ref.replayed_step_us}
    for p in ref.points:  # the base moved to each other reference's size, replayed
        p.replayed_step_us = replayed[p.config] = simulate_steps(predict_graphs(ref, p.config), comm_model, cores)[0]
    log(f"references {', '.join(c.name for c in used)}: measured / replayed "
        + ", ".join(f"{meas[c] / 1e3:.1f} / " + (f"{replayed[c] / 1e3:.1f}" if c in replayed else "n/a") + " ms"
                    for c in used)
        + f" ({len(ref.graphs)} of {ref.steps_pooled} base steps replayed)"
        + (f"; per-op fit failed: {ref.scaling_error}" if ref.scaling_error else ""))
    rows = []
    for c in used:
        row = {"name": c.name, "run_dirs": [str(d) for d in dirs[c]], "measured_step_us": meas[c],
               "load_1min": [r.get("load_1min") for r in live[c]], "replayed_step_us": replayed.get(c),
               "base": c == base}
        if c == base:
            row.update({"steps_used": ref.steps_pooled, "steps_replayed": len(ref.graphs),
                        "per_op_curves": ref.scaling is not None, "per_op_curves_error": ref.scaling_error})
        rows.append(row)
    return rows, ref


def _predict_and_measure(cfg: LiveConfig, ref: Reference, comm_model: CommModel, cores: int, runs: Path,
                         live: list[dict], log) -> dict:
    """Predict `cfg` from `ref` (which never holds cfg's runs) and compare with its live
    runs (`live`: their run.json objects, one per repeat): one validation row."""
    raw_us, pred_ov, raw_min = simulate_steps(predict_graphs(ref, cfg, "piecewise"), comm_model, cores)
    raw_one_us, one_ov, _ = simulate_steps(predict_graphs(ref, cfg, "one-trace", ONE_TRACE_REPLAYS), comm_model, cores)
    # the replay itself is the prediction; the references' measured / replayed factor rides
    # along as a secondary figure (over 6 runs it moved the median error up in 5: module doc)
    factor = ref.replay_factor_at(cfg)
    pred_us, pred_min, one_us = raw_us, raw_min, raw_one_us
    per_step = pooled_steps_us(live)
    meas_us = statistics.median(per_step)
    meas_ov = measured_overlap_pct(pooled_ops([live_ops(d) for d in spread(rep_dirs(runs, cfg.name), MAX_PARSED_VISITS)]))
    loads = [r.get("load_1min") for r in live if r.get("load_1min") is not None]
    row = {
        "name": cfg.name, "predicted_step_us": pred_us, "measured_step_us": meas_us,
        "error_pct": _err(pred_us, meas_us), "predicted_overlap_pct": pred_ov, "measured_overlap_pct": meas_ov,
        **asdict(cfg), "reference": reference_of(cfg).name,
        "predicted_step_us_corrected": raw_us * factor, "error_pct_corrected": _err(raw_us * factor, meas_us),
        "reference_replay_factor": factor,
        "measured_step_us_min": min(per_step), "measured_step_us_max": max(per_step),
        "measured_steps": len(per_step), "repeats": len(live),
        "measured_step_us_per_repeat": [statistics.median(pooled_steps_us([r])) for r in live],
        "predicted_step_us_fastest": pred_min, "error_pct_fastest": _err(pred_min, min(per_step)),
        "load_1min": round(statistics.mean(loads), 2) if loads else None,
        "method": "piecewise" if ref.scaling is not None else "one-trace",
        "predicted_step_us_one_trace": one_us, "error_pct_one_trace": _err(one_us, meas_us),
        "predicted_overlap_pct_one_trace": one_ov,
    }
    log(f"{cfg.name:<34} predicted {pred_us / 1e3:8.1f} ms  measured {meas_us / 1e3:8.1f} ms  "
        f"error {row['error_pct']:+6.1f}% (one trace {row['error_pct_one_trace']:+6.1f}%, fastest steps "
        f"{row['error_pct_fastest']:+6.1f}%)  overlap {_fmt(pred_ov)} / {_fmt(meas_ov)}  (load {row['load_1min']})")
    return row


def repredict(out_dir: str | os.PathLike, calibration: str | os.PathLike, cores: int | None = None, log=print,
              comm_load: str = "auto") -> dict:
    """Predict again from the runs a previous `validate` captured in VAL/runs (no live runs):
    for changes to the prediction side, and to separate measuring from predicting."""
    from traces.rundir import VALIDATION_JSON, read_json, read_run_json, write_json_atomic

    out = Path(out_dir)
    old = read_json(out / VALIDATION_JSON)
    _, compute_model, comm_model = load_calibration(calibration, backend="gloo")
    comm_load = _set_load_model(comm_model, comm_load)
    cores = cores or old.get("cores") or os.cpu_count() or 1
    runs = out / "runs"
    configs = [LiveConfig(c["world_size"], c["mode"], c["schedule"], c["batch"], c["seq"]) for c in old["configs"]]
    old_rows = {c["name"]: c for c in old["configs"]}
    old_loads = {c["name"]: [c.get("load_1min")] * (c.get("repeats") or 1) for c in old["configs"]}
    old_ref_loads = {r["name"]: r["load_1min"] if isinstance(r.get("load_1min"), list) else [r.get("load_1min")]
                     for r in old.get("references", [])}
    rows, ref_rows = [], []
    for key in sorted({(c.world_size, c.mode) for c in configs}):
        refs = references_of(LiveConfig(key[0], key[1], "sequential", 0, 0))
        # a VAL captured before a reference size was added has no runs for it: predict without it
        group = [c for c in refs if (runs / _run_name(c, refs)).is_dir()]
        if refs[0] not in group:
            raise SimulationError(f"{runs}: no runs of the base reference {refs[0].name}")
        members = [c for c in configs if (c.world_size, c.mode) == key]
        live = {c: [read_run_json(d) for d in rep_dirs(runs, _run_name(c, refs))[: old.get("repeats") or None]]
                for c in group + members}
        for c in refs:
            for run, load in zip(live.get(c, []), old_ref_loads.get(c.name) or []):
                run.setdefault("load_1min", load)
        rows_ref, ref = _group_rows(runs, refs, live, compute_model, comm_model, cores, log)
        ref_rows += rows_ref
        for cfg in members:
            # run.json keeps no load: carry the one the capture recorded
            for run, load in zip(live[cfg], old_loads.get(cfg.name) or []):
                run.setdefault("load_1min", load)
            rows.append(_predict_and_measure(cfg, ref, comm_model, cores, runs, live[cfg], log))
            # the alternating speedup run kept no run dirs: carry its measurement
            rows[-1].update({k: v for k, v in old_rows.get(cfg.name, {}).items() if k in ALTERNATING_FIELDS})
    result = summarise(rows)
    result.update({"references": ref_rows, "calibration": str(calibration), "quick": old.get("quick"), "preset": PRESET,
                   "steps": old.get("steps"), "warmup": old.get("warmup"), "repeats": old.get("repeats", 1),
                   "cores": cores, "repredicted": True, "comm_load_model": comm_load})
    write_json_atomic(out / VALIDATION_JSON, result)
    write_table(out / "validation.md", result)
    return result


def _fmt(x: float | None) -> str:
    return "  n/a" if x is None else f"{x:5.1f}"


def summarise(rows: list[dict]) -> dict:
    """The DESIGN.md summary keys plus overlap and shortcut-speedup agreement."""
    errs = [abs(r["error_pct"]) for r in rows]
    # world size 1 "collectives" are local copies of a few µs: their overlap % is reported per
    # config but left out of the agreement figure
    ov_all = [(r["world_size"], abs(r["predicted_overlap_pct"] - r["measured_overlap_pct"])) for r in rows
              if r["predicted_overlap_pct"] is not None and r["measured_overlap_pct"] is not None]
    ov = [d for w, d in ov_all if w > 1]
    by = {(r["world_size"], r["mode"], r["batch"], r["seq"], r["schedule"]): r for r in rows}
    speedups = []
    for (w, m, b, t, s), r in sorted(by.items()):
        other = by.get((w, m, b, t, "sequential"))
        if s == "shortcut" and other is not None:
            pred = other["predicted_step_us"] / r["predicted_step_us"]
            meas = other["measured_step_us"] / r["measured_step_us"]
            entry = {"name": f"w{w}-{m}-b{b}-t{t}", "predicted": pred, "measured": meas, "diff_pts": 100 * (pred - meas)}
            alt = r.get("measured_speedup_alternating")
            if alt is not None:
                entry.update({"measured_alternating": alt, "diff_pts_alternating": 100 * (pred - alt)})
                if r.get("measured_speedup_alternating_ci95"):  # older validations have none
                    entry.update({"measured_alternating_ci95": r["measured_speedup_alternating_ci95"],
                                  "alternating_pairs": r.get("speedup_alternating_pairs")})
            speedups.append(entry)
    one = [abs(r["error_pct_one_trace"]) for r in rows if r.get("error_pct_one_trace") is not None]
    fastest = [abs(r["error_pct_fastest"]) for r in rows if r.get("error_pct_fastest") is not None]
    corrected = [abs(r["error_pct_corrected"]) for r in rows if r.get("error_pct_corrected") is not None]
    return {
        "configs": rows,
        "median_abs_error_pct_fastest": statistics.median(fastest) if fastest else None,
        "max_abs_error_pct_fastest": max(fastest) if fastest else None,
        "median_abs_error_pct_corrected": statistics.median(corrected) if corrected else None,
        "max_abs_error_pct_corrected": max(corrected) if corrected else None,
        "median_abs_error_pct_one_trace": statistics.median(one) if one else None,
        "max_abs_error_pct_one_trace": max(one) if one else None,
        "median_abs_error_pct": statistics.median(errs) if errs else None,
        "max_abs_error_pct": max(errs) if errs else None,
        "overlap_max_abs_diff_pts": max(ov) if ov else None,
        "overlap_median_abs_diff_pts": statistics.median(ov) if ov else None,
        "overlap_max_abs_diff_pts_all": max((d for _, d in ov_all), default=None),
        "speedups": speedups,
        "speedup_max_abs_diff_pts": max((abs(s["diff_pts"]) for s in speedups), default=None),
        "speedup_max_abs_diff_pts_alternating": max(
            (abs(s["diff_pts_alternating"]) for s in speedups if "diff_pts_alternating" in s), default=None),
        "speedup_within_3pts_alternating": sum(abs(s["diff_pts_alternating"]) <= 3 for s in speedups
                                               if "diff_pts_alternating" in s),
    }


def merge(paths: list[str | os.PathLike], out_dir: str | os.PathLike) -> dict:
    """Combine validation.json files of matrix subsets (e.g. prefill and train run at
    different times) into one, recomputing the summary; writes OUT/validation.json + .md."""
    from traces.rundir import VALIDATION_JSON, read_json, write_json_atomic

    parts = [read_json(Path(p) / VALIDATION_JSON if Path(p).is_dir() else p) for p in paths]
    rows = [c for part in parts for c in part.get("configs", [])]
    if not rows:
        raise SimulationError(f"nothing to merge: no configs in {', '.join(map(str, paths))}")
    result = summarise(rows)
    result.update({"references": [r for part in parts for r in part.get("references", [])],
                   "merged_from": [str(p) for p in paths], "calibration": parts[0].get("calibration"),
                   "quick": all(part.get("quick") for part in parts), "preset": PRESET})
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / VALIDATION_JSON, result)
    write_table(out / "validation.md", result)
    return result


def alternating_text(s: dict) -> str:
    """'; alternating 1.043 [1.026-1.063, 400 pairs] (+3.4 pts)' for a speedups entry, or ''."""
    if "measured_alternating" not in s:
        return ""
    ci = s.get("measured_alternating_ci95")
    interval = f" [{ci[0]:.3f}-{ci[1]:.3f}, {s.get('alternating_pairs')} pairs]" if ci else ""
    return f"; alternating {s['measured_alternating']:.3f}{interval} ({s['diff_pts_alternating']:+.1f} pts)"


def write_table(path: Path, result: dict) -> Path:
    """A markdown table of the configs (README / dashboards)."""
    lines = ["| config | predicted ms | measured ms (min–max) | error % | one-trace error % | overlap % pred / meas | load |",
             "|---|---|---|---|---|---|---|"]
    for r in result["configs"]:
        lines.append(f"| {r['name']} | {r['predicted_step_us'] / 1e3:.1f} | {r['measured_step_us'] / 1e3:.1f} "
                     f"({r['measured_step_us_min'] / 1e3:.1f}–{r['measured_step_us_max'] / 1e3:.1f}) | "
                     f"{r['error_pct']:+.1f} | {r.get('error_pct_one_trace', float('nan')):+.1f} | {_fmt(r['predicted_overlap_pct'])} / {_fmt(r['measured_overlap_pct'])} | "
                     f"{r['load_1min']} |")
    lines.append("")
    lines.append(f"median |error| {result['median_abs_error_pct']:.1f}%, max |error| {result['max_abs_error_pct']:.1f}%")
    for s in result["speedups"]:
        lines.append(f"shortcut speedup {s['name']}: predicted {s['predicted']:.3f}, measured {s['measured']:.3f} "
                     f"({s['diff_pts']:+.1f} pts){alternating_text(s)}")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path
