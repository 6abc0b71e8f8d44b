"""What-if transforms on hand-built traces with closed-form answers."""

import numpy as np
import pyarrow as pa
import pytest

from simulator.costmodel import CostModel, DeviceSpec, KindFit
from simulator.errors import SimulationError
from simulator.transforms import apply_scaling, fit_scaling, scale_experts, scale_work, set_schedule, set_world_size, step_graph
from traces.schema import make_ops


def _table(rows):
    cols = {k: [r.get(k, d) for r in rows] for k, d in [
        ("id", 0), ("rank", 0), ("lane", "cpu:main"), ("kind", "compute"), ("name", "x"), ("label", ""),
        ("start_us", 0.0), ("dur_us", 0.0), ("flops", 0.0), ("bytes", 0.0), ("coll", ""), ("group", ""),
        ("coll_bytes", 0.0), ("seq", -1), ("step", 0), ("deps", [])]}
    return make_ops(cols)


def _sync_and_async_step(step, rank, base_id, t0, slow=0.0):
    """One rank's step: a gap-waited sync collective, then an async one joined by a wait op."""
    i = base_id
    return [
        dict(id=i, rank=rank, name="aten::linear", label="L0/attn0", start_us=t0, dur_us=10 + slow, step=step),
        dict(id=i + 1, rank=rank, kind="host", name="c10d::alltoall_base_", label="L0/dispatch", start_us=t0 + 10 + slow, dur_us=2, step=step),
        dict(id=i + 2, rank=rank, lane="cpu:gloo", kind="comm", name="gloo:all_to_all", label="L0/dispatch", coll="all_to_all",
             start_us=t0 + 12 + slow, dur_us=28, coll_bytes=256, deps=[i + 1], step=step),
        # idle from 12 to 40 (waiting), 1 µs of Python after the collective ended
        dict(id=i + 3, rank=rank, name="_ExchangeStart", label="L0/dispatch", start_us=t0 + 41 + slow, dur_us=3, step=step),
        dict(id=i + 4, rank=rank, lane="cpu:gloo", kind="comm", name="gloo:all_to_all", label="L0/dispatch", coll="all_to_all",
             start_us=t0 + 44 + slow, dur_us=30, coll_bytes=1e6, deps=[i + 3], step=step),
        dict(id=i + 5, rank=rank, name="aten::linear", label="L0/mlp0", start_us=t0 + 44 + slow, dur_us=20, step=step),
        # the wait op blocks from 65 until the collective ends at 74, then works 2 µs more
        dict(id=i + 6, rank=rank, name="_ExchangeWait", label="L0/dispatch", start_us=t0 + 65 + slow, dur_us=11, step=step),
        dict(id=i + 7, rank=rank, name="aten::mul", label="L0/experts", start_us=t0 + 76 + slow, dur_us=5, step=step),
    ]


def test_step_graph_removes_waiting_and_averages_steps():
    rows = []
    for step, slow in [(1, 0.0), (2, 3.0), (3, 6.0)]:
        rows += _sync_and_async_step(step, 0, 100 * step, 1000.0 * step, slow)
    g = step_graph(_table(rows))
    assert g.steps_used == 3 and g.n == 8
    by_name = {}
    for i in range(g.n):
        by_name.setdefault(g.name[i], []).append(i)
    first_linear, mlp0 = by_name["aten::linear"]
    assert g.dur_us[first_linear] == pytest.approx(13.0)  # mean of 10, 13, 16
    start_ex = by_name["_ExchangeStart"][0]
    sync_comm, async_comm = sorted(by_name["gloo:all_to_all"], key=lambda i: g.coll_bytes[i])
    # the op after the idle gap waits for the sync collective; only 1 µs of the gap is host time
    assert sync_comm in g.deps[start_ex] and g.gap_us[start_ex] == pytest.approx(1.0)
    wait = by_name["_ExchangeWait"][0]
    assert async_comm in g.deps[wait] and g.dur_us[wait] == pytest.approx(2.0)
    assert g.dur_us[mlp0] == pytest.approx(20.0)  # compute under the async collective is kept
    # collectives numbered in issue order, group = all ranks
    assert (g.seq[sync_comm], g.seq[async_comm]) == (0, 1) and g.group[sync_comm] == "0"
    per_step = step_graph(_table(rows), per_step=True)
    assert [p.dur_us[first_linear] for p in per_step] == [10.0, 13.0, 16.0]


