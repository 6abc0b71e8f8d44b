"""Live runs on 2 CPU ranks: shortcut vs sequential schedule, and the profiler's overhead.

    python3 tests/benchmarks/bench_profile.py [--preset small] [--mode prefill] [--rounds 3]
    python3 tests/benchmarks/bench_profile.py --interleaved 8     # one run, configs alternating per step
    python3 tests/benchmarks/bench_profile.py --probe-only        # can gloo overlap comm with compute here?

Runs `traces.capture` back to back, alternating the configurations round by round so slow
drift in machine load hits all of them alike, and prints per configuration the median over
rounds of each run's median step time (max over ranks per step), then
    shortcut / sequential        (< 1: the shortcut schedule wins)
    profiled / unprofiled        (profiler overhead; aim <= 1.05)
plus where the time of one layer goes on rank 0 (from the traces of the profiled runs): the
labelled spans of each block and the gloo all-to-all transfers on gloo's thread. The machine's
load average is printed before and after: on a shared 2-core machine, figures taken under load
are noise. `--interleaved` is the robust form: one run alternating sequential/shortcut and
profiler off/on step by step (a barrier, untimed, before every step), ratios taken per pair.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from traces.capture import CaptureSpec, capture  # noqa: E402
from traces.rundir import read_run_json  # noqa: E402


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _one(out: Path, args: argparse.Namespace, schedule: str, profiler: bool) -> dict:
    spec = CaptureSpec(
        out_dir=str(out), preset=args.preset, world_size=2, schedule=schedule, mode=args.mode,
        batch=args.batch, seq=args.seq, context=args.context, steps=args.steps, warmup=args.warmup,
        threads=args.threads, profiler=profiler, timeout_s=900,
    )
    capture(spec)
    return read_run_json(out)


def _block_breakdown(run_dir: Path, rank: int = 0) -> dict[str, float]:
    """Mean µs per step of each labelled block (summed over layers) and of the gloo transfers."""
    with gzip.open(run_dir / f"rank{rank}.pt.trace.json.gz", "rt") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
    steps = sum(e["name"].startswith("ProfilerStep#") for e in events)
    total: dict[str, float] = defaultdict(float)
    for e in events:
        name = e["name"]
        if name.startswith("L") and "/" in name:
            total[name.split("/", 1)[1]] += e["dur"]
        elif name.startswith("gloo:"):
            total[name] += e["dur"]
        elif name.startswith("ProfilerStep#"):
            total["step"] += e["dur"]
    return {k: v / max(steps, 1) for k, v in total.items()}


def _overlap_probe(rank: int, world: int, device, rows: int, hidden: int, matmul_n: int, repeats: int, out: str) -> None:
    """Can a gloo all-to-all overlap compute here? Times (median of `repeats`, after a barrier):
    the exchange alone, a matmul chain alone, and the exchange issued async around the chain."""
    import torch
    import torch.distributed as dist

    send = torch.randn(rows * world, hidden)
    recv = torch.empty_like(send)
    a = torch.randn(matmul_n, matmul_n)

    def compute() -> None:
        for _ in range(8):
            a @ a

    def timed(body) -> float:
        times = []
        for _ in range(repeats):
            dist.barrier()
            start = time.perf_counter()
            body()
            times.append((time.perf_counter() - start) * 1e6)
        return statistics.median(times)

    def overlapped() -> None:
        work = dist.all_to_all_single(recv, send, async_op=True)
        compute()
        work.wait()

    result = {
        "comm_us": timed(lambda: dist.all_to_all_single(recv, send)),
        "compute_us": timed(compute),
        "overlapped_us": timed(overlapped),
        "bytes_per_peer": rows * hidden * 4,
    }
    if rank == 0:
        Path(out).write_text(json.dumps(result))


def _interleaved(rank: int, world: int, device, spec: CaptureSpec, pairs: int, out: str) -> None:
    """One run that alternates step by step (after a barrier, untimed) between
    sequential and shortcut, then between profiler off and on (shortcut): both sides of each
    ratio see the same machine load, however it drifts."""
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile, schedule

    from traces.capture import barrier_timed_step, build_workload

    workload = build_workload(spec, rank, world, device)
    ep = workload.model.expert_parallel

    for _ in range(spec.warmup):
        barrier_timed_step(workload)
    times: dict[str, list[float]] = defaultdict(list)
    for i in range(2 * pairs):
        ep.schedule = ("sequential", "shortcut")[i % 2]
        times[ep.schedule].append(barrier_timed_step(workload))
    ep.schedule = "shortcut"
    # profiler cycle: off (wait), warming up (not timed), recording (active)
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=True,
                   schedule=schedule(wait=1, warmup=1, active=1, repeat=pairs), on_trace_ready=lambda p: None)
    prof.start()
    for i in range(3 * pairs):
        t = barrier_timed_step(workload)
        if i % 3 == 0:
            times["profiler_off"].append(t)
        elif i % 3 == 2:
            times["profiler_on"].append(t)
        prof.step()
    prof.stop()
    gathered: list = [None] * world
    dist.all_gather_object(gathered, dict(times))
    if rank == 0:
        # a step lasts as long as its slowest rank
        per_step = {k: [max(ts) for ts in zip(*(g[k] for g in gathered))] for k in gathered[0]}
        Path(out).write_text(json.dumps(per_step))


def interleaved(args: argparse.Namespace, pairs: int) -> dict[str, list[float]]:
    from traces.capture import spawn_ranks

    with tempfile.TemporaryDirectory() as tmp:
        spec = CaptureSpec(out_dir=tmp, preset=args.preset, world_size=2, schedule="sequential", mode=args.mode,
                           batch=args.batch, seq=args.seq, context=args.context, steps=1, warmup=args.warmup,
                           threads=args.threads)
        out = Path(tmp) / "interleaved.json"
        spawn_ranks(_interleaved, 2, (spec, pairs, str(out)), backend="gloo", timeout_s=1800, status_dir=tmp,
                    threads=args.threads)
        return json.loads(out.read_text())


def _dispatch_rows_per_peer(args: argparse.Namespace) -> int:
    """Rows one rank sends its peer per dispatch in `small`: ~8 FFN experts per token (run.json
    routing), half of them on the other rank."""
    return args.batch // 2 * args.seq * 8 // 2


def _pair_ratios(num: list[float], den: list[float]) -> list[float]:
    return [a / b for a, b in zip(num, den)]


def probe(rows: int, hidden: int, matmul_n: int, repeats: int = 15) -> dict:
    from traces.capture import spawn_ranks

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "probe.json"
        spawn_ranks(_overlap_probe, 2, (rows, hidden, matmul_n, repeats, str(out)),
                    backend="gloo", timeout_s=600, status_dir=tmp)
        return json.loads(out.read_text())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--mode", default="prefill")
    parser.add_argument("--batch", type=int, default=8, help="global sequences (4 per rank)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--context", type=int, default=0)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--probe-only", action="store_true", help="only the gloo overlap probe")
    parser.add_argument("--interleaved", type=int, default=0, metavar="PAIRS",
                        help="one run alternating the configurations step by step (robust to load drift)")
    args = parser.parse_args()

    if args.interleaved:
        load_before = _load()
        steps = interleaved(args, args.interleaved)
        print(f"interleaved, one run: preset {args.preset}, mode {args.mode}, batch {args.batch} x {args.seq}, "
              f"{args.interleaved} pairs; load before {load_before}, after {_load()}")
        for key, values in steps.items():
            print(f"  {key:<13} median step {statistics.median(values) / 1e3:8.2f} ms   "
                  f"(min {min(values) / 1e3:.2f}, max {max(values) / 1e3:.2f})")
        sched = _pair_ratios(steps["shortcut"], steps["sequential"])
        prof = _pair_ratios(steps["profiler_on"], steps["profiler_off"])
        print(f"shortcut / sequential, median of per-pair ratios = {statistics.median(sched):.3f}, "
              f"ratio of minima = {min(steps['shortcut']) / min(steps['sequential']):.3f}")
        print(f"profiled / unprofiled,  median of per-pair ratios = {statistics.median(prof):.3f}, "
              f"ratio of minima = {min(steps['profiler_on']) / min(steps['profiler_off']):.3f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"steps_us": steps, "shortcut_over_sequential": statistics.median(sched),
                                                   "profiler_overhead": statistics.median(prof),
                                                   "load_before": load_before, "load_after": _load()}, indent=1))
        return 0
    if args.probe_only:
        r = probe(_dispatch_rows_per_peer(args), 256, 320)
        print(f"load {_load()}: {r}")
        return 0
    configs = [("sequential", True), ("shortcut", True), ("shortcut", False), ("sequential", False)]
    medians: dict[tuple[str, bool], list[float]] = defaultdict(list)
    breakdown: dict[str, dict[str, float]] = {}
    load_before = _load()
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for schedule, profiler in configs:
                out = Path(tmp) / f"{schedule}-{int(profiler)}-{round_index}"
                run = _one(out, args, schedule, profiler)
                medians[(schedule, profiler)].append(run["step_time_us_median"])
                print(f"round {round_index}  {schedule:<10} profiler={'on ' if profiler else 'off'} "
                      f"median step {run['step_time_us_median'] / 1e3:8.2f} ms   load {_load()}", flush=True)
                if profiler and round_index == args.rounds - 1:
                    breakdown[schedule] = _block_breakdown(out)
    load_after = _load()

    med = {key: statistics.median(values) for key, values in medians.items()}
    ratio_schedule = med[("shortcut", True)] / med[("sequential", True)]
    ratio_schedule_off = med[("shortcut", False)] / med[("sequential", False)]
    overhead = {s: med[(s, True)] / med[(s, False)] for s in ("sequential", "shortcut")}
    print()
    print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"load average before {load_before}, after {load_after}; {time.time() - started:.0f} s")
    print(f"config: preset {args.preset}, mode {args.mode}, 2 gloo ranks, batch {args.batch} x {args.seq}, "
          f"{args.threads} thread(s)/rank, {args.steps} steps after {args.warmup} warmup, {args.rounds} rounds")
    for (schedule, profiler), value in sorted(med.items()):
        print(f"  {schedule:<10} profiler {'on ' if profiler else 'off'}  median step {value / 1e3:8.2f} ms")
    print(f"shortcut / sequential  (profiler on)  = {ratio_schedule:.3f}")
    print(f"shortcut / sequential  (profiler off) = {ratio_schedule_off:.3f}")
    for schedule, value in overhead.items():
        print(f"profiled / unprofiled ({schedule}) = {value:.3f}  ({(value - 1) * 100:+.1f}%)")
    print("\nper step on rank 0, µs (labelled spans summed over layers; gloo = transfer on gloo's thread):")
    keys = sorted({k for b in breakdown.values() for k in b})
    print("  " + " ".join(f"{k:>16}" for k in ["block"] + list(breakdown)))
    for k in keys:
        print("  " + f"{k:>16}" + " ".join(f"{breakdown[s].get(k, 0.0):16.0f}" for s in breakdown))
    # The overlap probe: an exchange the size of one dispatch of this run, against compute
    # of about the same length.
    result = probe(_dispatch_rows_per_peer(args), 256, 320)
    serial = result["comm_us"] + result["compute_us"]
    print(f"\noverlap probe (2 gloo ranks, {result['bytes_per_peer'] / 1e6:.2f} MB per peer, load {_load()}): "
          f"all-to-all {result['comm_us']:.0f} us, compute {result['compute_us']:.0f} us, "
          f"async all-to-all around the compute {result['overlapped_us']:.0f} us "
          f"= {result['overlapped_us'] / serial:.2f} of comm + compute "
          f"({result['overlapped_us'] / max(result['comm_us'], result['compute_us']):.2f} of the longer one)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "load_before": load_before, "load_after": load_after, "medians_us": {f"{s}/{int(p)}": v for (s, p), v in med.items()},
            "runs_us": {f"{s}/{int(p)}": v for (s, p), v in medians.items()},
            "shortcut_over_sequential": ratio_schedule, "shortcut_over_sequential_unprofiled": ratio_schedule_off,
            "profiler_overhead": overhead, "breakdown_us": breakdown, "overlap_probe": result,
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
