"""Tiny hand-built topologies and op tables for the simulator tests."""

from __future__ import annotations

import networkx as nx

from simulator.cluster import Cluster, GpuSpec
from traces.schema import make_ops

SPEC = GpuSpec("test-gpu", 100e12, 200e12, 1e12, 1e9, 100)


def link(g: nx.DiGraph, a: str, b: str, gbps: float, lat_us: float) -> None:
    g.add_edge(a, b, bandwidth_gbps=gbps, latency_us=lat_us)
    g.add_edge(b, a, bandwidth_gbps=gbps, latency_us=lat_us)


def cluster_of(g: nx.DiGraph, name: str = "test", **kw) -> Cluster:
    return Cluster(name=name, gpu=SPEC, graph=g, gpus_per_node=kw.pop("gpus_per_node", 8), comm_sms=kw.pop("comm_sms", 0), **kw)


def star(n: int, gbps: float, lat_us: float) -> Cluster:
    """n GPUs on one switch, every GPU link `gbps` per direction, `lat_us` per hop."""
    g = nx.DiGraph()
    g.add_node("sw", kind="nvswitch", host=0)
    for r in range(n):
        g.add_node(f"gpu{r}", kind="gpu", rank=r, host=0)
        link(g, f"gpu{r}", "sw", gbps, lat_us)
    return cluster_of(g)


def two_hosts(k: int, switch_gbps: float, nic_gbps: float, lat_us: float) -> Cluster:
    """Two hosts of k GPUs on a host switch each; hosts joined by one NIC each on a leaf."""
    g = nx.DiGraph()
    g.add_node("leaf0", kind="leaf")
    for h in range(2):
        g.add_node(f"sw{h}", kind="nvswitch", host=h)
        g.add_node(f"nic{h}", kind="nic", host=h)
        link(g, f"sw{h}", f"nic{h}", 1e6, 0.0)  # ample: the NIC→leaf link is the bottleneck
        link(g, f"nic{h}", "leaf0", nic_gbps, lat_us)
        for j in range(k):
            r = h * k + j
            g.add_node(f"gpu{r}", kind="gpu", rank=r, host=h)
            link(g, f"gpu{r}", f"sw{h}", switch_gbps, lat_us)
    return cluster_of(g, gpus_per_node=k)


class Ops:
    """Append ops, then `.table()`."""

    def __init__(self) -> None:
        self.cols: dict[str, list] = {k: [] for k in (
            "id", "rank", "lane", "kind", "name", "label", "start_us", "dur_us", "flops", "bytes",
            "coll", "group", "coll_bytes", "splits", "seq", "step", "deps")}

    def add(self, rank: int, lane: str, kind: str = "compute", name: str = "op", dur: float = 0.0, *,
            start: float = 0.0, coll: str = "", group: str = "", coll_bytes: float = 0.0, splits=(),
            seq: int = -1, deps=(), flops: float = 0.0, nbytes: float = 0.0, label: str = "", step: int = -1) -> int:
        op_id = len(self.cols["id"])
        row = dict(id=op_id, rank=rank, lane=lane, kind=kind, name=name, label=label, start_us=start, dur_us=dur,
                   flops=flops, bytes=nbytes, coll=coll, group=group, coll_bytes=coll_bytes, splits=list(splits),
                   seq=seq, step=step, deps=list(deps))
        for k, v in row.items():
            self.cols[k].append(v)
        return op_id

    def table(self):
        return make_ops(self.cols)
