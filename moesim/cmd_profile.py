"""`moesim profile`: run LongCat-Flash expert-parallel on N ranks under torch.profiler.

Spawns the ranks itself, or, started by torchrun, is one rank of it:
    torchrun --standalone --nproc-per-node 2 -m moesim profile --world-size 2 ... --out RUN
    (multi-node: torchrun --nnodes N --rdzv-endpoint HOST:PORT ...; each node writes its ranks'
    traces to its own RUN, rank 0 writes run.json)
Exit codes: 0 done, 1 a rank failed or hung (one line naming it), 2 bad arguments.
"""

from __future__ import annotations

import argparse
import sys

HELP = "run the model expert-parallel on N ranks under torch.profiler and write a run dir"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="small", help="model preset: tiny, small (CPU), medium (one GPU), longcat-flash (default small)")
    parser.add_argument("--world-size", type=int, default=2, help="ranks (spawned here, or torchrun's)")
    parser.add_argument("--schedule", default="shortcut", help="sequential or shortcut (default)")
    parser.add_argument("--mode", default="prefill", help="prefill (default), decode or train")
    parser.add_argument("--batch", type=int, default=None,
                        help="global sequences per step, split over the ranks (default: the preset's batch x world size)")
    parser.add_argument("--seq", type=int, default=None,
                        help="tokens per sequence; in decode, new tokens per step (default: preset's seq, decode 1)")
    parser.add_argument("--context", type=int, default=None,
                        help="decode: cached tokens before each step (default: the preset's seq)")
    parser.add_argument("--steps", type=int, default=5, help="measured, profiled steps (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first (default 2)")
    parser.add_argument("--out", required=True, help="run dir to write (rank{r}.pt.trace.json.gz, run.json)")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads per rank (default 1)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds before the run is stopped (default 600)")
    parser.add_argument("--backend", default="auto", help="auto (nccl with CUDA, else gloo), gloo or nccl")
    parser.add_argument("--seed", type=int, default=0, help="weights and data seed (default 0)")
    parser.add_argument("--no-profiler", action="store_true", help="same run without torch.profiler (no traces)")
    parser.add_argument("--zero-bias", type=float, default=0.0,
                        help="set every router's correction bias of the zero-computation experts to this (the FFN "
                             "experts' stays 0): positive routes more slots to them, negative fewer (router scores are "
                             "softmax probabilities, ~1/experts each); the share reached is in run.json's routing "
                             "(default 0)")
    parser.add_argument("--inject-fault", default="", help=argparse.SUPPRESS)  # tests: raise:R / hang:R


def run(args: argparse.Namespace) -> int:
    from model.config import LongcatConfig
    from traces.capture import CaptureSpec, RankFailure, capture

    config = LongcatConfig.preset(args.preset)  # ConfigError (exit 2) on an unknown preset
    decode = args.mode == "decode"
    spec = CaptureSpec(
        out_dir=args.out,
        preset=args.preset,
        world_size=args.world_size,
        schedule=args.schedule,
        mode=args.mode,
        batch=args.batch if args.batch is not None else config.default_batch_size * max(args.world_size, 1),
        seq=args.seq if args.seq is not None else (1 if decode else config.default_seq_len),
        context=args.context if args.context is not None else (config.default_seq_len if decode else 0),
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        timeout_s=args.timeout,
        profiler=not args.no_profiler,
        backend=args.backend,
        seed=args.seed,
        zero_bias=args.zero_bias,
        fault=args.inject_fault,
    )
    try:
        run_dir = capture(spec)
    except RankFailure as err:
        print(f"moesim profile: {err}", file=sys.stderr)
        return 1
    _print_summary(run_dir)
    return 0


def _print_summary(run_dir) -> None:
    from traces.rundir import RUN_JSON, read_json, trace_files

    import os

    path = run_dir / RUN_JSON
    if os.environ.get("RANK", "0") != "0" or not path.is_file():  # under torchrun rank 0 reports
        return
    run = read_json(path)
    print(f"run dir      {run_dir}")
    print(f"model        {run['preset']}  mode {run['mode']}  schedule {run['schedule']}  "
          f"world {run['world_size']} ({run['backend']})")
    print(f"batch        {run['batch']} x {run['seq']} tokens (context {run['context']})")
    print(f"step time    median {run['step_time_us_median'] / 1e3:.2f} ms  "
          f"min {run['step_time_us_min'] / 1e3:.2f}  max {run['step_time_us_max'] / 1e3:.2f}  "
          f"({run['steps']} steps after {run['warmup']} warmup)")
    for layer, stats in run.get("routing", {}).items():
        print(f"layer {layer:<6} FFN experts/token {stats['ffn_experts_per_token_mean']:.2f}  "
              f"zero share {stats['zero_expert_share']:.2f}  rank load max/mean {stats['rank_load_max_over_mean']:.2f}")
    traces = trace_files(run_dir)
    if traces:
        print(f"traces       {', '.join(p.name for p in traces)}")
