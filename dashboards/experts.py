"""View 3, Zero experts: what the router's zero-computation experts do to the work.

Reads routing statistics from metrics.json, or from run.json `routing` (per-layer lists),
and the PID controller curves from a `moesim train` log (train_log.csv). Keys looked for
(the first one present wins; any may be absent, and a figure whose data is absent is
skipped with a note):
    ffn_experts_per_token_hist   [counts of tokens using 0, 1, ..., K FFN experts]
    activated_params_hist        {"bin_edges": [...], "counts": [...]} (optional)
    activated_params_mean/min/max
    zero_share / zero_expert_share_per_layer   [share of slots routed to zero experts, per layer]
    expert_load                  [[tokens per expert] per layer]  (layer × expert)
Without `activated_params_hist`, the activated-parameter histogram is derived from the
experts histogram: activated params per token are affine in the number of FFN experts
it uses (a + b·k, the dense part is fixed), with a, b set by activated_params_min/max at
the smallest / largest k seen. It is drawn only when the derived mean matches
activated_params_mean within 2 % of (max − min), i.e. when the histogram counts what
min/max/mean count (per token over all layers, not per token and layer).
Per-rank load: FFN experts are placed contiguously on the EP ranks (expert e on rank
e // (E / EP)); EP is run.json `ep_size` / `plan.ep_size`, else `world_size`. Zero experts
are identities that live on no rank: when `expert_load` has n_routed_experts +
zero_expert_num columns the last zero_expert_num are drawn but not assigned to ranks.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards.inputs import Run

DERIVED_MEAN_TOLERANCE = 0.02


def _find(run: Run, *keys: str) -> object | None:
    """The first of `keys` found in metrics.json, then in run.json `routing`, then run.json."""
    routing = run.run.get("routing") if isinstance(run.run.get("routing"), dict) else {}
    for source in (run.metrics or {}, routing, run.run):
        for key in keys:
            if key in source and source[key] is not None:
                return source[key]
    return None


def _number(run: Run, key: str) -> float | None:
    value = _find(run, key)
    return float(value) if isinstance(value, (int, float)) else None


def experts_hist(run: Run) -> np.ndarray | None:
    """(K+1,) token counts using 0..K FFN experts, or None."""
    hist = _find(run, "ffn_experts_per_token_hist")
    if not isinstance(hist, list) or not hist:
        return None
    counts = np.asarray(hist, dtype=np.float64)
    return counts if counts.ndim == 1 and counts.sum() > 0 and (counts >= 0).all() else None


def activated_hist(run: Run) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(x params, token counts, how) for the activated-parameter histogram, or None."""
    given = _find(run, "activated_params_hist")
    if isinstance(given, dict) and given.get("counts") and given.get("bin_edges"):
        edges = np.asarray(given["bin_edges"], dtype=np.float64)
        counts = np.asarray(given["counts"], dtype=np.float64)
        if edges.size == counts.size + 1:
            return (edges[:-1] + edges[1:]) / 2, counts, "from activated_params_hist"
    counts = experts_hist(run)
    lo, hi, mean = (_number(run, k) for k in ("activated_params_min", "activated_params_max", "activated_params_mean"))
    if counts is None or lo is None or hi is None or mean is None:
        return None
    used = np.flatnonzero(counts > 0)
    k_lo, k_hi = int(used[0]), int(used[-1])
    if k_hi == k_lo:
        params = np.full(counts.size, lo)
    else:
        per_expert = (hi - lo) / (k_hi - k_lo)
        params = lo + (np.arange(counts.size) - k_lo) * per_expert
    derived_mean = float(np.sum(params * counts) / counts.sum())
    if abs(derived_mean - mean) > DERIVED_MEAN_TOLERANCE * max(hi - lo, 1e-9 * abs(mean)):
        return None
    return params[used[0]: used[-1] + 1], counts[used[0]: used[-1] + 1], "derived from the experts histogram"


def zero_share_per_layer(run: Run) -> np.ndarray | None:
    values = _find(run, "zero_share", "zero_expert_share_per_layer", "zero_share_per_layer")
    if isinstance(values, list) and values and all(isinstance(v, (int, float)) for v in values):
        return np.asarray(values, dtype=np.float64)
    return None


