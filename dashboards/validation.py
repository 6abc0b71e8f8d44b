"""View 5, Validation: simulated vs measured step time (and overlap %) per config.

Reads validation.json (`configs` → [{name, predicted_step_us, measured_step_us,
error_pct, predicted_overlap_pct, measured_overlap_pct}], median/max_abs_error_pct).
Measured is on x, predicted on y, with the y = x line and shaded ±BANDS_PCT bands: a point
inside the inner band is within that many percent of the live run.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

BANDS_PCT = (10.0, 25.0)
BAND_COLOURS = ("rgba(44,160,44,0.18)", "rgba(255,127,14,0.12)")
MAX_TEXT_LABELS = 8  # more configs: names on hover only


def _band(fig: go.Figure, lo: float, hi: float, pct: float, colour: str, col: int, absolute: bool) -> None:
    """Shade y within ±pct of x (relative) or ±pct points (absolute) over [lo, hi]."""
    xs = np.linspace(lo, hi, 50)
    up = xs + pct if absolute else xs * (1 + pct / 100)
    down = xs - pct if absolute else xs * (1 - pct / 100)
    unit = " pts" if absolute else "%"
    fig.add_trace(go.Scatter(x=np.concatenate([xs, xs[::-1]]), y=np.concatenate([up, down[::-1]]), fill="toself",
                             fillcolor=colour, line=dict(width=0), hoverinfo="skip",
                             name=f"±{pct:g}{unit}", showlegend=col == 1), row=1, col=col)


def validation_figure(validation: dict) -> go.Figure:
    """Predicted vs measured step time; a second panel for overlap % when present."""
    configs = validation["configs"]
    names = [str(c.get("name", i)) for i, c in enumerate(configs)]
    measured = np.array([float(c["measured_step_us"]) for c in configs]) / 1e3
    predicted = np.array([float(c["predicted_step_us"]) for c in configs]) / 1e3
    error = 100 * (predicted - measured) / measured
    ov = [(n, c.get("measured_overlap_pct"), c.get("predicted_overlap_pct")) for n, c in zip(names, configs)]
    ov = [(n, float(m), float(p)) for n, m, p in ov if isinstance(m, (int, float)) and isinstance(p, (int, float))]
    median = validation.get("median_abs_error_pct")
    worst = validation.get("max_abs_error_pct")
    median = float(median) if isinstance(median, (int, float)) else float(np.median(np.abs(error)))
    worst = float(worst) if isinstance(worst, (int, float)) else float(np.max(np.abs(error)))
    titles = [f"step time: median |error| {median:.1f}%, max {worst:.1f}%"]
    if ov:
        titles.append("overlap % (hidden comm / comm)")
    fig = make_subplots(rows=1, cols=len(titles), subplot_titles=titles)

    one = [(n, m, c.get("predicted_step_us_one_trace")) for n, m, c in zip(names, measured, configs)]
    one = [(n, m, float(p) / 1e3) for n, m, p in one if isinstance(p, (int, float))]
    lo, hi = 0.0, float(max([measured.max(), predicted.max()] + [p for *_, p in one]) * 1.1)
    for pct, colour in reversed(list(zip(BANDS_PCT, BAND_COLOURS))):
        _band(fig, lo, hi, pct, colour, 1, absolute=False)
    fig.add_trace(go.Scatter(x=[lo, hi], y=[lo, hi], mode="lines", line=dict(color="black", dash="dash"),
                             name="y = x", hoverinfo="skip"), row=1, col=1)
    fig.add_trace(go.Scatter(
        x=measured, y=predicted, mode="markers+text" if len(names) <= MAX_TEXT_LABELS else "markers", text=names, textposition="top center", name="configs",
        marker=dict(size=10, color="#1f77b4"), customdata=error,
        hovertemplate="%{text}<br>measured %{x:.2f} ms<br>predicted %{y:.2f} ms<br>error %{customdata:+.1f}%<extra></extra>",
    ), row=1, col=1)
    if one:  # simulator/validate.py also predicts from one trace without the per-op curves through the references
        fig.add_trace(go.Scatter(
            x=[m for _, m, _ in one], y=[p for *_, p in one], text=[n for n, *_ in one], mode="markers",
            name="one-trace prediction", marker=dict(size=8, color="#7f7f7f", symbol="x"),
            hovertemplate="%{text}<br>measured %{x:.2f} ms<br>one-trace %{y:.2f} ms<extra></extra>",
        ), row=1, col=1)
    fig.update_xaxes(title_text="measured step time (ms)", range=[lo, hi], row=1, col=1)
    fig.update_yaxes(title_text="simulated step time (ms)", range=[lo, hi], row=1, col=1)
    if ov:
        for pct, colour in reversed(list(zip(BANDS_PCT, BAND_COLOURS))):
            _band(fig, 0, 100, pct, colour, 2, absolute=True)
        fig.add_trace(go.Scatter(x=[0, 100], y=[0, 100], mode="lines", line=dict(color="black", dash="dash"),
                                 showlegend=False, hoverinfo="skip"), row=1, col=2)
        fig.add_trace(go.Scatter(
            x=[m for _, m, _ in ov], y=[p for *_, p in ov], text=[n for n, *_ in ov],
            mode="markers+text" if len(ov) <= MAX_TEXT_LABELS else "markers",
            textposition="top center", marker=dict(size=10, color="#ff7f0e"), name="overlap %",
            hovertemplate="%{text}<br>measured %{x:.1f}%<br>predicted %{y:.1f}%<extra></extra>",
        ), row=1, col=2)
        fig.update_xaxes(title_text="measured overlap %", range=[0, 100], row=1, col=2)
        fig.update_yaxes(title_text="simulated overlap %", range=[0, 100], row=1, col=2)
    fig.update_layout(title="Validation: simulator vs live runs", height=480)
    return fig
