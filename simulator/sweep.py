"""Sweeps: run the full-scale what-if (simulator/whatif.py) over a grid of deployments.

    points = grid(presets, clusters, gpus, batches, schedules, ...)   # list[SweepPoint]
    table = run_sweep(points, out_dir, workers=2)                     # pa.Table of results

Each point is one `run_whatif` (no run dir written, only its metrics). Points run in worker
processes; each finished point is appended at once to `OUT/points.jsonl`, the journal that
makes a sweep resumable: a second run with the same (or a grown) grid skips every point
already in it. At the end the journal becomes `OUT/results.parquet` and `OUT/results.csv`
(written atomically). A point whose plan cannot run (e.g. the model does not fit in GPU
memory, TBO with one sequence per GPU) is kept as a row with `status = "infeasible"` and the
reason in `error`, so a frontier shows where the grid stops being deployable.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from simulator.errors import SimulationError

JOURNAL = "points.jsonl"
RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"

# Metrics copied from run_whatif's dict into the results table (None where a mode lacks one).
METRIC_COLUMNS = (
    "step_time_us",
    "tpot_ms",
    "tps_per_user",
    "tgs",
    "cost_usd_per_m_tokens",
    "tokens_per_s",
    "mfu_pct",
    "overlap_pct_mean",
    "comm_us_mean",
    "exposed_comm_us_mean",
    "activated_params_mean",
    "zero_expert_share",
    "expert_load_max_over_mean",
)


@dataclass(frozen=True)
class SweepPoint:
    """One deployment of the grid; the fields are the key that resume matches on."""

    preset: str
    cluster: str
    gpus: int
    batch_per_gpu: int
    schedule: str
    mode: str = "decode"
    context: int = 5000
    mtp_accept: float = 0.0  # 0 = no MTP
    price_per_gpu_hour: float = 2.0
    seed: int = 0

    @property
    def key(self) -> str:
        return _row_key(asdict(self))


def grid(
    presets: Iterable[str],
    clusters: Iterable[str],
    gpus: Iterable[int],
    batches: Iterable[int],
    schedules: Iterable[str],
    *,
    mode: str = "decode",
    context: int = 5000,
    mtp_accept: float = 0.0,
    price_per_gpu_hour: float = 2.0,
    seed: int = 0,
) -> list[SweepPoint]:
    """The cartesian product, checked up front: unknown presets, clusters or schedules and
    non-positive sizes raise SimulationError before anything runs or is written."""
    from simulator.baselines import get_arch
    from simulator.cluster import get_cluster

    presets, clusters, gpus, batches, schedules = map(list, (presets, clusters, gpus, batches, schedules))
    for name, values in [("preset", presets), ("cluster", clusters), ("gpus", gpus),
                         ("batch-per-gpu", batches), ("schedule", schedules)]:
        if not values:
            raise SimulationError(f"sweep grid: {name} is empty")
    for preset in presets:
        get_arch(preset)  # raises naming the valid models
    for cluster in clusters:
        get_cluster(cluster)  # raises naming the valid clusters
    for value in gpus + batches:
        if value <= 0:
            raise SimulationError(f"sweep grid: sizes must be positive, got {value}")
    for schedule in schedules:
        if schedule not in ("sequential", "tbo", "sbo"):
            raise SimulationError(f"sweep grid: schedule {schedule!r}; expected sequential, tbo or sbo")
    if mode not in ("prefill", "decode", "train"):
        raise SimulationError(f"sweep grid: mode {mode!r}; expected prefill, decode or train")
    return [
        SweepPoint(p, c, g, b, s, mode, context, mtp_accept, price_per_gpu_hour, seed)
        for p, c, g, b, s in itertools.product(presets, clusters, gpus, batches, schedules)
    ]


def run_point(point: SweepPoint) -> dict:
    """Simulate one point; returns its results row (never raises for an infeasible plan)."""
    from simulator.whatif import run_whatif
    from simulator.workload import ParallelPlan

    row: dict = asdict(point)
    t0 = time.perf_counter()
    plan = ParallelPlan(
        gpus=point.gpus,
        mode=point.mode,  # type: ignore[arg-type]
        batch_per_gpu=point.batch_per_gpu,
        context=point.context,
        schedule=point.schedule,  # type: ignore[arg-type]
        mtp=point.mtp_accept > 0,
        mtp_accept=point.mtp_accept,
    )
    try:
        metrics = run_whatif(point.preset, plan, point.cluster, seed=point.seed,
                             price_per_gpu_hour=point.price_per_gpu_hour, write_traces=False)
    except SimulationError as err:
        row.update(status="infeasible", error=str(err))
        metrics = {}
    else:
        row.update(status="ok", error="")
    for column in METRIC_COLUMNS:
        value = metrics.get(column)
        row[column] = None if value is None else float(value)
    row["sim_wall_s"] = time.perf_counter() - t0
    return row


def read_journal(out_dir: str | os.PathLike) -> list[dict]:
    """Rows already computed in `out_dir` (a torn last line from a killed run is ignored)."""
    path = Path(out_dir) / JOURNAL
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def _row_key(row: dict) -> str:
    """The resume key of a point or results row: its grid fields, canonically serialised."""
    return json.dumps({name: row[name] for name in SweepPoint.__dataclass_fields__}, sort_keys=True)


def run_sweep(
    points: list[SweepPoint],
    out_dir: str | os.PathLike,
    *,
    workers: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> pa.Table:
    """Run the points not yet in the journal, `workers` at a time; write the results files.

    progress(done, total) is called after each point. Returns the results table of every
    point in the journal (this grid and earlier ones), in grid order then journal order.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    done = {_row_key(r): r for r in read_journal(out_dir)}
    todo = [p for p in points if p.key not in done]
    total = len(points)
    finished = total - len(todo)
    if progress:
        progress(finished, total)
    with open(out_dir / JOURNAL, "a") as journal:
        def record(row: dict) -> None:
            nonlocal finished
            journal.write(json.dumps(row, sort_keys=True) + "\n")
            journal.flush()
            done[_row_key(row)] = row
            finished += 1
            if progress:
                progress(finished, total)

        if workers <= 1 or len(todo) <= 1:
            for point in todo:
                record(run_point(point))
        else:
            with ProcessPoolExecutor(max_workers=workers) as pool:
                futures = [pool.submit(run_point, p) for p in todo]
                for future in as_completed(futures):
                    record(future.result())
    grid_keys = [p.key for p in points]
    in_grid = set(grid_keys)
    rows = [done[k] for k in grid_keys] + [r for k, r in done.items() if k not in in_grid]
    table = results_table(rows)
    write_results(table, out_dir)
    return table


