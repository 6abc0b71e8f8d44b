"""Live capture: LongCat-Flash on N expert-parallel ranks under torch.profiler → a run dir.

    capture(spec)             spawn `spec.world_size` ranks on this machine (one process each,
                              a TCPStore on a port the OS picks, so runs never collide), or, when
                              started by torchrun (RANK / WORLD_SIZE / MASTER_ADDR set), run this
                              process's rank only: the same command then scales past one machine.
    spawn_ranks(fn, ...)      the launcher on its own: run fn(rank, world_size, device, *args)
                              on every rank with a process group, a deadline and error reports.

Each rank builds the same model from the same seed, applies `model.parallel` (experts sharded,
attention and dense MLPs data-parallel: every rank its own `batch / world_size` sequences), runs
`warmup + steps` steps of the mode (prefill, decode or train) with one intra-op thread by default,
and writes `RUN/rank{r}.pt.trace.json.gz` (Kineto; a `ProfilerStep#k` span per profiled step,
sub-blocks labelled `L{layer}/{block}` by model.parallel). Rank 0 gathers every rank's step
times, routing statistics and dispatch split sizes and writes `RUN/run.json`.

A rank that raises makes `capture` raise RankFailure naming the rank and its error; a rank that
does not finish by the deadline (`timeout_s`, counted from launch) likewise, with the step it
last started. The other ranks are stopped; traces that ranks finished writing are kept.
"""

from __future__ import annotations

import dataclasses
import datetime
import gc
import gzip
import json
import logging
import math
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from traces.errors import TraceError
from traces.rundir import RUN_JSON, TRACE_FILE_RE, rank_trace_name, write_json_atomic

SCHEDULES = ("sequential", "shortcut")
MODES = ("prefill", "decode", "train")
BACKENDS = ("auto", "gloo", "nccl")
RUN_JSON_VERSION = 1


class CaptureError(TraceError):
    """Capture arguments that cannot describe a run (the CLI prints one line, exit 2)."""


class RankFailure(RuntimeError):
    """A rank raised or did not finish in time; the message names the rank and the reason."""


@dataclasses.dataclass
class CaptureSpec:
    """One live run. `batch` is the global batch in sequences, split evenly over the ranks."""

    out_dir: str
    preset: str = "tiny"
    world_size: int = 2
    schedule: str = "shortcut"  # one of SCHEDULES
    mode: str = "prefill"  # one of MODES
    batch: int = 2  # global sequences per step; each rank runs batch / world_size
    seq: int = 16  # prefill/train: tokens per sequence; decode: new tokens per step
    context: int = 0  # decode: cached tokens in front of each step's new tokens
    steps: int = 5  # measured (profiled) steps
    warmup: int = 2  # steps run first, excluded from timing and from the trace
    threads: int = 1  # intra-op threads per rank
    timeout_s: float = 600.0  # deadline for the whole run, from launch
    profiler: bool = True  # False: same steps without torch.profiler (overhead check)
    backend: str = "auto"  # auto: nccl where CUDA is available, else gloo
    seed: int = 0
    zero_bias: float = 0.0  # the routers' correction bias of the zero experts (steers their share)
    fault: str = ""  # tests only: "raise:R", "hang:R" or "raise-after-trace:R"


def validate_spec(spec: CaptureSpec) -> None:
    """Raise CaptureError naming the first argument that cannot work (model checks come later)."""

    def bad(field: str, value: object, expected: str) -> None:
        raise CaptureError(f"--{field.replace('_', '-')} {value}: expected {expected}")

    if spec.world_size < 1:
        bad("world_size", spec.world_size, "at least 1")
    if spec.schedule not in SCHEDULES:
        bad("schedule", spec.schedule, " or ".join(SCHEDULES))
    if spec.mode not in MODES:
        bad("mode", spec.mode, ", ".join(MODES))
    if spec.backend not in BACKENDS:
        bad("backend", spec.backend, ", ".join(BACKENDS))
    if spec.batch < 1 or spec.batch % spec.world_size:
        bad("batch", spec.batch, f"a positive multiple of the world size {spec.world_size}")
    if spec.seq < 1:
        bad("seq", spec.seq, "at least 1")
    if spec.mode == "train" and spec.seq < 2:
        bad("seq", spec.seq, "at least 2 in train mode (next-token targets)")
    if spec.context < 0:
        bad("context", spec.context, "at least 0")
    if spec.steps < 1:
        bad("steps", spec.steps, "at least 1")
    if spec.warmup < 0:
        bad("warmup", spec.warmup, "at least 0")
    if spec.threads < 1:
        bad("threads", spec.threads, "at least 1")
    if not spec.timeout_s > 0:
        bad("timeout", spec.timeout_s, "a positive number of seconds")
    if not math.isfinite(spec.zero_bias):
        bad("zero_bias", spec.zero_bias, "a finite number")
    if spec.fault and not _parse_fault(spec.fault):
        bad("inject_fault", spec.fault, "raise:RANK, hang:RANK or raise-after-trace:RANK")


def _parse_fault(fault: str) -> tuple[str, int] | None:
    kind, _, rank = fault.partition(":")
    if kind in ("raise", "hang", "raise-after-trace") and rank.isdigit():
        return kind, int(rank)
    return None


