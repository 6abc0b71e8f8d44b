"""Each view's figures against the inputs they were drawn from (no browser)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dashboards import experts, overlap, sweep, timeline, validation
from dashboards.errors import DashboardError
from dashboards.inputs import load_run, read_train_log, read_validation, sweep_columns
from tests.dashboards import runs as fixtures
from traces import rundir


def _n_points(trace) -> int:
    return max(len(getattr(trace, a) if getattr(trace, a, None) is not None else []) for a in ("x", "y", "z"))


# --- timeline ------------------------------------------------------------------------


def test_representative_ranks_are_slowest_median_fastest(big_run):
    run = load_run(big_run)
    medians = {int(r): float(np.median(v)) for r, v in run.run["step_times_us"].items()}
    order = sorted(medians, key=lambda r: medians[r])
    assert timeline.representative_ranks(run) == [order[-1], order[len(order) // 2], order[0]]


def test_segments_cover_every_op_of_the_shown_ranks(inputs):
    run = load_run(inputs["live"])
    ranks = timeline.representative_ranks(run)
    assert ranks == [0, 1]  # few ranks: all shown
    rows, segs, gap_us = timeline.run_segments(run, ranks)
    ops = run.ops
    t0 = ops.column("start_us").to_numpy().min()
    for r, lane, kind, s, d in zip(*(ops.column(c).to_pylist() for c in ("rank", "lane", "kind", "start_us", "dur_us"))):
        row = rows.index(f"r{r} {lane}")
        m = (segs.row == row) & (segs.kind == kind)
        inside = (segs.start_us[m] <= s - t0 + 1e-9) & (s - t0 + d <= segs.end_us[m] + 1e-9)
        assert inside.any(), f"op {kind} on r{r} {lane} at {s} not drawn"
    assert len(segs.text) == segs.row.size


def test_hidden_rows_match_metrics_hidden_comm(inputs):
    """The shaded overlap rows and traces/overlap.py's hidden_comm_us are the same quantity."""
    run = load_run(inputs["live"])
    rows, segs, _ = timeline.run_segments(run, [0, 1])
    n_steps = len(run.run["step_times_us"]["0"])
    for r in (0, 1):
        m = segs.row == rows.index(f"r{r} {timeline.OVERLAP_ROW}")
        drawn_us = float(np.sum(segs.end_us[m] - segs.start_us[m]))
        expected = run.metrics["ranks"][str(r)]["hidden_comm_us"] * n_steps
        assert drawn_us == pytest.approx(expected, rel=1e-6)
        assert drawn_us <= run.metrics["ranks"][str(r)]["comm_us"] * n_steps + 1e-6


def test_hidden_intervals_closed_form():
    comm = (np.array([0.0, 10.0]), np.array([5.0, 20.0]))
    compute = (np.array([3.0, 12.0, 14.0]), np.array([11.0, 13.0, 30.0]))
    s, e = timeline.hidden_intervals(comm, compute)
    assert list(zip(s, e)) == [(3.0, 5.0), (10.0, 11.0), (12.0, 13.0), (14.0, 20.0)]


def test_merge_caps_segments_and_keeps_busy_time(big_run, monkeypatch):
    run = load_run(big_run)
    ranks = timeline.representative_ranks(run)
    monkeypatch.setattr(timeline, "MAX_SEGMENTS", 500)
    rows, segs, gap_us = timeline.run_segments(run, ranks)
    assert segs.row.size <= 500 and gap_us > 0
    # against the raw ops: every op of a lane row lies inside one merged segment of that row
    # and kind, and the row's segments span exactly its ops (merging never extends a row)
    ops = run.ops
    t0 = ops.column("start_us").to_numpy().min()
    rank, lane = ops.column("rank").to_numpy(), np.array(ops.column("lane").to_pylist(), dtype=object)
    kind = np.array(ops.column("kind").to_pylist(), dtype=object)
    start = ops.column("start_us").to_numpy() - t0
    end = start + ops.column("dur_us").to_numpy()
    for i, name in enumerate(rows):
        if name.endswith(timeline.OVERLAP_ROW):
            continue
        r, ln = name.split(" ", 1)
        mine = (rank == int(r[1:])) & (lane == ln)
        m = segs.row == i
        assert segs.start_us[m].min() == pytest.approx(start[mine].min())
        assert segs.end_us[m].max() == pytest.approx(end[mine].max())
        for s, e, k in zip(start[mine], end[mine], kind[mine]):
            inside = m & (segs.kind == k) & (segs.start_us <= s + 1e-9) & (segs.end_us >= e - 1e-9)
            assert inside.any(), (name, s, e, k)


