"""Benchmark: size and open time of a 128-rank simulated run's dashboard in headless Chromium.

    python3 tests/benchmarks/dashboard_open.py [--ranks 128] [--layers 28] [--repeats 3]

Prints the build time, the page size, and chromium's wall time (median of repeats) on the
dashboard against two peers measured in the same run: an empty page (browser start-up) and
a page holding only plotly.js (the fixed cost of embedding it). Open time = dashboard −
empty page. Run it on a quiet machine (`uptime`); on a loaded one all three grow together.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import dashboards  # noqa: E402
from tests.dashboards import browser, runs  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=128)
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if browser.CHROMIUM is None:
        print("chromium not installed")
        return 1
    from plotly.offline import get_plotlyjs

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run_dir = runs.make_run(tmp / "run", world_size=args.ranks, schedule="sbo", source="simulated",
                                n_layers=args.layers, n_steps=2, seed=3)
        t0 = time.perf_counter()
        built = dashboards.build([run_dir], tmp / "big.html")
        build_s = time.perf_counter() - t0
        empty = tmp / "empty.html"
        empty.write_text("<!DOCTYPE html><html><head></head><body>empty</body></html>")
        plotly_only = tmp / "plotly.html"
        plotly_only.write_text(f"<!DOCTYPE html><html><head><script>{get_plotlyjs()}</script></head><body>x</body></html>")
        walls: dict[str, list[float]] = {"empty": [], "plotly.js only": [], "dashboard": []}
        for _ in range(args.repeats):
            for name, page in (("empty", empty), ("plotly.js only", plotly_only), ("dashboard", built.path)):
                walls[name].append(browser.open_wall_s(page))
        med = {k: statistics.median(v) for k, v in walls.items()}
        print(f"machine: {platform.machine()} {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")
        print(f"{args.ranks} ranks x {args.layers} layers x 2 steps: built in {build_s:.2f} s, "
              f"{built.size_bytes / 1e6:.2f} MB, {built.n_figures} figures")
        for k, v in med.items():
            print(f"  chromium on {k:15s} {v:6.2f} s (median of {args.repeats})")
        print(f"open time (dashboard - empty) {med['dashboard'] - med['empty']:.2f} s; "
              f"ratio dashboard / plotly.js-only page {med['dashboard'] / med['plotly.js only']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
