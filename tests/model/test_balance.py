"""Budget controller, device-level balance loss and routing statistics (model/balance.py).

References are closed forms and slow per-token/per-group loops written here; the controller
is exercised on a simulated router whose loads respond to the bias the way a real one does
(top-k on softmax scores + bias), so it runs in milliseconds.
"""

from __future__ import annotations

import math

import pytest
import torch

from model.balance import (
    BiasController, PidGains, budget_error, device_balance_loss, layer_routing, make_controller,
    overshoot_pct, router_score_units, routing_stats, settle_step, step_routing_stats,
)
from model.config import ConfigError, LongcatConfig
from model.counting import activated_params


# ------------------------------------------------------------------ the error and the update
def test_budget_error_closed_form() -> None:
    N, K, Ke, T = 4, 2, 1.5, 100
    at_target = torch.full((N,), Ke * T / N)  # every expert gets K_e/N of the tokens
    assert torch.allclose(budget_error(at_target, T, K, Ke), torch.zeros(N, dtype=torch.float64))
    counts = torch.tensor([10, 20, 30, 40])  # 100 FFN slots over 100 tokens: 1 expert/token
    e = budget_error(counts, T, K, Ke)
    for i in range(N):  # the report's formula, element by element
        assert e[i].item() == pytest.approx(Ke / K / N - counts[i].item() / (K * T))
    mean_ffn_per_token = counts.sum().item() / T
    assert e.sum().item() == pytest.approx((Ke - mean_ffn_per_token) / K)


def test_p_only_is_the_aux_loss_free_update_and_zero_biases_never_move() -> None:
    N, Z, K, Ke, T, kp = 4, 2, 2, 1.5, 100, 0.3
    ctl = BiasController(N, Z, K, Ke, PidGains(kp=kp, balance_gain=1.0))
    bias = torch.tensor([0.1, -0.2, 0.0, 0.3, 0.7, -0.4])
    before = bias.clone()
    counts = torch.tensor([5, 60, 30, 25])
    ctl.step(bias, counts, T)  # default unit u = 1/E
    mu = kp * (1 / (N + Z)) * K * N / Ke
    expected = before[:N] + mu * budget_error(counts, T, K, Ke).float()
    assert torch.allclose(bias[:N], expected, atol=1e-7)
    assert torch.equal(bias[N:], before[N:])


def test_balance_gain_scales_only_the_differential_part() -> None:
    N, Z, K, Ke, T = 4, 2, 2, 1.5, 100
    counts = torch.tensor([5, 60, 30, 25])
    deltas = {}
    for s in (1.0, 0.25):
        ctl = BiasController(N, Z, K, Ke, PidGains(kp=1.0, balance_gain=s))
        deltas[s] = ctl.step(torch.zeros(N + Z), counts, T)
    assert deltas[1.0].mean().item() == pytest.approx(deltas[0.25].mean().item())
    spread = deltas[1.0] - deltas[1.0].mean()
    assert torch.allclose(deltas[0.25] - deltas[0.25].mean(), 0.25 * spread)


def test_per_expert_units_never_leak_into_the_budget() -> None:
    """mean_i Δb_i / u_b must stay kp · (budget error), whatever the per-expert units."""
    N, Z, K, Ke, T, kp = 4, 2, 2, 1.5, 100, 0.7
    counts = torch.tensor([5, 60, 30, 25])
    u_b, u_d = 0.01, torch.tensor([0.001, 0.02, 0.005, 0.03])
    ctl = BiasController(N, Z, K, Ke, PidGains(kp=kp, balance_gain=1.0))
    delta = ctl.step(torch.zeros(N + Z), counts, T, (u_b, u_d))
    budget = (Ke - counts.sum().item() / T) / Ke  # ε̄ = (K_e − FFN experts per token)/K_e
    assert delta.mean().item() / u_b == pytest.approx(kp * budget)
    # and each expert's differential step is (before re-centring) proportional to its own unit
    raw = u_d.double() * (ctl.relative_error(counts, T) - budget)
    assert torch.allclose(delta - delta.mean(), kp * (raw - raw.mean()))