def test_synchronous_issuer_keeps_only_its_own_time():
    rows = [
        dict(id=0, name="c10d::allreduce_", kind="host", label="grad_sync", start_us=0, dur_us=30, step=0),
        dict(id=1, lane="cpu:gloo", kind="comm", name="gloo:all_reduce", coll="all_reduce", start_us=5, dur_us=20, deps=[0], step=0),
        dict(id=2, name="aten::add", start_us=31, dur_us=4, step=0),
    ]
    g = step_graph(_table(rows))
    at = {n: i for i, n in enumerate(g.name)}
    assert g.dur_us[at["c10d::allreduce_"]] == pytest.approx(10.0)
    assert at["gloo:all_reduce"] in g.deps[at["aten::add"]]


def test_autograd_node_around_a_blocking_collective_waits_for_it():
    """A backward that issues a synchronous all_to_all: the c10d op returns at once (0–2),
    the autograd node that called it holds the lane until the collective ends at 30, then
    works 1 µs. The node waits for the collective and keeps 1 µs; the backward op after it
    must not run beside the collective (a plain host op in its place would be taken as
    compute under an async collective, joined at the next wait op)."""
    from simulator.cluster import cpu_loopback
    from simulator.engine import simulate

    rows = [
        dict(id=0, name="c10d::alltoall_base_", kind="host", label="backward", start_us=0, dur_us=2, step=0),
        dict(id=1, lane="cpu:gloo", kind="comm", name="gloo:all_to_all", coll="all_to_all", label="backward",
             start_us=2, dur_us=28, coll_bytes=1e6, deps=[0], step=0),
        dict(id=2, name="autograd::engine::evaluate_function: _ExchangeStartBackward", kind="host", label="backward",
             start_us=2, dur_us=29, step=0),
        dict(id=3, name="autograd::engine::evaluate_function: MmBackward0", label="backward", start_us=31, dur_us=10, step=0),
    ]
    g = step_graph(_table(rows))
    at = {n.split(": ")[-1]: i for i, n in enumerate(g.name)}
    assert at["gloo:all_to_all"] in g.deps[at["_ExchangeStartBackward"]]
    assert g.dur_us[at["_ExchangeStartBackward"]] == pytest.approx(1.0)
    ops, gap = g.to_ops()
    sim = simulate(ops, cpu_loopback(1, 4), comm_from_trace=True, gap_us=gap,
                   compute_time=lambda t_, c: t_.column("dur_us").to_numpy())
    start = dict(zip(sim.column("name").to_pylist(), sim.column("start_us").to_numpy()))
    comm_end = start["gloo:all_to_all"] + 28
    assert start["autograd::engine::evaluate_function: MmBackward0"] >= comm_end - 1e-6


def _fit_model():
    fit = KindFit("aten::linear", overhead_us=5.0, us_per_mflop=1.0, us_per_mb=0.0)
    return CostModel(DeviceSpec("d", 1e12, 1e11, 5.0), {"aten::linear": fit,
                                                         "other": KindFit("other", 1.0, 0.0, 0.0)})


