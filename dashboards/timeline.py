"""View 1, Timeline: per rank and lane, compute / comm / memory coloured, overlap shaded.

All runs given (e.g. a live run and its simulation) are stacked as rows of one figure that
shares its time axis; each run's time starts at its own first op, so steps line up.

How it stays small and fast for many ranks (a 128-rank × 28-layer run: 5.5 MB, of which
plotly.js is 4.7 MB; open time: tests/benchmarks/dashboard_open.py):
  * Representative ranks only. Runs with at most FULL_RANKS ranks show every rank. Larger
    runs show three ranks in full: the slowest, the median and the fastest (by the rank's
    median step time from run.json `step_times_us`, else by its span in the trace). Every
    rank appears in the per-rank bar chart beside it (compute, exposed comm and idle per
    step from metrics.json, hidden comm as a marker), with the shown ranks marked.
  * One trace per kind, WebGL when large. Ops are drawn as thick line segments of one
    trace per (run, kind) (x = start, end, gap), not one shape or bar per op. Up to
    SVG_MAX_SEGMENTS segments per run that trace is SVG `scatter` (one path: cheap, and it
    avoids a WebGL context, which costs seconds in software-GL browsers); above it,
    `scattergl`, so tens of thousands of ops are drawn on the GPU in one call. Hover text
    sits on invisible midpoint markers.
  * Merging below pixel size. On each lane, consecutive ops of the same kind separated by
    less than span / MERGE_PIXELS are merged into one segment (hover says how many ops
    and their busy time); the threshold doubles until the run has at most MAX_SEGMENTS.
Overlap (hidden comm = (comm ∪) ∩ (compute ∪) on the rank, the metrics.json definition) is
drawn as its own shaded row under each shown rank's lanes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards.inputs import Run

FULL_RANKS = 8  # runs with at most this many ranks show all of them
MERGE_PIXELS = 4000  # ops closer than span / MERGE_PIXELS on a lane are merged
MAX_SEGMENTS = 40_000  # per run, after merging
SVG_MAX_SEGMENTS = 5_000  # per run; above this the timeline uses WebGL (scattergl)
KIND_COLOURS = {
    "compute": "#1f77b4",
    "comm": "#ff7f0e",
    "memory": "#2ca02c",
    "sync": "#7f7f7f",
    "host": "#9467bd",
}
OVERLAP_COLOUR = "rgba(214, 39, 40, 0.55)"
OVERLAP_ROW = "overlap (hidden comm)"
LINE_WIDTH_PX = 9


@dataclass
class Segments:
    """Drawn segments of one run: (N,) arrays; `row` indexes the run's row labels."""

    row: np.ndarray
    kind: np.ndarray  # object (str)
    start_us: np.ndarray
    end_us: np.ndarray
    text: list[str]


