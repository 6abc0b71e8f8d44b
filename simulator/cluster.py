"""Clusters: GPU specs plus a networkx graph of GPUs, switches and NICs.

A `Cluster` is what the engine simulates on. Its `graph` is a `networkx.DiGraph`:

    nodes   "gpu{r}" (kind "gpu", attrs rank, host), "nvswitch{h}", "pcie{h}.{k}", "cpu{h}"
            (PCIe root complex), "nic{h}.{k}", "leaf{rail}.{block}", "spine{s}", "loopback"
            each with attr `kind` in NODE_KINDS; every non-fabric node has attr `host`.
    edges   one per direction, attrs `bandwidth_gbps` (GB/s = 1e9 bytes/s, that direction)
            and `latency_us` (one hop). GPUs never forward traffic for others.

Presets are functions of the GPU count (any multiple of the GPUs per node) returning a
Cluster; `get_cluster(name, gpus=N)` looks them up. Users load their own topologies from
GraphML or JSON (`load_cluster` / `save_cluster`); the same attributes are required.

Figures are dense (no sparsity) vendor datasheet numbers unless a comment says otherwise.
Link latencies are per hop and approximate (NCCL's measured small-message latency is a few µs
inside a node and 5-10 µs across nodes); they matter only for small messages.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import networkx as nx

from simulator.errors import SimulationError

NODE_KINDS = ("gpu", "nvswitch", "pcie", "cpu", "nic", "leaf", "spine", "loopback")
FABRIC_KINDS = ("leaf", "spine")

GB = 1e9  # bytes; link figures are GB/s per direction


@dataclass(frozen=True)
class GpuSpec:
    """One accelerator (or, on `cpu-loopback`, one process)."""

    name: str
    bf16_flops: float  # dense BF16 FLOP/s
    fp8_flops: float  # dense FP8 FLOP/s (= bf16 where the chip has no FP8)
    hbm_bytes_per_s: float  # memory bandwidth, bytes/s
    memory_bytes: float  # device memory, bytes
    sm_count: int  # streaming multiprocessors (cores for a CPU process)


@dataclass
class Cluster:
    """GPU spec + topology graph + how communication shares compute resources.

    kind "gpu": a comm kernel in flight on a GPU occupies `comm_sms` SMs, so concurrent
    compute on that GPU runs at 1 - comm_sms / sm_count of its speed.
    kind "cpu": all ranks are processes on one machine with `cores` cores; compute ops and
    in-flight transfers (one comm thread per rank) share them (processor sharing).
    """

    name: str
    gpu: GpuSpec
    graph: nx.DiGraph
    gpus_per_node: int
    kind: Literal["gpu", "cpu"] = "gpu"
    cores: int = 0
    comm_sms: int = 20
    notes: dict = field(default_factory=dict)

    @property
    def num_gpus(self) -> int:
        return sum(1 for _, k in self.graph.nodes(data="kind") if k == "gpu")

    @property
    def comm_compute_share(self) -> float:
        """Fraction of a GPU's compute a concurrent comm kernel takes away (0..1)."""
        if self.kind != "gpu" or self.gpu.sm_count <= 0:
            return 0.0
        return min(max(self.comm_sms / self.gpu.sm_count, 0.0), 0.95)

    def gpu_node(self, rank: int) -> str:
        return f"gpu{rank}"

    def summary(self) -> str:
        """A few human lines: spec, node counts by kind, link classes."""
        g = self.graph
        kinds: dict[str, int] = {}
        for _, k in g.nodes(data="kind"):
            kinds[k] = kinds.get(k, 0) + 1
        links: dict[tuple, int] = {}
        for u, v, d in g.edges(data=True):
            key = (g.nodes[u]["kind"], g.nodes[v]["kind"], d["bandwidth_gbps"], d["latency_us"])
            links[key] = links.get(key, 0) + 1
        s = self.gpu
        lines = [
            f"cluster {self.name}: {self.num_gpus} x {s.name}, {self.gpus_per_node} per node, kind {self.kind}"
            + (f", {self.cores} cores shared" if self.kind == "cpu" else f", comm kernels take {self.comm_sms} SMs"),
            f"  device: {s.bf16_flops / 1e12:.1f} TFLOP/s bf16, {s.fp8_flops / 1e12:.1f} TFLOP/s fp8, "
            f"{s.hbm_bytes_per_s / 1e12:.2f} TB/s memory, {s.memory_bytes / 1e9:.0f} GB, {s.sm_count} SMs",
            "  nodes: " + ", ".join(f"{k} {kinds[k]}" for k in NODE_KINDS if k in kinds),
            "  links (per direction):",
        ]
        for (a, b, bw, lat), n in sorted(links.items()):
            lines.append(f"    {a:>8} -> {b:<8} {bw:8.1f} GB/s {lat:6.2f} us  x{n}")
        return "\n".join(lines)