# ---------------------------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------------------------


def resolve_backend(backend: str) -> str:
    import torch

    if backend == "auto":
        return "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and not torch.cuda.is_available():
        raise CaptureError("--backend nccl: CUDA is not available on this machine")
    return backend


def launched_by_torchrun() -> bool:
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def spawn_ranks(
    fn: Callable[..., None],
    world_size: int,
    args: tuple,
    *,
    backend: str,
    timeout_s: float,
    status_dir: str | os.PathLike,
    threads: int = 1,
    progress: Callable[[str], None] | None = None,
) -> None:
    """Run `fn(rank, world_size, device, *args)` on `world_size` spawned ranks and wait.
    progress: called with rank 0's progress line (report_progress) whenever it changes.

    fn must be a module-level function (spawned processes import it). Each rank has the
    default process group initialised (`backend`, collectives time out at the deadline).
    Ranks write their errors and progress to hidden files in `status_dir`. Raises RankFailure
    when a rank raises (its error's last line, plus a hint where its traceback is) or when the
    deadline passes (the ranks still running and the step each last started).
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from torch.multiprocessing.spawn import ProcessException

    status_dir = Path(status_dir)
    status_dir.mkdir(parents=True, exist_ok=True)
    for r in range(world_size):
        for path in (_error_path(status_dir, r), _progress_path(status_dir, r), _log_path(status_dir, r)):
            path.unlink(missing_ok=True)
    # torch logs a warning per rank it stops; the RankFailure message says it once.
    logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    # The parent hosts the rendezvous store on a port the OS picks: two runs never collide.
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False)
    deadline = time.monotonic() + timeout_s
    context = mp.start_processes(
        _spawned_rank,
        args=(fn, world_size, store.port, backend, timeout_s, threads, str(status_dir), args),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    last = ""
    try:
        while not context.join(timeout=max(0.05, min(1.0, deadline - time.monotonic())), grace_period=2.0):
            if progress is not None:
                now = _read_progress(status_dir, 0)
                if now != last and now != "never started":
                    progress(now.removeprefix("last at "))
                    last = now
            if time.monotonic() >= deadline:
                running = [r for r, p in enumerate(context.processes) if p.is_alive()]
                where = ", ".join(f"rank {r} ({_read_progress(status_dir, r)})" for r in running)
                raise RankFailure(f"did not finish within {timeout_s:g} s: {where}; all ranks stopped")
    except ProcessException as err:
        raise RankFailure(_first_error(status_dir, world_size, err)) from None
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
        for process in context.processes:
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
        del store
    for r in range(world_size):  # success: the logs hold only the profiler's chatter
        _log_path(status_dir, r).unlink(missing_ok=True)


def _spawned_rank(
    rank: int,
    fn: Callable[..., None],
    world_size: int,
    port: int,
    backend: str,
    timeout_s: float,
    threads: int,
    status_dir: str,
    args: tuple,
) -> None:
    # The rank's stdout/stderr (Kineto prints a line at every profiler start/stop) go to a
    # hidden log in the run dir, so the terminal shows moesim's own output only.
    log_fd = os.open(_log_path(Path(status_dir), rank), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    keep_heap()
    # Collectives time out later than the launcher's deadline, so a hang is reported as one.
    timeout = datetime.timedelta(seconds=timeout_s + 60)
    try:
        device = _rank_device(backend, rank)
        store = dist.TCPStore("127.0.0.1", port, world_size, False, timeout=timeout)
        dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
        fn(rank, world_size, device, *args)
        dist.barrier()  # nobody tears the group down while a peer still needs it
        dist.destroy_process_group()
    except BaseException as err:
        _write_error(Path(status_dir), rank, err)
        raise
    # Done, and everything written. Skip the interpreter's teardown: after many profiler
    # sessions in one process (the alternating runs) it sometimes ends in std::terminate
    # ("terminate called without an active exception", SIGABRT) in a C++ destructor, which
    # would read as a failed rank (seen with torch 2.13 about once in five profiled runs).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _run_torchrun_rank(fn: Callable[..., None], backend: str, timeout_s: float, threads: int, status_dir: str, args: tuple) -> None:
    """This process is one rank started by torchrun: env:// rendezvous, same body as spawned."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    keep_heap()
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    try:
        device = _rank_device(backend, local_rank)
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))  # torchrun's agent owns the deadline
        fn(rank, world_size, device, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as err:
        _write_error(Path(status_dir), rank, err)
        raise


# glibc malloc gives a freed block of at least M_MMAP_THRESHOLD (dynamic, 128 KiB up to 32 MiB)
# back to the kernel, and trims the heap's top past M_TRIM_THRESHOLD: the next step's
# tensors of that size fault in fresh zeroed pages again. On CPU ranks that moved a train
# step of `small` by 8-20 % and, depending on what the previous visit left in the heap,
# made the optimizer's sqrt and div take 4-13x longer for whole visits. Ranks keep their heap,
# as the CUDA caching allocator does on a GPU.
HEAP_MMAP_THRESHOLD = 1 << 30
HEAP_TRIM_THRESHOLD = 2**31 - 1  # mallopt takes an int
_allocator = "default"  # what keep_heap did in this process, for run.json


def keep_heap() -> str:
    """Pin glibc malloc's thresholds (HEAP_*) for this process; returns (and run.json
    records as "allocator") what was done: "glibc heap kept (...)", or "default" where the
    C library is not glibc or refuses."""
    global _allocator
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return _allocator
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    if mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD) != 1 or mallopt(M_TRIM_THRESHOLD, HEAP_TRIM_THRESHOLD) != 1:
        return _allocator
    _allocator = f"glibc heap kept (mmap threshold {HEAP_MMAP_THRESHOLD >> 20} MiB, trim threshold {HEAP_TRIM_THRESHOLD >> 20} MiB)"
    return _allocator