def test_per_expert_units_of_the_wrong_length_are_a_config_error() -> None:
    ctl = BiasController(4, 2, 2, 1.5, PidGains(kp=0.5))
    with pytest.raises(ConfigError, match="one entry per FFN expert"):
        ctl.step(torch.zeros(6), torch.tensor([5, 60, 30, 25]), 100, (0.01, torch.ones(3)))


def test_integral_and_derivative_terms() -> None:
    N, Z, K, Ke, T = 2, 2, 2, 1.0, 10
    g = PidGains(kp=0.0, ki=1.0, kd=1.0, integral_band=10.0)
    ctl = BiasController(N, Z, K, Ke, g)
    unit = 1 / (N + Z)
    c1, c2 = torch.tensor([2, 2]), torch.tensor([4, 4])  # ε = 1 − load/target; target 5 each
    d1 = ctl.step(torch.zeros(N + Z), c1, T)
    assert torch.allclose(d1, torch.full((N,), 0.6 * unit, dtype=torch.float64))  # I=0.6, D=0
    d2 = ctl.step(torch.zeros(N + Z), c2, T)
    # I = 0.6 + 0.2, D = 0.2 − 0.6
    assert torch.allclose(d2, torch.full((N,), (0.8 - 0.4) * unit, dtype=torch.float64))


def test_target_outside_range_and_unknown_controller_are_config_errors() -> None:
    for bad in (0, -1, 2.5, math.nan):
        with pytest.raises(ConfigError, match="target_ffn_experts"):
            make_controller("pid", 4, 2, 2, bad)
    with pytest.raises(ConfigError, match="controller"):
        make_controller("pd", 4, 2, 2, 1.0)
    assert make_controller("off", 4, 2, 2, 1.0) is None


# ------------------------------------------------------------------ a simulated router
def simulate(kind: str, steps: int = 200, drift: float = 0.0, seed: int = 0,
             N: int = 8, Z: int = 4, K: int = 4, Ke: float = 2.5, T: int = 1024):
    """Fixed per-expert preferences + per-token noise, top-k on scores + bias; FFN biases
    start 1/E below zero (zero experts win). drift: per-step ramp of the preferences.
    The controller gets the gain-scheduled units, as in training."""
    gen = torch.Generator().manual_seed(seed)
    E = N + Z
    prefer_E = torch.randn(E, generator=gen) * 0.3
    bias = torch.zeros(E)
    bias[:N] -= 1.0 / E
    ctl = make_controller(kind, N, Z, K, Ke)
    ffn, loads = [], []
    for t in range(steps):
        logits = torch.randn(T, E, generator=gen) * 0.3 + prefer_E + drift * t * torch.linspace(-1, 1, E)
        scores = logits.softmax(-1)
        ids = torch.topk(scores + bias, K).indices
        routing = layer_routing(ids, N, Z)
        stats = routing_stats(routing, n_devices=2)
        ffn.append(stats["ffn_experts_per_token"])
        loads.append(stats["load_max_over_mean"])
        if ctl is not None:
            ctl.step(bias, routing.tokens_per_expert[:N], T, router_score_units(scores, N))
    return ffn, loads, bias


@pytest.mark.parametrize("kind", ["p", "pid"])
def test_controller_reaches_and_holds_the_budget_on_a_simulated_router(kind: str) -> None:
    ffn, loads, bias = simulate(kind)
    target, tail = 2.5, slice(160, 200)
    assert settle_step(ffn, target) is not None and settle_step(ffn, target) < 160
    assert all(abs(v - target) <= 0.05 * target for v in ffn[tail])
    assert sum(loads[tail]) / 40 <= 1.3
    assert torch.all(bias[8:] == 0)  # zero-expert biases untouched


def test_without_controller_the_skew_stays() -> None:
    ffn, loads, _ = simulate("off")
    assert max(ffn[160:]) < 0.5 * 2.5


