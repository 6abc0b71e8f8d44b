"""How precisely a live run measures the shortcut speedup (sequential / shortcut step time).

    python3 tests/benchmarks/bench_speedup.py [--seconds 60] [--sizes w2-prefill-b4-t32,...]
                                              [--validation VAL]

Per size: `simulator.validate.measure_speedup` (one run alternating the schedules step by
step, steps back to back in windows of 8, as `moesim validate` runs it) for about --seconds
with the profiler off, then as long with it on (`--speedup-profiled`). Prints for each: the
median of the pairs' ratios, its distribution-free 95 % interval, the pairs and the wall
time; then the peer ratio, profiled interval width / unprofiled (how much the profiler costs
in precision per second). With --validation VAL, also each size's predicted speedup from
VAL/validation.json and its distance in points from the unprofiled measurement. Sizes
default to the full matrix's 12 (~25 min at 60 s); the machine's load is printed before
and after, since figures taken under load are noise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from simulator.validate import LiveConfig, MAX_SPEEDUP_PAIRS, matrix, measure_speedup  # noqa: E402


def _size(name: str) -> LiveConfig:
    try:
        w, mode, b, t = name.split("-")
        return LiveConfig(int(w[1:]), mode, "sequential", int(b[1:]), int(t[1:]))
    except ValueError:
        raise SystemExit(f"--sizes: expected names like w2-prefill-b4-t32, got {name!r}") from None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="budget per size and profiler setting (default 60)")
    ap.add_argument("--sizes", default=None, help="comma-separated w{W}-{mode}-b{B}-t{T} (default: the full matrix's)")
    ap.add_argument("--validation", default=None, metavar="VAL", help="a `moesim validate` dir to compare predictions")
    args = ap.parse_args()
    sizes = ([_size(n) for n in args.sizes.split(",")] if args.sizes else
             sorted({LiveConfig(c.world_size, c.mode, "sequential", c.batch, c.seq) for c in matrix()},
                    key=lambda c: (c.mode, c.world_size, c.batch, c.seq)))
    predicted = {}
    if args.validation:
        val = json.loads((Path(args.validation) / "validation.json").read_text())
        predicted = {s["name"]: s["predicted"] for s in val["speedups"]}
    print(f"load {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, {args.seconds:g} s per size and setting")
    widths = {False: [], True: []}
    with tempfile.TemporaryDirectory(prefix="bench-speedup-") as tmp:
        for cfg in sizes:
            name = f"w{cfg.world_size}-{cfg.mode}-b{cfg.batch}-t{cfg.seq}"
            line = [f"{name:<20}"]
            for profiled in (False, True):
                t0 = time.time()
                m = measure_speedup(cfg, MAX_SPEEDUP_PAIRS, 2, Path(tmp), args.seconds, profiled=profiled)
                lo, hi = m["ci95"]
                widths[profiled].append(hi - lo)
                line.append(f"{'profiled' if profiled else 'unprofiled'} {m['speedup']:.3f} ({lo:.3f}-{hi:.3f}, "
                            f"±{50 * (hi - lo):.1f} pts, {m['pairs']} pairs, {time.time() - t0:.0f} s)")
                if not profiled and name in predicted:
                    line.append(f"predicted {predicted[name]:.3f} ({100 * (predicted[name] - m['speedup']):+.1f} pts)")
            print("  ".join(line), flush=True)
    ratios = [p / u for p, u in zip(widths[True], widths[False]) if u > 0]
    if ratios:
        print(f"profiled / unprofiled 95 % interval width: {min(ratios):.1f}-{max(ratios):.1f}x "
              f"(median {sorted(ratios)[len(ratios) // 2]:.1f}x)")
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
