"""`moesim simulate`: replay a traced run on a cluster model and write a simulated run dir.

    moesim simulate --trace RUN --cluster NAME [--gpus N] -o SIMRUN [--comm-from-trace] [--seed S]
    moesim simulate --trace RUN --to-batch B [--to-seq T] [--to-schedule S] [--to-zero-share Z] --calibration CAL -o SIMRUN
    moesim simulate --preset MODEL --cluster NAME --gpus N --mode decode --context C --batch-per-gpu B
                    --schedule sbo [--mtp-accept 0.9] [--price-per-gpu-hour 2] -o SIMRUN   (simulator/whatif.py)

The trace branch lives in `_run_trace`; analytic workloads (`--preset ...`, issue 8) add their
own branch in `run()` and reuse `_cluster_for` / `_report`.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

HELP = "simulate a run on a cluster model (replay a traced run) and write a simulated run dir"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", metavar="RUN", default=None, help="run dir holding ops.parquet (or the parquet file) to replay")
    parser.add_argument("--cluster", metavar="NAME", default=None,
                        help="cluster preset or .graphml/.json topology (default: cpu-loopback for gloo runs, "
                             "the GPU's preset for NCCL runs on an H200/H100/H800/A100/A800/A30)")
    parser.add_argument("--gpus", type=int, default=None, help="cluster size (default: the trace's ranks, rounded up to whole nodes)")
    parser.add_argument("--cores", type=int, default=None, help="cpu-loopback: cores shared by the processes (default: run.json or this machine)")
    parser.add_argument("-o", "--out", metavar="SIMRUN", required=True, help="simulated run dir to write")
    parser.add_argument("--comm-from-trace", action="store_true", help="take comm durations from the trace instead of the network model")
    parser.add_argument("--seed", type=int, default=0, help="recorded in run.json; the engine is deterministic")
    parser.add_argument("--flow-model", choices=["auto", "exact", "aggregate"], default="auto",
                        help="per-pair flows (exact), one flow per collective phase (aggregate), or by size (auto)")
    parser.add_argument("--no-gaps", action="store_true", help="drop the host gaps the trace shows between ops")
    parser.add_argument("--unsized-from-network", action="store_true",
                        help="collectives without byte counts in the trace: network latency only "
                             "(default: their traced time, counted in run.json)")
    w = parser.add_argument_group("what-if on a traced run (--trace; simulator/transforms.py)")
    w.add_argument("--to-batch", type=int, default=None, metavar="B",
                   help="predict the run at B global sequences per step (default: the run's)")
    w.add_argument("--to-seq", type=int, default=None, metavar="T",
                   help="predict it at T tokens per sequence (default: the run's)")
    w.add_argument("--to-schedule", choices=["sequential", "shortcut"], default=None,
                   help="predict it under this schedule (default: the run's)")
    w.add_argument("--to-zero-share", type=float, default=None, metavar="Z",
                   help="predict it with this share of routed slots going to zero-computation experts, 0 <= Z < 1 "
                        "(each layer's FFN-expert rows and dispatch/combine payloads scale by (1 - Z) / (1 - z), z the "
                        "layer's share in run.json; needs --calibration)")
    w.add_argument("--calibration", metavar="CAL", default=None,
                   help="the cost model that moves op durations to --to-batch/--to-seq (calibration.json or "
                        "its dir, from `moesim calibrate` on the run's hardware)")
    # analytic what-if (issue 8): the options map onto simulator/workload.py ParallelPlan fields
    g = parser.add_argument_group("analytic what-if (--preset)")
    g.add_argument("--preset", default=None, help="model: a LongCat preset (longcat-flash, medium, small, tiny) or a baseline "
                   "(deepseek-v3, qwen3-235b-a22b, kimi-k2, scmoe-gpt)")
    g.add_argument("--mode", choices=["prefill", "decode", "train"], default="decode",
                   help="step simulated: prefill, decode (one token per sequence) or a training step (default: %(default)s)")
    g.add_argument("--context", type=int, default=4096, help="decode: cached tokens per sequence; prefill/train: sequence length")
    g.add_argument("--batch-per-gpu", type=int, default=8, help="decode: concurrent sequences per GPU; prefill/train: sequences per GPU per step")
    g.add_argument("--schedule", choices=["sequential", "tbo", "sbo"], default="sbo",
                   help="sequential (no overlap), tbo (two micro-batches, DeepSeek-V3 style) or sbo "
                        "(LongCat-Flash single batch overlap) (default: %(default)s)")
    g.add_argument("--layout", choices=["shortcut", "conventional"], default=None, help="override the model's MoE layout")
    g.add_argument("--mtp-accept", type=float, default=None, help="decode with one MTP draft token accepted at this rate")
    g.add_argument("--price-per-gpu-hour", type=float, default=2.0, help="USD, for $/M output tokens")
    g.add_argument("--train-tokens", type=float, default=20e12, help="training: token budget for the days estimate")
    g.add_argument("--ep", type=int, default=0, help="expert-parallel group size (default: all GPUs of a stage, at most the expert count)")
    g.add_argument("--tp", type=int, default=1, help="attention tensor parallelism")
    g.add_argument("--pp", type=int, default=1, help="pipeline stages (training)")
    g.add_argument("--micro-batches", type=int, default=0, help="training micro-batches per step (default 2 x pp)")
    g.add_argument("--weight-bytes", type=float, default=2.0, help="bytes per weight (2 = BF16, 1 = FP8)")
    g.add_argument("--routing", choices=["uniform", "zipf", "replay"], default="uniform", help="expert choice")
    g.add_argument("--zipf-s", type=float, default=1.0,
                   help="--routing zipf: exponent of the expert popularity skew (default: %(default)s)")
    g.add_argument("--routing-record", default=None, help="routing record JSON or moesim train log (train_log.csv)")
    g.add_argument("--k-mean", type=float, default=8.0, help="mean FFN experts per token (zero-expert models)")
    g.add_argument("--k-std", type=float, default=3.0, help="their spread (std)")
    g.add_argument("--no-traces", action="store_true", help="skip the Kineto trace files (large at 1000+ GPUs)")
    g.add_argument("--json", action="store_true", help="print metrics.json instead of the table")
    g.add_argument("--target-tps-per-user", type=float, default=None,
                   help="decode: search the largest --batch-per-gpu whose TPS/user reaches this, then run it")


def _cluster_for(name: str, ranks: int, gpus: int | None, cores: int | None):
    """The cluster to simulate on, sized to hold `ranks` ranks unless --gpus says otherwise."""
    from simulator.cluster import get_cluster

    options = {"cores": cores} if name == "cpu-loopback" and cores is not None else {}
    if gpus is None:
        probe = get_cluster(name, **options)
        per = probe.gpus_per_node
        if name == "cpu-loopback":
            gpus = ranks
        elif name.endswith((".graphml", ".json")):
            return probe
        else:
            gpus = max(per, -(-ranks // per) * per)
    return get_cluster(name, gpus=gpus, **options)


def _zero_shares(live: dict, run_json: Path, to_share: float) -> dict[int, float]:
    """Per layer: the run's zero-expert share (run.json routing), checked with to_share."""
    from moesim.cli import UsageError

    if not 0 <= to_share < 1:
        raise UsageError(f"--to-zero-share {to_share:g}: expected 0 <= Z < 1")
    routing = live.get("routing")
    try:
        shares = {int(layer): float(r["zero_expert_share"]) for layer, r in routing.items()}
    except (AttributeError, KeyError, TypeError, ValueError):
        shares = {}
    if not shares:
        raise UsageError(f"--to-zero-share: {run_json} holds no routing.*.zero_expert_share (a run dir written by "
                         "`moesim profile`)")
    for layer, z in sorted(shares.items()):
        if not 0 <= z < 1:  # (NaN fails too) at 1 no FFN rows ran: nothing to scale from
            raise UsageError(f"--to-zero-share: {run_json} routing.{layer}.zero_expert_share is {z}; "
                             "the run's layers need FFN rows (0 <= share < 1) to be scaled")
    return shares


