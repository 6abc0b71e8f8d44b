"""`moesim model`: the size table of a LongCat-Flash configuration (closed form, no weights built)."""

from __future__ import annotations

import argparse
import json

HELP = "size table of a model preset or config: parameters, activated parameters, KV cache, FLOPs per token"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="longcat-flash",
                        help="tiny, small, medium or longcat-flash (default longcat-flash)")
    parser.add_argument("--config", metavar="PATH",
                        help="a config JSON instead of a preset: ours (LongcatConfig.to_json) or an official config.json")
    parser.add_argument("--context", type=int, default=4096,
                        help="context length for the decode FLOPs per token (default 4096)")
    parser.add_argument("--dtype-bytes", type=int, default=2, help="bytes per element for the KV cache (default 2: bf16)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")


def _load_config(args: argparse.Namespace):
    from model.config import ConfigError, LongcatConfig

    if args.config is None:
        return LongcatConfig.preset(args.preset), args.preset
    with open(args.config, encoding="utf-8") as f:
        try:
            raw = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{args.config}: not valid JSON ({err})") from err
    ours = {"shortcut", "default_batch_size", "default_seq_len"}
    if isinstance(raw, dict) and ours & set(raw):
        return LongcatConfig.from_dict(raw, source=args.config), args.config
    return LongcatConfig.from_hf(args.config), args.config


def run(args: argparse.Namespace) -> int:
    from model import counting
    from moesim.cli import UsageError

    if args.context < 0:
        raise UsageError(f"--context must be >= 0, got {args.context}")
    if args.dtype_bytes <= 0:
        raise UsageError(f"--dtype-bytes must be positive, got {args.dtype_bytes}")
    cfg, name = _load_config(args)
    mean_k = counting.expected_ffn_experts_per_token(cfg)
    prefill = counting.step_costs(cfg, mode="prefill", batch_size=1, seq_len=cfg.default_seq_len)
    row = {
        "name": name,
        "total_params": counting.total_params(cfg),
        "activated_params_min": counting.activated_params(cfg, 0),
        "activated_params_mean": counting.activated_params(cfg, mean_k),
        "activated_params_max": counting.activated_params(cfg, cfg.moe_topk),
        "ffn_experts_per_token_mean": mean_k,
        "ffn_experts_per_token_max": cfg.moe_topk,
        "kv_cache_bytes_per_token": counting.kv_cache_bytes_per_token(cfg, args.dtype_bytes),
        "decode_context": args.context,
        "decode_flops_per_token": counting.flops_per_token(cfg, context_len=args.context),
        "prefill_seq_len": cfg.default_seq_len,
        "prefill_flops_per_token": counting.total_cost(prefill).flops / cfg.default_seq_len,
    }
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    print(f"model {name}: {cfg.num_layers} layers, hidden {cfg.hidden_size}, "
          f"{cfg.n_routed_experts} FFN + {cfg.zero_expert_num} zero experts, top-{cfg.moe_topk}, "
          f"{'ScMoE' if cfg.shortcut else 'sequential MoE'}")
    lines = [
        ("total params", _params(row['total_params'])),
        ("activated params, 0 FFN experts", _params(row['activated_params_min'])),
        (f"activated params, mean {mean_k:g} FFN experts", _params(row['activated_params_mean'])),
        (f"activated params, max {cfg.moe_topk} FFN experts", _params(row['activated_params_max'])),
        (f"KV cache per token ({args.dtype_bytes} B/elem)", f"{row['kv_cache_bytes_per_token']:,} bytes"),
        (f"decode FLOPs per token at context {args.context}", f"{row['decode_flops_per_token'] / 1e9:,.2f} GFLOP"),
        (f"prefill FLOPs per token, {cfg.default_seq_len}-token prompt",
         f"{row['prefill_flops_per_token'] / 1e9:,.2f} GFLOP"),
    ]
    width = max(len(k) for k, _ in lines)
    for key, value in lines:
        print(f"  {key:<{width}}  {value:>18}")
    print("  (activated: lm_head counted, embedding not; FLOPs: matmuls, mean experts, causal attention)")
    return 0


def _params(n: float) -> str:
    """A parameter count in the unit that keeps it readable: 560.665 B, 1.234 M, 98,304."""
    if n >= 1e9:
        return f"{n / 1e9:,.3f} B"
    if n >= 1e6:
        return f"{n / 1e6:,.3f} M"
    return f"{n:,.0f}"