def _link(g: nx.DiGraph, a: str, b: str, bandwidth_gbps: float, latency_us: float) -> None:
    """A full-duplex link: one edge per direction with the same figures."""
    g.add_edge(a, b, bandwidth_gbps=float(bandwidth_gbps), latency_us=float(latency_us))
    g.add_edge(b, a, bandwidth_gbps=float(bandwidth_gbps), latency_us=float(latency_us))


def _check_count(name: str, gpus: int, per_node: int) -> int:
    if gpus <= 0 or gpus % per_node:
        raise SimulationError(f"cluster {name}: --gpus {gpus} must be a positive multiple of {per_node} GPUs per node")
    return gpus // per_node


def _fabric(
    g: nx.DiGraph,
    nics: list[list[str]],
    nic_gbps: float,
    rail_optimised: bool,
    leaf_down_ports: int = 32,
    spines: int = 32,
) -> None:
    """Two-tier fat tree over the NICs `nics[host][k]` (non-blocking: as many up as down ports).

    Rail-optimised: NIC k of every host goes to a leaf of rail k ("leaf{k}.{block}", up to
    `leaf_down_ports` hosts per leaf). Otherwise hosts fill leaves in order ("leaf0.{block}").
    One leaf in all: no spine. Each leaf links to every spine with a NIC-speed port.
    """
    hosts = len(nics)
    per_host = len(nics[0]) if hosts else 0
    leaves: list[str] = []
    if rail_optimised:
        blocks = math.ceil(hosts / leaf_down_ports)
        for k in range(per_host):
            for b in range(blocks):
                leaves.append(f"leaf{k}.{b}")
        for h in range(hosts):
            for k in range(per_host):
                leaf = f"leaf{k}.{h // leaf_down_ports}"
                g.add_node(leaf, kind="leaf")
                _link(g, nics[h][k], leaf, nic_gbps, 1.0)  # NIC + cable + switch port ≈ 1 µs
    else:
        hosts_per_leaf = max(1, leaf_down_ports // max(per_host, 1))
        for h in range(hosts):
            leaf = f"leaf0.{h // hosts_per_leaf}"
            if leaf not in leaves:
                leaves.append(leaf)
            g.add_node(leaf, kind="leaf")
            for k in range(per_host):
                _link(g, nics[h][k], leaf, nic_gbps, 1.0)
    if len(leaves) > 1:
        # non-blocking: a leaf needs as many up ports as it has NICs below it
        down_used = min(hosts, leaf_down_ports) if rail_optimised else min(hosts * per_host, leaf_down_ports)
        for s in range(min(spines, down_used)):
            g.add_node(f"spine{s}", kind="spine")
            for leaf in leaves:
                _link(g, leaf, f"spine{s}", nic_gbps, 1.0)  # ≈ 0.5 µs switch + cable per hop


def _nvlink_cluster(
    name: str,
    spec: GpuSpec,
    gpus: int,
    nvlink_gbps: float,
    nic_gbps: float,
    pcie_gbps: float,
    rail_optimised: bool = True,
) -> Cluster:
    """8-GPU NVSwitch nodes (one logical NVSwitch per node), one NIC per GPU behind its own
    PCIe switch (the GPUDirect-RDMA path), NICs on a two-tier fat tree."""
    per_node = 8
    hosts = _check_count(name, gpus, per_node)
    g = nx.DiGraph(name=name)
    nics: list[list[str]] = []
    for h in range(hosts):
        nvs = f"nvswitch{h}"
        g.add_node(nvs, kind="nvswitch", host=h)
        host_nics = []
        for k in range(per_node):
            r = h * per_node + k
            gpu, pcie, nic = f"gpu{r}", f"pcie{h}.{k}", f"nic{h}.{k}"
            g.add_node(gpu, kind="gpu", rank=r, host=h)
            g.add_node(pcie, kind="pcie", host=h)
            g.add_node(nic, kind="nic", host=h)
            _link(g, gpu, nvs, nvlink_gbps, 0.5)  # NVLink hop ≈ 0.5 µs (GPU→NVSwitch→GPU ≈ 1 µs)
            _link(g, gpu, pcie, pcie_gbps, 0.5)
            _link(g, pcie, nic, pcie_gbps, 0.5)
            host_nics.append(nic)
        nics.append(host_nics)
    _fabric(g, nics, nic_gbps, rail_optimised)
    return Cluster(name=name, gpu=spec, graph=g, gpus_per_node=per_node)


# --- GPU datasheets -------------------------------------------------------------------------
# H100 SXM5 (NVIDIA H100 datasheet): 989.4 TFLOP/s dense BF16, 1978.9 dense FP8, HBM3 3.35 TB/s,
# 80 GB, 132 SMs, NVLink 4 900 GB/s total = 450 GB/s per direction.
H100 = GpuSpec("H100-SXM5-80GB", 989.4e12, 1978.9e12, 3.35e12, 80e9, 132)
# H800 SXM5: the China-market H100: same compute and HBM, NVLink cut to 400 GB/s total
# (200 GB/s per direction; DeepSeek-V3 report §3.2.2 measures ≈160 GB/s achievable).
H800 = GpuSpec("H800-SXM5-80GB", 989.4e12, 1978.9e12, 3.35e12, 80e9, 132)
# H200 SXM (NVIDIA H200 datasheet): H100 compute, HBM3e 4.8 TB/s, 141 GB, NVLink 900 GB/s.
H200 = GpuSpec("H200-SXM-141GB", 989.4e12, 1978.9e12, 4.8e12, 141e9, 132)
# A100 SXM4 80GB (NVIDIA A100 datasheet): 312 TFLOP/s dense BF16, no FP8 (runs at BF16 rate),
# HBM2e 2.039 TB/s, 108 SMs, NVLink 3 600 GB/s total = 300 per direction.
A100 = GpuSpec("A100-SXM4-80GB", 312e12, 312e12, 2.039e12, 80e9, 108)
# A800 SXM4: A100 with NVLink cut to 400 GB/s total (200 per direction).
A800 = GpuSpec("A800-SXM4-80GB", 312e12, 312e12, 2.039e12, 80e9, 108)
# A30 PCIe (NVIDIA A30 datasheet): 165 TFLOP/s dense BF16, HBM2 933 GB/s, 24 GB, 56 SMs,
# PCIe Gen4 x16 64 GB/s total = 32 per direction (NVLink bridge not fitted here).
A30 = GpuSpec("A30-PCIe-24GB", 165e12, 165e12, 0.933e12, 24e9, 56)


def h800(gpus: int = 8) -> Cluster:
    """H800 SXM nodes as DeepSeek-V3 describes them: NVLink 200 GB/s per direction per GPU,
    8 × 400 Gb/s (50 GB/s) InfiniBand NICs per node, rail-optimised two-tier fat tree."""
    return _nvlink_cluster("h800", H800, gpus, nvlink_gbps=200, nic_gbps=50, pcie_gbps=64)


def h100(gpus: int = 8) -> Cluster:
    """DGX H100: NVLink 450 GB/s per direction, 8 × 400 Gb/s ConnectX-7, rail-optimised."""
    return _nvlink_cluster("h100", H100, gpus, nvlink_gbps=450, nic_gbps=50, pcie_gbps=64)


def h200(gpus: int = 8) -> Cluster:
    """HGX H200: NVLink 450 GB/s per direction, 8 × 400 Gb/s NICs, rail-optimised."""
    return _nvlink_cluster("h200", H200, gpus, nvlink_gbps=450, nic_gbps=50, pcie_gbps=64)


def a100(gpus: int = 8) -> Cluster:
    """DGX A100: NVLink 300 GB/s per direction, 8 × 200 Gb/s HDR (25 GB/s), PCIe Gen4 32 GB/s."""
    return _nvlink_cluster("a100", A100, gpus, nvlink_gbps=300, nic_gbps=25, pcie_gbps=32)


def a800(gpus: int = 8) -> Cluster:
    """A800 SXM nodes: NVLink 200 GB/s per direction, 8 × 200 Gb/s HDR NICs."""
    return _nvlink_cluster("a800", A800, gpus, nvlink_gbps=200, nic_gbps=25, pcie_gbps=32)


def a30_pcie(gpus: int = 8) -> Cluster:
    """8 × A30 per node on PCIe Gen4 (32 GB/s per direction), no NVLink: two PCIe switches of
    four GPUs under the CPU root complex (inter-switch traffic crosses the CPU at PCIe x16
    speed), one 200 Gb/s HDR NIC (25 GB/s) per switch, hosts on one fat tree (not rails)."""
    name, per_node = "a30-pcie", 8
    hosts = _check_count(name, gpus, per_node)
    g = nx.DiGraph(name=name)
    nics = []
    for h in range(hosts):
        cpu = f"cpu{h}"
        g.add_node(cpu, kind="cpu", host=h)
        host_nics = []
        for k in range(2):
            sw, nic = f"pcie{h}.{k}", f"nic{h}.{k}"
            g.add_node(sw, kind="pcie", host=h)
            g.add_node(nic, kind="nic", host=h)
            _link(g, sw, cpu, 32, 1.0)  # root-complex hop is slower than a switch hop
            _link(g, sw, nic, 32, 0.5)
            host_nics.append(nic)
            for j in range(4):
                r = h * per_node + 4 * k + j
                g.add_node(f"gpu{r}", kind="gpu", rank=r, host=h)
                _link(g, f"gpu{r}", sw, 32, 0.5)
        nics.append(host_nics)
    _fabric(g, nics, 25, rail_optimised=False)
    return Cluster(name=name, gpu=A30, graph=g, gpus_per_node=per_node)


def cpu_loopback(gpus: int = 2, cores: int = 2) -> Cluster:
    """`gpus` processes on one machine with `cores` cores, talking gloo over loopback TCP.

    Assumed (calibrate per machine): a process gets ~50 GFLOP/s fp32 from one core and ~10 GB/s
    of memory bandwidth; loopback TCP moves ~3 GB/s per direction per process with ~15 µs
    per hop (gloo small-message round trips measure tens of µs). Transfers also take a core.
    """
    if gpus <= 0:
        raise SimulationError(f"cluster cpu-loopback: --gpus {gpus} must be positive")
    if cores <= 0:
        raise SimulationError(f"cluster cpu-loopback: cores {cores} must be positive")
    spec = GpuSpec("cpu-process", 50e9, 50e9, 10e9, 4e9, 1)
    g = nx.DiGraph(name="cpu-loopback")
    g.add_node("loopback", kind="loopback", host=0)
    for r in range(gpus):
        g.add_node(f"gpu{r}", kind="gpu", rank=r, host=0)
        _link(g, f"gpu{r}", "loopback", 3.0, 15.0)
    return Cluster(name="cpu-loopback", gpu=spec, graph=g, gpus_per_node=gpus, kind="cpu", cores=cores, comm_sms=0)


# A CUDA device name's marker → the preset of that GPU, first match wins
DEVICE_PRESETS = (("h200", "h200"), ("h800", "h800"), ("h100", "h100"), ("a800", "a800"), ("a100", "a100"),
                  ("a30", "a30-pcie"))


def preset_for_devices(devices: list[str]) -> str | None:
    """The cluster preset of the GPU every device name names ("NVIDIA H200" → h200), or
    None when a name matches no preset or the names disagree."""
    found = set()
    for device in devices:
        lower = device.lower()
        found.add(next((preset for marker, preset in DEVICE_PRESETS if marker in lower), None))
    return found.pop() if len(found) == 1 else None


PRESETS: dict[str, Callable[..., Cluster]] = {
    "h800": h800,
    "h100": h100,
    "h200": h200,
    "a100": a100,
    "a800": a800,
    "a30-pcie": a30_pcie,
    "cpu-loopback": cpu_loopback,
}


def get_cluster(name: str, gpus: int | None = None, **options: object) -> Cluster:
    """Preset by name (see PRESETS) or a topology file (.graphml / .json) by path.

    `gpus` defaults to one node (2 processes for cpu-loopback). `options` go to the preset
    (e.g. `cores=` for cpu-loopback). Unknown name → SimulationError listing the valid ones.
    """
    if name in PRESETS:
        kwargs = dict(options)
        if gpus is not None:
            kwargs["gpus"] = gpus
        try:
            return PRESETS[name](**kwargs)
        except TypeError as err:
            raise SimulationError(f"cluster {name}: {err}") from None
    if name.endswith((".graphml", ".json")) and not os.path.exists(name):
        raise SimulationError(f"{name}: no such topology file")
    if name.endswith((".graphml", ".json")):
        cluster = load_cluster(name)
        if gpus is not None and gpus != cluster.num_gpus:
            raise SimulationError(f"{name}: has {cluster.num_gpus} GPUs, --gpus asked for {gpus}")
        return cluster
    raise SimulationError(f"unknown cluster {name!r}; valid: {', '.join(PRESETS)} or a .graphml/.json file")


# --- files -----------------------------------------------------------------------------------

_META_KEYS = ("name", "gpus_per_node", "kind", "cores", "comm_sms")


def save_cluster(cluster: Cluster, path: str | os.PathLike) -> Path:
    """Write GraphML (by suffix .graphml) or JSON (node-link) atomically."""
    path = Path(path)
    g = cluster.graph.copy()
    meta = {k: getattr(cluster, k) for k in _META_KEYS}
    g.graph.update({"moesim_" + k: v for k, v in meta.items()})
    g.graph.update({"moesim_gpu_" + k: v for k, v in asdict(cluster.gpu).items()})
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        if path.suffix == ".graphml":
            nx.write_graphml(g, tmp)
        else:
            with open(tmp, "w") as f:
                json.dump(nx.node_link_data(g, edges="links"), f, indent=1)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_cluster(path: str | os.PathLike) -> Cluster:
    """Read a cluster written by save_cluster (or hand-made with the same attributes)."""
    path = Path(path)
    try:
        if path.suffix == ".graphml":
            g = nx.read_graphml(path)
        else:
            with open(path) as f:
                g = nx.node_link_graph(json.load(f), directed=True, edges="links")
    except (json.JSONDecodeError, nx.NetworkXError, KeyError, ValueError, AttributeError, TypeError) as err:
        raise SimulationError(f"{path}: not a readable topology ({err})") from None
    if not g.is_directed():
        g = g.to_directed()
    g = nx.DiGraph(g)
    meta = g.graph
    try:
        spec = GpuSpec(
            name=str(meta["moesim_gpu_name"]),
            bf16_flops=float(meta["moesim_gpu_bf16_flops"]),
            fp8_flops=float(meta["moesim_gpu_fp8_flops"]),
            hbm_bytes_per_s=float(meta["moesim_gpu_hbm_bytes_per_s"]),
            memory_bytes=float(meta["moesim_gpu_memory_bytes"]),
            sm_count=int(meta["moesim_gpu_sm_count"]),
        )
    except KeyError as err:
        raise SimulationError(f"{path}: graph attribute {err.args[0]} missing (GPU spec)") from None
    for n, d in g.nodes(data=True):
        if d.get("kind") not in NODE_KINDS:
            raise SimulationError(f"{path}: node {n!r} has kind {d.get('kind')!r}, expected one of {NODE_KINDS}")
        if d["kind"] == "gpu":
            if "rank" not in d or n != f"gpu{int(d['rank'])}":
                raise SimulationError(f"{path}: GPU node {n!r} must be named gpu{{rank}} with a rank attribute")
            d["rank"] = int(d["rank"])
        if "host" in d:
            d["host"] = int(d["host"])
    for u, v, d in g.edges(data=True):
        for key in ("bandwidth_gbps", "latency_us"):
            if key not in d:
                raise SimulationError(f"{path}: edge {u}->{v} lacks {key}")
            d[key] = float(d[key])
        if d["bandwidth_gbps"] <= 0:
            raise SimulationError(f"{path}: edge {u}->{v} bandwidth_gbps must be > 0")
    cluster = Cluster(
        name=str(meta.get("moesim_name", path.stem)),
        gpu=spec,
        graph=g,
        gpus_per_node=int(meta.get("moesim_gpus_per_node", 8)),
        kind=str(meta.get("moesim_kind", "gpu")),  # type: ignore[arg-type]
        cores=int(meta.get("moesim_cores", 0)),
        comm_sms=int(meta.get("moesim_comm_sms", 20)),
    )
    ranks = sorted(d["rank"] for _, d in g.nodes(data=True) if d["kind"] == "gpu")
    if ranks != list(range(len(ranks))):
        raise SimulationError(f"{path}: GPU ranks must be 0..{len(ranks) - 1}")
    return cluster
