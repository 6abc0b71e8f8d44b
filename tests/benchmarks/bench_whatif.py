"""Speed of full-scale what-if runs (analytic workload → engine → metrics), wall seconds.

    python3 tests/benchmarks/bench_whatif.py [--quick]

Cases: LongCat-Flash decode steps (28 layers, SBO, MTP, per-rank expert imbalance from the
default routing) on 128 and 1024 H800s; a prefill step and a training step on 1024.
Peer measured in the same run: the workload generator alone (so the ratio says how much of
the wall time the engine and the metrics take). Prints absolute figures and the machine.
Goal (issue 8): decode on 128 GPUs ≤ 10 s, on 1024 GPUs ≤ 60 s.
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np


def main() -> None:
    from simulator.whatif import run_whatif
    from simulator.workload import ParallelPlan, generate
    from simulator.baselines import get_arch

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="only the 128-GPU decode")
    args = ap.parse_args()
    cases = [
        ("decode 128", ParallelPlan(gpus=128, mode="decode", batch_per_gpu=8, context=5000, schedule="sbo",
                                    mtp=True, mtp_accept=0.9), 10.0),
        ("decode 1024", ParallelPlan(gpus=1024, mode="decode", batch_per_gpu=8, context=5000, schedule="sbo",
                                     mtp=True, mtp_accept=0.9), 60.0),
        ("prefill 1024", ParallelPlan(gpus=1024, mode="prefill", batch_per_gpu=1, context=4096, schedule="sbo"),
         None),
        ("train 1024", ParallelPlan(gpus=1024, mode="train", batch_per_gpu=4, context=4096, schedule="sbo", pp=4,
                                    micro_batches=4), None),  # 256-GPU stages, EP 256, 4 micro-batches
    ]
    if args.quick:
        cases = cases[:1]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load {os.getloadavg()[0]:.2f} (wall time is inflated by other work when load > cores; "
          f"cpu = this process's CPU seconds)")
    arch = get_arch("longcat-flash")
    for name, plan, goal in cases:
        t0 = time.perf_counter()
        w = generate(arch, plan, np.random.default_rng(0))
        gen_s = time.perf_counter() - t0
        c0 = time.process_time()
        m = run_whatif("longcat-flash", plan, "h800", None, seed=0)
        cpu = time.process_time() - c0
        total = m["timing_s"]["total_s"]
        ok = "" if goal is None else (" (goal <= %.0f s: %s)" % (goal, "met" if total <= goal else "MISSED"))
        print(f"{name:13s} ops {w.ops.num_rows:8d}  wall {total:6.1f} s (cpu {cpu:6.1f} s){ok}  "
              f"[workload {m['timing_s']['workload_s']:.1f} s, engine {m['timing_s']['simulate_s']:.1f} s, "
              f"metrics {m['timing_s']['metrics_s']:.1f} s]  generator-alone peer {gen_s:.1f} s "
              f"(ratio total/generator {total / gen_s:.1f}x)  step {m['step_time_us'] / 1e3:.2f} ms, "
              f"expert load max/mean {m.get('expert_load_max_over_mean', float('nan')):.2f}", flush=True)


if __name__ == "__main__":
    main()
