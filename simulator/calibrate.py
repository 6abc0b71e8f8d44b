"""Calibration: microbenchmarks → fitted cost models → one JSON file the simulator loads.

`calibrate(backend, world_size)` runs
  - collectives (all_to_all, all_reduce, all_gather) over a sweep of message sizes on
    `world_size` spawned ranks (torch.multiprocessing, a free loopback port, one intra-op
    thread per rank); each point is the median over repetitions of the slowest rank's time
    for one collective started right after a barrier;
  - on CPU ranks (gloo, world size > 1), an all_to_all at the CPU matrix's dispatch
    payloads timed twice per repetition: ranks idle, then every rank computing (a loop
    of small matmuls that polls the async work) while it is in flight (comm_load_points);
  - compute ops (matmul / linear / bmm of several shapes, elementwise, norms, softmax,
    attention, gather / cat) under torch.profiler with record_shapes, so durations are
    measured the way live traces measure them (profiler overhead included);
and fits `CostModel` (per op kind), `CommModel` (alpha-beta per collective) and the
comm load exponent and core use (fit_comm_load: how much an in-flight transfer slows while
its ranks compute, and how much it slows their compute; simulator.engine's
comm_load_exponent and comm_core_use).

Calibration file (`CAL/calibration.json`, or any path ending in .json):
    format "moesim-calibration", version 1,
    backend, world_size, device {type, name, threads_per_rank}, torch_version, created_utc,
    compute  CostModel.to_json()  {device: DeviceSpec, fits: {kind: KindFit}}
    comm     CommModel.to_json()  [CommFit...]
    points   {compute: [{name, kind, shapes, flops, bytes, dur_us}],
              comm: [{coll, world_size, coll_bytes, dur_us, dur_us_all}]}
    comm_load (gloo, world size > 1; absent → exponent DEFAULT_COMM_LOAD_EXPONENT)
             {exponent, cores, share, sizes: [{coll_bytes, idle_us, loaded_us, exponent,
              compute_speed, core_use}], points: [{coll_bytes, idle_us_all, loaded_us_all,
              compute_speed_all, chunk_us}]} (compute_speed / core_use: calibrations
              from 2026-12-05 on)
    warnings [str]  fits the measurements could not support (comm_warnings); the CLI
             prints them
On CUDA the same code calibrates NCCL and kernels (each case's kernel time under the
profiler, the CUDA-event latency beside it); run on one H200 (tests/data/h200/calibration.json).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from simulator.costmodel import (
    AUTOGRAD_NODE,
    DEVICES,
    CommModel,
    CostModel,
    DeviceSpec,
    OpWork,
    classify,
    fit_comm,
    fit_cost_model,
    op_work,
)
from simulator.errors import SimulationError
from traces.rundir import write_json_atomic

CALIBRATION_JSON = "calibration.json"
FORMAT = "moesim-calibration"
VERSION = 1
COLLECTIVES = ("all_to_all", "all_reduce", "all_gather")
# Message bytes per rank: 1 KiB .. 4 MiB (x4 steps); gloo over loopback reaches its
# bandwidth plateau by ~1 MiB.
DEFAULT_SIZES_BYTES = tuple(1024 * 4**i for i in range(7))
# The comm load sweep: the all_to_all payloads of the CPU validation matrix's dispatch and
# combine (small preset, 64-512 tokens per rank: ~0.3-3 MiB).
LOAD_SIZES_BYTES = (256 * 1024, 512 * 1024, 1024 * 1024, 2048 * 1024, 4096 * 1024)
# Without a measured comm_load: plain processor sharing (a transfer's threads get their
# share of the cores like any other job).
DEFAULT_COMM_LOAD_EXPONENT = 1.0
# a loaded transfer that took this much longer than the median idle one stalled (stall_points)
STALL_THRESHOLD_US = 1000.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------
# communication microbenchmarks


def _comm_worker(rank: int, world_size: int, backend: str, port: int, sizes: Sequence[int], reps: int, out_dir: str) -> None:
    """One rank: time each collective at each size; write its times (µs) to out_dir."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    use_cuda = backend == "nccl"
    if use_cuda:
        torch.cuda.set_device(rank)
    dev = torch.device(f"cuda:{rank}" if use_cuda else "cpu")
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # older torch: the latter
    times: dict[str, dict[str, list[float]]] = {}
    try:
        for coll in COLLECTIVES:
            times[coll] = {}
            for size in sizes:
                numel = max(world_size, size // 4 // world_size * world_size)  # float32, divisible
                x = torch.randn(numel, device=dev)
                out = torch.empty(numel * (world_size if coll == "all_gather" else 1), device=dev)

                def op() -> None:
                    if coll == "all_to_all":
                        dist.all_to_all_single(out, x)
                    elif coll == "all_reduce":
                        dist.all_reduce(x)
                    else:
                        all_gather(out, x)
                    if use_cuda:
                        torch.cuda.synchronize()

                for _ in range(3):
                    op()
                samples = []
                for _ in range(reps):
                    dist.barrier()
                    t0 = time.perf_counter()
                    op()
                    samples.append((time.perf_counter() - t0) * 1e6)
                times[coll][str(numel * 4)] = samples
        dist.barrier()  # nobody tears the group down while a peer still needs it
    finally:
        dist.destroy_process_group()
    write_json_atomic(Path(out_dir) / f"rank{rank}.json", times)


def comm_points(backend: str, world_size: int, sizes_bytes: Sequence[int] = DEFAULT_SIZES_BYTES, reps: int = 15) -> list[dict]:
    """Run the collective sweep on `world_size` spawned ranks; one point per (coll, size).

    dur_us = median over repetitions of the slowest rank's time (a collective ends when
    its last rank does); dur_us_all keeps every repetition for the spread.
    """
    import torch.multiprocessing as mp

    if world_size < 1:
        raise SimulationError(f"calibrate: world size must be ≥ 1, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="moesim-cal-") as out_dir:
        mp.start_processes(
            _comm_worker, args=(world_size, backend, _free_port(), list(sizes_bytes), reps, out_dir),
            nprocs=world_size, join=True, start_method="spawn",
        )
        per_rank = [json.loads((Path(out_dir) / f"rank{r}.json").read_text()) for r in range(world_size)]
    points = []
    for coll in COLLECTIVES:
        for size_key in per_rank[0][coll]:
            slowest = [max(vals) for vals in zip(*(rank_times[coll][size_key] for rank_times in per_rank))]
            points.append({
                "coll": coll, "world_size": world_size, "coll_bytes": float(size_key),
                "dur_us": statistics.median(slowest), "dur_us_all": slowest,
            })
    return points


def _load_worker(rank: int, world_size: int, backend: str, port: int, sizes: Sequence[int], reps: int, out_dir: str) -> None:
    """One rank: per size and repetition, an all_to_all with the rank idle (issued, waited)
    and one while the rank computes (issued after a barrier and a short run-in of the
    compute loop, polled between matmuls of ~30 µs until it completes; the loop then goes on
    as long again so that every peer's transfer stays under load). Writes the issue and
    completion times (perf_counter, one clock for every process on the machine, µs), the
    matmuls done in flight and the run-in's time per matmul."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    g = torch.Generator().manual_seed(rank)
    a, w = torch.randn(128, 128, generator=g), torch.randn(128, 128, generator=g)

    def chunk() -> None:
        torch.mm(a, w)

    now = lambda: time.perf_counter() * 1e6  # noqa: E731
    t = now()
    for _ in range(100):
        chunk()
    out: dict = {"chunk_us": (now() - t) / 100}
    try:
        for size in sizes:
            numel = max(world_size, size // 4 // world_size * world_size)
            x, recv = torch.randn(numel, generator=g), torch.empty(numel)
            for _ in range(3):
                dist.all_to_all_single(recv, x)
            rows = []
            for _ in range(reps):
                dist.barrier()
                t0 = now()
                dist.all_to_all_single(recv, x, async_op=True).wait()
                t1 = now()
                dist.barrier()
                r0 = now()
                for _ in range(20):  # every rank busy before any transfer starts
                    chunk()
                s0 = now()
                work = dist.all_to_all_single(recv, x, async_op=True)
                n = 0
                while not work.is_completed():
                    chunk()
                    n += 1
                s1 = now()
                while now() < 2 * s1 - s0:
                    chunk()
                work.wait()
                rows.append((t0, t1, s0, s1, n, (s0 - r0) / 20))
            out[str(numel * 4)] = rows
        dist.barrier()
    finally:
        dist.destroy_process_group()
    write_json_atomic(Path(out_dir) / f"load{rank}.json", out)


def comm_load_points(backend: str, world_size: int, sizes_bytes: Sequence[int] = LOAD_SIZES_BYTES, reps: int = 101) -> list[dict]:
    """all_to_all with the ranks idle and with every rank computing, per size: one point
    each {coll_bytes, idle_us_all, loaded_us_all, compute_speed_all, chunk_us}. A transfer
    lasts from the last rank's issue to the first rank's completion (as validate times a
    traced collective); compute_speed: the loop's pace in flight over its run-in pace just
    before (mean over ranks)."""
    import torch.multiprocessing as mp

    if world_size < 2:
        raise SimulationError(f"calibrate: the comm load sweep needs world size ≥ 2, got {world_size}")
    with tempfile.TemporaryDirectory(prefix="moesim-load-") as out_dir:
        mp.start_processes(_load_worker, args=(world_size, backend, _free_port(), list(sizes_bytes), reps, out_dir),
                           nprocs=world_size, join=True, start_method="spawn")
        per_rank = [json.loads((Path(out_dir) / f"load{r}.json").read_text()) for r in range(world_size)]
    points = []
    for key in (k for k in per_rank[0] if k != "chunk_us"):
        idle, loaded, speed = [], [], []
        for rows in zip(*(r[key] for r in per_rank)):
            idle.append(min(r[1] for r in rows) - max(r[0] for r in rows))
            loaded.append(min(r[3] for r in rows) - max(r[2] for r in rows))
            # the compute loop's pace in flight: matmuls done × the run-in's time per matmul / time in flight
            speed.append(statistics.mean(row[4] * row[5] / (row[3] - row[2]) for row in rows))
        points.append({"coll": "all_to_all", "world_size": world_size, "coll_bytes": float(key),
                       "idle_us_all": idle, "loaded_us_all": loaded, "compute_speed_all": speed,
                       "chunk_us": statistics.mean(r["chunk_us"] for r in per_rank)})
    return points


def fit_comm_load(points: Sequence[dict], cores: int) -> dict:
    """The comm load exponent e of simulator.engine from comm_load_points: with every rank
    computing, a transfer shares the cores among 2 · world size jobs (each rank's compute,
    each rank's part of the transfer), share = min(1, cores / jobs), and the engine runs it
    at share ** e of its idle speed, so loaded = idle / share ** e. Per size
    e = max(0, ln(median loaded / median idle) / ln(1 / share)); the exponent is the median
    over the sizes. Where the cores are not shared (share 1) e cannot be measured and the
    default stays. Per size too, with the compute loops' pace: core_use, the share of a core
    each rank's transfer took from compute (simulator.engine comm_core_use)."""
    if not points:
        raise SimulationError("comm load: no points to fit")
    n = int(points[0]["world_size"])
    share = min(1.0, cores / (2 * n))
    sizes = []
    for p in points:
        idle, loaded = statistics.median(p["idle_us_all"]), statistics.median(p["loaded_us_all"])
        if not (idle > 0 and loaded > 0):
            raise SimulationError(f"comm load: non-positive median time at {p['coll_bytes']:.0f} bytes")
        # ≥ 0: on a busy machine a size's loaded median can come out below its idle one
        e = max(0.0, math.log(loaded / idle) / math.log(1 / share)) if share < 1 else None
        size = {"coll_bytes": p["coll_bytes"], "idle_us": idle, "loaded_us": loaded, "exponent": e}
        if share < 1 and p.get("compute_speed_all"):
            # n compute loops and n transfers on the cores: the loops' pace relative to the
            # run-in (no transfer) is (cores − n · use) / (n · pace without), pace without = min(1, cores / n)
            speed = statistics.median(p["compute_speed_all"])
            alone = min(1.0, cores / n)
            size.update({"compute_speed": speed,
                         "core_use": min(alone, max(0.0, (cores - n * speed * alone) / n))})
        sizes.append(size)
    exponent = (max(0.0, statistics.median(s["exponent"] for s in sizes)) if share < 1
                else DEFAULT_COMM_LOAD_EXPONENT)
    return {"exponent": exponent, "measured": share < 1, "cores": cores, "share": share, "sizes": sizes,
            "points": [{k: p[k] for k in ("coll_bytes", "idle_us_all", "loaded_us_all", "compute_speed_all", "chunk_us")
                        if k in p} for p in points]}


def stall_points(points: Sequence[dict], threshold_us: float = STALL_THRESHOLD_US) -> list[tuple[float, float, float]]:
    """(payload bytes, probability, µs) per size of the load sweep, for the engine's
    comm_load_stall. A loaded transfer either takes about its idle time or about a scheduler
    quantum more (its thread woke to full cores), so: stalled = longer than the median idle
    one by more than threshold_us; probability = the loaded transfers' stalled share beyond
    the idle ones' (p_loaded − p_idle) / (1 − p_idle), as the replayed traced time already
    holds the idle stalls; µs = median stalled loaded time − median idle time (0 when none
    stalled)."""
    out = []
    for p in points:
        idle, loaded = np.asarray(p["idle_us_all"], dtype=float), np.asarray(p["loaded_us_all"], dtype=float)
        base = float(np.median(idle))
        stalled = loaded[loaded > base + threshold_us]
        p_idle = float(np.mean(idle > base + threshold_us))
        p_loaded = stalled.size / loaded.size
        probability = max(0.0, (p_loaded - p_idle) / (1.0 - p_idle)) if p_idle < 1 else 0.0
        out.append((float(p["coll_bytes"]), probability, float(np.median(stalled)) - base if stalled.size else 0.0))
    return out


# ---------------------------------------------------------------------------------------
# compute microbenchmarks


# Added on a GPU, where the CPU sizes above all finish within a kernel launch: LongCat-Flash's
# own GEMM widths (hidden 6144, dense FFN 12288, expert FFN 2048, q_lora 1536) at 512-4096
# tokens, elementwise ops up to 64 Mi elements, attention at 2K-4K tokens.
GPU_GEMMS = ((512, 6144, 2048), (2048, 6144, 2048), (4096, 6144, 12288), (4096, 12288, 6144), (2048, 6144, 1536))
GPU_ELEMENTWISE = (1 << 23, 1 << 26)
GPU_ATTENTION = ((1, 16, 2048, 128), (1, 64, 4096, 128))


def _compute_cases(torch, seed: int, device: str = "cpu") -> list[tuple[str, Callable[[], object]]]:
    """(op name in the trace, thunk) pairs covering each op kind over a range of sizes; on a
    GPU device also GPU_* sizes. Tensors are drawn on the CPU (one generator, the same
    values everywhere) and moved to `device`."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device)  # noqa: E731
    gpu = device != "cpu"
    F = torch.nn.functional
    cases: list[tuple[str, Callable[[], object]]] = []
    for m, k, n in [(16, 64, 64), (64, 128, 128), (128, 256, 512), (256, 256, 256), (512, 256, 1024),
                    (1024, 512, 512), (256, 1024, 256), (2048, 256, 256), (128, 128, 1024), (512, 512, 2048),
                    *(GPU_GEMMS if gpu else ())]:
        a, w = rnd(m, k), rnd(n, k)
        cases.append(("aten::mm", lambda a=a, w=w: torch.mm(a, w.t())))
        cases.append(("aten::linear", lambda a=a, w=w: F.linear(a, w)))
    for b, m, k, n in [(4, 64, 32, 64), (8, 128, 64, 128), (16, 256, 64, 256), (8, 512, 32, 512)]:
        x, y = rnd(b, m, k), rnd(b, k, n)
        cases.append(("aten::bmm", lambda x=x, y=y: torch.bmm(x, y)))
    if hasattr(torch, "_grouped_mm"):
        for rows, k, n, groups in [(64, 128, 128, 4), (256, 256, 128, 8), (1024, 256, 256, 8)]:
            a, w = rnd(rows, k), rnd(groups, k, n)
            offs = torch.linspace(rows // groups, rows, groups).to(torch.int32).to(device)
            cases.append(("aten::_grouped_mm", lambda a=a, w=w, offs=offs: torch._grouped_mm(a, w, offs=offs)))
    for numel in [1 << 10, 1 << 13, 1 << 16, 1 << 19, 1 << 21, *(GPU_ELEMENTWISE if gpu else ())]:
        x, y = rnd(numel // 256, 256), rnd(numel // 256, 256)
        cases.append(("aten::add", lambda x=x, y=y: x + y))
        cases.append(("aten::mul", lambda x=x, y=y: x * y))
        cases.append(("aten::silu", lambda x=x: F.silu(x)))
        cases.append(("aten::_fused_rms_norm", lambda x=x: F.rms_norm(x, (256,))))
        cases.append(("aten::_softmax", lambda x=x: torch.softmax(x, -1)))
        idx = torch.randint(0, numel // 256, (numel // 512,), generator=g).to(device)
        cases.append(("aten::index", lambda x=x, idx=idx: x[idx]))
        cases.append(("aten::cat", lambda x=x, y=y: torch.cat([x, y])))
    for b, h, t, d in [(1, 4, 64, 32), (2, 4, 128, 32), (2, 8, 256, 64), (4, 8, 512, 64), *(GPU_ATTENTION if gpu else ())]:
        q = rnd(b, h, t, d)
        cases.append(("aten::scaled_dot_product_attention",
                      lambda q=q: F.scaled_dot_product_attention(q, q, q, is_causal=True)))
    return cases


def compute_points(device: str = "cpu", reps: int = 7, seed: int = 0) -> list[dict]:
    """Time every compute case `reps` times; one point per case.

    Each point: the traced op name, its kind, input shapes/dtypes, FLOPs and bytes from
    `op_work` (shapes recorded by the profiler), and the median duration (µs): on the CPU
    the op's profiled time; on a GPU the op's kernel time under the profiler (what a
    trace's GPU lane shows), with `latency_us`, the time between CUDA events around one
    call (launch included: 24-79 µs on an H200 VM for cases whose kernels take 0.9-4.5
    µs). On a GPU a case the device cannot run is left out with a note on stderr.
    """
    import torch

    cuda = device != "cpu"
    if cuda:
        torch.cuda.set_device(0)
        device = "cuda:0"
    else:
        torch.set_num_threads(1)
    points = []
    for name, thunk in _compute_cases(torch, seed, device):
        try:
            for _ in range(3 if cuda else 2):
                thunk()
            events = _profiled_events(torch, name, thunk, reps, cuda)
            durs = [_kernel_us(e) for e in events] if cuda else [e.cpu_time_total for e in events]
            latency = _cuda_event_times(torch, thunk, reps) if cuda else []
        except Exception as err:  # noqa: BLE001 - any case the GPU refuses is left out, named
            if not cuda:
                raise
            print(f"calibrate: {name} left out on {torch.cuda.get_device_name(0)}: {str(err).splitlines()[0]}",
                  file=sys.stderr)
            continue
        if not events:
            continue
        ev = events[0]
        # torch 2.11's FunctionEvent has no input_dtypes: take each tensor as float32 (the cases' data)
        types = getattr(ev, "input_dtypes", None) or ["float" if isinstance(d, list) and d else "" for d in ev.input_shapes]
        work = op_work(name, ev.input_shapes, types)
        point = {
            "name": name, "kind": work.kind, "shapes": ev.input_shapes, "flops": work.flops,
            "bytes": work.bytes, "dur_us": statistics.median(durs),
        }
        if latency:
            point["latency_us"] = statistics.median(latency)
            if not point["dur_us"] > 0:  # no kernel time recorded: the event latency stands in
                point["dur_us"] = point["latency_us"]
        points.append(point)
    return points


def _kernel_us(event) -> float:
    """The GPU time of a profiled op's kernels (µs); 0 where the profiler recorded none."""
    value = getattr(event, "device_time_total", None)
    if value is None:  # torch before 2.4
        value = getattr(event, "cuda_time_total", 0.0)
    return float(value or 0.0)


def _profiled_events(torch, name: str, thunk: Callable[[], object], reps: int, cuda: bool = False) -> list:
    """The top-level `name` events of `reps` calls under the profiler (CPU activity, shapes;
    with `cuda` the CUDA activity too, each call synchronised)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities, record_shapes=True) as prof:
        for _ in range(reps):
            thunk()
            if cuda:
                torch.cuda.synchronize()
    events = [e for e in prof.events() if e.name == name and (e.cpu_parent is None or e.cpu_parent.name != name)]
    return [e for e in events if e.cpu_parent is None] or events


def _cuda_event_times(torch, thunk: Callable[[], object], reps: int) -> list[float]:
    """µs between CUDA events recorded around each of `reps` calls, synchronised after each."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    durs = []
    for _ in range(reps):
        start.record()
        thunk()
        end.record()
        torch.cuda.synchronize()
        durs.append(start.elapsed_time(end) * 1e3)
    return durs


# ---------------------------------------------------------------------------------------
# fitting and the file


def cpu_device_spec(points: Sequence[dict]) -> DeviceSpec:
    """A DeviceSpec for this CPU core from its best measured GEMM and elementwise rates."""
    gemm = [p["flops"] / p["dur_us"] * 1e6 for p in points if p["kind"] == "gemm" and p["dur_us"] > 0]
    mem = [p["bytes"] / p["dur_us"] * 1e6 for p in points if p["kind"] == "elementwise" and p["dur_us"] > 0]
    small = sorted(p["dur_us"] for p in points if p["flops"] + p["bytes"] < 1e5)
    base = DEVICES["cpu-core"]
    return DeviceSpec(
        f"cpu:{platform.processor() or platform.machine()}",
        max(gemm) if gemm else base.peak_flops_per_s,
        max(mem) if mem else base.mem_bytes_per_s,
        small[0] if small else base.launch_overhead_us,
    )


# A CUDA device name's marker → its datasheet DeviceSpec (first match wins; A800s are A100s
# with slower links, the same chip)
GPU_SPEC_MARKERS = (("h200", "H200"), ("h800", "H800"), ("h100", "H100-SXM"), ("b200", "B200"),
                    ("a800", "A100-SXM-80GB"), ("a100", "A100-SXM-80GB"))


def gpu_device_spec(name: str) -> DeviceSpec:
    """The datasheet DeviceSpec of a CUDA device name ("NVIDIA H100 80GB HBM3" → H100-SXM);
    H800 when no marker matches."""
    lower = name.lower()
    return DEVICES[next((spec for marker, spec in GPU_SPEC_MARKERS if marker in lower), "H800")]


def fit_calibration(backend: str, world_size: int, device: dict, compute: list[dict], comm: list[dict],
                    torch_version: str, comm_load: dict | None = None) -> dict:
    """The calibration object (see module docstring) from measured points."""
    spec = cpu_device_spec(compute) if device.get("type") == "cpu" else gpu_device_spec(device.get("name", ""))
    model = fit_cost_model(spec, [p["kind"] for p in compute], [p["flops"] for p in compute],
                           [p["bytes"] for p in compute], [p["dur_us"] for p in compute])
    fits = {}
    for coll in sorted({p["coll"] for p in comm}):
        for n in sorted({p["world_size"] for p in comm if p["coll"] == coll}):
            sel = [p for p in comm if p["coll"] == coll and p["world_size"] == n]
            fits[(coll, n)] = fit_comm(coll, n, [p["coll_bytes"] for p in sel], [p["dur_us"] for p in sel])
    cal = {
        "format": FORMAT, "version": VERSION, "backend": backend, "world_size": world_size,
        "device": device, "torch_version": torch_version,
        "created_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "compute": model.to_json(), "comm": CommModel(fits).to_json(),
        "points": {"compute": compute, "comm": comm},
    }
    if comm_load is not None:
        cal["comm_load"] = comm_load
    warnings = comm_warnings(fits, comm)
    if warnings:
        cal["warnings"] = warnings
    return cal


def comm_warnings(fits: dict, comm: Sequence[dict]) -> list[str]:
    """One line per collective across ranks whose fit has no per-byte cost: its median time
    did not grow with message size. On shared cores a rank descheduled for a time slice
    (~3 ms on Linux) makes a repetition 10-20x slower; once that hits over half of a size's
    repetitions, the median of a small message can match a large one's and the fit says
    bandwidth is infinite."""
    lines = []
    for (coll, n), fit in fits.items():
        sel = sorted((p for p in comm if p["coll"] == coll and p["world_size"] == n), key=lambda p: p["coll_bytes"])
        if n < 2 or fit.us_per_mb > 0 or len(sel) < 2:
            continue
        lo, hi = sel[0], sel[-1]
        lines.append(
            f"{coll} at world size {n}: the median time does not grow with message size "
            f"({lo['coll_bytes'] / 1024:.0f} KiB {lo['dur_us']:.0f} µs, {hi['coll_bytes'] / 1024:.0f} KiB {hi['dur_us']:.0f} µs), "
            f"so its fit has no per-byte cost; the ranks were likely descheduled — rerun on idle cores or with more --comm-reps"
        )
    return lines


def calibrate(backend: str = "gloo", world_size: int = 2, sizes_bytes: Sequence[int] = DEFAULT_SIZES_BYTES,
              comm_reps: int = 15, compute_reps: int = 7, seed: int = 0, load_reps: int = 101,
              cores: int | None = None) -> dict:
    """Run the sweeps and fit; returns the calibration object. load_reps 0 skips the comm
    load sweep (the exponent then defaults); cores: the cores the ranks share (default
    this machine's)."""
    import torch

    if backend not in ("gloo", "nccl"):
        raise SimulationError(f"calibrate: backend {backend!r} not supported, expected gloo or nccl")
    on_gpu = backend == "nccl"
    device = (
        {"type": "cuda", "name": torch.cuda.get_device_name(0), "threads_per_rank": 1}
        if on_gpu else {"type": "cpu", "name": platform.processor() or platform.machine(), "threads_per_rank": 1}
    )
    from traces.capture import keep_heap

    keep_heap()  # the op microbenchmarks see the heap the live ranks run with
    compute = compute_points("cuda" if on_gpu else "cpu", compute_reps, seed)
    # world size 1 too: the live code still calls the collectives there (local copies)
    comm = comm_points(backend, 1, sizes_bytes[:: max(len(sizes_bytes) // 3, 1)], comm_reps)
    comm_load = None
    if world_size > 1:
        comm += comm_points(backend, world_size, sizes_bytes, comm_reps)
        if not on_gpu and load_reps > 0:
            cores = cores or os.cpu_count() or 1  # as validate counts them
            comm_load = fit_comm_load(comm_load_points(backend, world_size, LOAD_SIZES_BYTES, load_reps), cores)
    return fit_calibration(backend, world_size, device, compute, comm, torch.__version__, comm_load)


def calibration_path(path: str | os.PathLike) -> Path:
    """CAL may name the file itself (*.json) or a directory holding calibration.json."""
    path = Path(path)
    return path if path.suffix == ".json" else path / CALIBRATION_JSON


def write_calibration(cal: dict, path: str | os.PathLike) -> Path:
    target = calibration_path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    return write_json_atomic(target, cal)


def _create_hint(backend: str | None, world_size: int | None, path: Path) -> str:
    return (f"`moesim calibrate --backend {backend or 'gloo'} --world-size {world_size or 2} "
            f"-o {path.parent if path.name == CALIBRATION_JSON else path}`")


def load_calibration(path: str | os.PathLike, backend: str | None = None, world_size: int | None = None
                     ) -> tuple[dict, CostModel, CommModel]:
    """Read and check a calibration file → (raw object, compute model, comm model).

    Raises SimulationError when the file is missing (naming the command that creates it),
    unreadable, of another format, or calibrated for another backend / world size.
    """
    target = calibration_path(path)
    if not target.is_file():
        raise SimulationError(f"{target}: no calibration; create it with {_create_hint(backend, world_size, target)}")
    try:
        cal = json.loads(target.read_text())
    except json.JSONDecodeError as err:
        raise SimulationError(f"{target}: invalid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(cal, dict) or cal.get("format") != FORMAT:
        raise SimulationError(f"{target}: not a moesim calibration (format field {cal.get('format') if isinstance(cal, dict) else None!r})")
    if cal.get("version") != VERSION:
        raise SimulationError(f"{target}: calibration version {cal.get('version')}, this moesim reads {VERSION}")
    if backend is not None and cal.get("backend") != backend or world_size is not None and cal.get("world_size") != world_size:
        raise SimulationError(
            f"{target}: calibrated for backend {cal.get('backend')} world size {cal.get('world_size')}, "
            f"asked for backend {backend or cal.get('backend')} world size {world_size or cal.get('world_size')}; "
            f"recalibrate with {_create_hint(backend, world_size, target)}"
        )
    compute = CostModel.from_json(cal.get("compute", {}), source=str(target))
    comm = CommModel.from_json(cal.get("comm", []), source=str(target))
    load = cal.get("comm_load") or {}
    exponent = load.get("exponent", DEFAULT_COMM_LOAD_EXPONENT)
    if not isinstance(exponent, (int, float)) or not exponent >= 0:
        raise SimulationError(f"{target}: comm_load.exponent must be a number ≥ 0, got {exponent!r}")
    comm.load_exponent = float(exponent)
    for size in load.get("sizes") or []:
        point = (size.get("coll_bytes"), size.get("exponent")) if isinstance(size, dict) else (None, None)
        if not all(isinstance(v, (int, float)) for v in point) or not (point[0] > 0 and point[1] >= 0):
            raise SimulationError(f"{target}: comm_load.sizes needs coll_bytes > 0 and exponent ≥ 0 per size, got {size!r}")
        comm.load_points.append((float(point[0]), float(point[1])))
        if "core_use" in size:
            use = size["core_use"]
            if not isinstance(use, (int, float)) or not 0 <= use <= 1:
                raise SimulationError(f"{target}: comm_load.sizes core_use must be a number in [0, 1], got {use!r}")
            comm.core_use_points.append((float(point[0]), float(use)))
        share = load.get("share")
        if load.get("measured") and isinstance(share, (int, float)) and 0 < share < 1:
            # the alternative additive model (CommModel.load_delay_at; validate --comm-load delay)
            idle, loaded = size.get("idle_us"), size.get("loaded_us")
            if not all(isinstance(v, (int, float)) and v > 0 for v in (idle, loaded)):
                raise SimulationError(f"{target}: comm_load.sizes needs idle_us and loaded_us > 0 per size, got {size!r}")
            comm.load_delay_points.append((float(point[0]), max(0.0, loaded - idle) / (1 / share - 1)))
    if load.get("measured"):
        # the stall model (CommModel.load_stall_at; validate --comm-load stall) from the raw times
        for point in load.get("points") or []:
            times = [point.get(k) if isinstance(point, dict) else None for k in ("idle_us_all", "loaded_us_all")]
            if not (isinstance(point, dict) and isinstance(point.get("coll_bytes"), (int, float)) and point["coll_bytes"] > 0
                    and all(isinstance(t, list) and t and all(isinstance(v, (int, float)) and v > 0 for v in t) for t in times)):
                what = point.get("coll_bytes") if isinstance(point, dict) else point
                raise SimulationError(f"{target}: comm_load.points needs coll_bytes > 0 and non-empty idle_us_all and "
                                      f"loaded_us_all of times > 0 per point (the point at coll_bytes {what!r})")
        comm.load_stall_points = stall_points(load.get("points") or [])
    return cal, compute, comm


# ---------------------------------------------------------------------------------------
# calibration from a live trace: work from the Kineto shapes, fitted per op name and kind


@dataclass
class _EventColumns:
    """The profiler's CPU op events of one rank (N events); args None where no shapes."""

    name: list
    args: list
    ts_us: "np.ndarray"
    dur_us: "np.ndarray"
    tid: list


class _NestedWork:
    """Work of one rank's CPU op events: op_work from an event's own shapes, else the sum
    over the outermost events with work nested in it on its thread. An autograd node's fixed
    bytes are twice its forward op's (the weight read again, its gradient written): `flows`
    holds the trace's fwdbwd pairs ((ts, tid) of the forward side, of the backward side)."""

    def __init__(self, tf: _EventColumns, flows: list[tuple[tuple, tuple]]) -> None:
        self.tf = tf
        self.own: dict[int, OpWork] = {}
        by_thread: dict = {}
        for i in sorted(range(len(tf.name)), key=lambda i: (tf.ts_us[i], -tf.dur_us[i])):
            by_thread.setdefault(tf.tid[i], []).append(i)
        self.by_thread = {t: (np.asarray(ix), tf.ts_us[ix]) for t, ix in by_thread.items()}
        self.tops: dict = {}  # thread → (top-level event indices, their starts)
        for t, (ix, _) in self.by_thread.items():
            tops, covered = [], -math.inf
            for i in ix.tolist():
                if tf.ts_us[i] >= covered:
                    tops.append(i)
                    covered = tf.ts_us[i] + tf.dur_us[i]
            self.tops[t] = (np.asarray(tops, dtype=np.int64), tf.ts_us[tops] if tops else np.zeros(0))
        self.node_fixed: dict[int, float] = defaultdict(float)
        for (f_ts, f_tid), (b_ts, b_tid) in flows:
            fwd, node = self._top_at(f_tid, f_ts), self._top_at(b_tid, b_ts)
            if fwd >= 0 and node >= 0:
                self.node_fixed[node] += 2 * self.own_work(fwd).fixed_bytes

    def _top_at(self, tid, t: float) -> int:
        """The top-level event of thread tid running at time t, or -1."""
        tops, starts = self.tops.get(tid, (np.zeros(0, dtype=np.int64), np.zeros(0)))
        k = int(np.searchsorted(starts, t, side="right")) - 1
        if k < 0 or t > self.tf.ts_us[tops[k]] + self.tf.dur_us[tops[k]]:
            return -1
        return int(tops[k])

    def own_work(self, i: int) -> OpWork:
        if i not in self.own:
            a = self.tf.args[i]
            self.own[i] = (op_work(self.tf.name[i], a.get("Input Dims"), a.get("Input type"))
                           if a is not None else OpWork(classify(self.tf.name[i]), 0.0, 0.0))
        return self.own[i]

    def work(self, i: int) -> OpWork:
        w = self.own_work(i)
        if w.flops > 0 or w.bytes > 0:
            return w
        tf = self.tf
        ix, ts = self.by_thread[tf.tid[i]]
        end = tf.ts_us[i] + tf.dur_us[i]
        flops = nbytes = fixed = 0.0
        covered = -math.inf
        for j in ix[np.searchsorted(ts, tf.ts_us[i], side="left"): np.searchsorted(ts, end, side="right")].tolist():
            if j == i or tf.ts_us[j] < covered or tf.ts_us[j] + tf.dur_us[j] > end:
                continue
            c = self.own_work(j)
            if c.flops > 0 or c.bytes > 0:
                flops, nbytes, fixed = flops + c.flops, nbytes + c.bytes, fixed + c.fixed_bytes
                covered = tf.ts_us[j] + tf.dur_us[j]
        return OpWork(w.kind, flops, nbytes, min(max(fixed, self.node_fixed.get(i, 0.0)), nbytes))


def attach_work(ops: "pa.Table", run_dir: str | os.PathLike) -> "pa.Table":
    """Fill flops / bytes of CPU ops from the run's Kineto shapes (comm ops get their sizes
    when traces.kineto parses the run).

    The normalized trace keeps no shapes, so each op is matched to its profiler event (same
    rank and name, start within 1 µs after the rank's clock offset, which is estimated as
    the median start − ts over ops whose (name, duration) pair is unique) and `op_work`
    gives the work; an op without shapes of its own (an autograd node such as
    `autograd::engine::evaluate_function: MmBackward0`) takes the summed work of the
    outermost ops with work nested in it on its thread. Ops already carrying work, and ops
    without a match, are left as they are. Adds a `fixed_bytes` column beside the schema's
    (op_work: weight bytes, which scaling keeps; step_graph carries it into the StepGraph);
    an autograd node's are twice its forward op's, found through the trace's fwdbwd flows.
    """
    import numpy as np
    import pyarrow as pa

    from traces.capture import read_trace
    from traces.rundir import trace_files

    # traces.kineto keeps only the args its own columns need, so the shapes come from the
    # Kineto documents themselves (read through traces/, still never parsed here by hand)
    paths = trace_files(run_dir)
    if not paths:
        raise SimulationError(f"{run_dir}: no Kineto traces to take shapes from")
    by_rank, flows = {}, {}
    for k, path in enumerate(paths):
        doc = read_trace(path)
        rank = (doc.get("distributedInfo") or {}).get("rank", k)
        events = doc.get("traceEvents", [])
        timed = [e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "Operator")]
        ends = {e.get("id"): e for e in events if e.get("ph") == "f" and e.get("cat") == "fwdbwd"}
        flows[int(rank)] = [((float(e.get("ts", 0)), e.get("tid")), (float(ends[e["id"]].get("ts", 0)), ends[e["id"]].get("tid")))
                            for e in events if e.get("ph") == "s" and e.get("cat") == "fwdbwd" and e.get("id") in ends]
        by_rank[int(rank)] = _EventColumns(
            name=[e.get("name", "") for e in timed],
            args=[e["args"] if isinstance(e.get("args"), dict) and "Input Dims" in e["args"] else None for e in timed],
            ts_us=np.array([float(e.get("ts", 0)) for e in timed]), dur_us=np.array([float(e.get("dur", 0)) for e in timed]),
            tid=[e.get("tid") for e in timed],
        )
    rank_col = ops.column("rank").to_numpy()
    names = ops.column("name").to_pylist()
    start = ops.column("start_us").to_numpy()
    dur = ops.column("dur_us").to_numpy()
    kind = ops.column("kind").to_pylist()
    flops = ops.column("flops").to_numpy().copy()
    nbytes = ops.column("bytes").to_numpy().copy()
    fixed = (ops.column("fixed_bytes").to_numpy().copy() if "fixed_bytes" in ops.column_names
             else np.zeros(ops.num_rows))
    for rank, tf in by_rank.items():
        rows = np.flatnonzero(rank_col == rank)
        nested = _NestedWork(tf, flows.get(rank, []))
        ev_by_name: dict[str, list[int]] = {}
        for i, nm in enumerate(tf.name):
            ev_by_name.setdefault(nm, []).append(i)
        pair_ev: dict[tuple, list[int]] = {}
        for nm, idx in ev_by_name.items():
            for i in idx:
                pair_ev.setdefault((nm, round(float(tf.dur_us[i]), 3)), []).append(i)
        pair_op: dict[tuple, list[int]] = {}
        for r in rows:
            pair_op.setdefault((names[r], round(float(dur[r]), 3)), []).append(int(r))
        diffs = [start[o[0]] - tf.ts_us[pair_ev[key][0]] for key, o in pair_op.items()
                 if len(o) == 1 and len(pair_ev.get(key, ())) == 1]
        if not diffs:
            continue
        offset = float(np.median(diffs))
        ts_sorted = {}
        for nm, idx in ev_by_name.items():
            order = np.asarray(sorted(idx, key=lambda i: tf.ts_us[i]))
            ts_sorted[nm] = (order, tf.ts_us[order] + offset)
        for r in rows:
            found = ts_sorted.get(names[r])
            if found is None:
                continue
            idx, ts = found
            j = int(np.searchsorted(ts, start[r]))
            best = min((k for k in (j - 1, j) if 0 <= k < len(ts)), key=lambda k: abs(ts[k] - start[r]), default=None)
            if best is None or abs(ts[best] - start[r]) > 1.0:
                continue
            if kind[r] != "comm" and flops[r] <= 0 and nbytes[r] <= 0:
                work = nested.work(int(idx[best]))
                flops[r], nbytes[r], fixed[r] = work.flops, work.bytes, work.fixed_bytes
    out = ops
    for col, values in (("flops", flops), ("bytes", nbytes)):
        out = out.set_column(out.schema.get_field_index(col), col, pa.array(values, type=pa.float64()))
    if "fixed_bytes" in out.column_names:
        return out.set_column(out.schema.get_field_index("fixed_bytes"), "fixed_bytes", pa.array(fixed, type=pa.float64()))
    return out.append_column("fixed_bytes", pa.array(fixed, type=pa.float64()))


def fit_from_ops(ops: "pa.Table", base: CostModel, min_points: int = 3) -> CostModel:
    """Refine `base` with fits on a trace's own compute ops (work attached): one fit per op
    name seen at ≥ min_points distinct sizes, then per kind; `base` fills the rest. Autograd
    nodes (work summed from the ops nested in them, node overhead included) get fits of
    their own name only: they would skew their kind's fit."""
    import numpy as np

    kind = np.asarray(ops.column("kind").to_pylist())
    sel = np.flatnonzero(kind == "compute")
    names = np.asarray(ops.column("name").to_pylist())[sel]
    f = ops.column("flops").to_numpy()[sel]
    b = ops.column("bytes").to_numpy()[sel]
    y = ops.column("dur_us").to_numpy()[sel]
    has_work = (f + b) > 0
    kinds = np.asarray([classify(n) for n in names])
    own = has_work & ~np.char.startswith(names.astype(str), AUTOGRAD_NODE)
    fits = dict(base.fits)
    by_kind = fit_cost_model(base.device, kinds[own], f[own], b[own], y[own], min_points)
    fits.update(by_kind.fits)
    for name in sorted(set(names[has_work].tolist())):
        m = has_work & (names == name)
        if len({(float(x), float(z)) for x, z in zip(f[m], b[m])}) >= min_points:
            fits.update({name: fit_cost_model(base.device, [name] * int(m.sum()), f[m], b[m], y[m], min_points).fits[name]})
    return CostModel(base.device, fits)