def _rank_device(backend: str, local_rank: int):
    import torch

    if backend == "nccl":
        device = torch.device("cuda", local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    return torch.device("cpu")


def _error_path(status_dir: Path, rank: int) -> Path:
    return status_dir / f".rank{rank}.error"


def _log_path(status_dir: Path, rank: int) -> Path:
    return status_dir / f".rank{rank}.log"


def _progress_path(status_dir: Path, rank: int) -> Path:
    return status_dir / f".rank{rank}.progress"


def report_progress(status_dir: str | os.PathLike, rank: int, where: str) -> None:
    """Record what a rank is doing now (read back when it hangs)."""
    _progress_path(Path(status_dir), rank).write_text(where)


def _read_progress(status_dir: Path, rank: int) -> str:
    try:
        return "last at " + _progress_path(status_dir, rank).read_text()
    except OSError:
        return "never started"


def _write_error(status_dir: Path, rank: int, err: BaseException) -> None:
    if isinstance(err, KeyboardInterrupt):  # stopped by the launcher, not a failure of its own
        return
    line = "".join(traceback.format_exception_only(type(err), err)).strip().splitlines()[-1]
    record = {"time": time.time(), "rank": rank, "error": line, "traceback": traceback.format_exc()}
    try:
        _error_path(status_dir, rank).write_text(json.dumps(record))
    except OSError:
        pass


def _first_error(status_dir: Path, world_size: int, err: BaseException) -> str:
    """The earliest error any rank recorded: peers of a failed rank fail after it, in comm."""
    records = []
    for r in range(world_size):
        try:
            records.append(json.loads(_error_path(status_dir, r).read_text()))
        except (OSError, ValueError):
            continue
    if not records:
        return f"rank {getattr(err, 'error_index', '?')}: {str(err).strip().splitlines()[-1]}"
    first = min(records, key=lambda rec: rec["time"])
    return (f"rank {first['rank']} failed: {first['error']} "
            f"(traceback in {_error_path(status_dir, first['rank'])}, output in {_log_path(status_dir, first['rank'])})")


# ---------------------------------------------------------------------------------------------
# One rank's run
# ---------------------------------------------------------------------------------------------


def capture(spec: CaptureSpec) -> Path:
    """Run `spec` and return the run dir holding run.json and one trace per rank."""
    validate_spec(spec)
    backend = resolve_backend(spec.backend)
    out_dir = Path(spec.out_dir)
    from model.config import LongcatConfig  # noqa: F401 - fail early on an unknown preset

    _check_model_fits(spec)
    if backend == "nccl":
        import torch

        if not launched_by_torchrun() and spec.world_size > torch.cuda.device_count():
            raise CaptureError(
                f"--world-size {spec.world_size}: NCCL needs one GPU per rank, this machine has "
                f"{torch.cuda.device_count()}"
            )
    out_dir.mkdir(parents=True, exist_ok=True)
    if launched_by_torchrun():
        if int(os.environ["WORLD_SIZE"]) != spec.world_size:
            raise CaptureError(
                f"--world-size {spec.world_size}: torchrun started {os.environ['WORLD_SIZE']} ranks"
            )
        _run_torchrun_rank(_capture_rank, backend, spec.timeout_s, spec.threads, str(out_dir), (spec,))
        return out_dir
    _clear_run_dir(out_dir, spec.world_size)
    spawn_ranks(
        _capture_rank,
        spec.world_size,
        (spec,),
        backend=backend,
        timeout_s=spec.timeout_s,
        status_dir=out_dir,
        threads=spec.threads,
    )
    return out_dir


def barrier_timed_step(workload: "Workload") -> float:
    """One step started by all ranks together (untimed preparation, then a barrier); its
    duration on this rank in µs. Steps timed this way carry no lag from the step before."""
    import torch.distributed as dist

    workload.begin_step(measured=False)
    dist.barrier()
    start = time.perf_counter_ns()
    workload.step()
    return (time.perf_counter_ns() - start) / 1e3


# Pairs per profiler window of an alternating run (8 steps; a capture traces 4 per visit:
# smaller windows cost more profiler starts and stops, ~0.8 s each here)
ALTERNATING_WINDOW_PAIRS = 4


def _alternating_schedules_rank(rank: int, world_size: int, device: Any, spec: CaptureSpec, pairs: int,
                                out: str, budget_s: float = 0.0, min_pairs: int = 1) -> None:
    import torch
    import torch.distributed as dist

    workload = build_workload(spec, rank, world_size, device)
    ep = workload.model.expert_parallel
    for _ in range(spec.warmup):
        barrier_timed_step(workload)
    window = 2 * ALTERNATING_WINDOW_PAIRS  # steps
    times: dict[str, list[float]] = {s: [] for s in SCHEDULES}
    started = time.monotonic()
    for w in range(2 * math.ceil(pairs / window)):
        if w % 2 == 0:
            at: dict[str, list[tuple[int, float]]] = {s: [] for s in SCHEDULES}  # (position, µs)
        gc.collect()  # as in a capture: no collection lands in a timed step (the last
        gc.disable()  # window's profiler is garbage by now)
        prof = _discarding_profiler(spec, device, window)
        barrier_timed_step(workload)  # untimed; with the profiler, its warmup step (as in a capture)
        if prof is not None:
            prof.step()
        for position in range(window):
            # A B B A, then B A A B: each schedule holds every position once per two windows
            ep.schedule = SCHEDULES[(position + position // 2 + w) % 2]
            workload.begin_step(measured=False)
            start = time.perf_counter_ns()
            workload.step()
            at[ep.schedule].append((position, (time.perf_counter_ns() - start) / 1e3))
            if prof is not None:
                prof.step()
        if prof is not None:
            prof.stop()
        del prof
        gc.enable()
        if w % 2 == 0:
            continue
        # pair k = the k-th step of each schedule by position: a pair's steps ran at the same
        # place in their windows, so whatever the place costs (the profiler warming in, a
        # lag left by the untimed step) falls on both alike
        for s in SCHEDULES:
            times[s] += [us for _, us in sorted(at[s])]
        if budget_s > 0:  # rank 0's clock decides for all
            done = torch.tensor([int(len(times[SCHEDULES[0]]) >= min_pairs and time.monotonic() - started > budget_s)])
            dist.broadcast(done, 0)
            if done.item():
                break
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, times)
    if rank == 0:  # a step lasts as long as its slowest rank
        per_step = {k: [max(ts) for ts in zip(*(g[k] for g in gathered))] for k in times}
        Path(out).write_text(json.dumps(per_step))


def _cuda_sync_config() -> Any:
    """Kineto's cuda_sync events (which stream or event a cudaStreamSynchronize,
    cudaStreamWaitEvent ... waited on; traces/lanes.py turns them into dependencies), where
    this torch offers them; None (the default) where it does not."""
    try:
        from torch._C._profiler import _ExperimentalConfig

        return _ExperimentalConfig(enable_cuda_sync_events=True)
    except (ImportError, TypeError):
        return None


def _discarding_profiler(spec: CaptureSpec, device: Any, steps: int) -> Any:
    """With spec.profiler: a started torch.profiler set up as a capture's (same activities,
    record_shapes, one warmup step, then `steps` recorded) whose events are dropped, so
    the steps carry the profiler's overhead like the traced steps they are compared with.
    None without."""
    if not spec.profiler:
        return None
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, record_shapes=True, on_trace_ready=lambda _prof: None,
                   schedule=schedule(wait=0, warmup=1, active=steps, repeat=1))
    prof.start()
    return prof


def alternating_schedules(spec: CaptureSpec, pairs: int, budget_s: float = 0.0,
                          min_pairs: int = 1) -> dict[str, list[float]]:
    """One live run of `spec` (its schedule ignored) that alternates the sequential and
    shortcut schedules step by step after `spec.warmup`: {"sequential": [µs...],
    "shortcut": [µs...]}, step k of each forming pair k. Both sides of a pair see the same
    machine, however its speed drifts, so the ratio of a pair is far steadier than the
    ratio of two separate runs' medians. Within a window the steps run back to back, as a
    capture's do: a rank that ends a step early starts the next early and waits at its
    first exchange, which the shortcut schedule can partly hide under mlp0 and attn1.

    The steps come in windows of 2 * ALTERNATING_WINDOW_PAIRS, each, with spec.profiler,
    under its own torch.profiler recording set up as a capture's (events discarded), so the
    steps are profiled like the traced steps validate predicts. The windows go A B B A,
    B A A B, ... and a pair's two steps sit at the same position of consecutive windows.
    `pairs` rounds up to whole window pairs; with budget_s > 0 the run stops after the
    first window pair that ends past budget_s seconds (from the first timed step) once it
    holds min_pairs."""
    import tempfile

    validate_spec(spec)
    with tempfile.TemporaryDirectory(prefix="moesim-alternating-") as tmp:
        out = Path(tmp) / "alternating.json"
        spawn_ranks(_alternating_schedules_rank, spec.world_size, (spec, pairs, str(out), budget_s, min_pairs),
                    backend=resolve_backend(spec.backend), timeout_s=spec.timeout_s, status_dir=tmp,
                    threads=spec.threads)
        return json.loads(out.read_text())


def _check_model_fits(spec: CaptureSpec) -> None:
    """Model-level argument checks, in the parent, so they fail before anything spawns."""
    from model.config import LongcatConfig

    config = LongcatConfig.preset(spec.preset)
    n_experts = config.n_routed_experts
    if n_experts % spec.world_size:
        raise CaptureError(
            f"--world-size {spec.world_size}: preset {spec.preset!r} has {n_experts} FFN experts, "
            "which must split evenly over the ranks"
        )
    tokens = spec.context + spec.seq  # decode cuts its cache back to the context every step
    if tokens > config.max_position_embeddings:
        raise CaptureError(
            f"--seq/--context: {tokens} positions exceed max_position_embeddings "
            f"{config.max_position_embeddings} of preset {spec.preset!r}"
        )


def _clear_run_dir(out_dir: Path, world_size: int) -> None:
    """Remove what an earlier run left (traces of any rank, run.json), so nothing mixes."""
    for path in out_dir.iterdir():
        if path.is_file() and (path.name == RUN_JSON or TRACE_FILE_RE.match(path.name)):
            path.unlink()


def _capture_rank(rank: int, world_size: int, device: Any, spec: CaptureSpec) -> None:
    """The body of one rank: build, warm up, run the profiled steps, export, gather."""
    import torch.distributed as dist

    out_dir = Path(spec.out_dir)
    report_progress(out_dir, rank, "setup")
    workload = build_workload(spec, rank, world_size, device)
    result = _profiled_steps(workload, spec, spec.warmup, out_dir, out_dir, rank, device)
    report_progress(out_dir, rank, "gather")
    fault = _parse_fault(spec.fault) if spec.fault else None
    if fault and fault == ("raise-after-trace", rank):
        raise RuntimeError(f"injected fault on rank {rank} after its trace")
    results: list[Any] = [None] * world_size
    dist.all_gather_object(results, result)
    if rank == 0:
        run = build_run_json(spec, workload, dist.get_backend(), results)
        write_json_atomic(out_dir / RUN_JSON, run)
    _progress_path(out_dir, rank).unlink(missing_ok=True)


def _profiled_steps(workload: "Workload", spec: CaptureSpec, warmup: int, out_dir: Path, status_dir: Path,
                    rank: int, device: Any, where: str = "") -> dict:
    """`warmup` unrecorded steps, then `spec.steps` timed ones under the profiler (when
    spec.profiler), the trace exported to out_dir; this rank's result for run.json. Progress
    lines go to status_dir, prefixed by `where`."""
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    fault = _parse_fault(spec.fault) if spec.fault else None
    trace_path = out_dir / rank_trace_name(rank)

    def export(prof: Any) -> None:
        # export_chrome_trace would gzip a ".gz" path at level 9: ~0.2 s per step of `small`
        # on this machine; level 1 takes a twentieth of that for files under twice the size
        raw = out_dir / f".rank{rank}.partial.json"
        tmp = out_dir / f".rank{rank}.partial.json.gz"
        prof.export_chrome_trace(str(raw))
        with open(raw, "rb") as src, gzip.open(tmp, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        raw.unlink()
        os.replace(tmp, trace_path)

    prof = None
    if spec.profiler:
        activities = [ProfilerActivity.CPU]
        if device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        prof = profile(
            activities=activities,
            record_shapes=True,
            experimental_config=_cuda_sync_config() if device.type == "cuda" else None,
            # The last warmup step also warms the profiler up; the rest run with it off.
            schedule=schedule(wait=max(warmup - 1, 0), warmup=min(warmup, 1), active=spec.steps, repeat=1),
            on_trace_ready=export,
        )
        prof.start()
    step_times_us = []
    load_before = os.getloadavg()[0]
    # Python's cyclic GC off while stepping, collected before (as timeit does), so no
    # collection of what earlier visits left behind lands in a timed step. (Steps 60-120 ms
    # slower than their neighbours recurred at fixed places of a validate round; GC was the
    # suspect, not confirmed: such steps still occur with it off.)
    gc.collect()
    gc.disable()
    try:
        for step in range(warmup + spec.steps):
            report_progress(status_dir, rank, f"{where}step {step} of {warmup + spec.steps}")
            if fault and fault[1] == rank and step == warmup:
                if fault[0] == "raise":
                    raise RuntimeError(f"injected fault on rank {rank} at step {step}")
                if fault[0] == "hang":
                    while True:  # a rank stuck outside any collective
                        time.sleep(0.05)
            workload.begin_step(measured=step >= warmup)
            start_ns = time.perf_counter_ns()
            workload.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_times_us.append((time.perf_counter_ns() - start_ns) / 1e3)
            if prof is not None:
                prof.step()
        if prof is not None:
            prof.stop()
    finally:
        gc.enable()
    del prof
    gc.collect()
    return {
        "rank": rank,
        "step_times_us": step_times_us[warmup:],
        "device": _device_name(device),
        "host": platform.node(),
        "allocator": _allocator,
        "records": workload.records(),
        "load_1min": round((load_before + os.getloadavg()[0]) / 2, 2),
        "warmup": warmup,
    }


def _interleaved_rank(rank: int, world_size: int, device: Any, specs: list[CaptureSpec],
                      visits: list[tuple[int, str]], status_dir: str) -> None:
    """One rank of capture_interleaved: a workload per (mode, context) kept across visits,
    reconfigured to each visit's spec; every visit exported as its own run dir."""
    import torch.distributed as dist

    status = Path(status_dir)
    workloads: dict[tuple, Workload] = {}
    visited: set[int] = set()
    results = []
    for i, (k, out) in enumerate(visits):
        spec = specs[k]
        key = _workload_key(spec)
        if key not in workloads:
            report_progress(status, rank, f"setup of {spec.mode} (visit {i + 1} of {len(visits)})")
            workloads[key] = build_workload(spec, rank, world_size, device)
        workload = workloads[key]
        workload.configure(spec)
        # the first visit of a spec warms it up fully; later ones run one step first (the new
        # shapes' allocations, the profiler's warmup)
        warmup = spec.warmup if k not in visited else min(spec.warmup, 1)
        visited.add(k)
        where = f"visit {i + 1} of {len(visits)} ({Path(out).parent.name}/{Path(out).name}): "
        results.append(_profiled_steps(workload, spec, warmup, Path(out), status, rank, device, where))
    report_progress(status, rank, "gather")
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, results)
    if rank == 0:
        backend = dist.get_backend()
        for i, (k, out) in enumerate(visits):
            workload = workloads[_workload_key(specs[k])]
            workload.configure(specs[k])
            per_rank = [g[i] for g in gathered]
            spec = dataclasses.replace(specs[k], out_dir=out, warmup=per_rank[0]["warmup"])
            run = build_run_json(spec, workload, backend, per_rank)
            run["interleaved"] = {"visit": i, "visits": len(visits)}
            write_json_atomic(Path(out) / RUN_JSON, run)
    _progress_path(status, rank).unlink(missing_ok=True)


def _workload_key(spec: CaptureSpec) -> tuple:
    """Specs sharing a key share one model: decode's cache fixes its batch and context."""
    return (spec.mode, spec.context, spec.batch if spec.mode == "decode" else 0)


def capture_interleaved(specs: list[CaptureSpec], visits: list[tuple[int, str | os.PathLike]],
                        status_dir: str | os.PathLike, timeout_s: float | None = None,
                        progress: Callable[[str], None] | None = None) -> list[Path]:
    """Live runs of several specs in one set of ranks, visit by visit: visit (k, DIR) runs
    specs[k] (its warmup on its first visit, one step after), then `steps` profiled steps,
    into the run dir DIR (run.json + a trace per rank, as `capture` writes; run.json's
    "interleaved" says which visit it was). Specs of one mode share one model per rank,
    reconfigured between visits (schedule, batch, seq).

    All specs must share preset, world size, backend, threads and seed. Runs that are to be
    compared see the same machine minutes this way: on a VM whose speed drifts by tens of
    percent over a minute, separate launches do not. Returns the run dirs in visit order."""
    if not specs or not visits:
        raise CaptureError("capture_interleaved: nothing to run (no specs or no visits)")
    for spec in specs:
        validate_spec(spec)
        _check_model_fits(spec)
        if spec.fault:
            raise CaptureError("--inject-fault: not supported by interleaved captures")
    first = specs[0]
    for spec in specs[1:]:
        for field in ("preset", "world_size", "backend", "threads", "seed"):
            if getattr(spec, field) != getattr(first, field):
                raise CaptureError(f"--{field.replace('_', '-')} {getattr(spec, field)}: interleaved runs must share it "
                                   f"({getattr(first, field)} in the first)")
    for k, _ in visits:
        if not 0 <= k < len(specs):
            raise CaptureError(f"visit of spec {k}: there are {len(specs)} specs")
    dirs = [Path(out) for _, out in visits]
    if len(set(dirs)) != len(dirs):
        raise CaptureError("capture_interleaved: two visits write the same run dir")
    for d in dirs:
        d.mkdir(parents=True, exist_ok=True)
        _clear_run_dir(d, first.world_size)
    backend = resolve_backend(first.backend)
    timeout = timeout_s if timeout_s is not None else sum(specs[k].timeout_s for k, _ in visits)
    spawn_ranks(_interleaved_rank, first.world_size, (specs, [(k, str(d)) for k, d in zip((k for k, _ in visits), dirs)],
                                                       str(status_dir)),
                backend=backend, timeout_s=timeout, status_dir=status_dir, threads=first.threads, progress=progress)
    return dirs


def _device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine() or "cpu"


def build_run_json(spec: CaptureSpec, workload: Any, backend: str, results: list[dict]) -> dict:
    """run.json: the stable keys of DESIGN.md plus what this live run measured."""
    import torch

    results = sorted(results, key=lambda r: r["rank"])
    step_times = {str(r["rank"]): [round(t, 3) for t in r["step_times_us"]] for r in results}
    # A synchronous step lasts as long as its slowest rank.
    per_step = [max(ts) for ts in zip(*(r["step_times_us"] for r in results))]
    run = {
        "run_json_version": RUN_JSON_VERSION,
        "source": "live",
        "preset": spec.preset,
        "config": workload.config_dict(),
        "schedule": spec.schedule,
        "mode": spec.mode,
        "world_size": spec.world_size,
        "backend": backend,
        "step_times_us": step_times,
        "step_time_us_median": statistics.median(per_step),
        "step_time_us_min": min(per_step),
        "step_time_us_max": max(per_step),
        "step_time_us_per_rank_median": {str(r["rank"]): statistics.median(r["step_times_us"]) for r in results},
        "parallel": {"expert_parallel": spec.world_size, "data_parallel": spec.world_size, "experts_per_rank": workload.experts_per_rank},
        "batch": spec.batch,
        "batch_per_rank": spec.batch // spec.world_size,
        "seq": spec.seq,
        "context": spec.context,
        "tokens_per_step": workload.tokens_per_step * spec.world_size,
        "steps": spec.steps,
        "warmup": spec.warmup,
        "threads": spec.threads,
        "profiler": spec.profiler,
        "seed": spec.seed,
        "zero_bias": spec.zero_bias,
        "load_1min": results[0].get("load_1min"),  # this machine's 1-min load average, rank 0, over the steps
        "devices": {str(r["rank"]): r["device"] for r in results},
        "hosts": {str(r["rank"]): r["host"] for r in results},
        "allocator": {str(r["rank"]): r.get("allocator", "default") for r in results},
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "launcher": "torchrun" if launched_by_torchrun() else "spawn",
        "command": " ".join(sys.argv),
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    run.update(workload.summarise_records([r["records"] for r in results]))
    return run


class Workload:
    """One rank's model, data and step for `spec.mode`, expert-parallel over the default group.

    prefill: forward of batch/world sequences of `seq` tokens, no grad, last position's logits.
    decode:  `seq` new tokens per sequence on top of `context` cached ones; the cache is filled
             once (untimed) and cut back to `context` before every step, so steps are alike.
    train:   forward, next-token cross entropy (loss / world, so gradients are the global
             mean's), backward, dense-gradient all-reduce, AdamW step.
    Every step draws a fresh global batch from a generator seeded with `spec.seed + step` on
    every rank; rank r runs rows [r*b, (r+1)*b).
    """

    def __init__(self, spec: CaptureSpec, rank: int, world_size: int, device: Any) -> None:
        import torch

        from model.config import LongcatConfig
        from model.longcat import LongcatFlash
        from model.parallel import apply_expert_parallel

        self.spec, self.rank, self.world_size, self.device = spec, rank, world_size, device
        self.config = LongcatConfig.preset(spec.preset)
        model = LongcatFlash(self.config, generator=torch.Generator().manual_seed(spec.seed))
        self.model = apply_expert_parallel(model, None, spec.schedule).to(device)
        self.experts_per_rank = self.model.expert_parallel.experts_per_rank
        self.batch_per_rank = spec.batch // world_size
        self.tokens_per_step = self.batch_per_rank * spec.seq
        self.step_index = 0
        self._measured = False
        self._records: list[dict] = []
        _label_model_edges(self.model)
        self._set_zero_bias(spec.zero_bias)
        self.optimizer = None
        if spec.mode == "train":
            self.model.train()
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        else:
            self.model.eval()
        self.cache = None
        if spec.mode == "decode":
            self.cache = self.model.new_cache()
            if spec.context:
                with torch.no_grad():
                    self.model(self._tokens(-1, spec.context), cache=self.cache)

    def configure(self, spec: CaptureSpec) -> None:
        """Switch to another spec of the same model (capture_interleaved): schedule, batch
        and seq may change; preset, seed and world size may not, nor mode and context."""
        if _workload_key(spec) != _workload_key(self.spec) or (spec.preset, spec.seed) != (self.spec.preset, self.spec.seed):
            raise CaptureError(f"workload of {self.spec.mode} ({self.spec.preset}, seed {self.spec.seed}) cannot run "
                               f"{spec.mode} ({spec.preset}, seed {spec.seed}, context {spec.context})")
        self.spec = spec
        self.model.expert_parallel.schedule = spec.schedule
        self._set_zero_bias(spec.zero_bias)
        self.batch_per_rank = spec.batch // self.world_size
        self.tokens_per_step = self.batch_per_rank * spec.seq
        self._records = []

    def _set_zero_bias(self, bias: float) -> None:
        """Every router's correction bias: `bias` on the zero experts, 0 on the FFN ones (the
        bias only changes which experts are chosen, never their weights)."""
        from model.moe import Router

        for module in self.model.modules():
            if isinstance(module, Router):
                module.e_score_correction_bias.zero_()
                module.e_score_correction_bias[module.n_routed_experts:] = bias

    def _tokens(self, step: int, length: int) -> Any:
        import torch

        generator = torch.Generator().manual_seed(self.spec.seed * 1_000_003 + step + 1)
        tokens = torch.randint(0, self.config.vocab_size, (self.spec.batch, length), generator=generator)
        b = self.batch_per_rank
        return tokens[self.rank * b : (self.rank + 1) * b].to(self.device)

    def begin_step(self, measured: bool) -> None:
        """Untimed per-step preparation: records on/off, decode cache cut back to the context."""
        self._measured = measured
        self.model.expert_parallel.records = [] if measured else None
        if self.cache is not None:
            for index in range(len(self.cache.c_kv)):
                if self.cache.c_kv[index] is not None:
                    self.cache.c_kv[index] = self.cache.c_kv[index][:, : self.spec.context]
                    self.cache.k_rope[index] = self.cache.k_rope[index][:, : self.spec.context]
                    if self.spec.context == 0:
                        self.cache.c_kv[index] = self.cache.k_rope[index] = None

    def step(self) -> None:
        import torch
        from torch.profiler import record_function

        tokens = self._tokens(self.step_index, self.spec.seq)
        self.step_index += 1
        if self.spec.mode != "train":
            with torch.no_grad():  # a serving prefill needs the last position's logits only
                self.model(tokens, cache=self.cache, logits_to_keep=1 if self.spec.mode == "prefill" else 0)
        else:
            logits = self.model(tokens).logits
            with record_function("loss"):
                loss = next_token_loss(logits, tokens) / self.world_size
            with record_function("backward"):
                loss.backward()
            from model.parallel import sync_dense_grads

            sync_dense_grads(self.model)
            with record_function("optimizer"):
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
        if self._measured:
            self._records.extend(self.model.expert_parallel.records)

    def records(self) -> list[dict]:
        return self._records

    def config_dict(self) -> dict:
        return self.config.to_dict()

    def summarise_records(self, per_rank: list[list[dict]]) -> dict:
        """run.json's routing statistics and dispatch split sizes from every rank's records."""
        return summarise_routing(per_rank, self.config.n_routed_experts, self.config.moe_topk, self.world_size)


def build_workload(spec: CaptureSpec, rank: int, world_size: int, device: Any) -> Workload:
    return Workload(spec, rank, world_size, device)


def next_token_loss(logits_BTV: Any, tokens_BT: Any) -> Any:
    """Mean cross entropy of token t+1 given tokens ..t (the model's own loss formula)."""
    import torch.nn.functional as F

    return F.cross_entropy(
        logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]).float(), tokens_BT[:, 1:].reshape(-1)
    )


