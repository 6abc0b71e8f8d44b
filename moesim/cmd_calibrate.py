"""`moesim calibrate`: microbenchmark collectives and compute ops, fit, write CAL/calibration.json."""

from __future__ import annotations

import argparse
import sys

HELP = "measure collectives and compute ops on this machine and fit the cost models (writes CAL/calibration.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"],
                        help="gloo: CPU ranks over loopback; nccl: one GPU per rank (default gloo)")
    parser.add_argument("--world-size", type=int, default=2, help="ranks to spawn for the collectives (default 2)")
    parser.add_argument("-o", "--out", required=True, metavar="CAL",
                        help="directory to hold calibration.json (or a path ending in .json)")
    parser.add_argument("--sizes-kib", type=str, default=None,
                        help="comma-separated message sizes per rank in KiB (default 1,4,...,4096)")
    parser.add_argument("--comm-reps", type=int, default=15, help="repetitions per collective and size (default 15)")
    parser.add_argument("--load-reps", type=int, default=101,
                        help="repetitions of the comm load sweep: an all_to_all at 256 KiB to 4 MiB, idle and "
                             "beside compute, which measures how much transfers slow while the ranks compute "
                             "(gloo, world size > 1; 0 skips it; default %(default)s)")
    parser.add_argument("--compute-reps", type=int, default=7, help="repetitions per compute case (default 7)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the microbenchmark tensors (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from moesim.cli import UsageError
    from simulator.calibrate import DEFAULT_SIZES_BYTES, calibrate, write_calibration

    if args.world_size < 1:
        raise UsageError(f"--world-size must be ≥ 1, got {args.world_size}")
    if args.comm_reps < 1 or args.compute_reps < 1 or args.load_reps < 0:
        raise UsageError("--comm-reps and --compute-reps must be ≥ 1, --load-reps ≥ 0")
    sizes = DEFAULT_SIZES_BYTES
    if args.sizes_kib:
        try:
            sizes = tuple(int(float(s) * 1024) for s in args.sizes_kib.split(","))
        except ValueError:
            raise UsageError(f"--sizes-kib: expected comma-separated numbers, got {args.sizes_kib!r}") from None
        if len(sizes) < 2 or min(sizes) <= 0:
            raise UsageError("--sizes-kib: need ≥ 2 positive sizes to fit latency and bandwidth")
    cal = calibrate(args.backend, args.world_size, sizes, args.comm_reps, args.compute_reps, args.seed, args.load_reps)
    path = write_calibration(cal, args.out)
    print(f"calibration: backend {cal['backend']}  world size {cal['world_size']}  device {cal['device']['name']}  torch {cal['torch_version']}")
    print(f"{'compute kind':<14}{'points':>7}{'overhead µs':>13}{'GFLOP/s':>10}{'GB/s':>9}{'form':>6}{'med |err|':>11}")
    for kind, fit in cal["compute"]["fits"].items():
        gf = 1e3 / fit["us_per_mflop"] if fit["us_per_mflop"] > 0 else float("inf")
        gb = 1e3 / fit["us_per_mb"] if fit["us_per_mb"] > 0 else float("inf")
        print(f"{kind:<14}{fit['n_points']:>7}{fit['overhead_us']:>13.1f}{gf:>10.1f}{gb:>9.1f}{fit['combine']:>6}"
              f"{100 * fit['median_abs_rel_err']:>10.1f}%")
    if cal["comm"]:
        print(f"{'collective':<14}{'ranks':>7}{'latency µs':>13}{'GB/s':>10}{'med |err|':>11}")
        for fit in cal["comm"]:
            gb = 1e3 / fit["us_per_mb"] if fit["us_per_mb"] > 0 else float("inf")
            print(f"{fit['coll']:<14}{fit['world_size']:>7}{fit['latency_us']:>13.1f}{gb:>10.2f}{100 * fit['median_abs_rel_err']:>10.1f}%")
    load = cal.get("comm_load")
    if load:
        print(f"transfers beside compute ({load['cores']} cores, share {load['share']:.2f} per job):  "
              + "  ".join(f"{s['coll_bytes'] / 1024:.0f} KiB {s['idle_us']:.0f} → {s['loaded_us']:.0f} µs" for s in load["sizes"])
              + f"  → comm load exponent {load['exponent']:.2f}" + ("" if load["measured"] else " (default: cores not shared)"))
    for line in cal.get("warnings", []):
        print(f"calibrate: warning: {line}", file=sys.stderr)
    print(f"wrote {path}")
    return 0