def test_scale_work_closed_form():
    rows = [
        dict(id=0, name="aten::linear", label="L0/mlp0", start_us=0, dur_us=15, flops=10e6, step=0),
        dict(id=1, name="aten::_scaled_dot_product_flash_attention_for_cpu", label="L0/attn0", start_us=15, dur_us=9, step=0),
        dict(id=2, name="aten::linear", label="Optimizer.step#AdamW.step", start_us=24, dur_us=15, flops=10e6, step=0),
        dict(id=3, lane="cpu:gloo", kind="comm", name="gloo:all_to_all", coll="all_to_all", start_us=0, dur_us=1, coll_bytes=1e6, step=0),
        dict(id=4, lane="cpu:gloo", kind="comm", name="gloo:all_to_all", coll="all_to_all", start_us=2, dur_us=1, coll_bytes=256, step=0),
    ]
    g = scale_work(step_graph(_table(rows)), _fit_model(), token_scale=2.0, attention_scale=4.0)
    d = {(g.name[i], g.label[i]): g.dur_us[i] for i in range(g.n)}
    assert d[("aten::linear", "L0/mlp0")] == pytest.approx(15 * (5 + 20) / (5 + 10))  # overhead stays, work doubles
    # no work known and no attention fit: the device launch overhead (5) + the rest x attention scale
    assert d[("aten::_scaled_dot_product_flash_attention_for_cpu", "L0/attn0")] == pytest.approx(5 + 4 * 4)
    assert d[("aten::linear", "Optimizer.step#AdamW.step")] == 15  # optimizer: fixed
    assert sorted(g.coll_bytes[i] for i in range(g.n) if g.kind[i] == "comm") == [256, 2e6]  # counts do not scale
    with pytest.raises(SimulationError):
        scale_work(g, _fit_model(), 0.0)
    rows_e = [dict(id=0, name="aten::linear", label="L0/experts", start_us=0, dur_us=15, flops=10e6, step=0, rank=1)]
    ge = scale_experts(step_graph(_table(rows_e)), _fit_model(), {1: 0.5})
    assert ge.dur_us[0] == pytest.approx(15 * (5 + 5) / 15)


def test_scaling_keeps_weight_bytes():
    """A linear x[M,K] w[N,K] with M tokens: doubling the tokens doubles its FLOPs and its
    activation bytes (x and the output), not the weight's; with a bytes-only cost model
    (1 µs per MB, no overhead) the duration follows those bytes exactly."""
    M, K, N = 64, 512, 1024
    act, weight = 4 * (M * K + M * N), 4 * N * K
    rows = [dict(id=0, name="aten::linear", label="L0/experts", start_us=0, dur_us=30.0, flops=2 * M * K * N,
                 bytes=act + weight, step=0)]
    table = _table(rows).append_column("fixed_bytes", pa.array([float(weight)]))
    g = step_graph(table)
    assert g.fixed_bytes.tolist() == [weight]
    bytes_only = CostModel(DeviceSpec("cpu", 1e12, 1e10, 1.0), {"gemm": KindFit("gemm", 0.0, 0.0, 1.0, "sum", 3, 0.0)})
    for moved in (scale_work(g, bytes_only, 2.0), scale_experts(g, bytes_only, layer_scale={0: 2.0})):
        assert moved.bytes[0] == 2 * act + weight and moved.flops[0] == 4 * M * K * N
        assert moved.dur_us[0] == pytest.approx(30.0 * (2 * act + weight) / (act + weight))
    # without the column every byte grows, as before
    assert scale_work(step_graph(_table(rows)), bytes_only, 2.0).dur_us[0] == pytest.approx(60.0)


def _layer_rows(order):
    """A sequential-schedule layer on one rank; durations 1 µs each, names tell the part."""
    rows, t = [], 0.0
    for k, (label, name) in enumerate(order):
        rows.append(dict(id=k, name=name, label=f"L0/{label}", start_us=t, dur_us=1.0, step=0))
        t += 1.0
    return rows


SEQUENTIAL = [("attn0", "a0"), ("router", "r"), ("dispatch", "d_start"), ("dispatch", "_ExchangeWait"),
              ("experts", "e"), ("combine", "c_start"), ("combine", "_ExchangeWait"), ("combine", "c_add"),
              ("mlp0", "m0"), ("attn1", "a1"), ("mlp1", "m1")]


