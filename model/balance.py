"""Zero-computation budget control for the LongCat-Flash router.

Three pieces of plain tensor code (only model.moe's LayerRouting record is shared), used by
`model/train.py`:

1. `BiasController`: steers a router's `e_score_correction_bias` so that tokens use, on
   average, K_e FFN experts out of the K chosen, spread evenly over the N FFN experts.
2. `device_balance_loss`: LongCat's device-level load-balance loss (FFN experts in D groups,
   one per EP device, plus one group of all zero experts).
3. `routing_stats` / `step_routing_stats`: what the routing did in one step (FFN experts
   per token, zero-expert share, load imbalance per expert and per device, activated
   parameters per token).

Legend: T = tokens, K = top-k (FFN + zero experts chosen per token), N = FFN experts,
Z = zero (identity) experts, E = N + Z, D = EP devices (groups of FFN experts), L = layers.

The bias only changes WHICH experts are chosen (top-k on scores + bias); the gate value
of a chosen expert is its plain softmax score. So nothing here changes the model's
output except through selection.

Reference: LongCat-Flash Technical Report (arXiv 2509.01322), sections "Computational
budget control" and "Load balance control"; summarised in
/work/shared/reference/longcat-flash.md ("Training-time balancing"). The report gives the
per-expert update
    Δb_i = μ · ( K_e/K · 1/N − T_i/(K · T_all) )          (i < N; zero-expert b never moves)
and says the bias is "adjusted by a PID controller". The report does not print the PID
equations; the form below is ours and reduces to the printed update when ki = kd = 0.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Literal

import torch

from model.config import ConfigError
from model.moe import LayerRouting

ControllerKind = Literal["pid", "p", "off"]


# ------------------------------------------------------------------ the budget error
def budget_error(
    ffn_counts_N: torch.Tensor, n_tokens: int, top_k: int, target_ffn_experts: float
) -> torch.Tensor:
    """Per-FFN-expert error e_i = K_e/K · 1/N − T_i/(K · T_all)   (float64, shape [N]).

    ffn_counts_N: T_i, how many of the n_tokens (T_all) chose FFN expert i this step.
    Σ_i e_i = (K_e − mean FFN experts per token)/K: the common mode of e is the budget
    error, the differences between experts are the imbalance. All e_i = 0 exactly when
    every FFN expert receives K_e/N of the tokens.
    """
    n_ffn = ffn_counts_N.numel()
    counts = ffn_counts_N.to(torch.float64)
    return target_ffn_experts / (top_k * n_ffn) - counts / (top_k * n_tokens)


# ------------------------------------------------------------------ the PID controller
@dataclass(frozen=True)
class PidGains:
    """Gains in relative units (see `BiasController`); kp alone = aux-loss-free update."""

    kp: float
    ki: float = 0.0
    kd: float = 0.0
    integral_limit: float = 50.0  # anti-windup: |I_i| is clamped to this (relative units)
    integral_band: float = 0.10  # integral separation: I grows only while |mean_i ε_i| < this
    balance_gain: float = 1.0  # weight of the per-expert (differential) part of ε; 1 = plain e_i
    error_clip: float = math.inf  # the imbalance part ε_i − ε̄ is clamped to ±this


# Tuned on `tiny` and `small` training runs from a skewed start (README, "Measured figures"),
# with the gain-scheduled units of `router_score_units`. What the tuning showed:
# - units of 1/E with kp 0.1 lagged the router's own drift towards zero experts by 100+ steps
#   on tiny; on small (near-uniform router) 1/E-sized steps made the bias alone decide the
#   choice (8 FFN experts took every token). Token-spread units fixed tiny and made small's
#   steps proportionate; small's per-expert balance still comes slowly (README).
# - ki ≥ 0.02, or a wide integral band, slowed settling on tiny to 120+ steps with a slow ±7%
#   oscillation; ki is small and integrates only within ±10% of the budget.
# - kd > 0 (a proportional term on b) passes each step's count noise into the bias: per-step
#   load max/mean rose from ~1.3 to ~2.0 at kd 0.5 on tiny; kd defaults to 0, still a knob.
# - the imbalance part is clamped to ±1 (an overloaded expert's ε reaches 1 − N/K_e).
# - with one balance unit for all experts (the mean spread) small's load stayed at max/mean
#   1.68 pooled, 5.7 per step: the hottest experts' scores spread 5–6x less over tokens than
#   the mean, so each of their bias steps swung them from no tokens to most (a limit cycle).
#   Per-expert units (each its own spread) brought small to 1.25 pooled; halving the balance
#   part (balance_gain 0.5) to 1.19, and kept tiny settling within 87–118 steps (seeds 0–2).
# "p" is "pid" without its I and D terms, so comparing the two isolates what they add. The
# report's plain update is PidGains(kp=μ·K_e·E/(K·N)) with the default units (1/E).
DEFAULT_GAINS: dict[str, PidGains] = {
    "p": PidGains(kp=0.5, balance_gain=0.5, error_clip=1.0),
    "pid": PidGains(kp=0.5, ki=0.005, kd=0.0, balance_gain=0.5, error_clip=1.0),
}


class BiasController:
    """PID on the budget error, acting on the FFN-expert part of one router's bias.

    Units. e_i (above) scales like 1/(K·N) and the bias acts on softmax scores that scale
    like 1/E, so the controller works on the relative error
        ε_i = e_i · K · N / K_e = 1 − T_i / (K_e · T_all / N)      (1 − load / target load)
    and moves the bias in units of the router's scores (1/E, the uniform score, or the
    gain-scheduled units of `router_score_units`: u_b for the budget part, u_d,i per FFN
    expert for the balance part). ε splits into a common mode, the budget error
    ε̄ = mean_j ε_j = (K_e − mean FFN experts per token)/K_e, and a differential part
    ε_i − ε̄, the imbalance between FFN experts. The differential part of one step's counts
    is far noisier (each expert sees ~T·K_e/N tokens, the budget all T·K_e), so it may be
    weighted down by s = balance_gain:
        ε'_i(t) = ε̄(t) + s · [ (u_d,i/u_b) · (ε_i(t) − ε̄(t)) ]₀      (s = 1, u_d,i = u_b: ε'_i = ε_i)
    where [x]₀ = x − mean_j x_j re-centres the balance part, so per-expert units never leak
    into the budget (mean_i ε'_i = ε̄ always).
    Per step t and FFN expert i:
        I_i(t)  = clamp(I_i(t−1) + ε'_i(t), ±integral_limit)  only while |ε̄(t)| < integral_band
        Δb_i(t) = u_b · [ kp · ε'_i(t) + ki · I_i(t) + kd · (ε'_i(t) − ε'_i(t−1)) ]
    With ki = kd = 0, s = 1 and the default units this is exactly the report's update
    Δb_i = μ · e_i with μ = kp · K · N / (K_e · E). Zero-expert biases (indices N..E−1) are
    never touched.

    Why the extra terms: b is the running sum of Δb, so the P term already integrates the
    error (a type-1 loop: no steady error against a constant offset). The router's own
    weights drift as it trains, a ramp disturbance that a type-1 loop follows with a lag
    of drift/(gain); the I term (a second integration) removes that lag. In terms of b the
    D term is a proportional term, b ⊃ kd·ε/E: it reacts at once and damps the overshoot
    the I term brings. Integral separation (I frozen while the budget is more than
    integral_band away from target) keeps a skewed start from winding the integral up
    into a large overshoot.
    """

    def __init__(
        self,
        n_ffn: int,
        n_zero: int,
        top_k: int,
        target_ffn_experts: float,
        gains: PidGains,
    ) -> None:
        check_target(target_ffn_experts, top_k, n_ffn)
        self.n_ffn, self.n_zero, self.top_k = n_ffn, n_zero, top_k
        self.target_ffn_experts = float(target_ffn_experts)
        self.gains = gains
        self.integral_N = torch.zeros(n_ffn, dtype=torch.float64)
        self.prev_error_N: torch.Tensor | None = None

    def relative_error(self, ffn_counts_N: torch.Tensor, n_tokens: int) -> torch.Tensor:
        """ε_i = e_i · K · N / K_e (float64, [N]); 1 = expert i got no tokens."""
        e_N = budget_error(ffn_counts_N, n_tokens, self.top_k, self.target_ffn_experts)
        return e_N * (self.top_k * self.n_ffn / self.target_ffn_experts)

    @torch.no_grad()
    def step(
        self, bias_E: torch.Tensor, ffn_counts_N: torch.Tensor, n_tokens: int,
        units: tuple[float, float | torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Update bias_E[:N] in place from one step's FFN-expert token counts; returns Δb [N].

        units: (u_b, u_d), the bias units of the budget and balance parts (default 1/E
        both, the uniform score); u_d may be a float or a per-FFN-expert tensor [N];
        `router_score_units` gives the gain-scheduled ones.
        """
        if bias_E.numel() != self.n_ffn + self.n_zero:
            raise ConfigError(
                f"e_score_correction_bias: expected {self.n_ffn + self.n_zero} entries "
                f"(N {self.n_ffn} + Z {self.n_zero}), got {bias_E.numel()}"
            )
        g = self.gains
        raw_N = self.relative_error(ffn_counts_N.cpu(), n_tokens)
        budget = raw_N.mean()
        # ε_i ≤ 1 but an overloaded expert can reach 1 − N/K_e: clamp the imbalance part to
        # ±error_clip so a hot expert is not cut by N/K_e times the step an idle one gets
        # (re-centred after clamping, so the clamp never leaks into the budget part)
        imbalance_N = (raw_N - budget).clamp(-g.error_clip, g.error_clip)
        imbalance_N -= imbalance_N.mean()
        uniform = 1.0 / (self.n_ffn + self.n_zero)
        u_b, u_d = (uniform, uniform) if units is None else (float(units[0]), units[1])
        if isinstance(u_d, torch.Tensor):
            u_d = u_d.detach().to(torch.float64).cpu()
            if u_d.numel() != self.n_ffn:
                raise ConfigError(f"units: the balance unit needs one entry per FFN expert ({self.n_ffn}), got {u_d.numel()}")
            u_d = u_d.reshape(self.n_ffn)
        # per-expert units (a tensor u_d) would leak the imbalance into the common mode:
        # re-centre after scaling, so mean_i ε'_i stays the budget error
        balance_N = (u_d / u_b) * imbalance_N
        balance_N = balance_N - balance_N.mean()
        eps_N = budget + g.balance_gain * balance_N  # in units of u_b
        lim = g.integral_limit
        if abs(float(budget)) < g.integral_band:
            self.integral_N = (self.integral_N + eps_N).clamp(-lim, lim)
        d_eps_N = eps_N - self.prev_error_N if self.prev_error_N is not None else torch.zeros_like(eps_N)
        self.prev_error_N = eps_N
        delta_N = (g.kp * eps_N + g.ki * self.integral_N + g.kd * d_eps_N) * u_b
        bias_E[: self.n_ffn] += delta_N.to(bias_E.dtype).to(bias_E.device)
        return delta_N

    def state_dict(self) -> dict:
        return {
            "gains": asdict(self.gains),
            "target_ffn_experts": self.target_ffn_experts,
            "integral_N": self.integral_N.clone(),
            "prev_error_N": None if self.prev_error_N is None else self.prev_error_N.clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.gains = PidGains(**state["gains"])
        self.target_ffn_experts = float(state["target_ffn_experts"])
        self.integral_N = state["integral_N"].clone()
        prev = state["prev_error_N"]
        self.prev_error_N = None if prev is None else prev.clone()


def router_score_units(scores_TE: torch.Tensor, n_ffn: int) -> tuple[float, torch.Tensor]:
    """Bias units (u_b, u_d [N]) for a router in its current state (gain scheduling).

    A bias step on expert i changes the choice of the tokens whose score for i lies within
    that step of the top-k boundary, so the loop gain is (bias step) / (spread of expert
    i's score over tokens). Measuring steps in that spread keeps the gain steady as the
    router goes from nearly uniform (fresh) to peaked (trained):
        u_b   = mean over all E experts of the std over tokens of s_{t,i}   (budget part)
        u_d,i = the std over tokens of s_{t,i}, FFN expert i's own            (balance part)
                (floored at 0.1 × its mean over FFN experts, so an expert whose score
                barely varies still moves)
    Per expert because spreads differ: on `small` the hottest experts' spread was 5–6x below
    the mean, and a mean-sized step threw them between no tokens and most tokens.
    Why across tokens and not across experts: a fresh router ranks experts almost the same
    way for every token (hidden states share a large common direction), so the spread
    across experts is mostly a per-expert offset that the bias must cancel, not a margin.
    Measured on `small` from a skewed start: with steps in units of 1/E, or of the
    per-token spread across experts, 8 FFN experts took every token (load max/mean 8).
    """
    s = scores_TE.detach().float()
    spread_E = s.std(dim=0)
    spread_N = spread_E[:n_ffn].double()
    return float(spread_E.mean()), spread_N.clamp_min(0.1 * float(spread_N.mean()))


def check_target(target_ffn_experts: float, top_k: int, n_ffn: int) -> None:
    """K_e must lie in (0, min(K, N)]: a token cannot use more FFN experts than it picks."""
    upper = min(top_k, n_ffn)
    if not (isinstance(target_ffn_experts, (int, float)) and 0 < target_ffn_experts <= upper):
        raise ConfigError(
            f"target_ffn_experts: must lie in (0, {upper}] (top-k {top_k}, {n_ffn} FFN experts), "
            f"got {target_ffn_experts!r}"
        )


def make_controller(
    kind: ControllerKind, n_ffn: int, n_zero: int, top_k: int, target_ffn_experts: float,
    gains: PidGains | None = None,
) -> BiasController | None:
    """The controller for `kind` ("pid", "p" or "off" → None), default gains unless given."""
    check_target(target_ffn_experts, top_k, n_ffn)
    if kind == "off":
        return None
    if kind not in DEFAULT_GAINS:
        raise ConfigError(f"controller: expected one of pid, p, off; got {kind!r}")
    return BiasController(n_ffn, n_zero, top_k, target_ffn_experts, gains or DEFAULT_GAINS[kind])


# ------------------------------------------------------------------ device-level balance loss
def device_groups(n_ffn: int, n_devices: int) -> torch.Tensor:
    """Group id of each FFN expert (int64 [N]): contiguous blocks of N/D, as EP places them."""
    if n_devices <= 0 or n_ffn % n_devices:
        raise ConfigError(f"ep_devices: must divide the {n_ffn} FFN experts, got {n_devices}")
    return torch.arange(n_ffn) // (n_ffn // n_devices)


def device_balance_loss(
    scores_TE: torch.Tensor,
    ids_TK: torch.Tensor,
    n_ffn: int,
    n_devices: int,
    target_ffn_experts: float,
    coef: float,
) -> torch.Tensor:
    """LongCat's device-level load-balance loss (differentiable in scores_TE), a scalar.

    scores_TE: router softmax probabilities over all E = N + Z experts (before the bias);
    ids_TK:    the chosen experts (ids ≥ N are zero experts).
    Groups j = 1..D hold N/D FFN experts each, group D+1 holds the Z zero experts. With
        P_j = (1/T) Σ_t Σ_{i∈G_j} s_{t,i}                        mean routing mass of group j
        F_j = D/(K_e·T)     · #slots routed into G_j   (j ≤ D)    load relative to its target
        F_{D+1} = 1/((K−K_e)·T) · #slots routed to zero experts
        L = coef · Σ_j F_j · P_j
    F_j is 1 when group j receives exactly its budgeted share, so the gradient pushes
    routing mass away from groups above their share. (The report's formula, second-hand:
    see the module docstring; the F normalisation follows DeepSeek-V3's device-level loss.)
    The zero-expert group is dropped when K_e = K (it then has no budget).
    """
    n_tokens, n_experts = scores_TE.shape
    top_k = ids_TK.shape[1]
    group_E = torch.cat([
        device_groups(n_ffn, n_devices),
        torch.full((n_experts - n_ffn,), n_devices, dtype=torch.int64),
    ]).to(scores_TE.device)
    n_groups = n_devices + 1
    mass_G = torch.zeros(n_groups, dtype=scores_TE.dtype, device=scores_TE.device)
    mass_G = mass_G.index_add(0, group_E, scores_TE.sum(0)) / n_tokens  # P_j
    with torch.no_grad():
        slots_G = torch.bincount(group_E[ids_TK.reshape(-1)], minlength=n_groups).to(scores_TE.dtype)
        budget_G = torch.full((n_groups,), target_ffn_experts / n_devices, dtype=scores_TE.dtype)
        budget_G[-1] = top_k - target_ffn_experts
        budget_G = budget_G.to(scores_TE.device)
        load_G = torch.where(budget_G > 0, slots_G / (budget_G * n_tokens), torch.zeros_like(slots_G))
    return coef * (load_G * mass_G).sum()


# ------------------------------------------------------------------ routing statistics
# One layer's routing arrives as model.moe.LayerRouting (what `LongcatFlash(...,
# return_routing=True)` returns): expert_ids [T, K], ffn_experts_per_token [T],
# tokens_per_expert [N + Z] (FFN experts first).


def layer_routing(ids_TK: torch.Tensor, n_ffn: int, n_zero: int, layer: int = 0) -> LayerRouting:
    """A LayerRouting from bare choices ids_TK (int64 [T, K]), for routers outside a model."""
    return LayerRouting.from_router(layer, n_ffn, n_ffn + n_zero, ids_TK, torch.zeros(ids_TK.shape))


def _max_over_mean(loads: torch.Tensor) -> float:
    mean = float(loads.double().mean())
    return float(loads.max()) / mean if mean > 0 else math.inf


def _cv(loads: torch.Tensor) -> float:
    mean = float(loads.double().mean())
    return float(loads.double().std(unbiased=False)) / mean if mean > 0 else math.inf


def routing_stats(layer: LayerRouting, n_devices: int) -> dict[str, float]:
    """One layer's statistics: FFN experts per token (mean, std), zero share, expert and
    device load (max/mean, coefficient of variation). Device loads count FFN experts only:
    zero experts are replicated on every device and cost neither FLOPs nor traffic."""
    n_ffn = layer.n_routed_experts
    counts = layer.tokens_per_expert[:n_ffn]
    n_tokens, top_k = layer.expert_ids.shape
    device_N = torch.zeros(n_devices, dtype=torch.int64).index_add(
        0, device_groups(counts.numel(), n_devices), counts
    )
    per_token = layer.ffn_experts_per_token.double()
    return {
        "ffn_experts_per_token": float(per_token.mean()),
        "ffn_experts_std": float(per_token.std(unbiased=False)),
        "zero_share": float(layer.tokens_per_expert[n_ffn:].sum()) / (n_tokens * top_k),
        "load_max_over_mean": _max_over_mean(counts),
        "load_cv": _cv(counts),
        "device_load_max_over_mean": _max_over_mean(device_N),
        "device_load_cv": _cv(device_N),
    }


def step_routing_stats(
    layers: list[LayerRouting],
    n_devices: int,
    activated_params: Callable[[float], float] | None = None,
) -> dict[str, float]:
    """Statistics of one step over all MoE layers.

    FFN experts per token and zero share are means over (layer, token); the std is over
    (layer, token) pairs, as a per-layer count is what one MoE block computes. Load
    imbalance is the worst layer's (max over layers), since the slowest layer sets the
    straggler; CVs are means over layers.
    `activated_params(k)`: parameters a token activates when it uses k FFN experts in every
    layer (affine in k). A token's real count, with k_l experts in layer l, is then
    activated_params(mean_l k_l): its mean/min/max over tokens are reported.
    """
    per_layer = [routing_stats(layer, n_devices) for layer in layers]
    counts_LT = torch.stack([layer.ffn_experts_per_token for layer in layers]).double()
    slots = sum(layer.expert_ids.numel() for layer in layers)
    zero_slots = sum(float(layer.tokens_per_expert[layer.n_routed_experts:].sum()) for layer in layers)
    out = {
        "ffn_experts_per_token": float(counts_LT.mean()),
        "ffn_experts_std": float(counts_LT.std(unbiased=False)),
        "zero_share": zero_slots / slots,
        "load_max_over_mean": max(s["load_max_over_mean"] for s in per_layer),
        "load_cv": sum(s["load_cv"] for s in per_layer) / len(per_layer),
        "device_load_max_over_mean": max(s["device_load_max_over_mean"] for s in per_layer),
        "device_load_cv": sum(s["device_load_cv"] for s in per_layer) / len(per_layer),
    }
    if activated_params is not None:
        a0, a1 = float(activated_params(0)), float(activated_params(1))
        per_token_T = a0 + (a1 - a0) * counts_LT.mean(0)
        out["activated_params_mean"] = float(per_token_T.mean())
        out["activated_params_min"] = float(per_token_T.min())
        out["activated_params_max"] = float(per_token_T.max())
    return out


# ------------------------------------------------------------------ control-quality figures
def settle_step(values: list[float], target: float, tol: float = 0.05) -> int | None:
    """First step index from which every value stays within ±tol·target; None if never."""
    inside = [abs(v - target) <= tol * abs(target) for v in values]
    if not inside or not inside[-1]:
        return None
    i = len(inside)
    while i > 0 and inside[i - 1]:
        i -= 1
    return i


def overshoot_pct(values: list[float], target: float) -> float:
    """Largest excursion past the target on the far side from the start, in % of target
    (0 when the series never crosses the target)."""
    if not values:
        return 0.0
    sign = 1.0 if values[0] < target else -1.0
    beyond = [sign * (v - target) for v in values]
    return max(0.0, max(beyond)) / abs(target) * 100.0
