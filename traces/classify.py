"""Which traced op is compute, comm, memory, sync or host; which collective; how many bytes.

The rules (all regexes are configurable from `moesim parse --comm-regex ...`):

GPU activities (cat kernel / gpu_memcpy / gpu_memset):
    memory   cat gpu_memcpy / gpu_memset, or a kernel named Memcpy* / Memset*
    comm     a kernel matching `comm_kernel_regex` (NCCL, DeepEP `::ep::` / `deep_ep::`), or
             one matching `comm_stream_kernel_regex` (dispatch / combine / notify) on a
             *comm stream*: a stream that carries at least one `comm_kernel_regex` kernel,
             or one listed in `comm_streams`
    compute  every other kernel
CPU events, on a rank whose trace holds GPU activities:
    sync     cuda runtime calls that block the thread (cuda*Synchronize), and `wait` ops
    host     everything else (launch and framework time)
CPU events, on a CPU-only rank:
    comm     `gloo:*` (and `nccl:*`) user annotations on a worker thread
    sync     ops whose name ends in "wait" (c10d::wait, aten::wait, _ExchangeWait ...)
    host     collective issue ops (c10d::*, record_param_comms), and a top-level op that
             calls one (e.g. an autograd Function that starts an exchange)
    compute  every other top-level cpu_op
A nested issue or wait op is cut out of its top-level op as its own piece, as CUDA runtime
calls are (traces/lanes.py).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from traces.errors import TraceError

DEFAULT_COMM_KERNEL_REGEX = r"^nccl|^ncclDevKernel|(^|::|\b)(deep_?ep|ep)::|^void (deep_?ep|dpsk)::"
DEFAULT_COMM_STREAM_KERNEL_REGEX = r"dispatch|combine|notify"
SYNC_RUNTIME_RE = re.compile(r"^cuda(Device|Stream|Event)Synchronize$|^cudaStreamQuery$")
WAIT_OP_RE = re.compile(r"wait(_tensor)?$|^c10d::wait|work\.wait", re.I)
ISSUE_OP_RE = re.compile(r"^c10d::(?!wait)|^record_param_comms$|^c10d_functional::(?!wait)|^_c10d_functional::(?!wait)")
CPU_COMM_ANNOTATION_RE = re.compile(r"^(gloo|nccl|mpi|ucc):")

# collective names as they appear in `Collective name`, annotations and kernel names
_COLL_ALIASES = {
    "allreduce": "all_reduce",
    "all_reduce": "all_reduce",
    "allreduce_coalesced": "all_reduce",
    "all_to_all": "all_to_all",
    "alltoall": "all_to_all",
    "alltoall_base": "all_to_all",
    "all_to_allv": "all_to_all",
    "all_to_all_single": "all_to_all",
    "allgather": "all_gather",
    "all_gather": "all_gather",
    "_allgather_base": "all_gather",
    "allgather_into_tensor_coalesced": "all_gather",
    "all_gather_into_tensor": "all_gather",
    "allgather_coalesced": "all_gather",
    "reduce_scatter": "reduce_scatter",
    "reducescatter": "reduce_scatter",
    "_reduce_scatter_base": "reduce_scatter",
    "reduce_scatter_tensor": "reduce_scatter",
    "reduce_scatter_tensor_coalesced": "reduce_scatter",
    "send": "send",
    "recv": "recv",
    "recv_any_source": "recv",
    "broadcast": "broadcast",
    "barrier": "barrier",
    "reduce": "all_reduce",
    "gather": "all_gather",
    "scatter": "broadcast",
}
_KERNEL_COLL = [
    (re.compile(r"AllReduce", re.I), "all_reduce"),
    (re.compile(r"AllGather", re.I), "all_gather"),
    (re.compile(r"ReduceScatter", re.I), "reduce_scatter"),
    (re.compile(r"Broadcast", re.I), "broadcast"),
    (re.compile(r"AllToAll|all_to_all|alltoall|dispatch|combine|notify", re.I), "all_to_all"),
    # NCCL runs all-to-all and point-to-point both as SendRecv kernels; without the
    # collective args we cannot tell them apart and call it a send.
    (re.compile(r"SendRecv|Send", re.I), "send"),
    (re.compile(r"Recv", re.I), "recv"),
    (re.compile(r"Reduce", re.I), "all_reduce"),
]
_DTYPE_BYTES = {
    "float": 4, "float32": 4, "double": 8, "float64": 8, "half": 2, "float16": 2,
    "bfloat16": 2, "bf16": 2, "int": 4, "int32": 4, "long": 8, "int64": 8, "short": 2,
    "int16": 2, "char": 1, "int8": 1, "byte": 1, "uint8": 1, "bool": 1, "unsigned char": 1,
    "float8_e4m3fn": 1, "float8_e5m2": 1, "complexfloat": 8, "complexdouble": 16,
    # the spellings of the profiler's `Input type` (C++ type names)
    "c10::half": 2, "c10::bfloat16": 2, "long int": 8, "short int": 2, "signed char": 1,
    "c10::float8_e4m3fn": 1, "c10::float8_e5m2": 1, "c10::complex<float>": 8, "c10::complex<double>": 16,
}


@dataclass
class ClassifyConfig:
    """Regexes that decide what counts as communication (see module docstring)."""

    comm_kernel_regex: str = DEFAULT_COMM_KERNEL_REGEX
    comm_stream_kernel_regex: str = DEFAULT_COMM_STREAM_KERNEL_REGEX
    comm_streams: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        try:
            self.comm_kernel_re = re.compile(self.comm_kernel_regex, re.I)
            self.comm_stream_kernel_re = re.compile(self.comm_stream_kernel_regex, re.I)
        except re.error as err:
            raise TraceError(f"classification regex: {err}") from None


def collective_of(name: str, args: dict | None) -> str:
    """Normalized collective type (schema.COLLECTIVES) of a comm op, "" if unknown."""
    if args:
        coll = args.get("Collective name")
        if isinstance(coll, str) and coll:
            key = coll.lower().strip()
            if key in _COLL_ALIASES:
                return _COLL_ALIASES[key]
    if ":" in name and CPU_COMM_ANNOTATION_RE.match(name):
        key = name.split(":", 1)[1].lower()
        if key in _COLL_ALIASES:
            return _COLL_ALIASES[key]
    for pattern, coll in _KERNEL_COLL:
        if pattern.search(name):
            return coll
    return ""


def _int_list(value: object) -> list[int]:
    """'[1, 2]' or [1, 2] → [1, 2]; anything else → []."""
    if isinstance(value, str):
        try:
            value = ast.literal_eval(value) if value.strip() else []
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            return []
    if isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return [int(v) for v in value]
    return []


def collective_details(args: dict | None, pg_ranks: dict[str, list[int]]) -> tuple[str, float, list[float], int]:
    """(group, coll_bytes, splits_bytes, seq) from record_param_comms-style args.

    group is the comma-separated global ranks ("" unknown); coll_bytes the input message in
    bytes (0 unknown); splits the per-peer input bytes for all-to-all-v (empty when even);
    seq the `Seq` arg (-1 when absent).
    """
    if not args:
        return "", 0.0, [], -1
    ranks = _int_list(args.get("Process Group Ranks"))
    if not ranks:
        ranks = pg_ranks.get(str(args.get("Process Group Name", "")), [])
    group = ",".join(str(r) for r in ranks)
    nelems = args.get("In msg nelems")
    dtype = str(args.get("dtype", "")).lower()
    elem_bytes = _DTYPE_BYTES.get(dtype, 0)
    coll_bytes = float(nelems) * elem_bytes if isinstance(nelems, (int, float)) and elem_bytes else 0.0
    split_rows = _int_list(args.get("In split size"))
    splits: list[float] = []
    if split_rows and sum(split_rows) > 0 and coll_bytes > 0:
        total = float(sum(split_rows))
        splits = [coll_bytes * r / total for r in split_rows]
    seq = args.get("Seq")
    seq = int(seq) if isinstance(seq, (int, float)) and not isinstance(seq, bool) else -1
    return group, coll_bytes, splits, seq


def _tensor_bytes(dims: object, dtype: object) -> float:
    """Bytes of one profiler `Input Dims` entry ([d0, d1, ...]) of `Input type` dtype; 0 unknown."""
    elem = _DTYPE_BYTES.get(str(dtype).lower(), 0) if isinstance(dtype, str) else 0
    if not elem or not isinstance(dims, list) or not dims or not all(isinstance(d, int) for d in dims):
        return 0.0
    n = 1
    for d in dims:
        n *= d
    return float(n * elem)


def cpu_collective_details(
    issue_name: str, issue_args: dict | None, comm_args: dict | None, pg_ranks: dict[str, list[int]]
) -> tuple[str, float, list[float], int]:
    """(group, coll_bytes, splits_bytes, seq) of a CPU (gloo) collective.

    Starts from the issue op's record_param_comms-style args (`collective_details`), then
    fills what CPU traces leave out (torch's CPU builds record no record_param_comms):
      coll_bytes  the worker thread's `gloo:*` annotation records the input tensors (its
                  `Input Dims` / `Input type`): their bytes summed
      splits      `c10d::alltoall_base_(output, input, pg, output_splits, input_splits, ...)`
                  keeps the input split sizes (rows) in `Concrete Inputs`[4]; "[]" = even
      group       the process group when the trace's distributedInfo lists only one
    """
    group, coll_bytes, splits, seq = collective_details(issue_args, pg_ranks)
    if coll_bytes <= 0 and comm_args:
        dims, types = comm_args.get("Input Dims"), comm_args.get("Input type")
        if isinstance(dims, list) and isinstance(types, list):
            coll_bytes = sum(_tensor_bytes(d, t) for d, t in zip(dims, types))
    if not splits and coll_bytes > 0 and issue_args:
        concrete = issue_args.get("Concrete Inputs")
        if isinstance(concrete, list) and len(concrete) > 4 and issue_name.startswith("c10d::alltoall_base"):
            rows = _int_list(concrete[4])
            if rows and sum(rows) > 0:
                splits = [coll_bytes * r / sum(rows) for r in rows]
    if not group and len(pg_ranks) == 1:
        group = ",".join(str(r) for r in next(iter(pg_ranks.values())))
    return group, coll_bytes, splits, seq
