"""View 2, Overlap: how much communication each schedule hides, from metrics.json.

Per label (layer × block, e.g. "L3/dispatch"), a horizontal bar splits the label's comm
time into hidden and exposed, with the label's overlap window (compute the dependency
graph lets run beside it) as a second bar beside it: window ≥ comm means the schedule
*can* hide the comm, hidden says it *did*. Runs are placed side by side as columns with a
shared label axis, so a sequential and a shortcut (ScMoE) run compare row by row; runs are
told apart by run.json `schedule`. Runs of different presets (models) get one such figure
each, since their labels and times do not compare row by row. A second figure gives
overlap % per rank for each run.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards.inputs import Run

MAX_COLUMNS = 4  # runs side by side; more runs are skipped with a note
HIDDEN_COLOUR = "#2ca02c"
EXPOSED_COLOUR = "#d62728"
WINDOW_COLOUR = "#9ecae1"


def label_rows(run: Run) -> list[dict]:
    """metrics.json `labels` entries that carry comm, in file order (floats, µs)."""
    labels = (run.metrics or {}).get("labels")
    if not isinstance(labels, list):
        return []
    out = []
    for entry in labels:
        if not isinstance(entry, dict) or not entry.get("label"):
            continue
        comm = float(entry.get("comm_us") or 0.0)
        if comm <= 0:
            continue
        hidden = min(float(entry.get("hidden_comm_us") or 0.0), comm)
        out.append({"label": str(entry["label"]), "comm_us": comm, "hidden_comm_us": hidden,
                    "window_us": float(entry.get("window_us") or 0.0)})
    return out


def label_figures(runs: list[Run]) -> tuple[list[go.Figure], list[str]]:
    """One side-by-side figure per model preset (runs of one preset share their label and µs
    axes; runs of different models are not comparable row by row). Returns (figures, notes)."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(str(run.run.get("preset") or "?"), []).append(run)
    figs: list[go.Figure] = []
    notes: list[str] = []
    for preset, members in groups.items():
        fig, group_notes = label_figure(members, title_suffix=f" ({preset})" if len(groups) > 1 else "")
        notes += group_notes
        if fig is not None:
            figs.append(fig)
    return figs, notes


def label_figure(runs: list[Run], title_suffix: str = "") -> tuple[go.Figure | None, list[str]]:
    """Hidden / exposed comm and window per label, one column per run. Returns (fig, notes)."""
    notes: list[str] = []
    usable = []
    for run in runs:
        rows = label_rows(run)
        if rows:
            usable.append((run, rows))
        else:
            notes.append(f"Overlap per label: {run.name} skipped (metrics.json has no labels with comm)")
    if len(usable) > MAX_COLUMNS:
        notes.append(f"Overlap per label: only the first {MAX_COLUMNS} runs shown side by side")
        usable = usable[:MAX_COLUMNS]
    if not usable:
        return None, notes
    order: list[str] = []
    for _, rows in usable:
        for row in rows:
            if row["label"] not in order:
                order.append(row["label"])
    titles = []
    for run, rows in usable:
        comm = sum(r["comm_us"] for r in rows)
        hidden = sum(r["hidden_comm_us"] for r in rows)
        titles.append(f"{run.schedule}: {run.path.name}<br>{hidden / comm * 100:.0f}% of labelled comm hidden")
    fig = make_subplots(rows=1, cols=len(usable), shared_yaxes=True, subplot_titles=titles,
                        horizontal_spacing=0.04)
    for col, (run, rows) in enumerate(usable, start=1):
        y = [r["label"] for r in rows]
        hidden = np.array([r["hidden_comm_us"] for r in rows])
        exposed = np.array([r["comm_us"] for r in rows]) - hidden
        window = np.array([r["window_us"] for r in rows])
        first = col == 1
        fig.add_trace(go.Bar(y=y, x=hidden, orientation="h", name="hidden comm", offsetgroup="comm",
                             marker_color=HIDDEN_COLOUR, legendgroup="hidden", showlegend=first,
                             hovertemplate="%{y}: hidden %{x:.1f} µs<extra></extra>"), row=1, col=col)
        fig.add_trace(go.Bar(y=y, x=exposed, base=hidden, orientation="h", name="exposed comm",
                             offsetgroup="comm", marker_color=EXPOSED_COLOUR, legendgroup="exposed",
                             showlegend=first, customdata=exposed,
                             hovertemplate="%{y}: exposed %{customdata:.1f} µs<extra></extra>"), row=1, col=col)
        fig.add_trace(go.Bar(y=y, x=window, orientation="h", name="overlap window", offsetgroup="window",
                             marker_color=WINDOW_COLOUR, legendgroup="window", showlegend=first,
                             hovertemplate="%{y}: window %{x:.1f} µs<extra></extra>"), row=1, col=col)
        fig.update_xaxes(title_text="µs per step", row=1, col=col)
    fig.update_yaxes(categoryorder="array", categoryarray=order, autorange="reversed")
    fig.update_xaxes(matches="x")  # one µs scale across runs
    fig.update_layout(barmode="group", height=min(260 + 22 * len(order), 3200), margin=dict(t=120),
                      title=f"Comm per label: hidden vs exposed, beside its overlap window{title_suffix}")
    return fig, notes


def rank_overlap_figure(runs: list[Run]) -> tuple[go.Figure | None, list[str]]:
    """Overlap % per rank, one bar group per run (ranks with no comm are left out)."""
    notes: list[str] = []
    fig = go.Figure()
    for run in runs:
        ranks = (run.metrics or {}).get("ranks")
        if not isinstance(ranks, dict) or not ranks:
            notes.append(f"Overlap per rank: {run.name} skipped (metrics.json has no ranks)")
            continue
        keys = sorted((k for k in ranks if isinstance(ranks[k], dict) and ranks[k].get("overlap_pct") is not None),
                      key=lambda k: int(k))
        if not keys:
            notes.append(f"Overlap per rank: {run.name} skipped (no rank has comm)")
            continue
        pct = [float(ranks[k]["overlap_pct"]) for k in keys]
        mean = (run.metrics or {}).get("overlap_pct_mean")
        mean = float(mean) if isinstance(mean, (int, float)) else float(np.mean(pct))
        fig.add_trace(go.Bar(x=[int(k) for k in keys], y=pct, name=f"{run.name}: mean {mean:.1f}%"))
    if not fig.data:
        return None, notes
    contiguous = all(list(t.x) == list(range(len(t.x))) for t in fig.data)
    n_ranks = max(len(t.x) for t in fig.data) if contiguous else 10**9
    fig.update_layout(barmode="group", title="Overlap % per rank (hidden comm / comm)",
                      xaxis=dict(title="rank", type="category" if n_ranks <= 32 else "linear"),
                      yaxis=dict(title="overlap %", range=[0, 105]), height=380,
                      legend=dict(orientation="h", y=-0.25, yanchor="top"))
    return fig, notes