def _what_if(args: argparse.Namespace, ops, run_dir: Path, live: dict, cluster, notes: dict):
    """The traced run moved to --to-batch / --to-seq / --to-schedule / --to-zero-share: one
    typical step (waiting removed), op durations scaled by the calibration's cost model (on
    a GPU trace: kernels by their launching op's work, host ops kept), then replayed.
    Collectives take the calibration's comm model on cpu-loopback, their traced time on a
    GPU cluster."""
    import numpy as np

    from moesim.cli import UsageError
    from simulator.calibrate import attach_work, load_calibration
    from simulator.engine import simulate
    from simulator.transforms import scale_experts, scale_work, set_schedule, step_graph

    batch, seq = live.get("batch"), live.get("seq")
    if not (isinstance(batch, int) and isinstance(seq, int) and batch > 0 and seq > 0):
        raise UsageError(f"--to-batch/--to-seq/--to-schedule/--to-zero-share: {run_dir / 'run.json'} gives no batch and seq "
                         "(a run dir written by `moesim profile`)")
    to_batch = args.to_batch if args.to_batch is not None else batch
    to_seq = args.to_seq if args.to_seq is not None else seq
    if to_batch <= 0 or to_seq <= 0:
        raise UsageError(f"--to-batch {to_batch} / --to-seq {to_seq}: expected positive integers")
    if live.get("mode") == "decode" and to_seq != seq:
        raise UsageError("--to-seq: a decode step's attention grows with its cached context, which --to-seq "
                         "does not move; use --to-batch, or profile the other length")
    if args.comm_from_trace or args.no_gaps:
        raise UsageError("--comm-from-trace / --no-gaps: not with the --to-* what-ifs (the moved "
                         "step takes collectives from the comm model on cpu-loopback, from the trace on GPUs)")
    token_scale = to_batch * to_seq / (batch * seq)
    shares = None if args.to_zero_share is None else _zero_shares(live, run_dir / "run.json", args.to_zero_share)
    # FFN rows per token are top_k · (1 − share): each layer's rows scale by (1 − Z) / (1 − z)
    layer_scale = None if shares is None else {k: (1 - args.to_zero_share) / (1 - z) for k, z in shares.items()}
    backend = live.get("backend")
    comm = None
    moved = token_scale != 1 or layer_scale is not None
    g = step_graph(attach_work(ops, run_dir) if moved else ops)
    if moved or cluster.kind == "cpu":
        if args.calibration is None:
            raise UsageError(f"--calibration CAL is required to move the run's op durations; create it with "
                             f"`moesim calibrate --backend {backend or 'gloo'} --world-size {live.get('world_size', 1)} -o CAL`")
        _, model, comm = load_calibration(args.calibration, backend=backend,
                                          world_size=live.get("world_size") if cluster.kind == "cpu" else None)
        if token_scale != 1:
            g = scale_work(g, model, token_scale, token_scale * to_seq / seq)
        if layer_scale is not None:
            g = scale_experts(g, model, layer_scale=layer_scale)
    schedule = args.to_schedule or live.get("schedule")
    if schedule in ("sequential", "shortcut"):
        g = set_schedule(g, schedule)
    notes["what_if"] = {"from": {"batch": batch, "seq": seq, "schedule": live.get("schedule")},
                        "to": {"batch": to_batch, "seq": to_seq, "schedule": schedule},
                        "token_scale": token_scale, "calibration": args.calibration}
    if layer_scale is not None:
        notes["what_if"]["from"]["zero_share"] = {str(k): z for k, z in shares.items()}
        notes["what_if"]["to"]["zero_share"] = args.to_zero_share
        notes["what_if"]["ffn_rows_scale"] = {str(k): v for k, v in layer_scale.items()}
    if cluster.kind == "cpu":
        from simulator.validate import simulate_graph

        return simulate_graph(g, comm, cluster.cores)[2]
    replayed, gap = g.to_ops()
    durations = replayed.column("dur_us").to_numpy().astype(np.float64)
    return simulate(replayed, cluster, comm_from_trace=True, gap_us=gap, compute_time=lambda _t, _c: durations)


