"""`moesim train`: a small training run with zero-computation budget control (model/train.py)."""

from __future__ import annotations

import argparse

HELP = "train a small LongCat-Flash with PID-steered expert bias; writes train_log.csv + checkpoint"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None,
                        help="model preset (tiny, small, ...); default tiny; not with --grow-from, whose "
                             "checkpoint sets the model")
    parser.add_argument("--steps", type=int, default=200, help="optimizer steps (default 200)")
    parser.add_argument("--target-ffn-experts", type=float, default=None, metavar="K_E",
                        help="target mean FFN experts per token, in (0, top-k]; default 2/3 of top-k")
    parser.add_argument("--controller", default="pid", help="bias controller: pid, p or off (default pid)")
    parser.add_argument("--balance-loss", type=float, default=0.1, metavar="COEF",
                        help="device-level balance loss coefficient (default 0.1; 0 = off)")
    parser.add_argument("--ep-devices", type=int, default=None,
                        help="EP devices D for the balance loss and device load (default: up to 8)")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, data order and routing (default: %(default)s)")
    parser.add_argument("--out", required=True, metavar="DIR", help="run dir for train_log.csv etc.")
    parser.add_argument("--data", default="text", help="text (Python docs, bytes) or zipf (default text)")
    parser.add_argument("--dtype", default="fp32", help="fp32 or bf16 (CPU autocast)")
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per step (default: %(default)s)")
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate; the router classifier uses a tenth of it (default: %(default)s)")
    parser.add_argument("--skew", default="none",
                        help="skewed start: none, zero (bias favours zero experts), few (a few FFN experts)")
    parser.add_argument("--skew-strength", type=float, default=1.0, help="skew in units of 1/E (default 1)")
    parser.add_argument("--kp", type=float, default=None, help="override the controller's P gain")
    parser.add_argument("--ki", type=float, default=None, help="override the controller's I gain")
    parser.add_argument("--kd", type=float, default=None, help="override the controller's D gain")
    parser.add_argument("--num-layers", type=int, default=None, help="override the preset's depth")
    parser.add_argument("--grow-from", default=None, metavar="CKPT",
                        help="start from a half-depth checkpoint stacked to twice its depth (model/growth.py)")
    parser.add_argument("--log-every", type=int, default=10, help="print a progress line every N steps (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")


def run(args: argparse.Namespace) -> int:
    from moesim.cli import UsageError

    if args.controller not in ("pid", "p", "off"):
        raise UsageError(f"--controller: expected pid, p or off, got {args.controller!r}")
    if args.steps <= 0:
        raise UsageError(f"--steps: must be positive, got {args.steps}")
    if args.data not in ("text", "zipf"):
        raise UsageError(f"--data: expected text or zipf, got {args.data!r}")
    if args.dtype not in ("fp32", "bf16"):
        raise UsageError(f"--dtype: expected fp32 or bf16, got {args.dtype!r}")
    if args.skew not in ("none", "zero", "few"):
        raise UsageError(f"--skew: expected none, zero or few, got {args.skew!r}")

    import torch

    from model.config import ConfigError  # noqa: F401  (registers the error type with the CLI)
    from model.train import TrainConfig, train

    if args.threads is not None:
        torch.set_num_threads(args.threads)

    if args.grow_from is not None and (args.preset is not None or args.num_layers is not None):
        from moesim.cli import UsageError

        raise UsageError("--grow-from takes the model from its checkpoint: drop --preset / --num-layers")
    cfg = TrainConfig(
        preset=args.preset or "tiny", steps=args.steps, target_ffn_experts=args.target_ffn_experts,
        controller=args.controller, kp=args.kp, ki=args.ki, kd=args.kd,
        balance_loss=args.balance_loss, ep_devices=args.ep_devices, seed=args.seed, data=args.data,
        dtype=args.dtype, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        skew=args.skew, skew_strength=args.skew_strength, num_layers=args.num_layers,
        log_every=args.log_every,
    )
    model = None
    if args.grow_from is not None:
        from model.growth import grow_checkpoint

        model = grow_checkpoint(args.grow_from)
        cfg.preset = "grown"
    result = train(cfg, args.out, model=model)
    s = result.summary
    settle = "never" if s["settle_step"] is None else f"step {s['settle_step']}"
    print(
        f"target {s['target_ffn_experts']:g} FFN experts/token: settled {settle}, overshoot "
        f"{s['overshoot_pct']:.1f}%, last 20%: {s['tail_ffn_experts_per_token']:.3f} "
        f"(max error {s['tail_max_abs_error_pct']:.1f}%), load max/mean {s['tail_load_max_over_mean']:.2f} "
        f"per step, {s['tail_load_max_over_mean_pooled']:.2f} pooled; held-out loss "
        f"{s['eval_loss_before']:.3f} -> {s['eval_loss_after']:.3f}"
    )
    print(f"wrote {args.out}/train_log.csv, summary.json, checkpoint.pt")
    return 0
