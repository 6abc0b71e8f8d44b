"""Routing at scale for the analytic workloads: which experts each token uses, per layer.

    route_layer(arch, ranks, ep, tokens_per_rank, k_probs, expert_probs, rng) -> LayerRouting

Each token's number of FFN experts is drawn from a distribution over 0..K (`k_distribution`;
default for zero-expert models: beta-binomial with mean 8 and std 3 of K = 12, LongCat-Flash's
reported behaviour); which FFN experts from uniform, Zipf-skewed or replayed per-expert
probabilities (`expert_distribution`), distinct per token (`draw_experts`). The remaining
slots are identity experts, served on the token's own rank: they never enter the splits.
A token goes once to each destination rank holding at least one of its experts (the DeepEP /
all-to-all-v convention). Seeded numpy Generators only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

from simulator.baselines import MoeArch
from simulator.errors import SimulationError

# Above this many tokens per rank per micro-batch, routing is drawn for a sample of tokens
# and the counts are drawn from the choice probabilities (multinomial at the true size).
EXACT_TOKENS_PER_RANK = 1024


@dataclass
class RoutingSpec:
    """How tokens pick experts. k_probs: P(k FFN experts), k = 0..K (None: the default)."""

    k_mean: float = 8.0
    k_std: float = 3.0
    k_probs: list[float] | None = None
    choice: Literal["uniform", "zipf", "replay"] = "uniform"
    zipf_s: float = 1.0
    expert_probs: list[float] | None = None  # replay: per FFN expert, any scale
    shuffle_experts: bool = False  # replay: place the profile on experts by a seeded permutation


def beta_binomial_probs(k: int, mean: float, std: float) -> np.ndarray:
    """P(j), j = 0..k, of a beta-binomial with the given mean and std (binomial if too narrow)."""
    p = min(max(mean / k, 1e-6), 1 - 1e-6)
    j = np.arange(k + 1)
    log_binom = np.array([math.lgamma(k + 1) - math.lgamma(i + 1) - math.lgamma(k - i + 1) for i in j])
    var_binom = k * p * (1 - p)
    ratio = std * std / var_binom
    if ratio <= 1.0 + 1e-9:  # no over-dispersion possible: plain binomial
        return np.exp(log_binom + j * math.log(p) + (k - j) * math.log(1 - p))
    if ratio >= k:
        raise SimulationError(f"routing: std {std} too wide for {k} slots with mean {mean}")
    s = (k - ratio) / (ratio - 1)
    a, b = p * s, (1 - p) * s
    lbeta = lambda x, y: math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)  # noqa: E731
    logp = log_binom + np.array([lbeta(i + a, k - i + b) for i in j]) - lbeta(a, b)
    probs = np.exp(logp)
    return probs / probs.sum()


def k_distribution(arch: MoeArch, spec: RoutingSpec) -> np.ndarray:
    """P(number of FFN experts = j), j = 0..moe_topk."""
    K = arch.moe_topk
    if arch.zero_expert_num == 0:
        probs = np.zeros(K + 1)
        probs[K] = 1.0
        return probs
    if spec.k_probs is not None:
        probs = np.asarray(spec.k_probs, dtype=np.float64)
        if probs.shape != (K + 1,) or (probs < 0).any() or probs.sum() <= 0:
            raise SimulationError(f"routing: k_probs must be {K + 1} non-negative numbers")
        return probs / probs.sum()
    return beta_binomial_probs(K, spec.k_mean, spec.k_std)


def expert_distribution(arch: MoeArch, spec: RoutingSpec, rng: np.random.Generator) -> np.ndarray | None:
    """Per-FFN-expert choice probabilities; None means uniform."""
    E = arch.n_routed_experts
    if spec.choice == "uniform":
        return None
    if spec.choice == "zipf":
        weights = 1.0 / np.arange(1, E + 1) ** spec.zipf_s
        probs = weights[rng.permutation(E)]
    elif spec.choice == "replay":
        if spec.expert_probs is None or len(spec.expert_probs) != E:
            raise SimulationError(f"routing: replay needs expert_probs for the {E} FFN experts")
        probs = np.asarray(spec.expert_probs, dtype=np.float64)
        if (probs < 0).any() or probs.sum() <= 0:
            raise SimulationError("routing: expert_probs must be non-negative, not all zero")
        if spec.shuffle_experts:
            probs = probs[rng.permutation(E)]
    else:
        raise SimulationError(f"routing: choice {spec.choice!r}: expected uniform, zipf or replay")
    return probs / probs.sum()


def draw_experts(
    n_tokens: int, K: int, E: int, probs: np.ndarray | None, rng: np.random.Generator
) -> np.ndarray:
    """(n_tokens, K) distinct FFN expert ids per token (K ≤ E), drawn without replacement."""
    K = min(K, E)
    if probs is None:
        ids = rng.integers(0, E, size=(n_tokens, K))
    else:
        ids = rng.choice(E, size=(n_tokens, K), p=probs)
    for _ in range(64):  # redraw duplicates until every row is distinct
        order = np.argsort(ids, axis=1, kind="stable")
        srt = np.take_along_axis(ids, order, axis=1)
        dup_sorted = np.zeros_like(srt, dtype=bool)
        dup_sorted[:, 1:] = srt[:, 1:] == srt[:, :-1]
        if not dup_sorted.any():
            return ids
        dup = np.zeros_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        n = int(dup.sum())
        ids[dup] = rng.integers(0, E, size=n) if probs is None else rng.choice(E, size=n, p=probs)
    # pathological skew: fall back to Gumbel top-K on the offending rows
    rows = np.flatnonzero(dup.any(axis=1))
    g = np.log(probs if probs is not None else np.full(E, 1.0 / E))[None, :] - np.log(
        -np.log(rng.random((len(rows), E)))
    )
    ids[rows] = np.argpartition(-g, K - 1, axis=1)[:, :K]
    return ids


@dataclass
class LayerRouting:
    """One MoE layer, one micro-batch, one pipeline stage (ranks local to the stage).

    send_tokens: (R, R) int64, tokens rank i sends to rank j (one per token and destination
    rank holding ≥ 1 of its FFN experts; the diagonal stays on the rank).
    expert_slots: (R,) token-expert pairs each rank's experts compute.
    experts_hit: (R,) experts on each rank that received ≥ 1 token.
    ffn_per_token: (n_sampled,) FFN experts of the sampled tokens; zero_slots, all_slots: totals.
    """

    send_tokens: np.ndarray
    expert_slots: np.ndarray
    experts_hit: np.ndarray
    ffn_per_token: np.ndarray
    zero_slots: float
    all_slots: float


def route_layer(
    arch: MoeArch, ranks: int, ep: int, tokens_per_rank: int, k_probs: np.ndarray,
    expert_probs: np.ndarray | None, rng: np.random.Generator,
) -> LayerRouting:
    """Draw one layer's routing for `ranks` ranks in EP groups of `ep` consecutive ranks.

    Up to EXACT_TOKENS_PER_RANK tokens per rank every token is drawn. Beyond (prefill,
    training), a sample of tokens gives the mean FFN experts and destination ranks per
    token, and the counts are drawn at full size: messages per source rank over the
    destination ranks, and slots per expert, as multinomials of the choice probabilities.
    """
    E, K = arch.n_routed_experts, arch.moe_topk
    epr = E // ep  # experts per rank
    if tokens_per_rank > EXACT_TOKENS_PER_RANK:
        return _route_layer_sampled(arch, ranks, ep, tokens_per_rank, k_probs, expert_probs, rng)
    n = ranks * tokens_per_rank
    k_tok = rng.choice(K + 1, size=n, p=k_probs)
    ids = draw_experts(n, K, E, expert_probs, rng)
    used = np.arange(ids.shape[1])[None, :] < k_tok[:, None]  # (n, K) FFN slots in use
    src = np.repeat(np.arange(ranks), tokens_per_rank)
    group_base = (src // ep) * ep
    dest = group_base[:, None] + ids // epr  # global (stage-local) destination rank
    # one message per (token, destination rank): distinct dests among used slots
    dest_s = np.sort(np.where(used, dest, -1), axis=1)
    first = np.ones_like(dest_s, dtype=bool)
    first[:, 1:] = dest_s[:, 1:] != dest_s[:, :-1]
    keep = first & (dest_s >= 0)
    pair = np.repeat(src, keep.sum(axis=1)) * ranks + dest_s[keep]
    send = np.bincount(pair, minlength=ranks * ranks).reshape(ranks, ranks)
    gexp = ((group_base // ep * E)[:, None] + ids)[used]  # expert index unique across EP groups
    per_expert = np.bincount(gexp, minlength=ranks // ep * E).astype(np.float64)
    ffn_slots = float(k_tok.sum())
    return LayerRouting(
        send_tokens=send.astype(np.int64), expert_slots=per_expert.reshape(ranks, epr).sum(axis=1),
        experts_hit=(per_expert.reshape(ranks, epr) > 0).sum(axis=1), ffn_per_token=k_tok.astype(np.int8),
        zero_slots=K * n - ffn_slots, all_slots=float(K * n),
    )


SAMPLE_TOKENS = 4096  # tokens drawn per layer in the sampled mode (for the per-token means)


def _route_layer_sampled(
    arch: MoeArch, ranks: int, ep: int, tokens_per_rank: int, k_probs: np.ndarray,
    expert_probs: np.ndarray | None, rng: np.random.Generator,
) -> LayerRouting:
    E, K = arch.n_routed_experts, arch.moe_topk
    epr = E // ep
    k_s = rng.choice(K + 1, size=SAMPLE_TOKENS, p=k_probs)
    ids = draw_experts(SAMPLE_TOKENS, K, E, expert_probs, rng)
    used = np.arange(ids.shape[1])[None, :] < k_s[:, None]
    dest_s = np.sort(np.where(used, ids // epr, -1), axis=1)
    first = np.ones_like(dest_s, dtype=bool)
    first[:, 1:] = dest_s[:, 1:] != dest_s[:, :-1]
    dests_per_token = float((first & (dest_s >= 0)).sum()) / SAMPLE_TOKENS
    p_exp = np.full(E, 1.0 / E) if expert_probs is None else expert_probs
    p_rank = p_exp.reshape(ep, epr).sum(axis=1)
    n_groups = ranks // ep
    msgs = np.full(ranks, int(round(tokens_per_rank * dests_per_token)))
    block = rng.multinomial(msgs, p_rank)  # (ranks, ep): each rank's messages over its group
    send = np.zeros((ranks, ranks), dtype=np.int64)
    for g in range(n_groups):
        send[g * ep:(g + 1) * ep, g * ep:(g + 1) * ep] = block[g * ep:(g + 1) * ep]
    mean_k = float(k_s.mean())
    slots_g = np.full(n_groups, int(round(tokens_per_rank * ep * mean_k)))
    per_expert = rng.multinomial(slots_g, p_exp).reshape(-1).astype(np.float64)
    n = ranks * tokens_per_rank
    return LayerRouting(
        send_tokens=send, expert_slots=per_expert.reshape(ranks, epr).sum(axis=1),
        experts_hit=(per_expert.reshape(ranks, epr) > 0).sum(axis=1), ffn_per_token=k_s.astype(np.int8),
        zero_slots=(K - mean_k) * n, all_slots=float(K * n),
    )