def expert_load(run: Run) -> np.ndarray | None:
    """(layers, experts) token counts, or None."""
    load = _find(run, "expert_load")
    if not isinstance(load, list) or not load:
        return None
    try:
        arr = np.asarray(load, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if arr.ndim == 1:
        arr = arr[None, :]
    return arr if arr.ndim == 2 and arr.size else None


def rank_load(run: Run, load: np.ndarray) -> tuple[np.ndarray, int] | None:
    """(EP,) tokens per EP rank summed over layers, and the number of FFN experts placed."""
    config = run.run.get("config") if isinstance(run.run.get("config"), dict) else {}
    plan = run.run.get("plan") if isinstance(run.run.get("plan"), dict) else {}
    ep = run.run.get("ep_size") or plan.get("ep_size") or plan.get("ep") or run.run.get("world_size")
    n_ffn = int(config.get("n_routed_experts") or load.shape[1])
    n_zero = int(config.get("zero_expert_num") or 0)
    if load.shape[1] not in (n_ffn, n_ffn + n_zero):
        n_ffn = load.shape[1]
    if not isinstance(ep, int) or ep < 1 or n_ffn % ep:
        return None
    per_rank = load[:, :n_ffn].sum(axis=0).reshape(ep, n_ffn // ep).sum(axis=1)
    return per_rank, n_ffn


def routing_figures(runs: list[Run]) -> tuple[list[go.Figure], list[str]]:
    """Histograms, zero share per layer, load heatmap and per-rank load bars."""
    figs: list[go.Figure] = []
    notes: list[str] = []

    hist_fig = go.Figure()
    act_fig = go.Figure()
    zero_fig = go.Figure()
    act_how = set()
    for run in runs:
        counts = experts_hist(run)
        if counts is None:
            notes.append(f"Zero experts: {run.name} has no ffn_experts_per_token_hist")
        else:
            hist_fig.add_trace(go.Bar(x=np.arange(counts.size), y=counts / counts.sum(), name=run.name,
                                      customdata=counts, hovertemplate="%{x} experts: %{customdata:.0f} tokens<extra></extra>"))
        act = activated_hist(run)
        if act is None:
            notes.append(f"Zero experts: {run.name} has no activated-parameter histogram "
                         "(needs activated_params_hist, or the experts histogram with consistent min/max/mean)")
        else:
            x, c, how = act
            act_how.add(how)
            act_fig.add_trace(go.Bar(x=x / 1e9, y=c / c.sum(), name=run.name, customdata=c,
                                     hovertemplate="%{x:.3f} B params: %{customdata:.0f} tokens<extra></extra>"))
        zero = zero_share_per_layer(run)
        if zero is None:
            notes.append(f"Zero experts: {run.name} has no per-layer zero share")
        else:
            zero_fig.add_trace(go.Bar(x=np.arange(zero.size), y=zero * 100, name=run.name))
    if hist_fig.data:
        hist_fig.update_layout(title="FFN experts per token", xaxis_title="FFN experts used by a token",
                               yaxis_title="share of tokens", barmode="group", height=360)
        figs.append(hist_fig)
    if act_fig.data:
        act_fig.update_layout(title=f"Activated parameters per token ({'; '.join(sorted(act_how))})",
                              xaxis_title="activated parameters (billions)", yaxis_title="share of tokens",
                              barmode="group", height=360)
        figs.append(act_fig)
    if zero_fig.data:
        zero_fig.update_layout(title="Zero-expert share per layer (slots routed to identity experts)",
                               xaxis_title="layer", yaxis=dict(title="% of routing slots", rangemode="tozero"),
                               barmode="group", height=360)
        figs.append(zero_fig)

    for run in runs:
        load = expert_load(run)
        if load is None:
            notes.append(f"Zero experts: {run.name} has no expert_load (layer × expert)")
            continue
        figs.append(_heatmap(run, load))
        placed = rank_load(run, load)
        if placed is None:
            notes.append(f"Zero experts: {run.name}: per-rank load skipped (EP size unknown or does not divide the experts)")
            continue
        per_rank, n_ffn = placed
        mean = per_rank.mean()
        bars = go.Figure(go.Bar(x=np.arange(per_rank.size), y=per_rank, name="tokens", marker_color="#1f77b4"))
        bars.add_hline(y=mean, line_dash="dash", annotation_text="mean")
        ratio = per_rank.max() / mean if mean > 0 else float("nan")
        bars.update_layout(title=f"{run.name}: FFN-expert load per EP rank ({n_ffn} experts on {per_rank.size} "
                                 f"ranks); max/mean {ratio:.2f}",
                           xaxis_title="EP rank", yaxis_title="tokens (all layers)", height=340)
        figs.append(bars)
    return figs, notes


def _heatmap(run: Run, load: np.ndarray) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=load, colorscale="Viridis", colorbar=dict(title="tokens"),
                               hovertemplate="layer %{y}, expert %{x}: %{z:.0f} tokens<extra></extra>"))
    fig.update_layout(title=f"{run.name}: expert load (layer × expert)", xaxis_title="expert",
                      yaxis_title="layer", height=max(300, min(800, 120 + 14 * load.shape[0])))
    return fig


def train_figure(log: dict[str, np.ndarray]) -> go.Figure | None:
    """PID controller curves from a `moesim train` log, one panel per quantity present."""
    panels = [
        ("ffn_experts_per_token", "FFN experts / token"),
        ("zero_share", "zero-expert share"),
        ("load_max_over_mean", "expert load max/mean"),
        ("activated_params_mean", "activated params (mean)"),
        ("loss", "loss"),
    ]
    panels = [p for p in panels if p[0] in log and np.isfinite(log[p[0]]).any()]
    if not panels:
        return None
    step = log["step"]
    fig = make_subplots(rows=len(panels), cols=1, shared_xaxes=True, subplot_titles=[t for _, t in panels],
                        vertical_spacing=0.06)
    for i, (key, title) in enumerate(panels, start=1):
        fig.add_trace(go.Scatter(x=step, y=log[key], mode="lines", name=title), row=i, col=1)
        if key == "ffn_experts_per_token" and "ffn_experts_std" in log:
            std = log["ffn_experts_std"]
            fig.add_trace(go.Scatter(x=np.concatenate([step, step[::-1]]),
                                     y=np.concatenate([log[key] + std, (log[key] - std)[::-1]]),
                                     fill="toself", fillcolor="rgba(31,119,180,0.2)", line=dict(width=0),
                                     name="± std across layers", hoverinfo="skip"), row=i, col=1)
        if key == "load_max_over_mean" and "device_load_max_over_mean" in log:
            fig.add_trace(go.Scatter(x=step, y=log["device_load_max_over_mean"], mode="lines",
                                     name="device load max/mean"), row=i, col=1)
    fig.update_xaxes(title_text="training step", row=len(panels), col=1)
    fig.update_layout(title="Router PID controller (moesim train log)", height=220 * len(panels) + 80)
    return fig
