"""Failure reports: why a simulation stopped with ops unfinished.

After `env.run()` drains, every lane still holding ops is blocked either on a dependency or in
a collective's rendezvous. Following "waits for" edges (op → the blocked op of the lane that
would finish its dependency; collective → the blocked ops of the ranks that have not arrived)
from each blocked op must revisit an op: the cycle is reported as a dependency cycle when it
uses only dependency edges, else as a collective deadlock.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from simulator.errors import SimulationError

if TYPE_CHECKING:
    from simulator.engine import Simulation


def explain_stall(sim: "Simulation") -> None:
    """Raise SimulationError explaining why some ops never finished: a dependency cycle (naming an
    op on it) or a collective deadlock (naming the collective, its group and the missing ranks)."""
    end = sim.end
    blocked_at: dict[int, int] = {}  # lane index → first unfinished op
    lane_of: dict[int, int] = {}
    for li, (lo, hi) in enumerate(sim.lane_bounds):
        for i in range(lo, hi):
            lane_of[i] = li
        for i in range(lo, hi):
            if end[i] < 0:
                blocked_at[li] = i
                break
    lane_index = np.zeros(sim.n, dtype=np.int64)
    for li, (lo, hi) in enumerate(sim.lane_bounds):
        lane_index[lo:hi] = li

    def waits_for(i: int) -> list[tuple[int, str]]:
        key = sim.ckey[i]
        if sim.start[i] >= 0 and key is not None:
            rdv = sim.rdv[key]
            arrived = {int(sim.rank[p]) for p in rdv.members}
            out = []
            for p in range(sim.n):
                if sim.ckey[p] == key and int(sim.rank[p]) not in arrived:
                    out.append((blocked_at[int(lane_index[p])], "coll"))
            return out
        for j in sim.deps[i] or ():
            if end[j] < 0:
                return [(blocked_at[int(lane_index[j])], "dep")]
        return []

    # follow wait-for edges from each blocked op until a node repeats
    for start_op in sorted(blocked_at.values()):
        path: list[int] = []
        via: list[str] = []
        seen: dict[int, int] = {}
        i = start_op
        while i not in seen:
            seen[i] = len(path)
            path.append(i)
            nxt = waits_for(i)
            if not nxt:
                break
            i, how = nxt[0]
            via.append(how)
        else:
            cycle = path[seen[i]:]
            cycle_via = via[seen[i]:]
            colls = [p for p in cycle if sim.ckey[p] is not None and sim.start[p] >= 0]
            if "coll" not in cycle_via or not colls:
                p = min(cycle, key=lambda q: sim.ids[q])
                raise SimulationError(
                    f"dependency cycle through op id {int(sim.ids[p])} ({sim._name(p)}, rank {int(sim.rank[p])})"
                )
            p = colls[0]
            gid, seq, coll = sim.ckey[p]
            ranks = sim._group_ranks[gid]
            rdv = sim.rdv[sim.ckey[p]]
            arrived = {int(sim.rank[q]) for q in rdv.members}
            missing = [r for r in ranks if r not in arrived]
            raise SimulationError(
                f"deadlock: collective {coll} on group {','.join(map(str, ranks))} seq {seq} waits for "
                f"rank(s) {','.join(map(str, missing))}, blocked on a cycle through op id {int(sim.ids[p])}"
            )
    i = min(blocked_at.values())
    raise SimulationError(f"simulation stalled at op id {int(sim.ids[i])} ({sim._name(i)}, rank {int(sim.rank[i])})")

