"""View 3, Zero experts: what the router's zero-computation experts do to the work.

Routing statistics come from metrics.json and from run.json `routing`, which holds one
entry per MoE layer ({layer: {tokens, ffn_experts_per_token_hist, zero_expert_share,
tokens_per_expert, rank_load_rows, ...}}, as traces/capture.py writes it). The PID
controller curves come from a `moesim train` log (train_log.csv). For each figure the first
source present wins; a figure whose data is absent is skipped with a note:
    FFN experts per token    metrics `ffn_experts_per_token_hist` [tokens using 0..K], else the
                             per-layer histograms summed (one count per token and layer)
    activated params/token   metrics `activated_params_histogram` (or `_hist`) {edges | bin_edges,
                             counts}, else derived (below)
    zero share per layer     routing[layer].zero_expert_share
    expert load              metrics `expert_load` [[tokens per expert] per layer], else
                             routing[layer].tokens_per_expert stacked (layer × expert)
    load per EP rank         routing[layer].rank_load_rows summed over layers, else the FFN
                             experts' load placed contiguously (expert e on rank e // (E / EP))
Derived activated-parameter histogram: activated params per token are affine in the
number of FFN experts it uses (a + b·k, the dense part is fixed), with a, b set by
activated_params_min/max at the smallest / largest k seen. It is drawn only when the
derived mean matches activated_params_mean within 2 % of (max − min), i.e. when the
histogram counts what min/max/mean count (per token over all layers, not per token and
layer). EP size: run.json `parallel.expert_parallel`, `plan.ep`, else `world_size`. Zero
experts are identities that live on no rank: expert-load columns past n_routed_experts
are drawn in the heatmap but assigned to no rank.
"""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from dashboards.inputs import Run

DERIVED_MEAN_TOLERANCE = 0.02


def _layers(run: Run) -> list[dict]:
    """run.json `routing` as a list of per-layer dicts, in layer order ([] if absent)."""
    routing = run.run.get("routing")
    if not isinstance(routing, dict):
        return []
    keys = [k for k in routing if str(k).isdigit() and isinstance(routing[k], dict)]
    return [routing[k] for k in sorted(keys, key=int)]