def test_set_schedule_reorders_and_round_trips():
    g = step_graph(_table(_layer_rows(SEQUENTIAL)))
    sc = set_schedule(g, "shortcut")
    order = [sc.name[i] + "/" + sc.label[i].split("/")[1] for i in np.argsort(sc.pos)]
    assert order == ["a0/attn0", "r/router", "d_start/dispatch", "m0/mlp0", "a1/attn1", "_ExchangeWait/dispatch",
                     "e/experts", "c_start/combine", "m1/mlp1", "_ExchangeWait/combine", "c_add/combine"]
    back = set_schedule(sc, "sequential")
    assert [back.name[i] for i in np.argsort(back.pos)] == [n for _, n in SEQUENTIAL]
    with pytest.raises(SimulationError, match="expected sequential or shortcut"):
        set_schedule(g, "sbo")


def test_schedule_change_replays_to_the_closed_form():
    """Dispatch of 10 µs issued after the router: sequential waits for it, shortcut hides it
    behind mlp0 + attn1 (6 µs of work), so the step shrinks by 6 µs."""
    from simulator.cluster import cpu_loopback
    from simulator.engine import simulate

    order = [("attn0", "a0", 2), ("router", "r", 1), ("dispatch", "d_start", 1), ("dispatch", "_ExchangeWait", 1),
             ("experts", "e", 2), ("combine", "c_start", 1), ("combine", "_ExchangeWait", 1),
             ("mlp0", "m0", 3), ("attn1", "a1", 3), ("mlp1", "m1", 3)]
    rows, t = [], 0.0
    for k, (label, name, d) in enumerate(order):
        rows.append(dict(id=k, name=name, label=f"L0/{label}", start_us=t, dur_us=d, step=0))
        t += d
    rows.append(dict(id=100, lane="cpu:gloo", kind="comm", name="gloo:all_to_all", label="L0/dispatch", coll="all_to_all",
                     coll_bytes=1e6, start_us=4, dur_us=10, deps=[2], step=0))
    rows[3]["dur_us"] = 11  # the sequential wait blocked from 4 to 14, then 1 µs
    for r in rows[4:-1]:
        r["start_us"] += 10
    g = step_graph(_table(rows))

    def step_us(graph):
        ops, gap = graph.to_ops()
        sim = simulate(ops, cpu_loopback(1, 4), comm_from_trace=True, gap_us=gap,
                       compute_time=lambda t_, c: t_.column("dur_us").to_numpy())
        s = sim.column("start_us").to_numpy()
        return float((s + sim.column("dur_us").to_numpy()).max() - s.min())

    seq_us = step_us(set_schedule(g, "sequential"))
    assert seq_us == pytest.approx(2 + 1 + 1 + 10 + 1 + 2 + 1 + 1 + 9)
    assert step_us(set_schedule(g, "shortcut")) == pytest.approx(seq_us - 6)


def test_set_world_size_replicates_ranks_and_groups():
    rows = _sync_and_async_step(0, 0, 0, 0.0) + _sync_and_async_step(0, 1, 50, 0.0)
    g = set_world_size(step_graph(_table(rows)), 4)
    assert sorted(set(g.rank.tolist())) == [0, 1, 2, 3]
    comm = [i for i in range(g.n) if g.kind[i] == "comm"]
    assert {g.group[i] for i in comm} == {"0,1,2,3"} and len(comm) == 8
    for i in range(g.n):  # deps stay within the rank
        assert all(g.rank[d] == g.rank[i] for d in g.deps[i])


def _sized_graph(tokens, seq, linear_us):
    """A linear op of duration linear_us(tokens), attention 2 + 0.01·tokens·seq, an
    optimizer op that does not grow (its +tokens % 3 must not be followed)."""
    rows = [dict(id=0, name="aten::linear", label="L0/mlp0", start_us=0, dur_us=linear_us(tokens), step=0),
            dict(id=1, name="aten::scaled_dot_product_attention", label="L0/attn0", start_us=1000,
                 dur_us=2 + 0.01 * tokens * seq, step=0),
            dict(id=2, name="aten::add_", label="Optimizer.step#AdamW.step", start_us=5000, dur_us=7 + tokens % 3, step=0)]
    return step_graph(_table(rows))