def test_timeline_stacks_runs_on_one_axis(inputs, big_run):
    runs = [load_run(inputs["live"]), load_run(inputs["seq"]), load_run(big_run)]
    fig, notes = timeline.timeline_figure(runs)
    assert not notes
    axes = {t.xaxis for t in fig.data}
    assert len(axes) == 3  # one subplot row per run ...
    # ... on one time axis: the upper rows' x axes follow the bottom one
    assert fig.layout.xaxis.matches == "x3" and fig.layout.xaxis2.matches == "x3"
    assert all(_n_points(t) > 0 for t in fig.data)


def test_timeline_switches_to_webgl_above_the_svg_budget(inputs, monkeypatch):
    runs = [load_run(inputs["live"])]
    fig, _ = timeline.timeline_figure(runs)
    assert {t.type for t in fig.data} == {"scatter"}
    monkeypatch.setattr(timeline, "SVG_MAX_SEGMENTS", 10)
    fig, _ = timeline.timeline_figure(runs)
    assert {t.type for t in fig.data} == {"scattergl"}


def test_rank_bars_cover_every_rank(big_run):
    run = load_run(big_run)
    fig = timeline.rank_bars_figure(run, timeline.representative_ranks(run))
    compute = next(t for t in fig.data if t.name == "compute")
    assert len(compute.x) == 128
    np.testing.assert_allclose(compute.y, [run.metrics["ranks"][str(r)]["compute_us"] for r in range(128)])


# --- overlap -------------------------------------------------------------------------


def test_overlap_labels_split_comm_and_sit_side_by_side(inputs):
    live, seq = load_run(inputs["live"]), load_run(inputs["seq"])
    fig, notes = overlap.label_figure([live, seq])
    assert not notes
    titles = [a.text for a in fig.layout.annotations]
    assert titles[0].startswith("sbo") and titles[1].startswith("sequential")
    for run, suffix in ((live, ""), (seq, "2")):
        by_name = {t.name: t for t in fig.data if t.xaxis == f"x{suffix}"}
        hidden, exposed = np.asarray(by_name["hidden comm"].x), np.asarray(by_name["exposed comm"].x)
        assert (hidden >= 0).all() and (exposed >= -1e-9).all()
        comm = {e["label"]: e["comm_us"] for e in run.metrics["labels"] if e["comm_us"] > 0}
        np.testing.assert_allclose(hidden + exposed, [comm[y] for y in by_name["hidden comm"].y])
    # the sequential schedule hides (almost) nothing, the shortcut one most
    seq_hidden = sum(next(t for t in fig.data if t.xaxis == "x2" and t.name == "hidden comm").x)
    live_hidden = sum(next(t for t in fig.data if t.xaxis == "x" and t.name == "hidden comm").x)
    assert seq_hidden < 0.05 * live_hidden


def test_overlap_per_rank_matches_metrics(inputs):
    runs = [load_run(inputs["live"]), load_run(inputs["seq"])]
    fig, _ = overlap.rank_overlap_figure(runs)
    for trace, run in zip(fig.data, runs):
        np.testing.assert_allclose(trace.y, [run.metrics["ranks"][str(r)]["overlap_pct"] for r in trace.x])


# --- zero experts --------------------------------------------------------------------


def test_routing_figures_match_the_router_counts(inputs):
    run = load_run(inputs["live"])
    layers = [run.run["routing"][k] for k in sorted(run.run["routing"], key=int)]
    figs, notes = experts.routing_figures([run])
    assert not notes
    titles = [f.layout.title.text for f in figs]
    assert titles[0] == "FFN experts per token"
    hist = figs[0].data[0]
    assert sum(hist.y) == pytest.approx(1.0)
    assert sum(hist.customdata) == sum(layer["tokens"] for layer in layers)  # one count per token and layer
    act = figs[1].data[0]
    assert sum(act.customdata) == sum(run.metrics["activated_params_histogram"]["counts"])
    assert min(act.x) * 1e9 >= run.metrics["activated_params_min"] and max(act.x) * 1e9 <= run.metrics["activated_params_max"]
    load = experts.expert_load(run)
    n_ffn = run.run["config"]["n_routed_experts"]
    assert load.shape == (len(layers), n_ffn + run.run["config"]["zero_expert_num"])
    per_rank, _ = experts.rank_load(run, load)
    assert per_rank.size == run.run["world_size"]
    assert per_rank.sum() == pytest.approx(load[:, :n_ffn].sum())  # zero experts live on no rank
    # the same per-rank load placed from the expert load when rank_load_rows is absent
    for layer in layers:
        del layer["rank_load_rows"]
    placed, how = experts.rank_load(run, load)
    np.testing.assert_allclose(placed, per_rank)
    assert "contiguously" in how
    zero = experts.zero_share_per_layer(run)
    np.testing.assert_allclose(zero, load[:, n_ffn:].sum(1) / (load.sum(1)))


