"""What a gloo all-to-all waits for a core while its ranks compute, by what ran just before it.

    python3 tests/benchmarks/bench_comm_load.py [--reps 41] [--sizes 262144,2097152]

Two ranks on this machine (one intra-op thread each), per size and repetition, in order:
  after-idle    a barrier, then the transfer issued while every rank computes (a loop of
                128 x 128 matmuls), right after an idle exchange and a barrier, as
                `moesim calibrate`'s load sweep issues it (there every transfer follows one);
  after-loaded  the same, right after the previous loaded transfer;
  idle          an exchange with the ranks idle (issued, waited).
The loaded transfers' completion is stamped by the work's future callback on the thread
that completes it (the load sweep polls work.is_completed() between matmuls instead), and
each loop then runs as long again so that the peers stay loaded. A transfer
lasts from the last rank's issue to the first rank's completion. Prints per size and case
the median, mean and quartiles (µs), then the peer ratio: after-idle / after-loaded median.
The load sweep's ~3 ms (loaded − idle, the same from 256 KiB to 4 MiB) is what the
after-idle case waits; README "Calibration and validation" compares it with live exchanges.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from simulator.calibrate import _free_port  # noqa: E402


def _worker(rank: int, world_size: int, port: int, sizes: list[int], reps: int, out: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    g = torch.Generator().manual_seed(rank)
    a, w = torch.randn(128, 128, generator=g), torch.randn(128, 128, generator=g)
    now = lambda: time.perf_counter() * 1e6  # noqa: E731
    res: dict[str, list] = {}

    def loaded(x, recv):
        for _ in range(20):
            torch.mm(a, w)
        s0 = now()
        work = dist.all_to_all_single(recv, x, async_op=True)
        done: list[float] = []
        work.get_future().add_done_callback(lambda _f: done.append(now()))
        while not done:
            torch.mm(a, w)
        s1 = done[0]
        while now() < 2 * s1 - s0:
            torch.mm(a, w)
        work.wait()
        return s0, s1

    for size in sizes:
        numel = size // 4
        x, recv = torch.randn(numel, generator=g), torch.empty(numel)
        for _ in range(3):
            dist.all_to_all_single(recv, x)
        for _ in range(reps):
            dist.barrier()
            t0 = now()
            dist.all_to_all_single(recv, x, async_op=True).wait()
            res.setdefault(f"idle {size}", []).append((t0, now()))
            dist.barrier()
            res.setdefault(f"after-idle {size}", []).append(loaded(x, recv))
            dist.barrier()
            res.setdefault(f"after-loaded {size}", []).append(loaded(x, recv))
    dist.destroy_process_group()
    Path(out, f"r{rank}.json").write_text(json.dumps(res))


def main() -> int:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=41, help="repetitions per size (default 41)")
    ap.add_argument("--sizes", default="262144,2097152", help="payload bytes per rank, comma-separated")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    print(f"load before: {os.getloadavg()[0]:.2f}")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out:
        mp.start_processes(_worker, args=(2, port, sizes, args.reps, out), nprocs=2, join=True, start_method="spawn")
        ranks = [json.loads(Path(out, f"r{r}.json").read_text()) for r in range(2)]
    medians = {}
    for key in ranks[0]:
        d = sorted(min(p[1], q[1]) - max(p[0], q[0]) for p, q in zip(ranks[0][key], ranks[1][key]))
        medians[key] = statistics.median(d)
        print(f"{key:22s} median {medians[key]:7.0f}  mean {statistics.mean(d):7.0f}  "
              f"p25 {d[len(d) // 4]:7.0f}  p75 {d[3 * len(d) // 4]:7.0f} µs")
    for size in sizes:
        print(f"{size} bytes: after-idle / after-loaded median {medians[f'after-idle {size}'] / medians[f'after-loaded {size}']:.2f}")
    print(f"load after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