def test_scaling_through_two_references_is_exact_for_linear_and_attention_ops():
    """dur = 3 + 0.5·tokens for a linear op, 2 + 0.01·tokens·seq for attention, an optimizer
    op fixed: two references pin the lines, a third size is predicted exactly."""
    line = lambda t: 3 + 0.5 * t  # noqa: E731
    a, b = _sized_graph(64, 32, line), _sized_graph(256, 64, line)
    s = fit_scaling(a, [([a], 64, 32), ([b], 256, 64)])
    out = apply_scaling(a, s, 512, 128)
    want = {"aten::linear": 3 + 0.5 * 512, "aten::scaled_dot_product_attention": 2 + 0.01 * 512 * 128, "aten::add_": 8}
    for i in range(out.n):
        assert out.dur_us[i] == pytest.approx(want[out.name[i]])
    # the gap before attention (1000 - 35 = 965 at 64 tokens, 1000 - 131 = 869 at 256) moves too
    att = out.name.index("aten::scaled_dot_product_attention")
    assert out.gap_us[att] == pytest.approx(max(965 + (869 - 965) / (256 - 64) * (512 - 64), 0.0))
    with pytest.raises(SimulationError, match="different token counts"):
        fit_scaling(a, [([a], 64, 32), ([a], 64, 32)])
    with pytest.raises(SimulationError, match="at least two"):
        fit_scaling(a, [([a], 64, 32)])
    with pytest.raises(SimulationError, match="no steps"):
        fit_scaling(a, [([a], 64, 32), ([], 256, 64)])


def test_scaling_through_three_references_follows_each_segment():
    """A linear op with a kink (flat 40 µs up to 64 tokens, then 40 + 0.25·(tokens − 64)),
    references at 32, 96 (the base, given first) and 384 tokens: a size between two
    references lies on their segment, one beyond the largest on the last segment; a
    straight line through the outer two alone would miss the kink."""
    kink = lambda t: 40 + 0.25 * max(t - 64, 0)  # noqa: E731
    base, small, large = _sized_graph(96, 48, kink), _sized_graph(32, 32, kink), _sized_graph(384, 96, kink)
    s = fit_scaling(base, [([base], 96, 48), ([small], 32, 32), ([large], 384, 96)])
    lin = base.name.index("aten::linear")
    att = base.name.index("aten::scaled_dot_product_attention")
    for tokens, want in ((64, 40 + (48 - 40) * (64 - 32) / (96 - 32)),  # on the 32–96 segment
                         (256, 48 + (120 - 48) * (256 - 96) / (384 - 96)),  # on the 96–384 segment
                         (512, 48 + (120 - 48) * (512 - 96) / (384 - 96)),  # beyond: the last segment
                         (16, 40 + (48 - 40) * (16 - 32) / (96 - 32))):  # below: the first segment
        out = apply_scaling(base, s, tokens, 32)
        assert out.dur_us[lin] == pytest.approx(want)
        assert out.dur_us[att] == pytest.approx(2 + 0.01 * tokens * 32)  # linear in tokens·seq: exact anywhere
    # the reference order does not matter, only which one is the base
    s2 = fit_scaling(base, [([base], 96, 48), ([large], 384, 96), ([small], 32, 32)])
    assert apply_scaling(base, s2, 64, 32).dur_us[lin] == pytest.approx(44.0)


def test_scaling_matches_groups_not_op_sequences():
    """References may run different op sequences (an expert with no tokens runs no ops):
    ratios come from group totals averaged over each reference's steps. Base steps: two
    expert linears of 10 µs each; at the small size one step runs both at 4 µs, the other
    only one: the group's mean total is (8 + 4) / 2 = 6 µs against 20, ratio 0.3."""

    def experts(durs, step):
        rows = [dict(id=10 * step + k, name="aten::linear", label="L0/experts", start_us=100 * k, dur_us=d, step=step)
                for k, d in enumerate(durs)]
        return step_graph(_table(rows))

    base = experts([10, 10], 0)
    s = fit_scaling(base, [([base], 96, 48), ([experts([4, 4], 0), experts([4], 1)], 32, 32)])
    out = apply_scaling(base, s, 32, 32)
    assert out.dur_us.tolist() == pytest.approx([3.0, 3.0])