def _number(run: Run, key: str) -> float | None:
    value = (run.metrics or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else None


def _per_layer_lists(run: Run, key: str) -> np.ndarray | None:
    """Stack routing[layer][key] lists into (layers, n); None unless every layer has one."""
    rows = [layer.get(key) for layer in _layers(run)]
    if not rows or not all(isinstance(r, list) and r for r in rows) or len({len(r) for r in rows}) != 1:
        return None
    return np.asarray(rows, dtype=np.float64)


def experts_hist(run: Run) -> np.ndarray | None:
    """(K+1,) counts of tokens (or token × layer) using 0..K FFN experts, or None."""
    hist = (run.metrics or {}).get("ffn_experts_per_token_hist")
    if isinstance(hist, list) and hist:
        counts = np.asarray(hist, dtype=np.float64)
    else:
        per_layer = _per_layer_lists(run, "ffn_experts_per_token_hist")
        if per_layer is None:
            return None
        counts = per_layer.sum(axis=0)
    return counts if counts.ndim == 1 and counts.sum() > 0 and (counts >= 0).all() else None


def activated_hist(run: Run) -> tuple[np.ndarray, np.ndarray, str] | None:
    """(x params, token counts, how) for the activated-parameter histogram, or None."""
    metrics = run.metrics or {}
    given = metrics.get("activated_params_histogram") or metrics.get("activated_params_hist")
    if isinstance(given, dict) and given.get("counts"):
        edges = np.asarray(given.get("edges") or given.get("bin_edges") or [], dtype=np.float64)
        counts = np.asarray(given["counts"], dtype=np.float64)
        if edges.size == counts.size + 1 and counts.sum() > 0:
            return (edges[:-1] + edges[1:]) / 2, counts, "per token over all layers"
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
    """(layers,) share of routing slots sent to zero experts, or None."""
    shares = [layer.get("zero_expert_share") for layer in _layers(run)]
    if shares and all(isinstance(v, (int, float)) for v in shares):
        return np.asarray(shares, dtype=np.float64)
    return None


def expert_load(run: Run) -> np.ndarray | None:
    """(layers, experts) token counts, or None."""
    load = (run.metrics or {}).get("expert_load")
    if isinstance(load, list) and load:
        try:
            arr = np.asarray(load, dtype=np.float64)
        except (TypeError, ValueError):
            return None
        arr = arr[None, :] if arr.ndim == 1 else arr
        return arr if arr.ndim == 2 and arr.size else None
    return _per_layer_lists(run, "tokens_per_expert")


def _ep_size(run: Run) -> int | None:
    parallel = run.run.get("parallel") if isinstance(run.run.get("parallel"), dict) else {}
    plan = run.run.get("plan") if isinstance(run.run.get("plan"), dict) else {}
    for value in (parallel.get("expert_parallel"), plan.get("ep"), run.run.get("world_size")):
        if isinstance(value, int) and value >= 1:
            return value
    return None


def rank_load(run: Run, load: np.ndarray | None) -> tuple[np.ndarray, str] | None:
    """(EP,) tokens per EP rank summed over layers, and where the figure came from."""
    rows = _per_layer_lists(run, "rank_load_rows")
    if rows is not None:
        return rows.sum(axis=0), "rank_load_rows in run.json"
    if load is None:
        return None
    config = run.run.get("config") if isinstance(run.run.get("config"), dict) else {}
    n_ffn = int(config.get("n_routed_experts") or load.shape[1])
    n_ffn = min(n_ffn, load.shape[1])
    ep = _ep_size(run)
    if ep is None or n_ffn % ep:
        return None
    per_rank = load[:, :n_ffn].sum(axis=0).reshape(ep, n_ffn // ep).sum(axis=1)
    return per_rank, f"{n_ffn} FFN experts placed contiguously on {ep} ranks"


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
            notes.append(f"Zero experts: {run.name} has no FFN-experts-per-token histogram")
        else:
            hist_fig.add_trace(go.Bar(x=np.arange(counts.size), y=counts / counts.sum(), name=run.name,
                                      customdata=counts, hovertemplate="%{x} experts: %{customdata:.0f} tokens<extra></extra>"))
        act = activated_hist(run)
        if act is None:
            notes.append(f"Zero experts: {run.name} has no activated-parameter histogram "
                         "(needs activated_params_histogram, or an experts histogram consistent with min/max/mean)")
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
                               yaxis_title="share of tokens", barmode="group", height=360, showlegend=True)
        figs.append(hist_fig)
    if act_fig.data:
        act_fig.update_layout(title=f"Activated parameters per token ({'; '.join(sorted(act_how))})",
                              xaxis_title="activated parameters (billions)", yaxis_title="share of tokens",
                              barmode="group", height=360, showlegend=True)
        figs.append(act_fig)
    if zero_fig.data:
        zero_fig.update_layout(title="Zero-expert share per layer (slots routed to identity experts)",
                               xaxis_title="layer", yaxis=dict(title="% of routing slots", rangemode="tozero"),
                               barmode="group", height=360, showlegend=True)
        figs.append(zero_fig)

    for run in runs:
        load = expert_load(run)
        if load is None:
            notes.append(f"Zero experts: {run.name} has no expert load (layer × expert)")
        else:
            figs.append(_heatmap(run, load))
        placed = rank_load(run, load)
        if placed is None:
            notes.append(f"Zero experts: {run.name}: no load per EP rank (no rank_load_rows, or EP size unknown "
                         "or not dividing the experts)")
            continue
        per_rank, how = placed
        mean = per_rank.mean()
        bars = go.Figure(go.Bar(x=np.arange(per_rank.size), y=per_rank, name="tokens", marker_color="#1f77b4"))
        bars.add_hline(y=mean, line_dash="dash", annotation_text="mean")
        ratio = per_rank.max() / mean if mean > 0 else float("nan")
        bars.update_layout(title=f"{run.name}: FFN-expert load per EP rank ({how}); max/mean {ratio:.2f}",
                           xaxis=dict(title="EP rank", type="category" if per_rank.size <= 32 else "linear"),
                           yaxis_title="tokens (all layers)", height=340)
        figs.append(bars)
    return figs, notes


def _heatmap(run: Run, load: np.ndarray) -> go.Figure:
    fig = go.Figure(go.Heatmap(z=load, colorscale="Viridis", colorbar=dict(title="tokens"),
                               hovertemplate="layer %{y}, expert %{x}: %{z:.0f} tokens<extra></extra>"))
    config = run.run.get("config") if isinstance(run.run.get("config"), dict) else {}
    n_ffn = config.get("n_routed_experts")
    if isinstance(n_ffn, int) and 0 < n_ffn < load.shape[1]:
        fig.add_vline(x=n_ffn - 0.5, line_color="white", line_dash="dash",
                      annotation_text="zero experts →", annotation_position="top right")
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
