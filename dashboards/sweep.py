"""View 4, Sweep: the throughput frontier and cost of a `moesim sweep` results table.

`sweep_view(table)` -> (figures, notes) and `sweep_figures(table)` -> figures take the
results table itself (pyarrow Table, dict of columns, or a
.parquet/.csv path) with at least the columns of inputs.SWEEP_COLUMNS, one row per grid
point; `ep_size` is used when present. Figures:
  * TPS per user (x) vs tokens/s per GPU (y), one colour per cluster and one marker per
    schedule; the Pareto frontier (points no other point beats on both) is drawn as a line.
  * $/M output tokens against TPS per user (the price of interactivity).
  * step time against GPU count, batch per GPU, EP size, schedule and cluster.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards.inputs import sweep_columns

SYMBOLS = ("circle", "square", "diamond", "triangle-up", "x", "star", "cross", "pentagon")
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def pareto_mask(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(N,) bool: points not dominated when maximising both x and y.

    A point is dominated when another has x' ≥ x and y' ≥ y with one strictly greater.
    NaNs are never on the frontier. O(N log N): sort by x descending (y descending to
    break ties) and keep points whose y beats every y seen so far.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ok = np.isfinite(x) & np.isfinite(y)
    mask = np.zeros(x.size, dtype=bool)
    idx = np.flatnonzero(ok)
    order = idx[np.lexsort((-y[idx], -x[idx]))]
    best_y = -np.inf
    prev = None
    for i in order:
        if y[i] > best_y:
            mask[i] = True
            best_y = y[i]
        elif prev is not None and x[i] == x[prev] and y[i] == y[prev] and mask[prev]:
            mask[i] = True  # an exact duplicate of a frontier point is not dominated
        prev = i
    return mask


def _hover(cols: dict[str, np.ndarray]) -> list[str]:
    names = [n for n in ("preset", "cluster", "gpus", "ep_size", "batch_per_gpu", "schedule") if n in cols]
    out = []
    for i in range(cols["gpus"].size):
        head = ", ".join(f"{n}={_fmt(cols[n][i])}" for n in names)
        out.append(
            f"{head}<br>step {cols['step_time_us'][i] / 1e3:.2f} ms, TPOT {cols['tpot_ms'][i]:.2f} ms"
            f"<br>TPS/user {cols['tps_per_user'][i]:.1f}, TGS {cols['tgs'][i]:.0f}"
            f"<br>${cols['cost_usd_per_m_tokens'][i]:.3f}/M tokens"
        )
    return out


def _fmt(value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def sweep_figures(table: pa.Table | dict | str | os.PathLike) -> list[go.Figure]:
    """The sweep view's figures for a results table (see module docstring)."""
    return sweep_view(table)[0]


def sweep_view(table: pa.Table | dict | str | os.PathLike) -> tuple[list[go.Figure], list[str]]:
    """(figures, notes): figures whose columns hold no numbers are left out with a note."""
    cols = sweep_columns(table)
    notes: list[str] = []
    figs: list[go.Figure] = []
    hover = np.array(_hover(cols), dtype=object)
    clusters = sorted(set(cols["cluster"]))
    schedules = sorted(set(cols["schedule"]))
    colour = {c: COLOURS[i % len(COLOURS)] for i, c in enumerate(clusters)}
    symbol = {s: SYMBOLS[i % len(SYMBOLS)] for i, s in enumerate(schedules)}
    x, y = cols["tps_per_user"], cols["tgs"]

    frontier = go.Figure()
    for c in clusters:
        for s in schedules:
            m = (cols["cluster"] == c) & (cols["schedule"] == s)
            if not m.any():
                continue
            frontier.add_trace(go.Scatter(
                x=x[m], y=y[m], mode="markers", name=f"{c} · {s}", text=hover[m],
                marker=dict(color=colour[c], symbol=symbol[s], size=8, opacity=0.8),
                hovertemplate="%{text}<extra></extra>",
            ))
    on = pareto_mask(x, y)
    order = np.flatnonzero(on)[np.argsort(x[on])]
    frontier.add_trace(go.Scatter(
        x=x[order], y=y[order], mode="lines+markers", name="Pareto frontier", text=hover[order],
        line=dict(color="black", width=2), marker=dict(size=12, color="rgba(0,0,0,0)", line=dict(width=2, color="black")),
        hovertemplate="frontier<br>%{text}<extra></extra>",
    ))
    frontier.update_layout(title=f"Throughput frontier: {x.size} configurations, {on.sum()} on the frontier",
                           xaxis_title="tokens/s per user (TPS/u)", yaxis_title="tokens/s per GPU (TGS)", height=520)
    if (np.isfinite(x) & np.isfinite(y)).any():
        figs.append(frontier)
    else:
        notes.append("Sweep: no row has both tps_per_user and tgs (no frontier to draw)")

    cost = go.Figure()
    for c in clusters:
        m = cols["cluster"] == c
        cost.add_trace(go.Scatter(x=x[m], y=cols["cost_usd_per_m_tokens"][m], mode="markers", name=c, text=hover[m],
                                  marker=dict(color=colour[c], size=8,
                                              symbol=[symbol[s] for s in cols["schedule"][m]]),
                                  hovertemplate="%{text}<extra></extra>"))
    cost.update_layout(title="Cost per million output tokens", xaxis_title="tokens/s per user (TPS/u)",
                       yaxis=dict(title="$ / M output tokens", type="log"), height=460)
    if (np.isfinite(x) & np.isfinite(cols["cost_usd_per_m_tokens"])).any():
        figs.append(cost)
    else:
        notes.append("Sweep: no row has both tps_per_user and cost_usd_per_m_tokens (no cost figure)")

    axes = [("gpus", "GPUs"), ("batch_per_gpu", "batch per GPU")]
    if "ep_size" in cols and cols["ep_size"].dtype == np.float64:
        axes.append(("ep_size", "EP size"))
    axes += [("schedule", "schedule"), ("cluster", "cluster")]
    n_cols = 3 if len(axes) > 4 else 2
    n_rows = (len(axes) + n_cols - 1) // n_cols
    step = make_subplots(rows=n_rows, cols=n_cols, subplot_titles=[f"step time vs {t}" for _, t in axes])
    step_ms = cols["step_time_us"] / 1e3
    for i, (key, title) in enumerate(axes):
        r, c_ = i // n_cols + 1, i % n_cols + 1
        for c in clusters:
            m = cols["cluster"] == c
            step.add_trace(go.Scatter(
                x=cols[key][m], y=step_ms[m], mode="markers", name=c, legendgroup=c, showlegend=i == 0,
                marker=dict(color=colour[c], size=7, opacity=0.75), text=hover[m],
                hovertemplate="%{text}<extra></extra>",
            ), row=r, col=c_)
        step.update_xaxes(title_text=title, type="log" if key in ("gpus", "batch_per_gpu", "ep_size") else None,
                          row=r, col=c_)
        step.update_yaxes(title_text="step time (ms)", type="log", row=r, col=c_)
    step.update_layout(title="Step time across the grid", height=340 * n_rows)
    if np.isfinite(step_ms).any():
        figs.append(step)
    else:
        notes.append("Sweep: no row has a step time")
    return figs, notes