def _label_model_edges(model: Any) -> None:
    """`embed` around the embedding, `head` around the final norm + lm_head, via module hooks
    (the model code stays free of profiler calls)."""
    from torch.profiler import record_function

    def around(first: Any, last: Any, label: str) -> None:
        open_spans: list[Any] = []

        def enter(module: Any, args: Any) -> None:
            span = record_function(label)
            span.__enter__()
            open_spans.append(span)

        def leave(module: Any, args: Any, output: Any) -> None:
            if open_spans:
                open_spans.pop().__exit__(None, None, None)

        first.register_forward_pre_hook(enter)
        last.register_forward_hook(leave)

    around(model.model.embed_tokens, model.model.embed_tokens, "embed")
    around(model.model.norm, model.lm_head, "head")


def summarise_routing(per_rank: list[list[dict]], n_routed_experts: int, top_k: int, world_size: int) -> dict:
    """Per-layer routing statistics over all ranks and measured steps, and the split sizes.

    Returns {"routing": {layer: {...}}, "dispatch_send_rows": {rank: [[rows to each peer] per
    MoE forward, in execution order]}, "dispatch_layers": [layer of each forward]}.
    """
    layers: dict[int, dict] = {}
    for records in per_rank:
        for rec in records:
            acc = layers.setdefault(rec["layer"], {"tokens": 0, "tokens_per_expert": None, "hist": None})
            acc["tokens"] += rec["tokens"]
            for key, src in (("tokens_per_expert", "tokens_per_expert"), ("hist", "ffn_experts_per_token_hist")):
                acc[key] = list(rec[src]) if acc[key] is None else [a + b for a, b in zip(acc[key], rec[src])]
    routing = {}
    n_local = n_routed_experts // world_size
    for layer, acc in sorted(layers.items()):
        ffn = acc["tokens_per_expert"][:n_routed_experts]
        zero_slots = sum(acc["tokens_per_expert"][n_routed_experts:])
        hist = acc["hist"]
        tokens = acc["tokens"]
        mean_ffn = sum(k * c for k, c in enumerate(hist)) / tokens if tokens else 0.0
        device_rows = [sum(ffn[r * n_local : (r + 1) * n_local]) for r in range(world_size)]
        routing[str(layer)] = {
            "tokens": tokens,
            "ffn_experts_per_token_mean": mean_ffn,
            "ffn_experts_per_token_hist": hist,
            "zero_expert_share": zero_slots / (tokens * top_k) if tokens else 0.0,
            "tokens_per_expert": acc["tokens_per_expert"],
            "expert_load_max_over_mean": _max_over_mean(ffn),
            "rank_load_rows": device_rows,
            "rank_load_max_over_mean": _max_over_mean(device_rows),
        }
    return {
        "routing": routing,
        "dispatch_send_rows": {str(r): [rec["send_rows"] for rec in records] for r, records in enumerate(per_rank)},
        "dispatch_layers": [rec["layer"] for rec in per_rank[0]] if per_rank else [],
    }


def _max_over_mean(loads: list[int]) -> float:
    mean = sum(loads) / len(loads) if loads else 0.0
    return max(loads) / mean if mean > 0 else 0.0


def read_trace(path: str | os.PathLike) -> dict:
    """Load one gzipped Kineto trace whole (for tests, quick looks, and shapes)."""
    import orjson

    with gzip.open(path, "rb") as f:
        return orjson.loads(f.read())
