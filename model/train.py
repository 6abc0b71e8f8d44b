"""A small, real training loop for LongCat-Flash with zero-computation budget control.

One step: sample a batch → forward (routing recorded) → next-token loss + device-level
balance loss → backward → clip → AdamW → per layer, the bias controller moves the FFN
experts' `e_score_correction_bias` from this step's token counts (model/balance.py).

Outputs in the run dir:
    train_log.csv    one row per step (columns: LOG_COLUMNS)
    checkpoint.pt    {"config", "train", "model", "controllers", "step"} (torch.save)
    summary.json     settle step, overshoot, tail averages, held-out loss before/after

A "skewed start" biases the router away from the target on purpose, to show the
controller bringing it back: "zero" lowers every FFN expert's bias by `skew/E` (zero
experts win; their bias is never updated so they keep winning unless the controller acts),
"few" raises the first N/8 FFN experts' bias by `skew/E` (a few experts take most tokens).
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import Callable, Literal

import torch

from model.balance import (
    DEFAULT_GAINS, BiasController, PidGains, check_target, device_balance_loss, make_controller, router_score_units,
    overshoot_pct, settle_step, step_routing_stats,
)
from model.config import ConfigError, LongcatConfig
from model.counting import activated_params
from model.data import DataKind, sample_batch, split_stream, token_stream
from model.longcat import LongcatFlash

LOG_COLUMNS = [
    "step", "loss", "balance_loss", "ffn_experts_per_token", "ffn_experts_std", "zero_share",
    "load_max_over_mean", "load_cv", "device_load_max_over_mean", "device_load_cv",
    "activated_params_mean", "activated_params_min", "activated_params_max",
    "ffn_bias_mean", "grad_norm", "step_s",
]


@dataclass
class TrainConfig:
    """Everything `moesim train` sets; JSON-able (asdict)."""

    preset: str = "tiny"
    steps: int = 200
    target_ffn_experts: float | None = None  # K_e; None: 2/3 of top-k (LongCat: 8 of 12)
    controller: Literal["pid", "p", "off"] = "pid"
    kp: float | None = None  # gains override the controller's defaults (model/balance.py)
    ki: float | None = None
    kd: float | None = None
    score_unit: Literal["scaled", "uniform"] = "scaled"  # bias units: router_score_units or 1/E
    integral_band: float | None = None
    balance_gain: float | None = None
    balance_loss: float = 0.1  # coefficient of the device-level balance loss (0 = off)
    ep_devices: int | None = None  # D groups of FFN experts; None: gcd(N, 8)
    seed: int = 0
    data: DataKind = "text"
    dtype: Literal["fp32", "bf16"] = "fp32"
    batch_size: int = 8
    seq_len: int = 64
    lr: float = 3e-3
    router_lr_scale: float = 0.1  # router classifier lr = lr * this (see `train`)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 10
    skew: Literal["none", "zero", "few"] = "none"
    skew_strength: float = 1.0  # in units of the uniform score 1/E
    num_layers: int | None = None  # override the preset's depth (half-depth runs for growth)
    log_every: int = 10

    def model_config(self) -> LongcatConfig:
        overrides = {} if self.num_layers is None else {"num_layers": self.num_layers}
        return LongcatConfig.preset(self.preset, **overrides)

    def validate(self, config: LongcatConfig) -> None:
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ConfigError(f"steps: must be a positive integer, got {self.steps!r}")
        if self.controller not in ("pid", "p", "off"):
            raise ConfigError(f"controller: expected one of pid, p, off; got {self.controller!r}")
        check_target(self.resolved_target(config), config.moe_topk, config.n_routed_experts)
        for name in ["batch_size", "seq_len", "log_every"]:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.seq_len > config.max_position_embeddings:
            raise ConfigError(f"seq_len: {self.seq_len} exceeds max_position_embeddings {config.max_position_embeddings}")
        if not self.balance_loss >= 0:
            raise ConfigError(f"balance_loss: must be >= 0, got {self.balance_loss}")
        if self.dtype not in ("fp32", "bf16"):
            raise ConfigError(f"dtype: expected fp32 or bf16, got {self.dtype!r}")
        if self.skew not in ("none", "zero", "few"):
            raise ConfigError(f"skew: expected none, zero or few, got {self.skew!r}")

    def resolved_target(self, config: LongcatConfig) -> float:
        if self.target_ffn_experts is None:
            return min(config.moe_topk * 2 / 3, config.n_routed_experts)
        return float(self.target_ffn_experts)

    def resolved_devices(self, config: LongcatConfig) -> int:
        """D: as given, else the largest of 8, 4, 2, 1 that divides N into groups of >= 2."""
        if self.ep_devices is not None:
            return self.ep_devices
        n = config.n_routed_experts
        return next(d for d in (8, 4, 2, 1) if n % d == 0 and (n // d >= 2 or d == 1))

    def gains(self) -> PidGains | None:
        if self.controller == "off":
            return None
        base = DEFAULT_GAINS[self.controller]
        return PidGains(
            kp=base.kp if self.kp is None else self.kp,
            ki=base.ki if self.ki is None else self.ki,
            kd=base.kd if self.kd is None else self.kd,
            integral_limit=base.integral_limit, error_clip=base.error_clip, balance_gain=base.balance_gain if self.balance_gain is None else self.balance_gain,
            integral_band=base.integral_band if self.integral_band is None else self.integral_band,
        )


@dataclass
class TrainResult:
    rows: list[dict[str, float]]
    summary: dict[str, float | int | None | str]
    model: LongcatFlash = field(repr=False)


@torch.no_grad()
def skew_router_bias(model: LongcatFlash, kind: str, strength: float) -> None:
    """Bias every router away from the target (see the module docstring)."""
    config = model.config
    n_ffn, unit = config.n_routed_experts, strength / config.n_experts_total
    for layer in model.model.layers:
        bias_E = layer.mlp.router.e_score_correction_bias
        if kind == "zero":
            bias_E[:n_ffn] -= unit
        elif kind == "few":
            bias_E[: max(1, n_ffn // 8)] += unit


@torch.no_grad()
def evaluate(model: LongcatFlash, tokens: torch.Tensor, cfg: TrainConfig, n_batches: int = 4) -> float:
    """Mean next-token loss on n_batches fixed windows of the held-out stream."""
    gen = torch.Generator().manual_seed(12345)
    losses = []
    for _ in range(n_batches):
        batch = sample_batch(tokens, cfg.batch_size, cfg.seq_len, gen)
        losses.append(float(model(batch, labels=batch).loss))
    return sum(losses) / len(losses)


def train(
    cfg: TrainConfig,
    out_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = print,
    model: LongcatFlash | None = None,
) -> TrainResult:
    """Train `model` (or a fresh one of cfg's preset) for cfg.steps steps; see module docstring."""
    config = model.config if model is not None else cfg.model_config()
    cfg.validate(config)
    target = cfg.resolved_target(config)
    n_devices = cfg.resolved_devices(config)
    n_ffn, n_zero, top_k = config.n_routed_experts, config.zero_expert_num, config.moe_topk

    gen = torch.Generator().manual_seed(cfg.seed)
    if model is None:
        model = LongcatFlash(config, generator=gen)
    train_tokens, held_tokens = split_stream(token_stream(cfg.data, config.vocab_size, gen))
    if cfg.skew != "none":
        skew_router_bias(model, cfg.skew, cfg.skew_strength)
    routers = [layer.mlp.router for layer in model.model.layers]
    for router in routers:
        router.keep_scores = True
    controllers: list[BiasController | None] = [
        make_controller(cfg.controller, n_ffn, n_zero, top_k, target, cfg.gains()) for _ in routers
    ]
    # Adam moves every weight by ~lr per step whatever its gradient, so at full lr the
    # router's logits (spread ~initializer_range·sqrt(D) at init) move by about their own
    # spread each step and the top-k choice reshuffles at random. A smaller router lr keeps
    # selection a slowly varying function of the weights, which the controller can steer.
    params = [p for p in model.parameters() if p.requires_grad]
    router_ids = {id(r.classifier.weight) for r in routers}
    decay = [p for p in params if p.ndim >= 2 and id(p) not in router_ids]
    no_decay = [p for p in params if p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0},
         {"params": [r.classifier.weight for r in routers], "weight_decay": 0.0,
          "lr": cfg.lr * cfg.router_lr_scale}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / max(1, cfg.warmup_steps))
    )
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if cfg.dtype == "bf16" else nullcontext()
    params_for = lambda k: activated_params(config, k)  # noqa: E731

    eval_before = evaluate(model, held_tokens, cfg)
    model.train()
    rows: list[dict[str, float]] = []
    tail_counts_LN = torch.zeros(len(routers), n_ffn, dtype=torch.int64)  # last 20% of steps
    for step in range(cfg.steps):
        t0 = time.perf_counter()
        batch = sample_batch(train_tokens, cfg.batch_size, cfg.seq_len, gen)
        with autocast:
            out = model(batch, labels=batch, return_routing=True)
        lm_loss = out.loss
        bal = torch.zeros((), dtype=torch.float32)
        if cfg.balance_loss > 0:
            for router, routing in zip(routers, out.routing):
                bal = bal + device_balance_loss(
                    router.last_scores_TE, routing.expert_ids, n_ffn, n_devices, target, cfg.balance_loss
                )
            bal = bal / len(routers)
        optimizer.zero_grad(set_to_none=True)
        (lm_loss + bal).backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
        optimizer.step()
        schedule.step()
        for router, routing, ctl in zip(routers, out.routing, controllers):
            units = router_score_units(router.last_scores_TE, n_ffn) if cfg.score_unit == "scaled" else None
            router.last_scores_TE = router.last_logits_TE = None  # free the graph
            if ctl is not None:
                ctl.step(router.e_score_correction_bias, routing.tokens_per_expert[:n_ffn], batch.numel(), units)
        if step >= int(cfg.steps * 0.8):
            tail_counts_LN += torch.stack([r.tokens_per_expert[:n_ffn] for r in out.routing])
        stats = step_routing_stats(out.routing, n_devices, params_for)
        ffn_bias = torch.stack([r.e_score_correction_bias[:n_ffn] for r in routers])
        row = {
            "step": step, "loss": float(lm_loss.detach()), "balance_loss": float(bal.detach()), **stats,
            "ffn_bias_mean": float(ffn_bias.mean()) * config.n_experts_total,  # units of 1/E
            "grad_norm": grad_norm, "step_s": time.perf_counter() - t0,
        }
        rows.append(row)
        if progress is not None and (step % cfg.log_every == 0 or step == cfg.steps - 1):
            progress(
                f"step {step:5d}  loss {row['loss']:.3f}  ffn/token {row['ffn_experts_per_token']:.2f} "
                f"(target {target:g})  zero {row['zero_share']:.2f}  load max/mean "
                f"{row['load_max_over_mean']:.2f}  device {row['device_load_max_over_mean']:.2f}  "
                f"{row['step_s'] * 1e3:.0f} ms"
            )
    model.eval()
    for router in routers:
        router.keep_scores = False
    summary = summarize(rows, target, cfg)
    summary["eval_loss_before"] = eval_before
    summary["eval_loss_after"] = evaluate(model, held_tokens, cfg)
    summary["ep_devices"] = n_devices
    pooled = tail_counts_LN.double()
    summary["tail_load_max_over_mean_pooled"] = float((pooled.max(1).values / pooled.mean(1)).max())
    if out_dir is not None:
        write_run(out_dir, rows, summary, cfg, model, controllers)
    return TrainResult(rows, summary, model)


