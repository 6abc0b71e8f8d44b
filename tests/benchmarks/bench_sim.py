"""Simulator speed: a synthetic 28-layer MoE decode step on 128, 512 and 1024 ranks.

Per rank and layer: 18 compute ops on the compute stream (attention, router, shared MLPs,
experts; durations from a roofline over flops/bytes, as analytic workloads give them) and two
all-to-alls (dispatch, combine) over all ranks on the comm stream, with the data deps of a
single-batch-overlap schedule: dispatch ∥ mlp0 + attn1, combine ∥ mlp1. 20 ops/layer/rank.

Peer, same run: a bare SimPy model of the same op count, one process per lane, each op waiting
on one pre-created dependency event, a timeout, then triggering its own event.

Each case runs in its own subprocess so peak RSS (ru_maxrss, minus the interpreter + imports
baseline) belongs to it. Prints ops per wall-second (setup + run) and peak memory.

    python3 tests/benchmarks/bench_sim.py [--ranks 128 512 1024] [--layers 28]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

OPS_PER_LAYER = 20


def decode_step(ranks: int, layers: int):
    """The synthetic op table (vectorised; ~20 ops per layer per rank)."""
    import numpy as np

    from traces.schema import make_ops

    # (name, label block, flops, bytes, lane) of one rank's layer, in lane order
    compute = (
        [(f"attn0.{i}", "attn0", 2.0e9, 8e6) for i in range(5)]
        + [("router", "router", 0.2e9, 1e6)]
        + [(f"mlp0.{i}", "mlp0", 4.0e9, 24e6) for i in range(3)]
        + [(f"attn1.{i}", "attn1", 2.0e9, 8e6) for i in range(4)]
        + [("experts", "experts", 12.0e9, 60e6)]
        + [(f"mlp1.{i}", "mlp1", 4.0e9, 24e6) for i in range(3)]
        + [("add", "mlp1", 0.01e9, 2e6)]
    )
    n_comp = len(compute)  # 18
    per_rank = layers * OPS_PER_LAYER
    n = ranks * per_rank
    rank = np.repeat(np.arange(ranks, dtype=np.int32), per_rank)
    # local index within rank: layer * 20 + slot; slots 0..17 compute, 18 dispatch, 19 combine
    local = np.tile(np.arange(per_rank), ranks)
    layer = local // OPS_PER_LAYER
    slot = local % OPS_PER_LAYER
    ids = np.arange(n, dtype=np.int64)
    is_comp = slot < n_comp
    names_c = np.array([c[0] for c in compute] + ["dispatch", "combine"], dtype=object)
    blocks = np.array([c[1] for c in compute] + ["dispatch", "combine"], dtype=object)
    flops = np.array([c[2] for c in compute] + [0.0, 0.0])[slot]
    nbytes = np.array([c[3] for c in compute] + [0.0, 0.0])[slot]
    lane = np.where(is_comp, "cuda:0/stream:7", "cuda:0/stream:20").astype(object)
    # lane order = start order: compute slots keep their order, comm ops sorted by slot
    start = (layer * OPS_PER_LAYER + slot).astype(np.float64)
    label = np.array([f"L{l}/" for l in range(layers)], dtype=object)[layer] + blocks[slot]
    base = rank.astype(np.int64) * per_rank + layer * OPS_PER_LAYER
    deps = [[] for _ in range(n)]
    router_, experts_, mlp0_0 = 5, 13, 6
    for r in range(ranks):
        for l_ in range(layers):
            b = r * per_rank + l_ * OPS_PER_LAYER
            deps[b + 18] = [b + router_]  # dispatch after router
            deps[b + experts_] = [b + 18]  # experts after dispatch
            deps[b + 19] = [b + experts_]  # combine after experts
            if l_ + 1 < layers:
                deps[b + OPS_PER_LAYER] = [b + 19]  # next layer's attention after combine
    del base, mlp0_0
    kind = np.where(is_comp, "compute", "comm").astype(object)
    coll = np.where(is_comp, "", "all_to_all").astype(object)
    group = np.where(is_comp, "", f"0-{ranks - 1}").astype(object)
    tokens = 64  # per rank, top-12 routing of a 7168-dim bf16 hidden state
    coll_bytes = np.where(is_comp, 0.0, tokens * 12 * 7168 * 2.0)
    seq = np.where(is_comp, -1, layer * 2 + (slot - n_comp)).astype(np.int64)
    return make_ops(
        dict(id=ids, rank=rank, lane=lane, kind=kind, name=names_c[slot], label=label, start_us=start,
             dur_us=np.zeros(n), flops=flops, bytes=nbytes, coll=coll, group=group, coll_bytes=coll_bytes,
             seq=seq, step=np.zeros(n, dtype=np.int32), deps=deps)
    )


def bare_simpy(lanes: int, ops_per_lane: int) -> float:
    """Wall seconds for a bare SimPy model: op k of lane l waits for op k-1 of lane l+1."""
    import simpy

    env = simpy.Environment()
    events = [[env.event() for _ in range(ops_per_lane)] for _ in range(lanes)]

    def lane(l):
        mine = events[l]
        dep = events[(l + 1) % lanes]
        for k in range(ops_per_lane):
            if k:
                yield dep[k - 1]
            yield env.timeout(1.0 + (l + k) % 3)
            mine[k].succeed()

    t0, c0 = time.perf_counter(), time.process_time()
    for l in range(lanes):
        env.process(lane(l))
    env.run()
    return time.perf_counter() - t0, time.process_time() - c0


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def one_case(kind: str, ranks: int, layers: int) -> dict:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import numpy  # noqa: F401
    import pyarrow  # noqa: F401
    import simpy  # noqa: F401

    from simulator.cluster import get_cluster
    from simulator.engine import Simulation

    base_mb = _rss_mb()
    n_ops = ranks * layers * OPS_PER_LAYER
    if kind == "bare":
        wall, cpu = bare_simpy(2 * ranks, n_ops // (2 * ranks))
        return {"kind": kind, "ranks": ranks, "ops": n_ops, "wall_s": wall, "ops_per_s": n_ops / wall,
                "ops_per_cpu_s": n_ops / cpu, "peak_mb": _rss_mb() - base_mb}
    t0 = time.perf_counter()
    table = decode_step(ranks, layers)
    build_s = time.perf_counter() - t0
    table_mb = _rss_mb() - base_mb
    cluster = get_cluster("h800", gpus=ranks)
    t0, c0 = time.perf_counter(), time.process_time()
    sim = Simulation(table, cluster)
    setup_s = time.perf_counter() - t0
    out = sim.run()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    step_us = float((out.column("start_us").to_numpy() + out.column("dur_us").to_numpy()).max())
    return {"kind": kind, "ranks": ranks, "ops": n_ops, "collectives": sim.stats.collectives,
            "build_table_s": build_s, "setup_s": setup_s, "wall_s": wall, "ops_per_s": n_ops / wall,
            "ops_per_cpu_s": n_ops / cpu, "table_mb": table_mb, "peak_mb": _rss_mb() - base_mb, "step_us": step_us,
            "network_recomputes": sim.stats.network_recomputes}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ranks", type=int, nargs="+", default=[128, 512, 1024])
    ap.add_argument("--layers", type=int, default=28)
    ap.add_argument("--one", nargs=2, metavar=("KIND", "RANKS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_case(args.one[0], int(args.one[1]), args.layers)))
        return
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}")
    print("ops/s = simulated ops per wall-second (setup + run); cpu: per CPU-second of the process (less load noise)")
    print(f"{'ranks':>6} {'ops':>8} {'colls':>6} {'setup_s':>8} {'wall_s':>7} {'ops/s':>9} {'bare ops/s':>11} "
          f"{'ratio':>6} {'cpu ops/s':>10} {'bare cpu':>9} {'ratio':>6} {'peak_MB':>8} {'table_MB':>8} {'B/op':>6} {'step_us':>9}")
    for ranks in args.ranks:
        res = {}
        for kind in ("bare", "sim"):
            cmd = [sys.executable, os.path.abspath(__file__), "--one", kind, str(ranks), "--layers", str(args.layers)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            res[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
        s, b = res["sim"], res["bare"]
        print(f"{ranks:>6} {s['ops']:>8} {s['collectives']:>6} {s['setup_s']:>8.2f} {s['wall_s']:>7.2f} "
              f"{s['ops_per_s']:>9.0f} {b['ops_per_s']:>11.0f} {s['ops_per_s'] / b['ops_per_s']:>6.2f} "
              f"{s['ops_per_cpu_s']:>10.0f} {b['ops_per_cpu_s']:>9.0f} {s['ops_per_cpu_s'] / b['ops_per_cpu_s']:>6.2f} "
              f"{s['peak_mb']:>8.0f} {s['table_mb']:>8.0f} {s['peak_mb'] * 2**20 / s['ops']:>6.0f} {s['step_us']:>9.1f}")


if __name__ == "__main__":
    main()
