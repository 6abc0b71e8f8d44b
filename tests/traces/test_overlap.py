"""compute_metrics and its interval core against closed-form answers and a brute-force grid."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from traces.overlap import compute_metrics, intersection_length, union_intervals, union_length
from traces.schema import make_ops


def _grid_length(intervals, resolution=1):
    """Slow reference: count unit cells covered (integer endpoints)."""
    covered = set()
    for s, e in intervals:
        covered.update(range(s * resolution, e * resolution))
    return covered


intervals_st = st.lists(
    st.tuples(st.integers(0, 60), st.integers(0, 20)).map(lambda t: (t[0], t[0] + t[1])), max_size=15
)


@settings(max_examples=200, deadline=None)
@given(intervals_st, intervals_st)
def test_union_and_intersection_match_a_brute_force_grid(a, b):
    a_s = np.array([s for s, _ in a], dtype=float)
    a_e = np.array([e for _, e in a], dtype=float)
    b_s = np.array([s for s, _ in b], dtype=float)
    b_e = np.array([e for _, e in b], dtype=float)
    assert union_length(a_s, a_e) == len(_grid_length(a))
    assert intersection_length((a_s, a_e), (b_s, b_e)) == len(_grid_length(a) & _grid_length(b))
    s, e = union_intervals(a_s, a_e)
    assert np.all(s[1:] > e[:-1])  # disjoint and sorted


def _table(rows, deps=None):
    """rows: (rank, lane, kind, start, dur, label, step)."""
    n = len(rows)
    return make_ops(
        {
            "id": np.arange(n),
            "rank": [r[0] for r in rows],
            "lane": [r[1] for r in rows],
            "kind": [r[2] for r in rows],
            "name": [f"op{i}" for i in range(n)],
            "start_us": [float(r[3]) for r in rows],
            "dur_us": [float(r[4]) for r in rows],
            "label": [r[5] for r in rows],
            "step": [r[6] for r in rows],
            "deps": deps or [[] for _ in range(n)],
        }
    )


def test_two_ranks_closed_form():
    # rank 0: compute [0,10) + [20,30); comm [5,25) on another lane -> hidden 5+5=10 of 20.
    # rank 1: compute [0,10); comm [10,20) -> nothing hidden. memory [30,40).
    rows = [
        (0, "cuda:0/stream:7", "compute", 0, 10, "L0/attn0", -1),
        (0, "cuda:0/stream:7", "compute", 20, 10, "L0/experts", -1),
        (0, "cuda:0/stream:20", "comm", 5, 20, "L0/dispatch", -1),
        (1, "cuda:1/stream:7", "compute", 0, 10, "L0/attn0", -1),
        (1, "cuda:1/stream:20", "comm", 10, 10, "L0/dispatch", -1),
        (1, "cuda:1/stream:7", "memory", 30, 10, "", -1),
    ]
    m = compute_metrics(_table(rows))
    r0, r1 = m["ranks"]["0"], m["ranks"]["1"]
    assert (r0["compute_us"], r0["comm_us"], r0["hidden_comm_us"], r0["exposed_comm_us"]) == (20, 20, 10, 10)
    assert r0["overlap_pct"] == pytest.approx(50.0)
    assert r0["idle_us"] == pytest.approx(0.0)  # span [0,30) fully busy
    assert (r1["hidden_comm_us"], r1["overlap_pct"], r1["memory_us"]) == (0, 0.0, 10)
    assert r1["idle_us"] == pytest.approx(10.0)  # span [0,40), busy [0,20) + [30,40)
    assert m["overlap_pct_mean"] == pytest.approx(25.0)
    assert m["step_time_us"] == pytest.approx(40.0)  # max over ranks, no step markers
    (label,) = m["labels"]
    assert label["label"] == "L0/dispatch"
    assert label["comm_us"] == pytest.approx(15.0)  # mean of 20 and 10
    assert label["hidden_comm_us"] == pytest.approx(5.0)  # mean of 10 and 0
    # no deps: every compute op on the other lane may run alongside the comm op
    assert label["window_us"] == pytest.approx((20 + 10) / 2)


def test_window_excludes_ancestors_and_descendants():
    # one rank, compute lane a -> b -> c -> d; comm launched after a, waited for by d.
    rows = [
        (0, "cpu:main", "compute", 0, 10, "L1/attn0", -1),  # 0 a: ancestor of comm
        (0, "cpu:main", "compute", 10, 10, "L1/router", -1),  # 1 b: concurrent
        (0, "cpu:main", "compute", 20, 10, "L1/experts", -1),  # 2 c: concurrent
        (0, "cpu:main", "compute", 40, 10, "L1/combine", -1),  # 3 d: descendant (waits comm)
        (0, "cpu:gloo", "comm", 10, 25, "L1/dispatch", -1),  # 4 comm
    ]
    deps = [[], [], [], [4], [0]]
    m = compute_metrics(_table(rows, deps))
    (label,) = m["labels"]
    assert label["window_us"] == pytest.approx(20.0)  # b + c only
    assert label["hidden_comm_us"] == pytest.approx(20.0)  # [10,30) of [10,35)
    assert m["ranks"]["0"]["idle_us"] == pytest.approx(5.0)  # [35,40)


def test_steps_divide_totals_and_ops_outside_steps_are_ignored():
    rows = [
        (0, "cpu:main", "compute", 0, 10, "", 0),
        (0, "cpu:gloo", "comm", 5, 10, "", 0),  # hidden 5 of 10
        (0, "cpu:main", "compute", 100, 30, "", 1),
        (0, "cpu:gloo", "comm", 100, 10, "", 1),  # hidden 10 of 10
        (0, "cpu:main", "compute", 500, 1000, "", -1),  # outside any step
    ]
    m = compute_metrics(_table(rows))
    assert m["n_steps"] == 2
    r = m["ranks"]["0"]
    assert r["compute_us"] == pytest.approx(20.0)  # (10 + 30) / 2
    assert r["comm_us"] == pytest.approx(10.0)
    assert r["overlap_pct"] == pytest.approx(75.0)
    assert m["step_time_us"] == pytest.approx((15 + 30) / 2)  # median of two spans
    assert [s["overlap_pct"] for s in m["steps"]] == pytest.approx([50.0, 100.0])


def test_rank_without_comm_has_no_overlap_figure():
    m = compute_metrics(_table([(0, "cpu:main", "compute", 0, 10, "", -1)]))
    assert m["ranks"]["0"]["overlap_pct"] is None
    assert m["overlap_pct_mean"] is None
    assert m["labels"] == []


def test_a_dependency_cycle_from_bad_heuristics_does_not_stop_the_metrics():
    rows = [
        (0, "cpu:main", "compute", 0, 10, "L0/attn0", -1),
        (0, "cpu:gloo", "comm", 5, 10, "L0/dispatch", -1),
    ]
    m = compute_metrics(_table(rows, deps=[[1], [0]]))  # each waits for the other
    assert m["ranks"]["0"]["hidden_comm_us"] == pytest.approx(5.0)
    # the earliest blocked op (attn0) goes first, so the cycle reads as deps [[], [0]]: attn0 is
    # the dispatch's ancestor and leaves it no window (without the deps it would be all 10 µs)
    assert m["labels"][0]["window_us"] == 0.0
    assert compute_metrics(_table(rows))["labels"][0]["window_us"] == pytest.approx(10.0)
