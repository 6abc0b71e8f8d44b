"""`moesim validate`: predict a matrix of live configs from the calibration, run them, compare."""

from __future__ import annotations

import argparse

STEPS, REPEATS, QUICK_REPEATS = 4, 24, 12
# Seconds per size of the alternating speedup run. Over 60 s here the median's 95 % interval
# spanned ±0.7-3.4 points at prefill (328-728 pairs) and ±1.8-4.6 at train (72-152) with the
# profiler off, in the full matrix of 17:55 UTC; ±2.2-4 / ±4.5-7 with it on (README
# "Calibration and validation")
SPEEDUP_SECONDS = 60.0
HELP = "predict live CPU runs (schedules x world sizes x sizes x modes) from the calibration and compare (writes VAL/validation.json)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--out", required=True, metavar="VAL", help="output directory (validation.json, validation.md, runs/)")
    parser.add_argument("--calibration", default=None, metavar="CAL",
                        help="calibration dir or .json from `moesim calibrate` (default: VAL/cal, created when missing)")
    parser.add_argument("--quick", action="store_true", help="a 4-config subset (world size 2, prefill) for CI")
    parser.add_argument("--steps", type=int, default=STEPS,
                        help=f"measured steps per visit of a config (references: twice as many) (default {STEPS})")
    parser.add_argument("--warmup", type=int, default=2,
                        help="warmup steps on a config's first visit (later visits: 1) (default 2)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="rounds per (world size, mode) group: one set of ranks visits the group's references "
                             "and configs once per round, so drifts in machine speed hit all of them alike; figures "
                             f"pool every round (default {REPEATS}; --quick {QUICK_REPEATS})")
    parser.add_argument("--speedup-seconds", type=float, default=None,
                        help="per size with both schedules, one extra live run alternating them step by step, "
                             "for a second measured shortcut speedup (the median of the pairs' ratios, with its "
                             "95 %% interval: steadier than the ratio of the two configs' medians on a drifting "
                             "machine), as many pairs as fit in about this many seconds "
                             f"(default {SPEEDUP_SECONDS:g}; --quick 0 = skip)")
    parser.add_argument("--speedup-pairs", type=int, default=None,
                        help="a fixed number of pairs for that run instead of --speedup-seconds (0 = skip it)")
    parser.add_argument("--speedup-profiled", action="store_true",
                        help="run that alternating run under the profiler, as the configs ran (a quarter to a half of the "
                             "pairs in the same time, each noisier)")
    parser.add_argument("--merge", nargs="+", metavar="VAL_PART", default=None,
                        help="run nothing: combine these validation dirs (matrix subsets) into -o VAL")
    parser.add_argument("--repredict", action="store_true",
                        help="run nothing live: predict again from the runs in VAL/runs and rewrite VAL/validation.json")
    parser.add_argument("--comm-load", choices=("auto", "stall", "exponent", "delay"), default="auto",
                        help="how a transfer fares while its ranks compute, in the replays: 'stall' lets it stall, "
                             "with the calibration's load-sweep probability, until a core frees or a scheduler "
                             "quantum passes, then slows it as 'exponent' does; 'exponent' runs it at share ** e "
                             "of its speed, e per payload from the sweep; 'delay' adds the sweep's loaded - idle "
                             "time instead; 'auto' (default): 'stall' where the calibration has the sweep, else "
                             "'exponent'. README 'Calibration and validation' compares them")
    parser.add_argument("--modes", default="prefill,train", help="subset of the matrix: comma-separated modes (default prefill,train)")
    parser.add_argument("--world-sizes", default="1,2", help="subset of the matrix: comma-separated world sizes (default 1,2)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moesim.cli import UsageError
    from simulator.calibrate import calibrate, calibration_path, write_calibration
    from simulator.validate import validate

    if args.repeats is not None and (args.merge or args.repredict):
        raise UsageError("--repeats: --merge and --repredict run nothing live; they use the runs already in VAL")
    repeats = (QUICK_REPEATS if args.quick else REPEATS) if args.repeats is None else args.repeats
    pairs = 0 if args.speedup_pairs is None else args.speedup_pairs
    seconds = (0.0 if args.quick else SPEEDUP_SECONDS) if args.speedup_seconds is None else args.speedup_seconds
    if args.speedup_pairs is not None and args.speedup_seconds is not None:
        raise UsageError("--speedup-pairs and --speedup-seconds: give one (pairs fix the count, seconds the time)")
    if args.merge:
        from simulator.validate import merge

        result = merge(args.merge, args.out)
        _print_summary(result, args.out)
        return 0
    if args.repredict:
        from simulator.validate import repredict

        if args.calibration is None:
            raise UsageError("--repredict needs --calibration CAL")
        result = repredict(args.out, args.calibration, comm_load=args.comm_load)
        _print_summary(result, args.out)
        return 0
    if args.steps < 1 or args.warmup < 0 or repeats < 1 or pairs < 0 or not 0 <= seconds < float("inf"):
        raise UsageError("--steps and --repeats must be ≥ 1, --warmup, --speedup-pairs and --speedup-seconds ≥ 0 "
                         "(seconds finite)")
    cal = args.calibration
    if cal is None:
        cal = Path(args.out) / "cal"
        if not calibration_path(cal).is_file():
            print(f"no --calibration given: calibrating gloo, world size 2 into {cal}")
            write_calibration(calibrate("gloo", 2, comm_reps=7, compute_reps=5), cal)
    from simulator.validate import matrix

    modes = set(args.modes.split(","))
    try:
        sizes = {int(w) for w in args.world_sizes.split(",")}
    except ValueError:
        raise UsageError(f"--world-sizes: expected comma-separated integers, got {args.world_sizes!r}") from None
    configs = [c for c in matrix(args.quick) if c.mode in modes and c.world_size in sizes]
    if not configs:
        raise UsageError(f"no config of the {'quick ' if args.quick else ''}matrix has mode in {sorted(modes)} "
                         f"and world size in {sorted(sizes)}")
    result = validate(args.out, cal, quick=args.quick, steps=args.steps, warmup=args.warmup, configs=configs,
                      repeats=repeats, speedup_pairs=pairs, speedup_seconds=seconds,
                      speedup_profiled=args.speedup_profiled, comm_load=args.comm_load)
    _print_summary(result, args.out)
    return 0


def _print_summary(result: dict, out: str) -> None:
    from pathlib import Path

    print(f"median |step-time error| {result['median_abs_error_pct']:.1f}%   max {result['max_abs_error_pct']:.1f}%   "
          f"({len(result['configs'])} configs, per-op curves through the references)")
    if result.get("median_abs_error_pct_corrected") is not None:
        print(f"times the references' measured/replayed factor: median |error| "
              f"{result['median_abs_error_pct_corrected']:.1f}%   max {result['max_abs_error_pct_corrected']:.1f}%")
    if result.get("median_abs_error_pct_one_trace") is not None:
        print(f"one trace + cost model: median |error| {result['median_abs_error_pct_one_trace']:.1f}%   "
              f"max {result['max_abs_error_pct_one_trace']:.1f}%")
    if result.get("median_abs_error_pct_fastest") is not None:
        print(f"fastest step (least contended) predicted vs measured: median |error| "
              f"{result['median_abs_error_pct_fastest']:.1f}%   max {result['max_abs_error_pct_fastest']:.1f}%")
    if result["overlap_max_abs_diff_pts"] is not None:
        print(f"overlap |predicted - measured| (world size > 1): median {result['overlap_median_abs_diff_pts']:.1f} pts, "
              f"max {result['overlap_max_abs_diff_pts']:.1f} pts")
    from simulator.validate import alternating_text

    for s in result["speedups"]:
        print(f"shortcut speedup {s['name']}: predicted {s['predicted']:.3f}  ratio of medians {s['measured']:.3f}  "
              f"({s['diff_pts']:+.1f} pts){alternating_text(s)}")
    alternating = [s for s in result["speedups"] if "measured_alternating" in s]
    if alternating:
        print(f"shortcut speedup within 3 pts of the alternating measurement: "
              f"{result['speedup_within_3pts_alternating']} of {len(alternating)} sizes")
    print(f"wrote {Path(out) / 'validation.json'}")
