"""`moesim demo`: the whole pipeline on the embedded default, in one command.

    1. profile  the `small` preset on 2 CPU ranks (gloo), sequential and shortcut schedules
    2. parse    each run's Kineto traces into ops.parquet + metrics.json
    3. replay   each run on the `cpu-loopback` cluster model: the replay error vs measured
    4. what-if  LongCat-Flash (560B) decode on 128 x H800, SBO + MTP
    5. dashboard of all of it, one self-contained HTML file
and a summary table. Each step is the corresponding `moesim` verb, run in-process with its
own output sent to OUT/demo.log, so the demo exercises exactly what users run.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

HELP = "run the whole pipeline on the embedded default (profile, parse, replay, what-if, dashboard)"

SCHEDULES = ("sequential", "shortcut")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-o", "--out", metavar="DIR", default="moesim-demo",
                        help="directory for every run dir, the log and the dashboard (default: %(default)s)")
    parser.add_argument("--preset", default="small", help="model preset profiled live (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=6, help="profiled steps per live run (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default: %(default)s)")
    parser.add_argument("--whatif-batch-per-gpu", type=int, default=8,
                        help="decode sequences per GPU in the 128 x H800 what-if; 8 is the published "
                             "804 TGS / 100.5 TPS per user point (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds allowed per live run (default: %(default)s)")


class _Steps:
    """Runs verbs with their output in the log, and prints one progress line per step."""

    def __init__(self, out: Path, total: int) -> None:
        self.out = out
        self.log_path = out / "demo.log"
        self.total = total
        self.done = 0
        self.t0 = time.perf_counter()

    def verb(self, title: str, argv: list[str]) -> None:
        from moesim.cli import main

        self.done += 1
        print(f"[{self.done}/{self.total}] {title} ...", end="", flush=True)
        t = time.perf_counter()
        with open(self.log_path, "a") as log:
            log.write(f"\n$ moesim {' '.join(argv)}\n")
            log.flush()
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                code = main(argv)
        print(f" {time.perf_counter() - t:5.1f} s")
        if code != 0:
            from moesim.cli import UsageError

            lines = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.strip()]
            why = f": {lines[-1].strip()}" if lines and not lines[-1].startswith("$ moesim") else ""
            raise UsageError(f"step `moesim {argv[0]}` failed (exit {code}){why}; see {self.log_path}")


def run(args: argparse.Namespace) -> int:
    from traces.rundir import METRICS_JSON, RUN_JSON, read_json

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps = _Steps(out, total=3 * len(SCHEDULES) + 2)
    live = {s: out / f"live-{s}" for s in SCHEDULES}
    sim = {s: out / f"sim-{s}" for s in SCHEDULES}
    whatif = out / "whatif-longcat-flash-128xh800"
    for s in SCHEDULES:
        steps.verb(f"profile {args.preset} on 2 CPU ranks, {s}",
                   ["profile", "--preset", args.preset, "--world-size", "2", "--schedule", s, "--mode", "prefill",
                    "--steps", str(args.steps), "--warmup", str(args.warmup), "--timeout", str(args.timeout),
                    "--out", str(live[s])])
    for s in SCHEDULES:
        steps.verb(f"parse {live[s].name}", ["parse", str(live[s])])
    for s in SCHEDULES:
        steps.verb(f"replay {live[s].name} on cpu-loopback", ["simulate", "--trace", str(live[s]),
                                                              "--cluster", "cpu-loopback", "-o", str(sim[s])])
    steps.verb("what-if: LongCat-Flash decode on 128 x H800 (SBO, MTP)",
               ["simulate", "--preset", "longcat-flash", "--cluster", "h800", "--gpus", "128", "--mode", "decode",
                "--context", "5000", "--batch-per-gpu", str(args.whatif_batch_per_gpu), "--schedule", "sbo",
                "--mtp-accept", "0.9", "--price-per-gpu-hour", "2.0", "--no-traces", "-o", str(whatif)])
    dashboard = out / "dashboard.html"
    steps.verb("dashboard", ["dashboard", *map(str, [*live.values(), *sim.values(), whatif]),
                             "--title", "moesim demo", "-o", str(dashboard)])

    print()
    print(f"{'schedule':>10} {'measured ms':>12} {'replayed ms':>12} {'error %':>8} {'overlap % live':>15} {'overlap % sim':>14}")
    for s in SCHEDULES:
        measured_us = float(read_json(live[s] / RUN_JSON)["step_time_us_median"])
        live_m = read_json(live[s] / METRICS_JSON)
        sim_m = read_json(sim[s] / METRICS_JSON)
        replayed_us = float(sim_m["step_time_us"])
        print(f"{s:>10} {measured_us / 1e3:12.2f} {replayed_us / 1e3:12.2f} "
              f"{100 * (replayed_us - measured_us) / measured_us:8.1f} "
              f"{_pct(live_m.get('overlap_pct_mean')):>15} {_pct(sim_m.get('overlap_pct_mean')):>14}")
    seq_us = float(read_json(live["sequential"] / RUN_JSON)["step_time_us_median"])
    short_us = float(read_json(live["shortcut"] / RUN_JSON)["step_time_us_median"])
    print(f"measured shortcut speedup (sequential / shortcut step time): {seq_us / short_us:.3f}")
    w = read_json(whatif / METRICS_JSON)
    print()
    print(f"LongCat-Flash on 128 x H800, decode, context 5000, {args.whatif_batch_per_gpu} seqs/GPU, SBO, MTP 0.9:")
    print(f"  TPOT {w['tpot_ms']:.1f} ms   TPS/user {w['tps_per_user']:.1f}   TGS {w['tgs']:.0f} tok/s/GPU   "
          f"${w['cost_usd_per_m_tokens']:.2f} / M output tokens at $2/GPU-hour")
    if args.whatif_batch_per_gpu == 8:
        print("  published (SGLang on 128 x H800, 8 users/GPU): TPS/user 100.5   TGS 804   $0.70 / M")
    if "activated_params_mean" in w:
        print(f"  activated params/token {w['activated_params_mean'] / 1e9:.1f}B mean, "
              f"zero-expert share {w.get('zero_expert_share', 0):.2f}")
    print()
    print(f"dashboard: {dashboard}")
    print(f"log: {steps.log_path}   total {time.perf_counter() - steps.t0:.0f} s")
    return 0


def _pct(value: object) -> str:
    return "-" if value is None else f"{float(value):.1f}"
