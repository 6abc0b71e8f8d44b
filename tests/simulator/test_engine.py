"""Engine semantics: lanes and deps, determinism, interference, and the failure reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.cluster import get_cluster
from simulator.engine import DEFAULT_EFFICIENCY, simulate
from simulator.errors import SimulationError
from tests.simulator.helpers import Ops, star
from traces.overlap import compute_metrics


def _by_id(table) -> dict[int, tuple[float, float]]:
    d = table.to_pydict()
    return {i: (s, du) for i, s, du in zip(d["id"], d["start_us"], d["dur_us"])}


def test_lane_order_and_cross_lane_deps():
    ops = Ops()
    a = ops.add(0, "s7", dur=10.0)
    b = ops.add(0, "s7", dur=5.0, start=1)
    c = ops.add(0, "s20", dur=3.0, deps=[b])  # waits for b on the other lane
    d = ops.add(0, "s20", dur=1.0, start=1)
    t = _by_id(simulate(ops.table(), star(2, 10, 1)))
    assert t[a] == (0.0, 10.0) and t[b] == (10.0, 5.0)
    assert t[c] == (15.0, 3.0) and t[d] == (18.0, 1.0)


def test_roofline_and_pluggable_compute_time():
    c = star(2, 10, 1)
    ops = Ops()
    ops.add(0, "s7", flops=1e12)  # 1e12 / 100e12 FLOP/s = 10 ms at peak
    ops.add(0, "s7", nbytes=1e9, start=1)  # 1e9 / 1e12 B/s = 1 ms at peak
    t = _by_id(simulate(ops.table(), c))
    assert t[0][1] == pytest.approx(1e4 / DEFAULT_EFFICIENCY)
    assert t[1][1] == pytest.approx(1e3 / DEFAULT_EFFICIENCY)
    t = _by_id(simulate(ops.table(), c, compute_time=lambda o, cl: np.array([7.0, 8.0])))
    assert t[0][1] == 7.0 and t[1] == (7.0, 8.0)


def _decode_like(n: int, layers: int, rng: np.random.Generator) -> Ops:
    ops = Ops()
    group = ",".join(map(str, range(n)))
    for r in range(n):
        prev = None
        for layer in range(layers):
            attn = ops.add(r, "s7", dur=float(rng.uniform(20, 40)), start=layer * 10 + 1, deps=[prev] if prev is not None else [],
                           label=f"L{layer}/attn0")
            disp = ops.add(r, "s20", "comm", "dispatch", coll="all_to_all", group=group, seq=2 * layer,
                           coll_bytes=1e6, splits=rng.uniform(0.5, 1.5, n) * 1e6 / n, deps=[attn], start=layer * 10 + 2,
                           label=f"L{layer}/dispatch")
            mlp = ops.add(r, "s7", flops=float(rng.uniform(1, 3)) * 1e10, start=layer * 10 + 3, label=f"L{layer}/mlp0")
            ops.add(r, "s7", flops=float(rng.uniform(1, 3)) * 1e10, start=layer * 10 + 3.5, label=f"L{layer}/attn1")
            exp = ops.add(r, "s7", flops=2e10, start=layer * 10 + 4, deps=[disp], label=f"L{layer}/experts")
            prev = ops.add(r, "s20", "comm", "combine", coll="all_to_all", group=group, seq=2 * layer + 1,
                           coll_bytes=1e6, deps=[exp], start=layer * 10 + 5, label=f"L{layer}/combine")
            del mlp
    return ops


def test_deterministic_byte_identical_metrics():
    c = get_cluster("h800", gpus=16)
    table = _decode_like(16, 3, np.random.default_rng(3)).table()
    runs = [json.dumps(compute_metrics(simulate(table, c, seed=5)), sort_keys=True) for _ in range(2)]
    assert runs[0] == runs[1]


def test_fused_runs_equal_one_event_per_op():
    c = get_cluster("h800", gpus=16)
    table = _decode_like(16, 3, np.random.default_rng(4)).table()
    fused = simulate(table, c)
    single = simulate(table, c, fuse=False)
    for col in ("start_us", "dur_us"):
        np.testing.assert_allclose(fused.column(col).to_numpy(), single.column(col).to_numpy(), rtol=1e-12, atol=1e-9)


def test_gpu_comm_slows_concurrent_model_compute_by_the_sm_share():
    c = get_cluster("h800", gpus=8)  # 20 of 132 SMs per comm kernel
    share = 20 / 132
    ops = Ops()
    group = ",".join(map(str, range(8)))
    for r in range(8):
        ops.add(r, "s7", flops=1e12 * DEFAULT_EFFICIENCY * 989.4e12 / 1e12 * 1e-4)  # 100 µs alone
        ops.add(r, "s20", "comm", coll="all_to_all", group=group, coll_bytes=8 * 2.5e6, seq=0)
    t = _by_id(simulate(ops.table(), c))
    comm_us = t[1][1]
    assert 0 < comm_us < 100
    expected = comm_us + (100.0 - comm_us * (1 - share))
    assert t[0][1] == pytest.approx(expected, rel=1e-9)
    # measured durations are not slowed again
    ops2 = Ops()
    for r in range(8):
        ops2.add(r, "s7", dur=100.0)
        ops2.add(r, "s20", "comm", coll="all_to_all", group=group, coll_bytes=8 * 2.5e6, seq=0)
    assert _by_id(simulate(ops2.table(), c))[0][1] == 100.0


def test_cpu_processor_sharing():
    c = get_cluster("cpu-loopback", gpus=3, cores=2)
    ops = Ops()
    for r in range(3):
        ops.add(r, "main", flops=50e9 * DEFAULT_EFFICIENCY * 1e-4)  # 100 µs of one core
    t = _by_id(simulate(ops.table(), c))
    # three jobs on two cores: each runs at 2/3 speed → 150 µs
    assert [t[i][1] for i in range(3)] == pytest.approx([150.0] * 3)


def test_timed_transfer_under_compute_shares_the_cores():
    # Two ranks on two cores. Each computes 60 µs (a measured duration: not slowed) while a
    # collective timed at 100 µs (idle speed) is in flight: 2 compute + 2 transfer jobs on 2
    # cores, a share of 0.5 until the compute ends, then the cores are free again.
    c = get_cluster("cpu-loopback", gpus=2, cores=2)
    ops = Ops()
    for r in range(2):
        ops.add(r, "main", dur=60.0)
        ops.add(r, "comm", "comm", coll="all_to_all", group="0,1", coll_bytes=1.0, seq=0, dur=100.0)
    table = ops.table()
    for exponent, end in [(0.0, 100.0), (1.0, 60.0 + (100.0 - 60.0 * 0.5)), (2.0, 60.0 + (100.0 - 60.0 * 0.25))]:
        t = _by_id(simulate(table, c, comm_from_trace=True, comm_load_exponent=exponent))
        assert t[0] == (0.0, 60.0) and t[2] == (0.0, 60.0)
        assert t[1][1] == pytest.approx(end) and t[3][1] == pytest.approx(end)
    # one rank computing: 3 jobs on 2 cores, a share of 2/3
    ops = Ops()
    ops.add(0, "main", dur=60.0)
    for r in range(2):
        ops.add(r, "comm", "comm", coll="all_to_all", group="0,1", coll_bytes=1.0, seq=0, dur=100.0)
    t = _by_id(simulate(ops.table(), c, comm_from_trace=True, comm_load_exponent=1.0))
    assert t[1][1] == pytest.approx(60.0 + (100.0 - 60.0 * 2 / 3))
    with pytest.raises(SimulationError, match="comm_load_exponent"):
        simulate(table, c, comm_from_trace=True, comm_load_exponent=-1.0)
    # an exponent per payload: the 1-byte transfer above gets 2, so the closed form for 2
    t = _by_id(simulate(table, c, comm_from_trace=True, comm_load_exponent=lambda b: 2.0 if b < 10 else 0.0))
    assert t[1][1] == pytest.approx(60.0 + (100.0 - 60.0 * 0.25))


def test_a_timed_transfer_under_compute_waits_the_calibrated_delay():
    # Two ranks on two cores, each computing (measured, not slowed) beside a 2-rank collective
    # of 100 µs at idle speed; a delay of 200 µs per runnable job beyond one per core. 4 jobs
    # on 2 cores: 1 / share − 1 = 1, so the transfer runs at 100 / (100 + 200) = 1/3 while
    # both ranks compute, at full speed after.
    c = get_cluster("cpu-loopback", gpus=2, cores=2)

    def comm_end(compute_us, ranks_computing=2, **kw):
        ops = Ops()
        for r in range(ranks_computing):
            ops.add(r, "main", dur=compute_us)
        for r in range(2):
            ops.add(r, "comm", "comm", coll="all_to_all", group="0,1", coll_bytes=1.0, seq=0, dur=100.0)
        t = simulate(ops.table(), c, comm_from_trace=True, **kw)
        comm = np.asarray(t.column("kind").to_pylist()) == "comm"
        return float((t.column("start_us").to_numpy() + t.column("dur_us").to_numpy())[comm].max())

    delay = {"comm_load_delay_us": lambda b: 200.0}
    # loaded throughout: the delay is added, whatever the exponent says
    assert comm_end(1000.0, **delay) == pytest.approx(300.0)
    assert comm_end(1000.0, comm_load_exponent=2.0, **delay) == pytest.approx(300.0)
    # loaded for the first 60 µs: 20 µs of progress, the other 80 at full speed
    assert comm_end(60.0, **delay) == pytest.approx(60.0 + 80.0)
    # one rank computing: 3 jobs, 1 / share − 1 = 1/2 → 100 / (100 + 100), 200 µs loaded throughout
    assert comm_end(1000.0, ranks_computing=1, **delay) == pytest.approx(200.0)
    # a delay of 0: no slowdown even with an exponent; no compute: no slowdown
    assert comm_end(1000.0, comm_load_exponent=2.0, comm_load_delay_us=lambda b: 0.0) == pytest.approx(100.0)
    assert comm_end(1000.0, ranks_computing=0, **delay) == pytest.approx(100.0)
    with pytest.raises(SimulationError, match="comm_load_delay_us: expected a finite delay ≥ 0 at 1 bytes, got -1.0"):
        comm_end(10.0, comm_load_delay_us=lambda b: -1.0)


def _stall_run(compute_us, stall, seed=0, **kw):
    """Two ranks on two cores: rank r computes compute_us[r] µs (measured) on its host lane
    beside a 2-rank collective of 100 µs at idle speed issued at 0 on its comm lane.
    Returns the collective's end and its two ops' starts."""
    c = get_cluster("cpu-loopback", gpus=2, cores=2)
    ops = Ops()
    for r, us in enumerate(compute_us):
        if us:
            ops.add(r, "main", dur=us)
    for r in range(2):
        ops.add(r, "comm", "comm", coll="all_to_all", group="0,1", coll_bytes=1.0, seq=0, dur=100.0)
    t = simulate(ops.table(), c, comm_from_trace=True, comm_load_stall=stall, seed=seed, **kw)
    comm = np.asarray(t.column("kind").to_pylist()) == "comm"
    start = t.column("start_us").to_numpy()[comm]
    return float((start + t.column("dur_us").to_numpy()[comm]).max()), sorted(start.tolist())


def test_a_timed_transfer_stalls_until_a_core_frees():
    always = lambda b: (1.0, 5000.0)  # noqa: E731
    # both cores busy (ranks computing 300 and 500 µs): stalled until rank 0 stops at 300,
    # then 100 µs at idle speed; one rank's op starts where the stall ended, the other's at 0
    assert _stall_run((300.0, 500.0), always) == (pytest.approx(400.0), [0.0, pytest.approx(300.0)])
    # after the stall the load exponent applies as without it: rank 1 still computes, so
    # 1 compute + 2 transfer jobs on 2 cores, speed 2/3 at exponent 1 → 150 µs
    assert _stall_run((300.0, 500.0), always, comm_load_exponent=1.0)[0] == pytest.approx(450.0)
    # the longest stall passes first
    assert _stall_run((300.0, 500.0), lambda b: (1.0, 200.0))[0] == pytest.approx(300.0)
    # never stalls at probability 0 or a longest stall of 0, nor with a core free at the start
    assert _stall_run((300.0, 500.0), lambda b: (0.0, 5000.0)) == (pytest.approx(100.0), [0.0, 0.0])
    assert _stall_run((300.0, 500.0), lambda b: (1.0, 0.0))[0] == pytest.approx(100.0)
    assert _stall_run((300.0, 0.0), always)[0] == pytest.approx(100.0)
    # at probability 0.3 about 30 % of seeds stall (binomial sd over 200: 6.5); a seed gives
    # the same answer every time
    ends = [_stall_run((300.0, 500.0), lambda b: (0.3, 5000.0), seed=s)[0] for s in range(200)]
    assert set(np.round(ends, 6)) == {100.0, 400.0}
    assert 40 <= sum(abs(e - 400.0) < 1e-6 for e in ends) <= 80
    half = lambda b: (0.5, 5000.0)  # noqa: E731
    assert _stall_run((300.0, 500.0), half, seed=7) == _stall_run((300.0, 500.0), half, seed=7)
    with pytest.raises(SimulationError, match=r"comm_load_stall: expected a probability in \[0, 1\] and a finite stall ≥ 0 µs at 1 bytes, got 1.5, 10.0"):
        _stall_run((300.0, 500.0), lambda b: (1.5, 10.0))


def test_compute_beside_a_timed_transfer_gets_the_cores_it_leaves():
    # Two ranks on two cores, each computing 1000 µs of modelled work (dur 0: the engine may
    # slow it) beside a 2-rank collective of 100 µs at idle speed: 4 jobs, a share of 0.5.
    c = get_cluster("cpu-loopback", gpus=2, cores=2)
    ops = Ops()
    for r in range(2):
        ops.add(r, "main", dur=0.0)
        ops.add(r, "comm", "comm", coll="all_to_all", group="0,1", coll_bytes=1.0, seq=0, dur=100.0)
    table = ops.table()
    work = lambda t, _c: np.where(np.asarray(t.column("kind").to_pylist()) == "comm", 100.0, 1000.0)  # noqa: E731

    def ends(**kw):
        t = _by_id(simulate(table, c, comm_from_trace=True, compute_time=work, **kw))
        return t[0][1], t[1][1]

    # exponent 1, no core use: plain processor sharing, all at 0.5 → transfer 200 µs, compute
    # 1000 − 200 · 0.5 = 900 µs of work left after it
    assert ends(comm_load_exponent=1.0) == pytest.approx((200.0 + 900.0, 200.0))
    # exponent 2: the transfer progresses at 0.25 (400 µs) and so uses 0.25 of a core per
    # rank: compute gets (2 − 2 · 0.25) / 2 = 0.75 → 1000 − 300 left after 400 µs
    assert ends(comm_load_exponent=2.0) == pytest.approx((400.0 + 700.0, 400.0))
    # a calibrated core use of 0.1 per rank: compute at (2 − 0.2) / 2 = 0.9 while in flight
    assert ends(comm_load_exponent=2.0, comm_core_use=lambda b: 0.1) == pytest.approx((400.0 + 640.0, 400.0))
    # a core use of 0: compute at full speed
    assert ends(comm_load_exponent=2.0, comm_core_use=lambda b: 0.0) == pytest.approx((1000.0, 400.0))
    # a measured duration (dur > 0) is never slowed, whatever the transfer takes
    ops = Ops()
    for r in range(2):
        ops.add(r, "main", dur=1000.0)
        ops.add(r, "comm", "comm", coll="all_to_all", group="0,1", coll_bytes=1.0, seq=0, dur=100.0)
    t = _by_id(simulate(ops.table(), c, comm_from_trace=True, comm_load_exponent=2.0, comm_core_use=lambda b: 0.5))
    assert (t[0][1], t[1][1]) == pytest.approx((1000.0, 400.0))


def test_a_rank_tail_holds_only_that_rank_after_the_collective():
    # Rank 1 arrives 20 µs late at a 30 µs all-to-all; rank 0 keeps a 15 µs tail: its comm op
    # ends 15 µs after the collective's end and its next op waits for it, rank 1 goes on at once.
    c = get_cluster("cpu-loopback", gpus=2, cores=2)
    ops = Ops()
    ops.add(0, "main", dur=10.0)
    ops.add(1, "main", dur=30.0)
    coll = [ops.add(r, "main", "comm", coll="all_to_all", group="0,1", coll_bytes=1.0, seq=0, dur=30.0, start=1)
            for r in range(2)]
    after = [ops.add(r, "main", dur=5.0, start=2) for r in range(2)]
    table = ops.table()
    tail = np.zeros(table.num_rows)
    tail[coll[0]] = 15.0
    t = _by_id(simulate(table, c, comm_from_trace=True, comm_tail_us=tail))
    assert t[coll[1]] == (30.0, 30.0) and t[after[1]][0] == 60.0
    assert t[coll[0]] == (10.0, 20.0 + 30.0 + 15.0) and t[after[0]][0] == 75.0
    # no tails: both released at the collective's end
    t = _by_id(simulate(table, c, comm_from_trace=True))
    assert t[after[0]][0] == t[after[1]][0] == 60.0
    with pytest.raises(SimulationError, match="comm_tail_us"):
        simulate(table, c, comm_from_trace=True, comm_tail_us=-tail)


def test_collective_never_reached_names_group_and_missing_rank():
    ops = Ops()
    ops.add(0, "s20", "comm", coll="all_reduce", group="0,1,2", coll_bytes=1e3, seq=4)
    ops.add(2, "s20", "comm", coll="all_reduce", group="0,1,2", coll_bytes=1e3, seq=4)
    with pytest.raises(SimulationError, match=r"all_reduce on group 0,1,2 seq 4 is never reached by rank\(s\) 1"):
        simulate(ops.table(), star(3, 10, 1))


def test_lock_step_ordering_deadlock_is_reported_not_hung():
    ops = Ops()
    ops.add(0, "s20", "comm", coll="all_reduce", group="0,1", coll_bytes=1e3, seq=0)
    ops.add(0, "s20", "comm", coll="all_gather", group="0,1", coll_bytes=1e3, seq=1, start=1)
    ops.add(1, "s20", "comm", coll="all_gather", group="0,1", coll_bytes=1e3, seq=1)
    ops.add(1, "s20", "comm", coll="all_reduce", group="0,1", coll_bytes=1e3, seq=0, start=1)
    with pytest.raises(SimulationError, match=r"deadlock: collective all_\w+ on group 0,1 seq \d waits for rank\(s\) [01]"):
        simulate(ops.table(), star(2, 10, 1))


def test_dependency_cycle_names_an_op_on_it():
    ops = Ops()
    ops.add(0, "a", dur=1.0)
    ops.add(0, "a", dur=1.0, start=1, deps=[3])
    ops.add(0, "b", dur=1.0)
    ops.add(0, "b", dur=1.0, start=1, deps=[1])
    ops.add(0, "c", dur=1.0)  # unrelated, finishes
    with pytest.raises(SimulationError, match=r"dependency cycle through op id [13]"):
        simulate(ops.table(), star(2, 10, 1))


def test_unknown_dep_and_rank_beyond_cluster():
    ops = Ops()
    ops.add(0, "a", dur=1.0, deps=[99])
    with pytest.raises(SimulationError, match="unknown op id 99"):
        simulate(ops.table(), star(2, 10, 1))
    ops = Ops()
    ops.add(5, "a", dur=1.0)
    with pytest.raises(SimulationError, match="rank 5 but cluster test has 2 GPUs"):
        simulate(ops.table(), star(2, 10, 1))


def _reference_schedule(lanes: list[list[int]], deps: dict[int, list[int]], dur: dict[int, float]) -> dict[int, float]:
    """Obviously-correct start times: repeatedly start any lane head whose deps are done."""
    end: dict[int, float] = {}
    start: dict[int, float] = {}
    heads = [0] * len(lanes)
    lane_free = [0.0] * len(lanes)
    progress = True
    while progress:
        progress = False
        for li, lane in enumerate(lanes):
            if heads[li] < len(lane):
                op = lane[heads[li]]
                if all(d in end for d in deps.get(op, [])):
                    start[op] = max([lane_free[li]] + [end[d] for d in deps.get(op, [])])
                    end[op] = lane_free[li] = start[op] + dur[op]
                    heads[li] += 1
                    progress = True
    return start



@settings(max_examples=40, deadline=None)
@given(st.data())
def test_engine_matches_a_reference_scheduler_on_random_graphs(data):
    n_lanes = data.draw(st.integers(1, 4))
    n_ops = data.draw(st.integers(1, 16))
    lane_of = [data.draw(st.integers(0, n_lanes - 1)) for _ in range(n_ops)]
    dur = {i: float(data.draw(st.integers(0, 20))) for i in range(n_ops)}
    deps = {}
    for i in range(n_ops):  # deps only on earlier ops: acyclic
        if i and data.draw(st.booleans()):
            deps[i] = sorted(set(data.draw(st.lists(st.integers(0, i - 1), max_size=2))))
    ops = Ops()
    for i in range(n_ops):
        ops.add(0, f"lane{lane_of[i]}", dur=dur[i], start=float(i), deps=deps.get(i, []))
    lanes = [[i for i in range(n_ops) if lane_of[i] == li] for li in range(n_lanes)]
    want = _reference_schedule(lanes, deps, dur)
    for fuse in (True, False):
        got = _by_id(simulate(ops.table(), star(2, 10, 1), fuse=fuse))
        assert {i: got[i][0] for i in range(n_ops)} == pytest.approx(want)


def test_comm_kernel_without_collective_args_keeps_its_duration_and_slows_compute():
    c = get_cluster("h800", gpus=8)
    share = 20 / 132
    ops = Ops()
    ops.add(0, "s7", flops=0.6 * 989.4e12 * 1e-4)  # 100 µs alone
    ops.add(0, "s20", "comm", "dpsk::ep::dispatch", dur=40.0)
    t = _by_id(simulate(ops.table(), c))
    assert t[1] == (0.0, 40.0)
    assert t[0][1] == pytest.approx(40.0 + (100.0 - 40.0 * (1 - share)))


def test_comm_from_trace_without_tails_ends_every_rank_after_the_shortest_duration():
    ops = Ops()
    a = ops.add(0, "main", dur=10.0)
    ops.add(0, "comm", "comm", coll="all_reduce", group="0,1", coll_bytes=1.0, seq=0, dur=7.0, deps=[a], start=1)
    b = ops.add(1, "main", dur=30.0)
    ops.add(1, "comm", "comm", coll="all_reduce", group="0,1", coll_bytes=1.0, seq=0, dur=7.0, deps=[b], start=1)
    t = _by_id(simulate(ops.table(), star(2, 10, 1), comm_from_trace=True))
    assert t[1] == (10.0, 27.0) and t[3] == (30.0, 7.0)  # both end at the last arrival + 7