def test_scaling_ignores_stalled_steps():
    """A step the machine stalled does not bend the curves: the base reference ran its
    linear in 10 µs in eight steps and 100 µs in two (a descheduled rank), the other
    reference in 20 µs in all eight: the ratio is 2 (a mean would say 20 / 28)."""

    def linear(dur, step):
        return step_graph(_table([dict(id=step, name="aten::linear", label="L0/experts", dur_us=dur, step=step)]))

    base = [linear(10.0, k) for k in range(8)] + [linear(100.0, 8), linear(100.0, 9)]
    s = fit_scaling(base[0], [(base, 96, 48), ([linear(20.0, k) for k in range(8)], 192, 48)])
    assert apply_scaling(base[0], s, 192, 48).dur_us.tolist() == pytest.approx([20.0])


def _comm_graph(tokens, stall_us, model_us=95.0):
    """An all-to-all whose in-situ time is the comm model's model_us plus stall_us (as
    simulator.validate.note_insitu_comm records it), after one linear op."""
    rows = [dict(id=0, name="aten::linear", label="L0/mlp0", start_us=0.0, dur_us=10.0 + tokens),
            dict(id=1, kind="host", name="c10d::alltoall_base_", label="L0/dispatch", start_us=20.0 + tokens, dur_us=1.0),
            dict(id=2, lane="cpu:gloo", kind="comm", name="gloo:all_to_all", label="L0/dispatch", coll="all_to_all",
                 start_us=20.5 + tokens, dur_us=model_us + stall_us, coll_bytes=1000.0 * tokens, deps=[1])]
    g = step_graph(_table(rows))
    comm = np.array([k == "comm" for k in g.kind])
    g.notes["comm_insitu_us"] = np.where(comm, model_us + stall_us, 0.0)
    g.notes["comm_model_ref_us"] = np.where(comm, model_us, 0.0)
    return g


def test_comm_stall_beyond_the_model_follows_the_references():
    """A local copy the model calls 95 µs whatever the size takes 95 + 100 + 2·tokens µs in
    situ: the excess moves along the group's curve through the references (it was carried
    as a constant, so a larger size replayed too short). A collective faster than the model
    keeps its note; references without notes leave it alone."""
    copy = lambda t: 100 + 2 * t  # noqa: E731
    base, small, large = _comm_graph(96, copy(96)), _comm_graph(32, copy(32)), _comm_graph(384, copy(384))
    s = fit_scaling(base, [([base], 96, 48), ([small], 32, 32), ([large], 384, 96)])
    i = base.kind.index("comm")
    for tokens in (256, 64, 512):
        out = apply_scaling(base, s, tokens, 32)
        assert out.notes["comm_insitu_us"][i] == pytest.approx(95 + copy(tokens))
        assert out.coll_bytes[i] == pytest.approx(1000.0 * tokens)
    assert base.notes["comm_insitu_us"][i] == pytest.approx(95 + copy(96))  # the base graph is not touched
    fast = _comm_graph(96, -45.0)  # 50 µs in situ, the model says 95: not a stall
    s = fit_scaling(fast, [([fast], 96, 48), ([_comm_graph(384, -45.0)], 384, 96)])
    assert apply_scaling(fast, s, 256, 32).notes["comm_insitu_us"][i] == pytest.approx(50.0)
    bare = step_graph(_table([dict(id=0, name="aten::linear", label="L0/mlp0", dur_us=10.0)]))
    assert fit_scaling(base, [([base], 96, 48), ([bare], 384, 96)]).stall_ratio is None
