"""The zero-expert share what-if against live runs: one trace, other shares predicted.

    python3 tests/benchmarks/bench_zero_share.py [--world-sizes 1,2] [--rounds 6]
        [--biases=-0.002,0.002,0.005] [--mode prefill] [--batch 4] [--seq 64] [--keep DIR]

Per world size: `moesim calibrate --backend gloo` for it, then `small` at --batch x --seq
with the routers' zero-expert bias 0 (the base) and each of --biases (`moesim profile
--zero-bias`: more or fewer slots go to the zero-computation experts), all in one set of
ranks, --rounds serpentine rounds of one profiled visit each (traces.capture
.capture_interleaved, as `moesim validate` runs its matrix: this VM's speed drifts too much
for separate launches). Then, from one visit of the base alone (the middle round's: the
first visits of a process run slower), `moesim simulate --trace
BASE --to-zero-share Z --calibration CAL` for each config's measured share Z (the mean over
layers; the what-if is linear in each layer's share and the layers are alike).

Prints per config: bias, measured share, predicted and measured median step time (all
rounds' steps pooled), error %, and the step time relative to the base, predicted vs
measured (the saving a share change brings, which is what the what-if is for); the peer is
the base predicted from its own trace at its own share. Figures under load are noise: the
load is printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from traces.capture import CaptureSpec, capture_interleaved  # noqa: E402
from traces.rundir import read_run_json  # noqa: E402


def moesim(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "moesim", *args], check=True, cwd=REPO, stdout=subprocess.DEVNULL)


def measured(runs: list[dict]) -> tuple[float, float, float, float]:
    """(median, min, max step time in ms over every round's steps, mean zero share)."""
    steps = [max(ts) / 1e3 for run in runs for ts in zip(*run["step_times_us"].values())]
    shares = [r["zero_expert_share"] for run in runs for r in run["routing"].values()]
    return statistics.median(steps), min(steps), max(steps), statistics.fmean(shares)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--world-sizes", default="1,2", help="comma-separated (default 1,2)")
    ap.add_argument("--rounds", type=int, default=6, help="serpentine rounds of one visit per config (default 6)")
    ap.add_argument("--steps", type=int, default=4, help="profiled steps per visit (default 4)")
    ap.add_argument("--biases", default="-0.002,0.002,0.005", help="zero-expert biases besides the base's 0")
    ap.add_argument("--mode", default="prefill", help="prefill or train (default prefill)")
    ap.add_argument("--batch", type=int, default=4, help="global sequences per step (default 4)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence (default 64)")
    ap.add_argument("--keep", default=None, metavar="DIR", help="keep the runs and calibrations here")
    args = ap.parse_args()
    biases = [0.0] + [float(b) for b in args.biases.split(",") if b]
    print(f"load {os.getloadavg()[0]:.2f}, {os.cpu_count()} cores, small {args.mode} {args.batch}x{args.seq}, "
          f"{args.rounds} rounds x {args.steps} profiled steps, biases {biases}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-zero-") as tmp:
        root = Path(args.keep or tmp)
        for w in (int(x) for x in args.world_sizes.split(",")):
            t0 = time.perf_counter()
            cal = root / f"cal-w{w}"
            moesim("calibrate", "--backend", "gloo", "--world-size", str(w), "-o", str(cal))
            specs = [CaptureSpec(out_dir=str(root / f"w{w}-bias{b:g}"), preset="small", world_size=w, mode=args.mode,
                                 schedule="shortcut", batch=args.batch, seq=args.seq, steps=args.steps, warmup=1,
                                 backend="gloo", zero_bias=b) for b in biases]
            order = list(range(len(specs)))
            visits = [(k, Path(specs[k].out_dir) / f"rep{r}") for r in range(args.rounds)
                      for k in (order if r % 2 == 0 else order[::-1])]
            capture_interleaved(specs, visits, root / f"status-w{w}", timeout_s=600 + 60 * len(visits))
            base = Path(specs[0].out_dir) / f"rep{args.rounds // 2}"
            moesim("parse", str(base))  # ops.parquet beside the traces, whose shapes the what-if reads
            rows = []
            for spec in specs:
                live = measured([read_run_json(Path(spec.out_dir) / f"rep{r}") for r in range(args.rounds)])
                sim = root / f"w{w}-sim-bias{spec.zero_bias:g}"
                moesim("simulate", "--trace", str(base), "--to-zero-share", f"{live[3]:.6f}",
                       "--calibration", str(cal), "-o", str(sim))
                predicted = json.loads((sim / "metrics.json").read_text())["step_time_us"] / 1e3
                rows.append((spec.zero_bias, live, predicted))
            (_, base_live, base_pred) = rows[0]
            print(f"world size {w} ({time.perf_counter() - t0:.0f} s, load now {os.getloadavg()[0]:.2f}):")
            print(f"  {'bias':>7} {'share':>6} {'pred ms':>8} {'meas ms (min-max)':>22} {'err %':>6}"
                  f" {'pred/base':>10} {'meas/base':>10} {'diff pts':>9}")
            for bias, (med, lo, hi, share), pred in rows:
                rel_p, rel_m = pred / base_pred, med / base_live[0]
                print(f"  {bias:>7g} {share:>6.3f} {pred:>8.1f} {med:>8.1f} ({lo:5.1f}-{hi:5.1f}) "
                      f"{100 * (pred / med - 1):>+6.1f} {rel_p:>10.3f} {rel_m:>10.3f} {100 * (rel_p - rel_m):>+9.1f}",
                      flush=True)


if __name__ == "__main__":
    main()