def test_pid_follows_a_drifting_router_closer_than_p() -> None:
    """A ramp in the router's preferences: P (one integration in b) lags; the I term removes it."""
    errors = {}
    for kind in ("p", "pid"):
        ffn, _, _ = simulate(kind, steps=300, drift=0.002)
        errors[kind] = sum(abs(v - 2.5) for v in ffn[200:]) / 100
    assert errors["pid"] < errors["p"]


def test_per_expert_units_balance_experts_whose_scores_barely_vary() -> None:
    """Most experts' scores barely vary over tokens, two vary 20x more (what a fresh router
    does on `small`: the mean spread is set by a few experts). One mean-sized unit for all
    then moves a narrow expert past every token's top-k boundary in one step, and it swings
    between no tokens and most tokens (a limit cycle); each expert's own spread as its unit
    does not."""
    N, Z, K, Ke, T, steps = 8, 4, 4, 2.5, 1024, 300
    E = N + Z
    spread_E = torch.full((E,), 0.05)
    spread_E[6:8] = 1.0
    prefer_E = torch.randn(E, generator=torch.Generator().manual_seed(1)) * 0.1
    tail_loads = {}
    for mode in ("per_expert", "mean"):
        bias = torch.zeros(E)
        ctl = make_controller("pid", N, Z, K, Ke)
        g = torch.Generator().manual_seed(4)
        per_step = []
        for t in range(steps):
            scores = (torch.randn(T, E, generator=g) * spread_E + prefer_E).softmax(-1)
            ids = torch.topk(scores + bias, K).indices
            counts = layer_routing(ids, N, Z).tokens_per_expert[:N]
            u_b, u_d = router_score_units(scores, N)
            ctl.step(bias, counts, T, (u_b, u_d if mode == "per_expert" else float(u_d.mean())))
            if t >= int(0.8 * steps):
                per_step.append(float(counts.max()) / float(counts.double().mean()))
        tail_loads[mode] = sum(per_step) / len(per_step)
    assert tail_loads["per_expert"] <= 1.3, tail_loads  # 1.09 measured
    assert tail_loads["mean"] >= 1.5, tail_loads  # 1.79 measured


# ------------------------------------------------------------------ device-level balance loss
def _loss_by_loops(scores, ids, N, D, Ke, coef):
    T, E = scores.shape
    K = ids.shape[1]
    G = N // D
    groups = [list(range(j * G, (j + 1) * G)) for j in range(D)] + [list(range(N, E))]
    total = 0.0
    for j, members in enumerate(groups):
        share = Ke / D if j < D else K - Ke
        slots = sum(1 for t in range(T) for k in range(K) if int(ids[t, k]) in members)
        F = slots / (share * T) if share > 0 else 0.0
        P = sum(float(scores[t, i].detach()) for t in range(T) for i in members) / T
        total += F * P
    return coef * total


def test_device_balance_loss_matches_a_per_group_loop_and_has_the_right_gradient() -> None:
    gen = torch.Generator().manual_seed(3)
    T, N, Z, K, D, Ke, coef = 16, 8, 4, 3, 4, 2.0, 0.5
    logits = torch.randn(T, N + Z, generator=gen, requires_grad=True)
    scores = logits.softmax(-1)
    ids = torch.topk(scores + 0.1 * torch.randn(T, N + Z, generator=gen), K).indices
    loss = device_balance_loss(scores, ids, N, D, Ke, coef)
    assert loss.item() == pytest.approx(_loss_by_loops(scores, ids, N, D, Ke, coef), rel=1e-5)
    # d loss / d score_{t,i} = coef · F_group(i) / T (F is a constant of the selection)
    s = scores.detach().requires_grad_(True)
    device_balance_loss(s, ids, N, D, Ke, coef).backward()
    g = s.grad
    assert torch.allclose(g, g[0:1].expand_as(g))  # same for every token
    for j in range(D):
        assert torch.allclose(g[0, j * 2:(j + 1) * 2], g[0, j * 2].expand(2))
    logits.sum().backward()  # differentiable through the softmax as well
    assert logits.grad is not None


