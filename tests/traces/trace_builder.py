"""Hand-built Kineto traces whose answers are known exactly (used by several tests)."""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson

RUN_PID = 4242


def cpu(name, ts, dur, tid=1, cat="cpu_op", **args):
    return {"ph": "X", "cat": cat, "name": name, "pid": RUN_PID, "tid": tid, "ts": ts, "dur": dur, "args": args}


def ann(name, ts, dur, tid=1):
    return cpu(name, ts, dur, tid=tid, cat="user_annotation")


def launch(ts, dur, corr, tid=1, name="cudaLaunchKernel"):
    return cpu(name, ts, dur, tid=tid, cat="cuda_runtime", correlation=corr)


def gpu(name, ts, dur, stream, corr, cat="kernel", device=0, **args):
    return {
        "ph": "X", "cat": cat, "name": name, "pid": device, "tid": stream, "ts": ts, "dur": dur,
        "args": {"device": device, "stream": stream, "correlation": corr, **args},
    }


A2A_ARGS = {
    "Collective name": "all_to_all", "In msg nelems": 1000, "Out msg nelems": 1000, "dtype": "Float",
    "Group size": 2, "In split size": "[300, 700]", "Out split size": "[500, 500]",
    "Process Group Name": "0", "Process Group Ranks": "[0, 1]",
}


def gpu_rank0_events():
    """Rank 0 on a GPU: compute on stream 7, DeepEP on stream 20, NCCL all-to-all on stream 21.

    comm    = notify [90,110) ∪ deep_ep dispatch [150,250) ∪ nccl [350,420)  = 190
    compute = [100,200) ∪ [300,400) ∪ dispatch_permute [450,500)            = 250
    hidden  = [100,110) + [150,200) + [350,400)                              = 110
    memory  = [400,450) = 50; span [10,500) (CPU ops count) = 490, busy 360 → idle 130
    HTA's rule (only ^nccl.*Kernel is comm) would give 50 / 70 = 71.4 % instead of 57.9 %.
    """
    return [
        ann("ProfilerStep#7", 0, 1000),
        cpu("aten::mm", 10, 20),
        launch(15, 5, 1),
        ann("L0/dispatch", 40, 40),
        cpu("deep_ep::Buffer::dispatch", 45, 25),
        launch(50, 5, 2),
        launch(60, 5, 3),
        ann("L0/experts", 100, 28),
        launch(100, 5, 4),
        launch(110, 5, 5, name="cudaMemcpyAsync"),
        launch(120, 5, 6),
        ann("L0/combine", 130, 20),
        cpu("record_param_comms", 132, 16, **A2A_ARGS, Seq=0),
        launch(135, 5, 7),
        gpu("void cutlass::Kernel<gemm>(Params)", 100, 100, 7, 1),
        gpu("void notify_dispatch<8>(int*)", 90, 20, 20, 2),
        gpu("void deep_ep::intranode::dispatch<8, 768>(void*)", 150, 100, 20, 3),
        gpu("void at::native::elementwise_kernel<128>(int)", 300, 100, 7, 4),
        gpu("Memcpy DtoD (Device -> Device)", 400, 50, 7, 5, cat="gpu_memcpy", bytes=4096),
        gpu("void moe::dispatch_permute<float>(float*)", 450, 50, 7, 6),
        gpu("ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)", 350, 70, 21, 7, **A2A_ARGS, Seq=0),
    ]


def cpu_rank1_events():
    """Rank 1, CPU only: gloo collectives on two worker threads overlapping main-thread compute.

    compute = [100,200) ∪ [250,400) ∪ [500,600) = 350 (aten::addmm nested: not counted twice)
    comm    = gloo all_to_all [30,300) ∪ gloo all_reduce [480,520) = 310
    hidden  = 100 + 50 + 20 = 170 → 54.84 %
    window of L1/dispatch: the compute between issue and wait = 100 + 150 = 250
    """
    return [
        ann("ProfilerStep#7", 0, 1000, tid=11),
        ann("L1/dispatch", 0, 100, tid=11),
        cpu("c10d::alltoall_base_", 10, 10, tid=11),
        cpu("record_param_comms", 12, 6, tid=11, **A2A_ARGS),
        ann("L1/experts", 100, 300, tid=11),
        cpu("aten::mm", 100, 100, tid=11),
        cpu("aten::addmm", 110, 80, tid=11),
        cpu("aten::mm", 250, 150, tid=11),
        cpu("c10d::wait", 400, 50, tid=11),
        ann("L1/combine", 455, 200, tid=11),
        cpu("c10d::allreduce_", 460, 10, tid=11),
        cpu("record_param_comms", 461, 8, tid=11, **{**A2A_ARGS, "Collective name": "allreduce", "In split size": "[]"}),
        cpu("aten::add", 500, 100, tid=11),
        ann("gloo:all_to_all", 30, 270, tid=12),
        ann("gloo:all_reduce", 480, 40, tid=13),
    ]


def write_trace(path: Path, events, rank=None, world_size=2, base_ns=None, gz=True, offset_us=0.0) -> Path:
    """Write a Kineto-style file; base_ns set → ts relative to it, else absolute (offset_us added)."""
    doc = {"schemaVersion": 1, "traceEvents": [dict(e, ts=e["ts"] + offset_us) for e in events]}
    if rank is not None:
        doc["distributedInfo"] = {"backend": "nccl", "rank": rank, "world_size": world_size}
    if base_ns is not None:
        doc["baseTimeNanoseconds"] = base_ns
    raw = orjson.dumps(doc)
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path