def _report(out: Path, metrics: dict, wall_s: float) -> None:
    ranks = metrics.get("ranks", {})
    print(f"wrote {out}  (simulated in {wall_s:.2f} s)")
    print(f"step time {metrics.get('step_time_us', 0):.1f} us, overlap mean "
          f"{metrics.get('overlap_pct_mean') if metrics.get('overlap_pct_mean') is None else round(metrics['overlap_pct_mean'], 1)} %")
    print(f"{'rank':>5} {'compute_us':>11} {'comm_us':>10} {'hidden_us':>10} {'exposed_us':>11} {'overlap%':>9}")
    for r, m in list(ranks.items())[:16]:
        pct = m.get("overlap_pct")
        print(f"{r:>5} {m['compute_us']:11.1f} {m['comm_us']:10.1f} {m['hidden_comm_us']:10.1f} "
              f"{m['exposed_comm_us']:11.1f} {('-' if pct is None else f'{pct:.1f}'):>9}")
    if len(ranks) > 16:
        print(f"  ... {len(ranks) - 16} more ranks in metrics.json")


def _run_trace(args: argparse.Namespace) -> int:
    import time

    from simulator.replay import replay, write_sim_run
    from traces.rundir import OPS_PARQUET, RUN_JSON, read_json
    from traces.schema import read_ops

    src = Path(args.trace)
    parquet = src / OPS_PARQUET if src.is_dir() else src
    ops = read_ops(parquet)
    run_json = parquet.parent / RUN_JSON
    live = read_json(run_json) if run_json.is_file() else {}
    name = args.cluster
    if name is None:
        from simulator.cluster import preset_for_devices

        devices = [str(d) for d in (live.get("devices") or {}).values()]
        if live.get("backend") == "gloo":
            name = "cpu-loopback"
        elif live.get("backend") == "nccl" and preset_for_devices(devices):
            name = preset_for_devices(devices)
            print(f"cluster {name} (the run's GPUs: {', '.join(sorted(set(devices)))}); --cluster picks another")
        else:
            from moesim.cli import UsageError

            said = f"ran on {', '.join(sorted(set(devices)))}" if devices else "does not say where it ran"
            raise UsageError(f"--cluster NAME is required (the trace's run.json {said}, which names no cluster preset)")
    cores = args.cores
    if cores is None and name == "cpu-loopback":
        cores = int(live.get("cores") or live.get("hardware", {}).get("cpu_count", 0) or os.cpu_count() or 1)
    world = int(ops.column("rank").to_numpy().max()) + 1 if ops.num_rows else 1
    cluster = _cluster_for(name, world, args.gpus, cores)
    t0 = time.perf_counter()
    notes: dict = {}
    if (args.to_batch, args.to_seq, args.to_schedule, args.to_zero_share) != (None, None, None, None):
        sim = _what_if(args, ops, parquet.parent, live, cluster, notes)
    elif args.calibration is not None:
        from moesim.cli import UsageError

        raise UsageError("--calibration: only the what-if options (--to-batch, --to-seq, --to-schedule, --to-zero-share) use it")
    else:
        sim = replay(ops, cluster, comm_from_trace=args.comm_from_trace, seed=args.seed,
                     keep_gaps=not args.no_gaps, flow_model=args.flow_model,
                     unsized_from_trace=not args.unsized_from_network, notes=notes)
    wall = time.perf_counter() - t0
    info = {k: live[k] for k in ("preset", "config", "schedule", "mode", "plan") if k in live}
    info.update(notes)
    info.update({"input": str(src), "comm_from_trace": bool(args.comm_from_trace), "flow_model": args.flow_model,
                 "keep_gaps": not args.no_gaps, "cores": cluster.cores if cluster.kind == "cpu" else None})
    if "step_time_us_median" in live:
        info["input_step_time_us_median"] = live["step_time_us_median"]
    out = write_sim_run(args.out, sim, cluster, seed=args.seed, run_info=info)
    from traces.rundir import METRICS_JSON

    _report(out, read_json(out / METRICS_JSON), wall)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.trace is not None:
        return _run_trace(args)
    if args.preset is not None:  # analytic what-if: logic in simulator/whatif.py
        from simulator.whatif import run_from_args

        return run_from_args(args)
    from moesim.cli import UsageError

    raise UsageError("nothing to simulate: give --trace RUN (a run dir with ops.parquet) or --preset MODEL")
