"""Collectives as phases of point-to-point traffic (the algorithms NCCL/gloo use, simplified).

A `Phase` is a set of (src rank, dst rank, bytes) pairs that move at the same time, repeated
over `steps` sequential rounds; `bytes` is the total over all rounds. Phases of one collective
run one after another. The network model (simulator/network.py) turns a phase into flows:
exact mode runs `steps` rounds of bytes/steps each, aggregated mode one round carrying all the
bytes with `steps` latency terms. For rings both give 2(n-1)/n·B/bw + 2(n-1)·latency.

Algorithms (B = a rank's input bytes, `coll_bytes`; n ranks; H hosts of k ranks each):
    all_to_all       direct: rank i sends splits[i][j] (or B/n) to every j ≠ i; 1 round
    all_reduce       ring: 2(n-1)/n·B per ring link over 2(n-1) rounds. Hierarchical when the
                     group spans H ≥ 2 hosts with k ≥ 2 ranks on each: reduce-scatter in the
                     host, all-reduce of B/k across hosts (one ring per local index, i.e. per
                     rail), all-gather in the host
    reduce_scatter   ring (n-1)/n·B; hierarchical: in-host RS, then cross-host RS of B/k
    all_gather       ring (n-1)·B; hierarchical: cross-host AG of B, then in-host AG of H·B
    broadcast        pipelined chain from the first rank of the group: B per link, n-1 rounds
    send / recv      one pair, 1 round
    barrier          ring of zero bytes over ceil(log2 n) rounds (latency only)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from simulator.errors import SimulationError


def parse_group(text: str) -> tuple[int, ...]:
    """Group column → sorted ranks. "0,1,2,3" (the schema's form); "0-1023" and "0-3,8-11"
    ranges are accepted too, so thousand-rank groups need not be spelled out on every op."""
    ranks: list[int] = []
    for part in text.split(","):
        part = part.strip()
        if "-" in part[1:]:
            lo, hi = part.split("-", 1)
            ranks.extend(range(int(lo), int(hi) + 1))
        else:
            ranks.append(int(part))
    return tuple(sorted(ranks))


@dataclass(frozen=True)
class Phase:
    src: np.ndarray  # int64 [p] global ranks
    dst: np.ndarray  # int64 [p]
    nbytes: np.ndarray  # float64 [p], total over all rounds
    steps: int  # sequential rounds (latency terms)


def _ring_pairs(rings: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    src, dst = [], []
    for ring in rings:
        if len(ring) < 2:
            continue
        for i, r in enumerate(ring):
            src.append(r)
            dst.append(ring[(i + 1) % len(ring)])
    return np.array(src, dtype=np.int64), np.array(dst, dtype=np.int64)


def _ring_phase(rings: list[list[int]], link_bytes: float, steps: int) -> Phase | None:
    src, dst = _ring_pairs(rings)
    if len(src) == 0 or steps <= 0:
        return None
    return Phase(src, dst, np.full(len(src), float(link_bytes)), steps)


def _host_layout(ranks: tuple[int, ...], host_of: np.ndarray | None) -> list[list[int]] | None:
    """Ranks grouped by host when the group spans ≥ 2 hosts with the same k ≥ 2 ranks each."""
    if host_of is None:
        return None
    by_host: dict[int, list[int]] = {}
    for r in ranks:
        by_host.setdefault(int(host_of[r]), []).append(r)
    sizes = {len(v) for v in by_host.values()}
    if len(by_host) < 2 or len(sizes) != 1 or sizes.pop() < 2:
        return None
    return [by_host[h] for h in sorted(by_host)]


def plan_collective(
    coll: str,
    ranks: tuple[int, ...],
    coll_bytes: np.ndarray,
    splits: list[np.ndarray] | None,
    host_of: np.ndarray | None,
    sender: int = -1,
) -> list[Phase]:
    """Phases of one collective over group `ranks` (sorted global ranks).

    coll_bytes[i] / splits[i] belong to ranks[i]; splits[i] has one entry per group member
    (self included, ignored) or is empty for an even split. `host_of[rank]` groups ranks into
    hosts for hierarchical algorithms (None: flat). `sender` is the sending rank of send/recv.
    """
    n = len(ranks)
    if coll in ("send", "recv"):
        if n != 2 or sender not in ranks:
            raise SimulationError(f"{coll} on group {ranks}: needs exactly two ranks and one send op")
        peer = ranks[1] if ranks[0] == sender else ranks[0]
        b = float(coll_bytes[ranks.index(sender)])
        return [Phase(np.array([sender]), np.array([peer]), np.array([max(b, 0.0)]), 1)]
    if n < 2:
        return []
    if coll == "all_to_all":
        src, dst, nb = [], [], []
        rank_arr = np.array(ranks, dtype=np.int64)
        for i in range(n):
            row = splits[i] if splits is not None and len(splits[i]) else None
            if row is not None and len(row) != n:
                raise SimulationError(
                    f"all_to_all on group {','.join(map(str, ranks))}: rank {ranks[i]} has {len(row)} splits, expected {n}"
                )
            per_peer = row if row is not None else np.full(n, float(coll_bytes[i]) / n)
            mask = per_peer > 0
            mask[i] = False
            src.append(np.full(int(mask.sum()), ranks[i], dtype=np.int64))
            dst.append(rank_arr[mask])
            nb.append(np.asarray(per_peer, dtype=np.float64)[mask])
        s, d, b = np.concatenate(src), np.concatenate(dst), np.concatenate(nb)
        if not len(s):  # nothing to move (unknown sizes): still one round of latency
            s, d = np.repeat(rank_arr, n), np.tile(rank_arr, n)
            keep = s != d
            s, d, b = s[keep], d[keep], np.zeros(int(keep.sum()))
        return [Phase(s, d, b, 1)]
    big = float(np.max(coll_bytes)) if len(coll_bytes) else 0.0
    hosts = _host_layout(ranks, host_of)
    flat = [list(ranks)]
    phases: list[Phase | None]
    if coll == "all_reduce":
        if hosts is None:
            phases = [_ring_phase(flat, 2 * (n - 1) / n * big, 2 * (n - 1))]
        else:
            h, k = len(hosts), len(hosts[0])
            rails = [[hosts[j][i] for j in range(h)] for i in range(k)]
            phases = [
                _ring_phase(hosts, (k - 1) / k * big, k - 1),
                _ring_phase(rails, 2 * (h - 1) / h * big / k, 2 * (h - 1)),
                _ring_phase(hosts, (k - 1) / k * big, k - 1),
            ]
    elif coll == "reduce_scatter":
        if hosts is None:
            phases = [_ring_phase(flat, (n - 1) / n * big, n - 1)]
        else:
            h, k = len(hosts), len(hosts[0])
            rails = [[hosts[j][i] for j in range(h)] for i in range(k)]
            phases = [_ring_phase(hosts, (k - 1) / k * big, k - 1), _ring_phase(rails, (h - 1) / h * big / k, h - 1)]
    elif coll == "all_gather":
        if hosts is None:
            phases = [_ring_phase(flat, (n - 1) * big, n - 1)]
        else:
            h, k = len(hosts), len(hosts[0])
            rails = [[hosts[j][i] for j in range(h)] for i in range(k)]
            phases = [_ring_phase(rails, (h - 1) * big, h - 1), _ring_phase(hosts, (k - 1) * h * big, k - 1)]
    elif coll == "broadcast":
        src = np.array(ranks[:-1], dtype=np.int64)
        dst = np.array(ranks[1:], dtype=np.int64)
        phases = [Phase(src, dst, np.full(n - 1, big), n - 1)] if big > 0 else [Phase(src, dst, np.zeros(n - 1), n - 1)]
    elif coll == "barrier":
        phases = [_ring_phase(flat, 0.0, max(1, math.ceil(math.log2(n))))]
    else:
        raise SimulationError(f"collective {coll!r} on group {','.join(map(str, ranks))}: not modelled")
    return [p for p in phases if p is not None]
