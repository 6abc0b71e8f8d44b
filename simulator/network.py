"""Fluid network: flows share link bandwidth, max-min fair, rates recomputed only on change.

A flow is a vector of bytes per link (`loads`) moved at a common pace: a flow with rate x
(fraction of its bytes per µs) uses x·loads[l] bytes/µs of link l. Exact mode has one flow per
GPU pair (its ECMP paths as fractional loads); aggregated mode has one flow per collective
phase, carrying the whole phase's link loads (a "coflow").

Sharing model (weighted max-min fairness, progressive filling): each flow f has a standalone
time T_f = max_l loads[l] / cap[l]; all unfrozen flows run at x_f = θ / T_f while θ rises from
0; when a link saturates, every flow crossing it freezes at the current θ; repeat with the
rest. Two flows whose standalone bottleneck is the same link (e.g. two equal sends over one
link) therefore get equal shares: each half. Flows with different standalone rates slow by
the same factor on a shared bottleneck (not equal bytes/s, as per-flow max-min would give).

Limits: no packets, no congestion control, no head-of-line blocking or incast loss; ECMP is an
even split; links are full duplex and independent per direction; switches have no internal
limit. Rates are recomputed once per batch of arrivals/departures at one instant (one
zero-delay event), and the next completion is a single pending timeout: no per-byte events.
"""

from __future__ import annotations

import numpy as np
import simpy


class Flow:
    __slots__ = ("links", "loads", "standalone_us", "remaining", "rate", "group")

    def __init__(self, links: np.ndarray, loads: np.ndarray, standalone_us: float, group: "_Group"):
        self.links = links
        self.loads = loads
        self.standalone_us = standalone_us
        self.remaining = 1.0  # fraction of its bytes still to move
        self.rate = 0.0  # fraction per µs
        self.group = group


class _Group:
    __slots__ = ("event", "left")

    def __init__(self, event: simpy.Event, left: int):
        self.event = event
        self.left = left


_DONE_EPS = 1e-9


class FluidNetwork:
    """All flows in flight on a cluster's links."""

    def __init__(self, env: simpy.Environment, cap_bytes_per_us: np.ndarray):
        self.env = env
        self.cap = np.asarray(cap_bytes_per_us, dtype=np.float64)
        self.scale = 1.0  # multiplies every capacity (CPU clusters: the comm threads' core share)
        self.flows: list[Flow] = []
        self.t_last = 0.0
        self._version = 0
        self._pending = False
        self.recomputes = 0

    def transfer(self, flows: list[tuple[np.ndarray, np.ndarray]]) -> simpy.Event:
        """Start flows given as (link ids, bytes per link); the event fires when all are done."""
        event = self.env.event()
        flows = [(li, ld) for li, ld in flows if len(li) and ld.max() > 0]
        if not flows:
            event.succeed()
            return event
        group = _Group(event, len(flows))
        self._advance()
        for links, loads in flows:
            t = float(np.max(loads / self.cap[links]))
            self.flows.append(Flow(links, loads, t, group))
        self._request()
        return event

    def set_scale(self, scale: float) -> None:
        if scale != self.scale:
            self._advance()
            self.scale = scale
            if self.flows:
                self._request()

    # --- internals --------------------------------------------------------------------------

    def _request(self) -> None:
        """Recompute once at this instant, after every arrival scheduled for it so far."""
        if not self._pending:
            self._pending = True
            ev = self.env.timeout(0)
            ev.callbacks.append(self._on_recompute)

    def _on_recompute(self, _event: simpy.Event) -> None:
        self._pending = False
        self._update()

    def _on_timer(self, version: int) -> None:
        if version == self._version:
            self._update()

    def _advance(self) -> None:
        dt = self.env.now - self.t_last
        if dt > 0:
            for f in self.flows:
                f.remaining -= f.rate * dt
        self.t_last = self.env.now

    def _update(self) -> None:
        self._advance()
        alive = []
        for f in self.flows:
            if f.remaining * f.standalone_us <= _DONE_EPS or f.remaining <= _DONE_EPS:
                g = f.group
                g.left -= 1
                if g.left == 0:
                    g.event.succeed()
            else:
                alive.append(f)
        self.flows = alive
        self._version += 1
        if not alive:
            return
        self.recomputes += 1
        self._fill(alive)
        dt = min(f.remaining / f.rate for f in alive)
        version = self._version
        ev = self.env.timeout(max(dt, 0.0))
        ev.callbacks.append(lambda _e: self._on_timer(version))

    def _fill(self, flows: list[Flow]) -> None:
        """Progressive filling (see module docstring); sets f.rate for every flow."""
        n = len(flows)
        num_links = len(self.cap)
        if n == 1:
            f = flows[0]
            f.rate = self.scale / f.standalone_us
            return
        lens = np.array([len(f.links) for f in flows])
        links = np.concatenate([f.links for f in flows])
        per_theta = np.concatenate([f.loads / f.standalone_us for f in flows])  # bytes/µs at θ=1
        owner = np.repeat(np.arange(n), lens)
        residual = self.cap * self.scale
        theta = np.zeros(n)
        frozen = np.zeros(n, dtype=bool)
        while not frozen.all():
            live = ~frozen[owner]
            demand = np.bincount(links[live], weights=per_theta[live], minlength=num_links)
            used = demand > 0
            ratio = np.full(num_links, np.inf)
            ratio[used] = np.maximum(residual[used], 0.0) / demand[used]
            th = ratio.min()
            saturated = ratio <= th * (1 + 1e-9) + 1e-15
            newly = np.unique(owner[live & saturated[links]])
            frozen[newly] = True
            theta[newly] = th
            take = np.isin(owner, newly)
            residual = residual - np.bincount(links[take], weights=per_theta[take] * th, minlength=num_links)
        for f, th in zip(flows, theta.tolist()):
            f.rate = th / f.standalone_us
