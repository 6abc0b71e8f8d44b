"""Closed-form network checks on tiny topologies, and aggregated vs exact flows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.cluster import get_cluster
from simulator.engine import simulate
from simulator.routing import Router
from tests.simulator.helpers import Ops, cluster_of, link, star, two_hosts

import networkx as nx

MODELS = ["exact", "aggregate"]


def _comm_durs(table) -> dict[int, float]:
    d = table.to_pydict()
    return {i: du for i, k, du in zip(d["id"], d["kind"], d["dur_us"]) if k == "comm"}


@pytest.mark.parametrize("model", MODELS)
def test_one_flow_on_one_link_is_latency_plus_bytes_over_bandwidth(model):
    g = nx.DiGraph()
    g.add_node("gpu0", kind="gpu", rank=0, host=0)
    g.add_node("gpu1", kind="gpu", rank=1, host=0)
    link(g, "gpu0", "gpu1", 10.0, 3.0)  # 10 GB/s, 3 µs
    ops = Ops()
    ops.add(0, "comm", "comm", "send", coll="send", group="0,1", coll_bytes=4e6, seq=0)
    ops.add(1, "comm", "comm", "recv", coll="recv", group="0,1", coll_bytes=4e6, seq=0)
    out = simulate(ops.table(), cluster_of(g), flow_model=model)
    expected = 3.0 + 4e6 / 10e9 * 1e6  # 403 µs
    assert list(_comm_durs(out).values()) == pytest.approx([expected, expected], rel=1e-12)


@pytest.mark.parametrize("model", MODELS)
def test_two_flows_sharing_a_link_each_get_half(model):
    c = star(3, 10.0, 1.0)  # gpu0, gpu1 → sw → gpu2: sw→gpu2 is shared
    ops = Ops()
    b = 1e6
    for sender, seq in ((0, 0), (1, 1)):
        ops.add(sender, "comm", "comm", "send", coll="send", group=f"{sender},2", coll_bytes=b, seq=seq)
        ops.add(2, f"comm{sender}", "comm", "recv", coll="recv", group=f"{sender},2", coll_bytes=b, seq=seq)
    out = simulate(ops.table(), c, flow_model=model)
    alone = b / 10e3  # µs at the full 10 GB/s
    assert list(_comm_durs(out).values()) == pytest.approx([2.0 + 2 * alone] * 4, rel=1e-9)


def test_unequal_flows_sharing_a_link_follow_max_min():
    c = star(3, 10.0, 0.0)
    ops = Ops()
    for sender, b in ((0, 1e6), (1, 2e6)):
        ops.add(sender, "comm", "comm", "send", coll="send", group=f"{sender},2", coll_bytes=b, seq=0)
        ops.add(2, f"comm{sender}", "comm", "recv", coll="recv", group=f"{sender},2", coll_bytes=b, seq=0)
    durs = list(_comm_durs(simulate(ops.table(), c, flow_model="exact")).values())
    # both at 5 GB/s until the small one is done (200 µs), then the big one alone: +100 µs
    assert durs == pytest.approx([200.0, 200.0, 300.0, 300.0], rel=1e-9)


@pytest.mark.parametrize("n", [4, 8])
@pytest.mark.parametrize("model", MODELS)
def test_ring_all_reduce_closed_form(n, model):
    gbps, lat, nbytes = 50.0, 2.0, 8e6
    c = star(n, gbps, lat)
    ops = Ops()
    group = ",".join(map(str, range(n)))
    for r in range(n):
        ops.add(r, "comm", "comm", "ar", coll="all_reduce", group=group, coll_bytes=nbytes, seq=0)
    out = simulate(ops.table(), c, flow_model=model)
    expected = 2 * (n - 1) / n * nbytes / (gbps * 1e3) + 2 * (n - 1) * (2 * lat)  # 2 hops per ring step
    assert list(_comm_durs(out).values()) == pytest.approx([expected] * n, rel=1e-9)


@pytest.mark.parametrize("model", MODELS)
def test_all_to_all_on_a_switch_vs_through_a_bottleneck_nic(model):
    k, per_peer, lat = 2, 1e6, 1.0
    n = 2 * k
    group = ",".join(map(str, range(n)))

    def a2a(cluster):
        ops = Ops()
        for r in range(n):
            ops.add(r, "comm", "comm", "a2a", coll="all_to_all", group=group, coll_bytes=per_peer * n, seq=0)
        return list(_comm_durs(simulate(ops.table(), cluster, flow_model=model)).values())

    # one switch at 100 GB/s: every GPU sends 3 peers' worth over its own link
    on_switch = a2a(star(n, 100.0, lat))
    assert on_switch == pytest.approx([3 * per_peer / 100e3 + 2 * lat] * n, rel=1e-9)
    # two hosts joined by 10 GB/s NICs: each NIC carries k GPUs × k remote peers
    through_nic = a2a(two_hosts(k, 100.0, 10.0, lat))
    expected = k * k * per_peer / 10e3 + 4 * lat  # gpu→sw, nic→leaf, leaf→nic, sw→gpu (sw↔nic 0 µs)
    assert through_nic == pytest.approx([expected] * n, rel=1e-9)


@pytest.mark.parametrize("name", ["h800", "a30-pcie", "cpu-loopback"])
def test_aggregated_link_loads_equal_exact_pair_routes(name):
    c = get_cluster(name, gpus=16)
    router = Router(c)
    rng = np.random.default_rng(1)
    src, dst = np.meshgrid(np.arange(16), np.arange(16), indexing="ij")
    keep = src != dst
    src, dst = src[keep], dst[keep]
    nbytes = rng.uniform(1e3, 1e6, src.size)
    exact, lat_e = router.exact_loads(src, dst, nbytes)
    agg, lat_a = router.aggregate_loads(src, dst, nbytes)
    assert router.can_aggregate
    np.testing.assert_allclose(agg, exact, rtol=1e-12, atol=1e-6)
    assert lat_a == lat_e


@pytest.mark.parametrize("name,coll", [("h800", "all_to_all"), ("a30-pcie", "all_to_all"), ("h800", "all_reduce"),
                                       ("h800", "all_gather")])
def test_aggregated_collectives_within_2pct_of_exact_per_pair_flows(name, coll):
    c = get_cluster(name, gpus=16)
    rng = np.random.default_rng(7)
    n = 16
    group = ",".join(map(str, range(n)))
    ops = Ops()
    for step in range(2):  # two collectives in flight together on each rank's two lanes
        for r in range(n):
            splits = rng.uniform(0.7, 1.3, n) * 2e5 if coll == "all_to_all" else ()
            ops.add(r, f"comm{step}", "comm", coll, coll=coll, group=group, seq=step,
                    coll_bytes=float(np.sum(splits)) if len(splits) else 4e6, splits=splits)
    table = ops.table()
    exact = np.array(list(_comm_durs(simulate(table, c, flow_model="exact")).values()))
    agg = np.array(list(_comm_durs(simulate(table, c, flow_model="aggregate")).values()))
    assert np.max(np.abs(agg - exact) / exact) < 0.02


def test_hierarchical_all_reduce_on_h800_two_nodes():
    c = get_cluster("h800", gpus=16)
    ops = Ops()
    group = ",".join(map(str, range(16)))
    for r in range(16):
        ops.add(r, "comm", "comm", "ar", coll="all_reduce", group=group, coll_bytes=1e6, seq=0)
    durs = list(_comm_durs(simulate(ops.table(), c)).values())
    intra = 7 / 8 * 1e6 / 200e3 + 7 * 1.0  # in-node reduce-scatter (and all-gather): NVLink 200 GB/s, 1 µs/step
    inter = 2 * (1 / 2) * (1e6 / 8) / 50e3 + 2 * 4.0  # per-rail ring over 2 nodes: 50 GB/s NIC, 4 µs/step
    assert durs == pytest.approx([2 * intra + inter] * 16, rel=1e-9)


def test_unreachable_gpu_pair_is_named():
    g = nx.DiGraph()
    for r in range(2):
        g.add_node(f"gpu{r}", kind="gpu", rank=r, host=r)
        g.add_node(f"sw{r}", kind="nvswitch", host=r)
        link(g, f"gpu{r}", f"sw{r}", 10, 1)
    ops = Ops()
    ops.add(0, "comm", "comm", "send", coll="send", group="0,1", coll_bytes=1e3, seq=0)
    ops.add(1, "comm", "comm", "recv", coll="recv", group="0,1", coll_bytes=1e3, seq=0)
    from simulator.errors import SimulationError

    with pytest.raises(SimulationError, match="gpu0 cannot reach gpu1"):
        simulate(ops.table(), cluster_of(g))


def _reference_max_min(flows: list[tuple[int, int, float]], cap: float) -> list[float]:
    """Per-flow max-min fair fluid model by hand: each flow loads its sender's uplink and its
    receiver's downlink (capacity `cap` each); completion time of every flow."""
    left = [b for _, _, b in flows]
    done = [None] * len(flows)
    t = 0.0
    while any(d is None for d in done):
        active = [i for i, d in enumerate(done) if d is None]
        rate = {i: 0.0 for i in active}
        frozen: set[int] = set()
        residual = {}
        for i in active:
            residual[("up", flows[i][0])] = cap
            residual[("down", flows[i][1])] = cap
        while len(frozen) < len(active):
            users = {}
            for i in active:
                if i not in frozen:
                    for link in (("up", flows[i][0]), ("down", flows[i][1])):
                        users.setdefault(link, []).append(i)
            inc = min(residual[link] / len(us) for link, us in users.items())
            for i in active:
                if i not in frozen:
                    rate[i] += inc
            for link, us in users.items():
                residual[link] -= inc * len(us)
            for link, us in users.items():
                if residual[link] <= 1e-9 * cap:
                    frozen.update(us)
        dt = min(left[i] / rate[i] for i in active)
        t += dt
        for i in active:
            left[i] -= rate[i] * dt
            if left[i] <= 1e-9 * flows[i][2]:
                done[i] = t
    return done



@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(1, 50)), min_size=1, max_size=8))
def test_fluid_network_matches_hand_max_min_on_random_flows(raw):
    flows = [(s, d, b * 1e4) for s, d, b in raw if s != d]
    if not flows:
        return
    ops = Ops()
    for k, (s, d, b) in enumerate(flows):
        ops.add(s, f"send{k}", "comm", coll="send", group=f"{s},{d}", coll_bytes=b, seq=k)
        ops.add(d, f"recv{k}", "comm", coll="recv", group=f"{s},{d}", coll_bytes=b, seq=k)
    out = simulate(ops.table(), star(4, 10.0, 0.0), flow_model="exact").to_pydict()
    want = _reference_max_min(flows, 10e3)
    got = [out["dur_us"][2 * k] for k in range(len(flows))]
    assert got == pytest.approx(want, rel=1e-6)