def test_device_balance_loss_without_zero_budget_ignores_the_zero_group() -> None:
    scores = torch.full((4, 6), 1 / 6)
    ids = torch.tensor([[0, 4], [1, 5], [2, 4], [3, 5]])
    loss = device_balance_loss(scores, ids, 4, 2, target_ffn_experts=2.0, coef=1.0)
    # FFN groups: 2 slots each over budget 1 per token → F = 0.5, P = 2/6; zero group dropped
    assert loss.item() == pytest.approx(2 * 0.5 * (2 / 6))


def test_device_groups_must_divide_the_experts() -> None:
    with pytest.raises(ConfigError, match="ep_devices"):
        device_balance_loss(torch.rand(2, 6), torch.zeros(2, 2, dtype=torch.int64), 4, 3, 1.0, 1.0)


# ------------------------------------------------------------------ routing statistics
def test_routing_stats_against_hand_counts() -> None:
    N, Z = 4, 2
    ids = torch.tensor([[0, 4], [0, 1], [5, 4], [2, 0], [3, 0]])  # 5 tokens, top-2
    stats = routing_stats(layer_routing(ids, N, Z), n_devices=2)
    per_token = [1, 2, 0, 2, 2]
    counts = [4, 1, 1, 1]  # expert 0 in 4 tokens
    mean = sum(per_token) / 5
    assert stats["ffn_experts_per_token"] == pytest.approx(mean)
    assert stats["ffn_experts_std"] == pytest.approx(math.sqrt(sum((c - mean) ** 2 for c in per_token) / 5))
    assert stats["zero_share"] == pytest.approx(3 / 10)
    assert stats["load_max_over_mean"] == pytest.approx(4 / (7 / 4))
    dev = [5, 2]
    assert stats["device_load_max_over_mean"] == pytest.approx(5 / 3.5)
    cv = math.sqrt(sum((c - 7 / 4) ** 2 for c in counts) / 4) / (7 / 4)
    assert stats["load_cv"] == pytest.approx(cv)
    assert stats["device_load_cv"] == pytest.approx(1.5 / 3.5)
    assert sum(dev) == sum(counts)


def test_activated_params_per_token_over_layers() -> None:
    config = LongcatConfig.preset("small")  # 2 layers, top-6
    ids_l0 = torch.tensor([[0, 1, 2, 40, 41, 42], [3, 40, 41, 42, 43, 44]])  # 3 and 1 FFN experts
    ids_l1 = torch.tensor([[0, 1, 2, 3, 4, 5], [40, 41, 42, 43, 44, 45]])  # 6 and 0
    layers = [layer_routing(ids_l0, 32, 16, 0), layer_routing(ids_l1, 32, 16, 1)]
    stats = step_routing_stats(layers, 8, lambda k: activated_params(config, k))
    base = activated_params(config, 0)
    per_expert_per_layer = (activated_params(config, 1) - base) / config.num_layers
    token0 = base + (3 + 6) * per_expert_per_layer
    token1 = base + (1 + 0) * per_expert_per_layer
    assert stats["activated_params_mean"] == pytest.approx((token0 + token1) / 2)
    assert stats["activated_params_max"] == pytest.approx(token0)
    assert stats["activated_params_min"] == pytest.approx(token1)
    assert stats["ffn_experts_per_token"] == pytest.approx((3 + 1 + 6 + 0) / 4)


def test_settle_and_overshoot() -> None:
    series = [0.0, 0.5, 0.9, 1.2, 1.04, 0.97, 1.01, 1.0]
    assert settle_step(series, 1.0) == 4
    assert overshoot_pct(series, 1.0) == pytest.approx(20.0)
    assert settle_step([1.0, 1.0, 1.2], 1.0) is None
    assert overshoot_pct([2.0, 1.5, 0.9], 1.0) == pytest.approx(10.0)
