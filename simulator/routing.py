"""Routes over a cluster graph: which links a GPU-to-GPU transfer loads, and by how much.

Links are the graph's directed edges, numbered in graph order; `Router.cap_bytes_per_us[l]`
and `Router.lat_us[l]` hold their figures.

Routing model: shortest paths by hop count; GPUs never forward traffic for others. When several
shortest paths exist (fat-tree spines), the pair's bytes are split equally over all of them
(ECMP as a fluid: no hash collisions). A pair's latency is the largest path latency.

Two ways to turn a set of (src GPU, dst GPU, bytes) pairs into link loads:
- exact (`pair_route`): a BFS per pair on the whole graph, cached. Any topology; slow at
  thousands of GPUs.
- aggregated (`aggregate_loads`): pairs inside a host use exact cached routes; pairs across
  hosts are summed per GPU on its up-chain (GPU → ... → its leaf), per GPU on its down-chain,
  and per leaf pair on the fabric (leaf → spine → leaf ECMP). All vectorised, O(pairs).
  Requires every GPU to have a `host` attribute and a unique nearest leaf; it equals the exact
  loads when every inter-host shortest path is up-chain + leaf-to-leaf + down-chain, which
  holds for every preset (tests/simulator check it link by link).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from simulator.cluster import FABRIC_KINDS, Cluster
from simulator.errors import SimulationError


@dataclass(frozen=True)
class Route:
    """Links one unit of traffic from src to dst loads: link ids and the fraction on each."""

    links: np.ndarray  # int64 [k]
    frac: np.ndarray  # float64 [k], sums to the path length (each path's links get 1/#paths)
    latency_us: float


class _Csr:
    """Columns of (link, weight) entries: loads = Σ_c value_c · column_c, vectorised."""

    def __init__(self, columns: list[Route], num_links: int):
        counts = np.array([len(r.links) for r in columns], dtype=np.int64)
        self.ptr = np.concatenate([[0], np.cumsum(counts)])
        self.links = np.concatenate([r.links for r in columns]) if columns else np.zeros(0, np.int64)
        self.frac = np.concatenate([r.frac for r in columns]) if columns else np.zeros(0)
        self.lat = np.array([r.latency_us for r in columns], dtype=np.float64)
        self.num_links = num_links

    def loads(self, cols: np.ndarray, values: np.ndarray) -> np.ndarray:
        """Σ values[i] · column cols[i] as a dense [num_links] array."""
        if len(cols) == 0:
            return np.zeros(self.num_links)
        starts = self.ptr[cols]
        counts = self.ptr[cols + 1] - starts
        total = int(counts.sum())
        # entry indices of all selected columns, concatenated
        offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
        idx = offsets + np.arange(total)
        w = self.frac[idx] * np.repeat(values, counts)
        return np.bincount(self.links[idx], weights=w, minlength=self.num_links)


class Router:
    """Link table and routes of one cluster (build once per simulation)."""

    def __init__(self, cluster: Cluster):
        g = cluster.graph
        self.cluster = cluster
        self.nodes: list[str] = list(g.nodes)
        self.node_index = {n: i for i, n in enumerate(self.nodes)}
        self.kind = [g.nodes[n]["kind"] for n in self.nodes]
        edges = list(g.edges(data=True))
        self.num_links = len(edges)
        self.link_ends = [(self.node_index[u], self.node_index[v]) for u, v, _ in edges]
        self.cap_bytes_per_us = np.array([d["bandwidth_gbps"] * 1e3 for _, _, d in edges], dtype=np.float64)
        self.lat_us = np.array([d["latency_us"] for _, _, d in edges], dtype=np.float64)
        self._lat_list = self.lat_us.tolist()  # Python floats for the BFS (numpy scalars are slow)
        self.succ: list[list[tuple[int, int]]] = [[] for _ in self.nodes]  # node → [(next node, link)]
        for li, (u, v) in enumerate(self.link_ends):
            self.succ[u].append((v, li))
        self.gpu_nodes = np.array(
            [self.node_index[f"gpu{r}"] for r in range(cluster.num_gpus)], dtype=np.int64
        )
        self._pair_cache: dict[tuple[int, int], Route] = {}
        self._agg: _Aggregated | None = None
        self._agg_checked = False

    # --- exact routes --------------------------------------------------------------------------

    def _bfs(self, src: int, expandable, targets: set[int] | None = None):
        """BFS by hops from src through nodes `expandable(v)` allows, counting shortest paths;
        stops after the level where every node of `targets` has been reached."""
        dist = {src: 0}
        sigma = {src: 1}
        lat = {src: 0.0}
        link_lat = self._lat_list
        succ = self.succ
        preds: dict[int, list[tuple[int, int]]] = {}
        frontier = [src]
        level = 0
        left = set(targets) if targets is not None else None
        while frontier and (left is None or left):
            level += 1
            nxt: list[int] = []
            for u in frontier:
                if u != src and not expandable(u):
                    continue
                lu, su = lat[u], sigma[u]
                for v, li in succ[u]:
                    dv = dist.get(v)
                    if dv is None:
                        dist[v] = level
                        sigma[v] = su
                        lat[v] = lu + link_lat[li]
                        preds[v] = [(u, li)]
                        nxt.append(v)
                        if left is not None:
                            left.discard(v)
                    elif dv == level:
                        sigma[v] += su
                        cand = lu + link_lat[li]
                        if cand > lat[v]:
                            lat[v] = cand
                        preds[v].append((u, li))
            frontier = nxt
        return dist, sigma, lat, preds

    def _route(self, src: int, dst: int, expandable) -> Route | None:
        """All shortest src→dst paths through nodes `expandable(v)` allows."""
        return self._backtrack(self._bfs(src, expandable, {dst}), dst)

    def _backtrack(self, bfs, dst: int) -> Route | None:
        """The Route to dst from a `_bfs` result (ECMP fractions over all shortest paths)."""
        dist, sigma, lat, preds = bfs
        if dst not in dist:
            return None
        if sigma[dst] == 1:  # a single shortest path: walk it back
            links = []
            v = dst
            while v in preds:
                v, li = preds[v][0]
                links.append(li)
            links.sort()
            return Route(np.array(links, dtype=np.int64), np.ones(len(links)), float(lat[dst]))
        # nodes on some shortest path, collected backwards from dst
        order = [dst]
        on_dag = {dst}
        i = 0
        while i < len(order):
            for u, _ in preds.get(order[i], ()):
                if u not in on_dag:
                    on_dag.add(u)
                    order.append(u)
            i += 1
        # tau[v] = shortest paths v → dst; a link u→v carries sigma[u]·tau[v] of sigma[dst] paths.
        # Levels descending, so tau[v] is complete before v's predecessors use it.
        tau = {dst: 1}
        by_level: dict[int, list[int]] = {}
        for v in order:
            by_level.setdefault(dist[v], []).append(v)
        link_w = {}
        for lvl in sorted(by_level, reverse=True):
            for v in by_level[lvl]:
                for u, li in preds.get(v, ()):
                    link_w[li] = link_w.get(li, 0.0) + sigma[u] * tau[v]
                    tau[u] = tau.get(u, 0) + tau[v]
        total = sigma[dst]
        ordered = sorted(link_w)
        links = np.array(ordered, dtype=np.int64)
        frac = np.array([link_w[li] / total for li in ordered], dtype=np.float64)
        return Route(links, frac, float(lat[dst]))

    def pair_route(self, src_rank: int, dst_rank: int) -> Route:
        """Route of one unit of traffic from GPU `src_rank` to GPU `dst_rank` (cached)."""
        key = (src_rank, dst_rank)
        route = self._pair_cache.get(key)
        if route is None:
            s, d = int(self.gpu_nodes[src_rank]), int(self.gpu_nodes[dst_rank])
            kind = self.kind
            route = self._route(s, d, lambda v: kind[v] != "gpu")
            if route is None:
                raise SimulationError(
                    f"cluster {self.cluster.name}: gpu{src_rank} cannot reach gpu{dst_rank} (no path in the topology)"
                )
            self._pair_cache[key] = route
        return route

    def exact_loads(self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> tuple[np.ndarray, float]:
        """Dense link loads (bytes) and the largest pair latency, pair by pair (reference)."""
        loads = np.zeros(self.num_links)
        lat = 0.0
        for s, d, b in zip(src.tolist(), dst.tolist(), nbytes.tolist()):
            r = self.pair_route(s, d)
            loads[r.links] += r.frac * b
            lat = max(lat, r.latency_us)
        return loads, lat

    # --- aggregated loads ------------------------------------------------------------------------

    @property
    def can_aggregate(self) -> bool:
        if not self._agg_checked:
            self._agg_checked = True
            self._agg = _Aggregated.build(self)
        return self._agg is not None

    def aggregate_loads(self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> tuple[np.ndarray, float]:
        """Dense link loads and largest latency for pairs (src ≠ dst), summed by structure."""
        if not self.can_aggregate:
            return self.exact_loads(src, dst, nbytes)
        return self._agg.loads(src, dst, nbytes)  # type: ignore[union-attr]


class _Aggregated:
    """Per-host / per-leaf decomposition of routes (see module docstring)."""

    @staticmethod
    def build(router: Router) -> "_Aggregated | None":
        g = router.cluster.graph
        n_gpu = len(router.gpu_nodes)
        hosts = []
        for r in range(n_gpu):
            h = g.nodes[f"gpu{r}"].get("host")
            if h is None:
                return None
            hosts.append(int(h))
        kind = router.kind
        fabric = [k in FABRIC_KINDS for k in kind]
        self = _Aggregated()
        self.router = router
        self.host = np.array(hosts, dtype=np.int64)
        # intra-host pair columns: base[h] + li[s] * k[h] + li[d]
        uniq, inverse, counts = np.unique(self.host, return_inverse=True, return_counts=True)
        self.host_k = counts[inverse]
        self.local = np.zeros(n_gpu, dtype=np.int64)
        seen: dict[int, int] = {}
        for r in range(n_gpu):
            self.local[r] = seen.get(hosts[r], 0)
            seen[hosts[r]] = self.local[r] + 1
        base = np.concatenate([[0], np.cumsum(counts**2)[:-1]])
        self.base = base[inverse]
        members: dict[int, list[int]] = {}
        for r in range(n_gpu):
            members.setdefault(hosts[r], []).append(r)
        cols: list[Route] = []
        empty = Route(np.zeros(0, np.int64), np.zeros(0), 0.0)
        not_gpu = lambda v: kind[v] != "gpu"  # noqa: E731
        gpu_nodes = router.gpu_nodes.tolist()
        for h in uniq.tolist():
            for s in members[h]:
                # one BFS per source reaches every GPU of its host
                bfs = router._bfs(gpu_nodes[s], not_gpu, {gpu_nodes[d] for d in members[h] if d != s})
                for d in members[h]:
                    if s == d:
                        cols.append(empty)
                        continue
                    route = router._pair_cache.get((s, d)) or router._backtrack(bfs, gpu_nodes[d])
                    if route is None:
                        raise SimulationError(
                            f"cluster {router.cluster.name}: gpu{s} cannot reach gpu{d} (no path in the topology)"
                        )
                    router._pair_cache[(s, d)] = route
                    cols.append(route)
        self.intra = _Csr(cols, router.num_links)
        # up/down chains to the unique nearest fabric node (the GPU's leaf)
        attach = {}
        if any(fabric) and len(uniq) > 1:
            for r in range(n_gpu):
                leaf = self._nearest_fabric(gpu_nodes[r])
                if leaf is None:
                    return None
                attach[r] = leaf
        leaves = sorted(set(attach.values()))
        self.leaf_ids = {v: i for i, v in enumerate(leaves)}
        self.num_leaves = len(leaves)
        ups: list[Route] = []
        downs: list[Route] = []
        leaf_of = np.full(n_gpu, -1, dtype=np.int64)
        if leaves and len(uniq) > 1:
            local_only = lambda v: kind[v] != "gpu" and not fabric[v]  # noqa: E731
            under: dict[int, list[int]] = {}
            for r in range(n_gpu):
                s = gpu_nodes[r]
                leaf = attach[r]
                up = router._route(s, leaf, local_only)
                if up is None:
                    return None
                ups.append(up)
                under.setdefault(leaf, []).append(r)
                leaf_of[r] = self.leaf_ids[leaf]
            downs = [empty] * n_gpu
            for leaf, below in under.items():
                bfs = router._bfs(leaf, lambda v, leaf=leaf: v == leaf or local_only(v), {gpu_nodes[r] for r in below})
                for r in below:
                    down = router._backtrack(bfs, gpu_nodes[r])
                    if down is None:
                        return None
                    downs[r] = down
            fab: list[Route] = []
            unreachable = Route(np.zeros(0, np.int64), np.zeros(0), np.inf)
            for a in leaves:
                bfs = router._bfs(a, lambda v: fabric[v], set(leaves) - {a})
                for b in leaves:
                    route = empty if a == b else router._backtrack(bfs, b)
                    fab.append(route if route is not None else unreachable)
            self.fabric = _Csr(fab, router.num_links)
        else:
            ups = downs = [empty] * n_gpu
            self.fabric = _Csr([empty], router.num_links)
        self.up = _Csr(ups, router.num_links)
        self.down = _Csr(downs, router.num_links)
        self.leaf_of = leaf_of
        return self

    def _nearest_fabric(self, s: int) -> int | None:
        """The unique nearest leaf/spine from GPU node s (None if none or ambiguous)."""
        router = self.router
        kind = router.kind
        dist = {s: 0}
        frontier = [s]
        while frontier:
            nxt = []
            found = []
            for u in frontier:
                if u != s and kind[u] == "gpu":
                    continue
                for v, _ in router.succ[u]:
                    if v not in dist:
                        dist[v] = dist[u] + 1
                        if kind[v] in FABRIC_KINDS:
                            found.append(v)
                        else:
                            nxt.append(v)
            if found:
                return found[0] if len(set(found)) == 1 else None
            frontier = nxt
        return None

    def loads(self, src: np.ndarray, dst: np.ndarray, nbytes: np.ndarray) -> tuple[np.ndarray, float]:
        n_gpu = len(self.host)
        same = self.host[src] == self.host[dst]
        lat = 0.0
        loads = np.zeros(self.router.num_links)
        if same.any():
            s, d, b = src[same], dst[same], nbytes[same]
            col = self.base[s] + self.local[s] * self.host_k[s] + self.local[d]
            loads += self.intra.loads(col, b)
            lat = max(lat, float(self.intra.lat[col].max()))
        cross = ~same
        if cross.any():
            s, d, b = src[cross], dst[cross], nbytes[cross]
            up = np.bincount(s, weights=b, minlength=n_gpu)
            down = np.bincount(d, weights=b, minlength=n_gpu)
            nz_up, nz_down = np.flatnonzero(up), np.flatnonzero(down)
            loads += self.up.loads(nz_up, up[nz_up])
            loads += self.down.loads(nz_down, down[nz_down])
            nl = self.num_leaves
            code = self.leaf_of[s] * nl + self.leaf_of[d]
            between = np.bincount(code, weights=b, minlength=nl * nl)
            np.fill_diagonal(between.reshape(nl, nl), 0.0)
            nz = np.flatnonzero(between)
            fab_lat = self.fabric.lat[code]
            if np.isinf(fab_lat).any():
                k = int(np.flatnonzero(np.isinf(fab_lat))[0])
                raise SimulationError(
                    f"cluster {self.router.cluster.name}: gpu{int(s[k])} cannot reach gpu{int(d[k])} (no path in the topology)"
                )
            loads += self.fabric.loads(nz, between[nz])
            pair_lat = self.up.lat[s] + fab_lat + self.down.lat[d]
            lat = max(lat, float(pair_lat.max()))
        return loads, lat