def representative_ranks(run: Run) -> list[int]:
    """The ranks the timeline shows in full: all when few, else slowest, median, fastest."""
    if run.ops is None:
        return []
    ranks = np.unique(run.ops.column("rank").to_numpy())
    if len(ranks) <= FULL_RANKS:
        return [int(r) for r in ranks]
    per_rank_us = _rank_step_us(run, ranks)
    order = np.argsort(per_rank_us, kind="stable")
    picks = [order[-1], order[len(order) // 2], order[0]]  # slowest, median, fastest
    out: list[int] = []
    for i in picks:
        if int(ranks[i]) not in out:
            out.append(int(ranks[i]))
    return out


def _rank_step_us(run: Run, ranks: np.ndarray) -> np.ndarray:
    """Per-rank median step time from run.json, else the rank's span in the trace."""
    step_times = run.run.get("step_times_us")
    if isinstance(step_times, dict):
        values = [step_times.get(str(int(r)), step_times.get(int(r))) for r in ranks]
        if all(isinstance(v, list) and v for v in values):
            return np.array([float(np.median(v)) for v in values])
    rank = run.ops.column("rank").to_numpy()
    start = run.ops.column("start_us").to_numpy()
    end = start + run.ops.column("dur_us").to_numpy()
    return np.array([end[rank == r].max() - start[rank == r].min() for r in ranks])


def hidden_intervals(
    comm: tuple[np.ndarray, np.ndarray], compute: tuple[np.ndarray, np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """(comm ∪) ∩ (compute ∪) as sorted disjoint (starts, ends), µs."""
    from traces.overlap import union_intervals

    a_s, a_e = union_intervals(*comm)
    b_s, b_e = union_intervals(*compute)
    if a_s.size == 0 or b_s.size == 0:
        return a_s[:0], a_e[:0]
    cuts = np.unique(np.concatenate([a_s, a_e, b_s, b_e]))
    lo, hi = cuts[:-1], cuts[1:]
    mid = (lo + hi) / 2
    ia = np.searchsorted(a_s, mid, side="right") - 1
    ib = np.searchsorted(b_s, mid, side="right") - 1
    in_a = (ia >= 0) & (mid < a_e[np.maximum(ia, 0)])
    in_b = (ib >= 0) & (mid < b_e[np.maximum(ib, 0)])
    both = in_a & in_b
    return union_intervals(lo[both], hi[both])


def _merge(row: np.ndarray, kind: np.ndarray, s: np.ndarray, e: np.ndarray, gap_us: float) -> np.ndarray:
    """Group ids: consecutive ops of one (row, kind) closer than gap_us share a group.

    Inputs must be sorted by (row, kind, start). Returns (N,) int group ids, 0-based.
    """
    if s.size == 0:
        return np.zeros(0, dtype=np.int64)
    reach = e.copy()
    new = np.ones(s.size, dtype=bool)
    same = (row[1:] == row[:-1]) & (kind[1:] == kind[:-1])
    # running max of end within a (row, kind) run, so nested ops never open a new group
    key_start = np.flatnonzero(np.concatenate([[True], ~same]))
    for a, b in zip(key_start, np.append(key_start[1:], s.size)):
        reach[a:b] = np.maximum.accumulate(e[a:b])
    new[1:] = ~same | (s[1:] > reach[:-1] + gap_us)
    return np.cumsum(new) - 1


def _natural_key(lane: str) -> list:
    """Sort "cuda:0/stream:7" before "cuda:0/stream:13": digit runs compare as numbers."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", lane)]


def run_segments(run: Run, ranks: list[int]) -> tuple[list[str], Segments, float]:
    """Rows ("r{rank} {lane}", then the rank's overlap row) and merged segments of `ranks`.

    Times are relative to the run's first op. Returns (row labels, segments, merge gap µs).
    """
    ops = run.ops
    t0 = float(ops.column("start_us").to_numpy().min()) if ops.num_rows else 0.0
    keep = np.isin(ops.column("rank").to_numpy(), ranks)
    shown = ops.filter(pa.array(keep))  # convert only the shown ranks' strings to Python

    def strings(column: str) -> np.ndarray:
        return np.array(shown.column(column).to_pylist(), dtype=object)

    rank = shown.column("rank").to_numpy()
    lane, kind, label, name = strings("lane"), strings("kind"), strings("label"), strings("name")
    start = shown.column("start_us").to_numpy() - t0
    dur = shown.column("dur_us").to_numpy()
    end = start + dur

    rows: list[str] = []
    row_of: dict[tuple[int, str], int] = {}
    for r in ranks:
        for ln in sorted(set(lane[rank == r]), key=_natural_key):
            row_of[(r, ln)] = len(rows)
            rows.append(f"r{r} {ln}")
        row_of[(r, OVERLAP_ROW)] = len(rows)
        rows.append(f"r{r} {OVERLAP_ROW}")
    row = np.array([row_of[(int(r), ln)] for r, ln in zip(rank, lane)], dtype=np.int64)

    # hidden-comm rows: intervals per rank, drawn with kind "overlap"
    o_row, o_s, o_e = [], [], []
    for r in ranks:
        mine = rank == r
        comm = mine & (kind == "comm")
        comp = mine & (kind == "compute")
        hs, he = hidden_intervals((start[comm], end[comm]), (start[comp], end[comp]))
        o_row.append(np.full(hs.size, row_of[(r, OVERLAP_ROW)]))
        o_s.append(hs)
        o_e.append(he)
    o_row_a = np.concatenate(o_row) if o_row else np.zeros(0, dtype=np.int64)
    all_row = np.concatenate([row, o_row_a])
    all_kind = np.concatenate([kind, np.full(o_row_a.size, "overlap", dtype=object)])
    all_s = np.concatenate([start] + o_s)
    all_e = np.concatenate([end] + o_e)
    all_text = np.concatenate([np.where(label != "", label, name), np.full(o_row_a.size, "hidden comm", dtype=object)])

    span_us = float(all_e.max() - all_s.min()) if all_s.size else 0.0
    order = np.lexsort((all_s, all_kind.astype(str), all_row))
    all_row, all_kind, all_s, all_e, all_text = (x[order] for x in (all_row, all_kind, all_s, all_e, all_text))
    gap_us = span_us / MERGE_PIXELS
    group = _merge(all_row, all_kind, all_s, all_e, gap_us)
    while group.size and group[-1] + 1 > MAX_SEGMENTS:
        gap_us *= 2
        group = _merge(all_row, all_kind, all_s, all_e, gap_us)
    if group.size == 0:
        return rows, Segments(all_row, all_kind, all_s, all_e, []), gap_us
    first = np.flatnonzero(np.concatenate([[True], group[1:] != group[:-1]]))
    g_s = np.minimum.reduceat(all_s, first)
    g_e = np.maximum.reduceat(all_e, first)
    g_busy = np.add.reduceat(all_e - all_s, first)
    g_n = np.diff(np.append(first, group.size))
    text = []
    for i, f in enumerate(first):
        if g_n[i] == 1:
            text.append(f"{all_text[f]}<br>{all_kind[f]} · {g_e[i] - g_s[i]:.1f} µs")
        else:
            last = all_text[first[i] + g_n[i] - 1]
            text.append(f"{g_n[i]} {all_kind[f]} ops merged: {all_text[f]} … {last}<br>busy {g_busy[i]:.1f} µs")
    return rows, Segments(all_row[first], all_kind[first], g_s, g_e, text), gap_us


def timeline_figure(runs: list[Run]) -> tuple[go.Figure | None, list[str]]:
    """One figure, one row per run with ops, shared time axis. Returns (figure, notes)."""
    notes: list[str] = []
    usable = [r for r in runs if r.ops is not None and r.ops.num_rows]
    for r in runs:
        if r not in usable:
            notes.append(f"Timeline: {r.name} skipped (no ops.parquet)")
    if not usable:
        return None, notes
    per_run = []
    for r in usable:
        ranks = representative_ranks(r)
        rows, segs, gap_us = run_segments(r, ranks)
        n_ranks = len(np.unique(r.ops.column("rank").to_numpy()))
        how = "all ranks" if len(ranks) == n_ranks else f"ranks {ranks} of {n_ranks} (slowest, median, fastest)"
        title = f"{r.name}: {how}; ops closer than {gap_us:.2g} µs merged"
        per_run.append((r, rows, segs, title))
    heights = [max(len(rows), 1) for _, rows, _, _ in per_run]
    fig = make_subplots(
        rows=len(per_run),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08 / max(len(per_run), 1),
        row_heights=[h / sum(heights) for h in heights],
        subplot_titles=[t for *_, t in per_run],
    )
    shown_legend: set[str] = set()
    for i, (r, rows, segs, _) in enumerate(per_run, start=1):
        scatter = go.Scattergl if segs.row.size > SVG_MAX_SEGMENTS else go.Scatter
        for kind in [*KIND_COLOURS, "overlap"]:
            m = segs.kind == kind
            if not m.any():
                continue
            colour = OVERLAP_COLOUR if kind == "overlap" else KIND_COLOURS[kind]
            s, e, y = segs.start_us[m], segs.end_us[m], segs.row[m].astype(np.float64)
            n = s.size
            xs = np.empty(3 * n)
            ys = np.empty(3 * n)
            xs[0::3], xs[1::3], xs[2::3] = s, e, np.nan
            ys[0::3], ys[1::3], ys[2::3] = y, y, np.nan
            legend = kind not in shown_legend
            shown_legend.add(kind)
            fig.add_trace(
                scatter(
                    x=xs, y=ys, mode="lines", line=dict(color=colour, width=LINE_WIDTH_PX),
                    name=kind, legendgroup=kind, showlegend=legend, hoverinfo="skip", connectgaps=False,
                ),
                row=i, col=1,
            )
            fig.add_trace(
                scatter(
                    x=(s + e) / 2, y=y, mode="markers", marker=dict(color=colour, size=LINE_WIDTH_PX, opacity=0),
                    text=[segs.text[j] for j in np.flatnonzero(m)], hovertemplate="%{text}<br>%{x:.1f} µs<extra></extra>",
                    name=kind, legendgroup=kind, showlegend=False,
                ),
                row=i, col=1,
            )
        fig.update_yaxes(
            tickmode="array", tickvals=list(range(len(rows))), ticktext=rows,
            range=[len(rows) - 0.5, -0.5], row=i, col=1,
        )
    fig.update_xaxes(title_text="time since the run's first op (µs)", row=len(per_run), col=1)
    fig.update_layout(
        height=min(200 + 26 * sum(heights), 2400), hovermode="closest", margin=dict(l=220),
    )
    return fig, notes


def rank_bars_figure(run: Run, shown_ranks: list[int]) -> go.Figure | None:
    """Every rank's compute / exposed comm / idle per step (stacked) and hidden comm, µs."""
    ranks_obj = (run.metrics or {}).get("ranks")
    if not isinstance(ranks_obj, dict) or not ranks_obj:
        return None
    ranks = sorted(ranks_obj, key=lambda k: int(k))
    x = np.array([int(k) for k in ranks])

    def col(key: str) -> np.ndarray:
        return np.array([float(ranks_obj[k].get(key) or 0.0) for k in ranks])

    fig = go.Figure()
    for key, colour in (("compute_us", KIND_COLOURS["compute"]), ("exposed_comm_us", KIND_COLOURS["comm"]), ("idle_us", "#d3d3d3")):
        fig.add_trace(go.Bar(x=x, y=col(key), name=key.removesuffix("_us").replace("_", " "), marker_color=colour))
    fig.add_trace(
        go.Scatter(x=x, y=col("hidden_comm_us"), mode="markers", name="hidden comm",
                   marker=dict(color=OVERLAP_COLOUR, symbol="diamond", size=7))
    )
    shown = [r for r in shown_ranks if r in set(x.tolist())]
    if shown:
        top = (col("compute_us") + col("exposed_comm_us") + col("idle_us")).max()
        fig.add_trace(
            go.Scatter(x=shown, y=[top * 1.05] * len(shown), mode="markers", name="in timeline",
                       marker=dict(symbol="triangle-down", size=10, color="black"))
        )
    world = run.run.get("world_size")
    which = (f"all {len(ranks)} ranks" if not isinstance(world, int) or world == len(ranks)
             else f"{len(ranks)} of {world} ranks, as sampled in metrics.json")
    contiguous = x.tolist() == list(range(len(x)))
    fig.update_layout(
        barmode="stack", title=f"{run.name}: per-rank time per step ({which})",
        xaxis=dict(title="rank", type="category" if contiguous and len(ranks) <= 32 else "linear"),
        yaxis_title="µs per step", height=380,
    )
    return fig


def small_runs_bars_figure(runs: list[Run]) -> go.Figure | None:
    """Runs with at most FULL_RANKS ranks (all shown in the timeline) in one figure: per
    rank compute / exposed comm / idle per step (stacked) and hidden comm, µs; x = run · rank."""
    x: list[str] = []
    values: dict[str, list[float]] = {k: [] for k in ("compute_us", "exposed_comm_us", "idle_us", "hidden_comm_us")}
    for run in runs:
        ranks_obj = (run.metrics or {}).get("ranks")
        if not isinstance(ranks_obj, dict) or not ranks_obj or len(ranks_obj) > FULL_RANKS:
            continue
        for k in sorted(ranks_obj, key=int):
            x.append(f"{run.path.name} · r{k}")
            for key in values:
                values[key].append(float(ranks_obj[k].get(key) or 0.0))
    if not x:
        return None
    fig = go.Figure()
    for key, colour in (("compute_us", KIND_COLOURS["compute"]), ("exposed_comm_us", KIND_COLOURS["comm"]),
                        ("idle_us", "#d3d3d3")):
        fig.add_trace(go.Bar(x=x, y=values[key], name=key.removesuffix("_us").replace("_", " "), marker_color=colour))
    fig.add_trace(go.Scatter(x=x, y=values["hidden_comm_us"], mode="markers", name="hidden comm",
                             marker=dict(color=OVERLAP_COLOUR, symbol="diamond", size=9)))
    fig.update_layout(barmode="stack", title="Per-rank time per step (runs shown in full above)",
                      xaxis=dict(title="run · rank", type="category"), yaxis_title="µs per step", height=400)
    return fig