def results_table(rows: list[dict]) -> pa.Table:
    columns = [*SweepPoint.__dataclass_fields__, "status", "error", *METRIC_COLUMNS, "sim_wall_s"]
    return pa.Table.from_pylist([{c: r.get(c) for c in columns} for r in rows])


def write_results(table: pa.Table, out_dir: Path) -> None:
    """results.parquet and results.csv, each via a temp file + rename."""
    for name in (RESULTS_PARQUET, RESULTS_CSV):
        final = out_dir / name
        tmp = out_dir / f".{name}.tmp{os.getpid()}"
        try:
            if name.endswith(".parquet"):
                pq.write_table(table, tmp)
            else:
                with open(tmp, "w", newline="") as f:
                    writer = csv.writer(f)
                    writer.writerow(table.column_names)
                    for row in table.to_pylist():
                        writer.writerow(["" if row[c] is None else row[c] for c in table.column_names])
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)


def tqdm_progress(desc: str = "sweep") -> Callable[[int, int], None]:
    """A progress callback drawing a tqdm bar on stderr."""
    from tqdm import tqdm

    bar: dict = {}

    def update(done: int, total: int) -> None:
        if "bar" not in bar:
            bar["bar"] = tqdm(total=total, initial=done, desc=desc, unit="pt", file=sys.stderr)
        else:
            bar["bar"].update(done - bar["bar"].n)
        if done >= total:
            bar["bar"].close()

    return update
