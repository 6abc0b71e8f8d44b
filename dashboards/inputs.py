"""What dashboards read: run dirs, `moesim train` logs, validation.json, sweep tables.

Dashboards read these files and nothing of the simulator (../shared/DESIGN.md). Every
reader raises DashboardError naming the file and what was expected; optional pieces of a
run dir (ops.parquet, metrics.json, routing stats) come back as None so a view that needs
them can be skipped with a note instead of failing.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from dashboards.errors import DashboardError
from traces import rundir
from traces.errors import TraceError

# Columns a sweep results table must have (`moesim sweep` writes them).
SWEEP_COLUMNS = (
    "preset",
    "cluster",
    "gpus",
    "batch_per_gpu",
    "schedule",
    "step_time_us",
    "tpot_ms",
    "tps_per_user",
    "tgs",
    "cost_usd_per_m_tokens",
)
# Columns a `moesim train` log has besides `step`; any subset may be present.
TRAIN_LOG_COLUMNS = (
    "loss",
    "ffn_experts_per_token",
    "ffn_experts_std",
    "zero_share",
    "load_max_over_mean",
    "device_load_max_over_mean",
    "activated_params_mean",
)


@dataclass
class Run:
    """One run dir as dashboards see it."""

    path: Path
    run: dict  # run.json ({} when the dir holds only traces / ops)
    metrics: dict | None  # metrics.json
    ops: pa.Table | None  # ops.parquet (the normalized trace)
    notes: list[str] = field(default_factory=list)  # what was missing or unreadable

    @property
    def name(self) -> str:
        """A short title: dir name, source and schedule."""
        bits = [self.path.name or str(self.path)]
        extra = [str(v) for v in (self.run.get("source"), self.run.get("schedule")) if v]
        if extra:
            bits.append(f"({', '.join(extra)})")
        return " ".join(bits)

    @property
    def schedule(self) -> str:
        return str(self.run.get("schedule") or "unknown")

    def step_time_us(self) -> float | None:
        """metrics.json step_time_us, else run.json step_time_us_median, else None."""
        for obj, key in ((self.metrics or {}, "step_time_us"), (self.run, "step_time_us_median")):
            value = obj.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                return float(value)
        return None


def _read_json(path: Path) -> dict:
    """rundir.read_json, with a binary / non-UTF-8 file reported as DashboardError too."""
    try:
        return rundir.read_json(path)
    except TraceError as err:
        raise DashboardError(str(err)) from None
    except UnicodeDecodeError:
        raise DashboardError(f"{path}: not a JSON text file (not UTF-8)") from None


def load_run(path: str | os.PathLike) -> Run:
    """Read a run dir. Raises DashboardError when `path` is not a run dir or a file in it
    is corrupt; missing optional files become notes."""
    path = Path(path)
    if not path.is_dir():
        raise DashboardError(f"{path}: not a directory (expected a run dir holding run.json / ops.parquet)")
    if not rundir.is_run_dir(path):
        raise DashboardError(f"{path}: not a run dir (no {rundir.RUN_JSON}, {rundir.OPS_PARQUET} or Kineto traces)")
    notes: list[str] = []
    run: dict = {}
    metrics: dict | None = None
    ops: pa.Table | None = None
    try:
        if (path / rundir.RUN_JSON).is_file():
            run = _read_json(path / rundir.RUN_JSON)
        else:
            notes.append(f"{path.name}: no {rundir.RUN_JSON}")
        if (path / rundir.METRICS_JSON).is_file():
            metrics = _read_json(path / rundir.METRICS_JSON)
        else:
            notes.append(f"{path.name}: no {rundir.METRICS_JSON}")
        if (path / rundir.OPS_PARQUET).is_file():
            from traces.schema import read_ops

            ops = read_ops(path / rundir.OPS_PARQUET)
        else:
            notes.append(f"{path.name}: no {rundir.OPS_PARQUET} (run `moesim parse` for a timeline)")
    except TraceError as err:
        raise DashboardError(str(err)) from None
    if metrics is None and ops is not None and ops.num_rows:
        metrics = _metrics_from_ops(ops, path)
    return Run(path=path, run=run, metrics=metrics, ops=ops, notes=notes)


def _metrics_from_ops(ops: pa.Table, path: Path) -> dict | None:
    """metrics.json figures computed with the one shared definition (traces/overlap.py)."""
    try:
        from traces.overlap import compute_metrics
    except ImportError:  # pragma: no cover - traces/overlap.py is part of the project
        return None
    try:
        return compute_metrics(ops)
    except TraceError as err:
        raise DashboardError(f"{path}: {err}") from None


def read_table(path: str | os.PathLike) -> pa.Table:
    """A results table from .parquet or .csv (numbers parsed as float where they parse)."""
    path = Path(path)
    if not path.is_file():
        raise DashboardError(f"{path}: no such results table")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path)
        except (pa.ArrowInvalid, OSError) as err:
            raise DashboardError(f"{path}: not a readable Parquet file ({err})") from None
    if path.suffix == ".csv":
        return _read_csv(path)
    raise DashboardError(f"{path}: expected a .parquet or .csv results table")


def _read_csv(path: Path) -> pa.Table:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise DashboardError(f"{path}: not a readable CSV file ({err})") from None
    if not rows:
        raise DashboardError(f"{path}: CSV has no rows")
    columns: dict[str, list] = {name: [row.get(name, "") for row in rows] for name in rows[0]}
    arrays = {}
    for name, values in columns.items():
        try:
            arrays[name] = pa.array([float(v) if v not in ("", None) else math.nan for v in values])
        except ValueError:
            arrays[name] = pa.array([v or "" for v in values])
    return pa.table(arrays)


def sweep_columns(table: pa.Table | dict | str | os.PathLike, source: str = "sweep results") -> dict[str, np.ndarray]:
    """The sweep table as numpy columns; checks the columns of SWEEP_COLUMNS are there.

    Accepts a pyarrow Table, a dict of column → sequence, or a .parquet/.csv path.
    Numeric columns come back as float64 arrays, the others as object arrays of str.
    """
    if isinstance(table, (str, os.PathLike)):
        source = str(table)
        table = read_table(table)
    if isinstance(table, dict):
        table = pa.table({k: pa.array(list(v)) for k, v in table.items()})
    if not isinstance(table, pa.Table):
        raise DashboardError(f"{source}: expected a pyarrow Table, a dict of columns or a results file")
    missing = [c for c in SWEEP_COLUMNS if c not in table.column_names]
    if missing:
        raise DashboardError(f"{source}: missing column(s) {', '.join(missing)}")
    if table.num_rows == 0:
        raise DashboardError(f"{source}: no rows")
    out: dict[str, np.ndarray] = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_null(col.type):  # a column with no values at all (e.g. TPS/user in prefill)
            out[name] = np.full(table.num_rows, np.nan)
        elif pa.types.is_integer(col.type) or pa.types.is_floating(col.type):
            out[name] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
        else:
            out[name] = np.array([str(v) if v is not None else "" for v in col.to_pylist()], dtype=object)
    for name in ("gpus", "batch_per_gpu", "step_time_us", "tps_per_user", "tgs", "cost_usd_per_m_tokens"):
        if out[name].dtype != np.float64:
            raise DashboardError(f"{source}: column {name} is not numeric")
    return out


def read_train_log(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A `moesim train` log (CSV with a `step` column) as float columns."""
    path = Path(path)
    table = read_table(path) if path.suffix == ".csv" else None
    if table is None:
        raise DashboardError(f"{path}: expected a .csv train log")
    if "step" not in table.column_names:
        raise DashboardError(f"{path}: train log has no `step` column")
    out = {}
    for name in table.column_names:
        col = table.column(name)
        if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
            out[name] = np.asarray(col.to_numpy(zero_copy_only=False), dtype=np.float64)
    if not any(name in out for name in TRAIN_LOG_COLUMNS):
        raise DashboardError(f"{path}: train log has none of the columns {', '.join(TRAIN_LOG_COLUMNS)}")
    return out


def read_validation(path: str | os.PathLike) -> dict:
    """validation.json: checks `configs` is a list of objects with predicted/measured step."""
    path = Path(path)
    obj = _read_json(path)
    configs = obj.get("configs")
    if not isinstance(configs, list) or not configs:
        raise DashboardError(f"{path}: expected a non-empty `configs` list")
    for i, config in enumerate(configs):
        for key in ("predicted_step_us", "measured_step_us"):
            if not isinstance(config, dict) or not isinstance(config.get(key), (int, float)):
                raise DashboardError(f"{path}: configs[{i}] has no numeric `{key}`")
    return obj
