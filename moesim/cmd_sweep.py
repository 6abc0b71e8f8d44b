"""`moesim sweep`: the full-scale what-if over a grid of clusters, GPU counts, batches and schedules.

    moesim sweep --preset longcat-flash --cluster h800,h100,h200 --gpus 32,64,128,256 \
        --batch-per-gpu 8,16,32,64,128 --schedule sbo,tbo,sequential -o SWEEP

Writes SWEEP/results.parquet, SWEEP/results.csv and SWEEP/dashboard.html; resumes (points
already in SWEEP/points.jsonl are skipped).
"""

from __future__ import annotations

import argparse
import os

HELP = "run the full-scale what-if over a grid (parallel, resumable) and build the sweep dashboard"


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", type=_names, default=["longcat-flash"],
                        help="model(s), comma separated: a LongCat preset or a baseline (deepseek-v3, ...)")
    parser.add_argument("--cluster", type=_names, default=["h800"], help="cluster preset(s), comma separated")
    parser.add_argument("--gpus", type=_ints, default=[128], help="GPU counts, comma separated")
    parser.add_argument("--batch-per-gpu", type=_ints, default=[16, 32, 64],
                        help="sequences per GPU (decode: concurrent users per GPU), comma separated")
    parser.add_argument("--schedule", type=_names, default=["sbo", "tbo", "sequential"],
                        help="schedules, comma separated: sequential, tbo, sbo")
    parser.add_argument("--mode", choices=["prefill", "decode", "train"], default="decode", help="step simulated")
    parser.add_argument("--context", type=int, default=5000,
                        help="decode: cached tokens per sequence; prefill/train: sequence length")
    parser.add_argument("--mtp-accept", type=float, default=0.0,
                        help="MTP acceptance rate of the draft token (0 = no MTP)")
    parser.add_argument("--price-per-gpu-hour", type=float, default=2.0, help="USD per GPU-hour for $/M tokens")
    parser.add_argument("--seed", type=int, default=0, help="routing draw seed (same seed, same results)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    parser.add_argument("--no-dashboard", action="store_true", help="skip SWEEP/dashboard.html")
    parser.add_argument("-o", "--out", metavar="SWEEP", required=True, help="output directory")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from moesim.cli import UsageError
    from simulator.sweep import grid, run_sweep, tqdm_progress

    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if not 0.0 <= args.mtp_accept <= 1.0:
        raise UsageError(f"--mtp-accept must be in [0, 1], got {args.mtp_accept}")
    points = grid(args.preset, args.cluster, args.gpus, args.batch_per_gpu, args.schedule,
                  mode=args.mode, context=args.context, mtp_accept=args.mtp_accept,
                  price_per_gpu_hour=args.price_per_gpu_hour, seed=args.seed)
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"{out}: exists and is not a directory")
    table = run_sweep(points, out, workers=args.workers, progress=tqdm_progress())
    rows = table.to_pylist()
    ok = [r for r in rows if r["status"] == "ok"]
    print(f"{len(rows)} points ({len(ok)} feasible) -> {out / 'results.parquet'}, {out / 'results.csv'}")
    _print_table(ok)
    if not args.no_dashboard and ok:
        from dashboards import build

        built = build(sweep=table.filter(_ok_mask(table)), out_path=out / "dashboard.html",
                      title=f"moesim sweep: {', '.join(args.preset)}")
        print(f"dashboard: {built.path}")
    return 0


def _ok_mask(table):
    import pyarrow.compute as pc

    return pc.equal(table.column("status"), "ok")


def _print_table(rows: list[dict], limit: int = 20) -> None:
    if not rows:
        return
    best = sorted(rows, key=lambda r: -(r.get("tgs") or 0))[:limit]
    print(f"{'cluster':>10} {'gpus':>5} {'batch':>6} {'sched':>10} {'step_ms':>9} {'TPS/u':>7} {'TGS':>8} {'$/M':>7}")
    for r in best:
        def fmt(key: str, spec: str) -> str:
            return "-" if r.get(key) is None else format(r[key], spec)

        print(f"{r['cluster']:>10} {r['gpus']:>5} {r['batch_per_gpu']:>6} {r['schedule']:>10} "
              f"{r['step_time_us'] / 1e3:>9.2f} "
              f"{fmt('tps_per_user', '.1f'):>7} {fmt('tgs', '.0f'):>8} {fmt('cost_usd_per_m_tokens', '.3f'):>7}")
    if len(rows) > limit:
        print(f"  ... {len(rows) - limit} more in results.csv (top {limit} by TGS shown)")