SMOOTH_STEPS = 10  # control figures are read on a trailing mean over this many steps


def trailing_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at each position (fewer at the start)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def summarize(rows: list[dict[str, float]], target: float, cfg: TrainConfig) -> dict:
    """Control-quality figures of one run.

    The budget figures (settle step: first step after which it stays within ±5% of target;
    overshoot; tail error) are read on the trailing mean of FFN experts per token over
    SMOOTH_STEPS steps (5k tokens at the default batch): a single step of a small router
    flips many near-tied choices at once, and the budget is a corpus-level quantity.
    `tail_*` = mean over the last 20% of steps; `tail_load_max_over_mean_pooled` = max/mean
    of the per-expert token counts summed over those steps (the worst layer).
    """
    ffn = trailing_mean([r["ffn_experts_per_token"] for r in rows], SMOOTH_STEPS)
    tail_start = int(len(rows) * 0.8)
    tail = rows[tail_start:] or rows[-1:]
    first = rows[: max(1, min(10, len(rows) // 10))]

    def tail_mean(key: str) -> float:
        return sum(r[key] for r in tail) / len(tail)

    return {
        "controller": cfg.controller, "preset": cfg.preset, "steps": cfg.steps,
        "target_ffn_experts": target,
        "settle_step": settle_step(ffn, target),
        "overshoot_pct": overshoot_pct(ffn, target),
        "tail_ffn_experts_per_token": tail_mean("ffn_experts_per_token"),
        "tail_max_abs_error_pct": max(abs(v - target) for v in ffn[tail_start:] or ffn[-1:]) / target * 100,
        "tail_max_abs_error_pct_per_step": max(abs(r["ffn_experts_per_token"] - target) for r in tail) / target * 100,
        "tail_ffn_experts_std": tail_mean("ffn_experts_std"),
        "tail_load_max_over_mean": tail_mean("load_max_over_mean"),
        "tail_load_max_over_mean_worst": max(r["load_max_over_mean"] for r in tail),
        "tail_device_load_max_over_mean": tail_mean("device_load_max_over_mean"),
        "tail_activated_params_mean": tail_mean("activated_params_mean"),
        "train_loss_first": sum(r["loss"] for r in first) / len(first),
        "train_loss_last": tail_mean("loss"),
    }


def write_run(
    out_dir: str | os.PathLike, rows: list[dict[str, float]], summary: dict, cfg: TrainConfig,
    model: LongcatFlash, controllers: list[BiasController | None],
) -> None:
    """train_log.csv, summary.json and checkpoint.pt, each written to a temp name and renamed."""
    out = os.fspath(out_dir)
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, f".train_log.csv.tmp{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{row[k]:.6g}" if isinstance(row[k], float) else row[k]) for k in LOG_COLUMNS})
    os.replace(tmp, os.path.join(out, "train_log.csv"))
    tmp = os.path.join(out, f".summary.json.tmp{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump({**summary, "train": asdict(cfg)}, f, indent=2)
        f.write("\n")
    os.replace(tmp, os.path.join(out, "summary.json"))
    save_checkpoint(os.path.join(out, "checkpoint.pt"), model, cfg, controllers, len(rows))


def save_checkpoint(
    path: str, model: LongcatFlash, cfg: TrainConfig, controllers: list[BiasController | None], step: int
) -> None:
    state = {
        "config": model.config.to_dict(),
        "train": asdict(cfg),
        "model": model.state_dict(),
        "controllers": [None if c is None else c.state_dict() for c in controllers],
        "step": step,
    }
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: str | os.PathLike) -> tuple[LongcatFlash, dict]:
    """(model, the raw checkpoint dict) from a checkpoint.pt written by `train`."""
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)  # never runs pickled code
    except (RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ConfigError(f"{os.fspath(path)}: not a moesim training checkpoint ({type(err).__name__})") from err
    if not isinstance(state, dict) or "config" not in state or "model" not in state:
        raise ConfigError(f"{os.fspath(path)}: not a moesim training checkpoint (no config/model)")
    model = LongcatFlash(LongcatConfig.from_dict(state["config"], source=os.fspath(path)))
    model.load_state_dict(state["model"])
    return model, state