def test_metrics_level_routing_keys_are_read(inputs, tmp_path):
    """The metrics.json forms: `ffn_experts_per_token_hist` and `expert_load` (layer × expert)."""
    run = load_run(inputs["live"])
    run.run.pop("routing")
    run.metrics = {**run.metrics, "ffn_experts_per_token_hist": [1, 5, 9, 3, 0], "expert_load": [[3, 1, 2, 2], [0, 4, 2, 2]]}
    np.testing.assert_array_equal(experts.experts_hist(run), [1, 5, 9, 3, 0])
    assert experts.expert_load(run).shape == (2, 4)
    run.run["config"] = {"n_routed_experts": 4}
    per_rank, _ = experts.rank_load(run, experts.expert_load(run))
    np.testing.assert_allclose(per_rank, [3 + 1 + 0 + 4, 2 + 2 + 2 + 2])


def test_activated_hist_derived_only_when_consistent(tmp_path):
    """Derived from the experts histogram: its mean must equal activated_params_mean."""
    rng = np.random.default_rng(5)
    run_dir = fixtures.make_run(tmp_path / "one", routing=False)
    metrics = rundir.read_json(run_dir / rundir.METRICS_JSON)
    run_json = rundir.read_json(run_dir / rundir.RUN_JSON)
    for n_layers, consistent in ((1, True), (4, False)):
        routing, stats = fixtures.routing_stats(n_layers, 8, 4, 4, 200, 2, rng)
        del stats["activated_params_histogram"]
        rundir.write_json_atomic(run_dir / rundir.METRICS_JSON, {**metrics, **stats})
        rundir.write_json_atomic(run_dir / rundir.RUN_JSON, {**run_json, "routing": routing})
        derived = experts.activated_hist(load_run(run_dir))
        if not consistent:  # per (token, layer) histogram vs per-token min/max/mean
            assert derived is None
            continue
        x, counts, how = derived
        assert "derived" in how
        assert np.sum(x * counts) / counts.sum() == pytest.approx(stats["activated_params_mean"], rel=1e-9)
        assert x.min() == pytest.approx(stats["activated_params_min"])
        assert x.max() == pytest.approx(stats["activated_params_max"])


def test_train_figure_has_pid_curves(inputs):
    log = read_train_log(inputs["train_log"])
    fig = experts.train_figure(log)
    names = {t.name for t in fig.data}
    assert {"FFN experts / token", "zero-expert share", "device load max/mean", "loss"} <= names
    assert all(_n_points(t) == log["step"].size for t in fig.data if t.name != "± std across layers")


# --- sweep ---------------------------------------------------------------------------


def _dominated_brute(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    n = x.size
    return np.array([any((x[j] >= x[i]) and (y[j] >= y[i]) and ((x[j] > x[i]) or (y[j] > y[i])) for j in range(n))
                     for i in range(n)])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 6), st.integers(0, 6)), min_size=1, max_size=30))
def test_pareto_mask_matches_brute_force(points):
    x = np.array([p[0] for p in points], dtype=float)
    y = np.array([p[1] for p in points], dtype=float)
    np.testing.assert_array_equal(sweep.pareto_mask(x, y), ~_dominated_brute(x, y))


def test_sweep_figures_hold_every_row(inputs):
    cols = sweep_columns(inputs["sweep"])
    frontier, cost, step = sweep.sweep_figures(inputs["sweep"])
    points = [t for t in frontier.data if t.name != "Pareto frontier"]
    assert sum(len(t.x) for t in points) == cols["gpus"].size
    assert sorted(np.concatenate([t.y for t in points])) == pytest.approx(sorted(cols["tgs"]))
    front = next(t for t in frontier.data if t.name == "Pareto frontier")
    assert len(front.x) == sweep.pareto_mask(cols["tps_per_user"], cols["tgs"]).sum() >= 1
    assert sum(len(t.x) for t in cost.data) == cols["gpus"].size
    assert {a.text for a in step.layout.annotations} >= {"step time vs GPUs", "step time vs EP size", "step time vs schedule"}


def test_sweep_csv_and_parquet_agree(inputs):
    a, b = sweep_columns(inputs["sweep"]), sweep_columns(inputs["sweep_csv"])
    for name in ("tgs", "tps_per_user", "cost_usd_per_m_tokens"):
        np.testing.assert_allclose(a[name], b[name])
    assert list(a["cluster"]) == list(b["cluster"])


def test_sweep_table_missing_column_is_named():
    cols = fixtures.sweep_table()
    del cols["tgs"]
    with pytest.raises(DashboardError, match="tgs"):
        sweep.sweep_figures(cols)


# --- validation ----------------------------------------------------------------------


def test_validation_points_and_errors(inputs):
    val = read_validation(inputs["validation"])
    fig = validation.validation_figure(val)
    points = next(t for t in fig.data if t.name == "configs")
    measured = np.array([c["measured_step_us"] for c in val["configs"]]) / 1e3
    predicted = np.array([c["predicted_step_us"] for c in val["configs"]]) / 1e3
    np.testing.assert_allclose(points.x, measured)
    np.testing.assert_allclose(points.customdata, [c["error_pct"] for c in val["configs"]])
    ov = next(t for t in fig.data if t.name == "overlap %")
    assert len(ov.x) == len(val["configs"])
    assert fig.layout.xaxis.range[1] >= max(measured.max(), predicted.max())


def test_runs_of_different_models_get_separate_label_figures(inputs):
    live, seq = load_run(inputs["live"]), load_run(inputs["seq"])
    seq.run = {**seq.run, "preset": "longcat-flash"}
    figs, notes = overlap.label_figures([live, seq])
    assert len(figs) == 2 and not notes
    assert "(tiny)" in figs[0].layout.title.text and "(longcat-flash)" in figs[1].layout.title.text
    assert len(overlap.label_figures([live, load_run(inputs["seq"])])[0]) == 1


def test_sweep_without_throughput_columns_keeps_step_time(tmp_path):
    """Prefill sweeps have no TPS/user: the frontier and cost figures become notes."""
    import pyarrow as pa

    cols = fixtures.sweep_table()
    table = pa.table({**{k: v for k, v in cols.items() if k not in ("tps_per_user", "tpot_ms")},
                      "tps_per_user": pa.nulls(len(cols["gpus"])), "tpot_ms": pa.nulls(len(cols["gpus"]))})
    figs, notes = sweep.sweep_view(table)
    assert [f.layout.title.text for f in figs] == ["Step time across the grid"]
    assert len(notes) == 2 and all("tps_per_user" in n for n in notes)


def test_small_runs_share_one_bar_figure(inputs):
    runs = [load_run(inputs["live"]), load_run(inputs["seq"])]
    fig = timeline.small_runs_bars_figure(runs)
    compute = next(t for t in fig.data if t.name == "compute")
    assert list(compute.x) == ["live · r0", "live · r1", "seq · r0", "seq · r1"]
    expected = [r.metrics["ranks"][k]["compute_us"] for r in runs for k in ("0", "1")]
    np.testing.assert_allclose(compute.y, expected)
    hidden = next(t for t in fig.data if t.name == "hidden comm")
    comm = [r.metrics["ranks"][k]["comm_us"] for r in runs for k in ("0", "1")]
    assert all(h <= c + 1e-9 for h, c in zip(hidden.y, comm))


def test_validation_tolerates_null_summary_and_draws_one_trace_points(inputs):
    val = read_validation(inputs["validation"])
    val = {**val, "median_abs_error_pct": None, "max_abs_error_pct": None}
    val["configs"] = [{**c, "predicted_step_us_one_trace": c["measured_step_us"] * 1.5} for c in val["configs"]]
    fig = validation.validation_figure(val)
    errors = [abs(c["error_pct"]) for c in val["configs"]]
    assert f"median |error| {np.median(errors):.1f}%" in fig.layout.annotations[0].text
    one = next(t for t in fig.data if t.name == "one-trace prediction")
    assert len(one.x) == len(val["configs"])
    assert fig.layout.yaxis.range[1] >= max(one.y)  # the axes hold every point
