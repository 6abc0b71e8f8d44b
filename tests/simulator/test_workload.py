"""Closed-form checks of the analytic workload generator (simulator/workload.py).

References: model/counting.py (FLOPs per sub-block, written from the model's shapes and
tested against torch's FlopCounterMode), the beta-binomial moments, the paper's parameter
arithmetic, and counting arguments on the routing draw itself.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from model import counting
from model.config import LongcatConfig
from simulator.baselines import DEEPSEEK_V3, KIMI_K2, QWEN3_235B_A22B, arch_from_longcat, get_arch
from simulator.errors import SimulationError
from simulator.workload import (
    ParallelPlan,
    RoutingSpec,
    beta_binomial_probs,
    build_workload,
    generate,
)
from traces.schema import validate_ops

LONGCAT = LongcatConfig.preset("longcat-flash")
SMALL = LongcatConfig.preset("small")


def _per_rank(table, col):
    ranks = table.column("rank").to_numpy()
    return ranks, table.column(col).to_pylist()


def _label_sum(table, rank, label_prefix, col="flops", exact=None):
    ranks = table.column("rank").to_numpy()
    labels = np.array(table.column("label").to_pylist())
    vals = table.column(col).to_numpy()
    m = ranks == rank
    if exact is not None:
        m &= labels == exact
    else:
        m &= np.char.startswith(labels.astype(str), label_prefix)
    return float(vals[m].sum())


# ------------------------------------------------------------------------- parameters
def test_longcat_params_match_counting_and_paper():
    arch = arch_from_longcat(LONGCAT)
    assert arch.total_params() == pytest.approx(counting.total_params(LONGCAT), rel=1e-12)
    for k in (0, 8, 12):
        assert arch.activated_params(k) == pytest.approx(counting.activated_params(LONGCAT, k), rel=1e-12)
    assert arch.total_params() == pytest.approx(560.7e9, rel=2e-3)
    assert arch.activated_params(8) == pytest.approx(27.2e9, rel=5e-3)


def test_baseline_params_match_published_totals():
    # DeepSeek-V3: 671B total, 37B activated (technical report); Kimi-K2: 1.04T / 32B;
    # Qwen3-235B-A22B: 235B / 22B. Tolerances cover MTP / rounding in the published figures.
    assert DEEPSEEK_V3.total_params() == pytest.approx(671e9, rel=0.01)
    assert DEEPSEEK_V3.activated_params(8) == pytest.approx(37e9, rel=0.03)
    assert KIMI_K2.total_params() == pytest.approx(1.04e12, rel=0.02)
    assert KIMI_K2.activated_params(8) == pytest.approx(32.6e9, rel=0.03)
    assert QWEN3_235B_A22B.total_params() == pytest.approx(235e9, rel=0.01)
    assert QWEN3_235B_A22B.activated_params(8) == pytest.approx(22e9, rel=0.03)


# ------------------------------------------------------------------------- routing
def test_beta_binomial_moments():
    p = beta_binomial_probs(12, 8.0, 3.0)
    j = np.arange(13)
    mean = float((p * j).sum())
    std = math.sqrt(float((p * (j - mean) ** 2).sum()))
    assert p.sum() == pytest.approx(1.0)
    assert mean == pytest.approx(8.0, abs=1e-9)
    assert std == pytest.approx(3.0, abs=1e-9)
    # too narrow for over-dispersion → the binomial itself
    b = beta_binomial_probs(12, 6.0, 1.0)
    assert b[6] == pytest.approx(math.comb(12, 6) / 2**12)


def _moe_comm_rows(table, rank, name):
    names = np.array(table.column("name").to_pylist())
    ranks = table.column("rank").to_numpy()
    idx = np.flatnonzero((ranks == rank) & (names == name))
    return idx


def test_identity_tokens_never_leave_and_splits_are_consistent():
    # every token picks exactly 4 FFN experts (k fixed) and 8 identity experts
    probs = [0.0] * 13
    probs[4] = 1.0
    G, B = 16, 8
    plan = ParallelPlan(gpus=G, mode="decode", batch_per_gpu=B, context=100, schedule="sbo",
                        routing=RoutingSpec(k_probs=probs))
    w = generate(LONGCAT, plan, np.random.default_rng(1))
    t = w.ops
    validate_ops(t)
    assert w.zero_slots / w.all_slots == pytest.approx(8 / 12)
    h = LONGCAT.hidden_size
    splits = t.column("splits").to_pylist()
    coll_bytes = t.column("coll_bytes").to_numpy()
    names = t.column("name").to_pylist()
    ranks = t.column("rank").to_numpy()
    labels = t.column("label").to_pylist()
    # per layer: dispatch matrix (tokens) and combine matrix must be transposes
    for layer in (0, 27):
        disp = np.zeros((G, G))
        comb = np.zeros((G, G))
        for i, (n, lab) in enumerate(zip(names, labels)):
            if lab == f"L{layer}/dispatch":
                assert coll_bytes[i] == pytest.approx(sum(splits[i]))
                disp[ranks[i]] = np.array(splits[i]) / (h * plan.dispatch_bytes)
            elif lab == f"L{layer}/combine":
                assert coll_bytes[i] == pytest.approx(sum(splits[i]))
                comb[ranks[i]] = np.array(splits[i]) / (h * plan.combine_bytes)
        np.testing.assert_allclose(comb, disp.T)
        # one message per (token, destination rank): between tokens (each has ≥ 1 FFN
        # expert) and FFN slots (4 per token); identity slots are never sent
        sent = disp.sum()
        assert G * B <= sent <= 4 * G * B
        # experts on a rank computed every slot routed to it: ≥ the tokens it received
        ex = np.array([_label_sum(t, r, "", exact=f"L{layer}/experts") for r in range(G)])
        slots = ex / (2 * 3 * h * LONGCAT.expert_ffn_hidden_size)
        assert slots.sum() == pytest.approx(4 * G * B)
        assert np.all(slots >= disp.sum(axis=0) - 1e-9)


def test_all_identity_routing_sends_nothing():
    probs = [1.0] + [0.0] * 12  # every slot an identity expert
    plan = ParallelPlan(gpus=8, mode="decode", batch_per_gpu=4, context=64, schedule="sbo",
                        routing=RoutingSpec(k_probs=probs))
    t = build_workload(LONGCAT, plan, np.random.default_rng(0))
    labels = np.array(t.column("label").to_pylist())
    coll_bytes = t.column("coll_bytes").to_numpy()
    flops = t.column("flops").to_numpy()
    assert coll_bytes[np.char.endswith(labels, "/dispatch")].sum() == 0
    assert coll_bytes[np.char.endswith(labels, "/combine")].sum() == 0
    assert flops[np.char.endswith(labels, "/experts")].sum() == 0


def test_default_routing_activated_params_match_paper():
    plan = ParallelPlan(gpus=64, mode="decode", batch_per_gpu=8, context=64, schedule="sbo")
    w = generate(LONGCAT, plan, np.random.default_rng(0))
    from simulator.whatif import routing_metrics

    m = routing_metrics(w)
    assert m["ffn_experts_per_token_mean"] == pytest.approx(8.0, abs=0.1)
    assert m["ffn_experts_per_token_std"] == pytest.approx(3.0, abs=0.1)
    assert m["activated_params_mean"] == pytest.approx(27e9, rel=0.02)
    assert 18.6e9 <= m["activated_params_min"] and m["activated_params_max"] <= 31.4e9
    lo, hi = m["activated_params_at_min_max_experts"]
    assert lo == pytest.approx(18.7e9, rel=5e-3) and hi == pytest.approx(31.4e9, rel=5e-3)
    assert m["zero_expert_share"] == pytest.approx(4 / 12, abs=0.01)


def test_zipf_skew_makes_stragglers():
    from simulator.whatif import routing_metrics

    base = dict(gpus=32, mode="decode", batch_per_gpu=16, context=64, schedule="sbo")
    uni = routing_metrics(generate(LONGCAT, ParallelPlan(**base), np.random.default_rng(0)))
    zipf = routing_metrics(generate(LONGCAT, ParallelPlan(**base, routing=RoutingSpec(choice="zipf", zipf_s=1.2)),
                                    np.random.default_rng(0)))
    assert zipf["expert_load_max_over_mean"] > uni["expert_load_max_over_mean"] + 0.5


def test_determinism_with_seed():
    plan = ParallelPlan(gpus=16, mode="decode", batch_per_gpu=4, context=64, schedule="tbo")
    a = build_workload(SMALL, plan, np.random.default_rng(7))
    b = build_workload(SMALL, plan, np.random.default_rng(7))
    c = build_workload(SMALL, plan, np.random.default_rng(8))
    assert a.equals(b)
    assert not a.column("splits").equals(c.column("splits"))


# ------------------------------------------------------------------------- graph shape
@pytest.mark.parametrize("schedule,per_layer", [("sequential", 12), ("sbo", 12), ("tbo", 24)])
def test_op_counts_per_rank(schedule, per_layer):
    plan = ParallelPlan(gpus=8, mode="decode", batch_per_gpu=4, context=64, schedule=schedule, mtp=True,
                        mtp_accept=0.8)
    t = build_workload(LONGCAT, plan, np.random.default_rng(0))
    mb = 2 if schedule == "tbo" else 1
    ranks = t.column("rank").to_numpy()
    expected = 28 * per_layer + mb * (1 + 3)  # + lm_head and the 3 MTP ops per micro-batch
    assert np.bincount(ranks).tolist() == [expected] * 8
    kinds = np.array(t.column("kind").to_pylist())
    assert (kinds[ranks == 0] == "comm").sum() == 28 * 2 * mb


def test_flops_equal_counting_decode_and_prefill():
    """Per block and rank, the generator's FLOPs equal model/counting.py's (same shapes)."""
    for mode, B, ctx in [("decode", 8, 5000), ("prefill", 2, 512)]:
        plan = ParallelPlan(gpus=8, mode=mode, batch_per_gpu=B, context=ctx, schedule="sequential")
        t = build_workload(LONGCAT, plan, np.random.default_rng(0))
        if mode == "decode":
            ref = counting.layer_costs(LONGCAT, batch_size=B, new_tokens=1, context_len=ctx)
            head = counting.head_cost(LONGCAT, B)
        else:
            ref = counting.layer_costs(LONGCAT, batch_size=B, new_tokens=ctx, context_len=0)
            head = counting.head_cost(LONGCAT, B)  # prefill: logits of each sequence's last token
        for block in ("attn0", "mlp0", "router", "attn1", "mlp1"):
            got = _label_sum(t, 3, "", exact=f"L5/{block}")
            assert got == pytest.approx(ref[block].flops, rel=1e-9), (mode, block)
        assert _label_sum(t, 0, "", exact="head") == pytest.approx(head.flops, rel=1e-9)
        # experts: all ranks together compute every FFN slot drawn
        total = sum(_label_sum(t, r, "", exact="L5/experts") for r in range(8))
        slots = total / (2 * 3 * LONGCAT.hidden_size * LONGCAT.expert_ffn_hidden_size)
        assert slots == pytest.approx(round(slots))
        assert 0 <= slots <= 12 * 8 * B * plan.tokens_per_seq_step


def test_training_is_three_times_forward_and_backward_a2a_reversed():
    plan = ParallelPlan(gpus=8, mode="train", batch_per_gpu=2, context=256, schedule="sbo", micro_batches=2)
    w = generate(SMALL, plan, np.random.default_rng(0))
    t = w.ops
    names = np.array(t.column("name").to_pylist())
    flops = t.column("flops").to_numpy()
    ranks = t.column("rank").to_numpy()
    r0 = ranks == 0
    fwd = flops[r0 & ~np.char.endswith(names, ".bwd") & ~np.char.startswith(names, "optimizer")].sum()
    bwd = flops[r0 & np.char.endswith(names, ".bwd")].sum()
    assert bwd == pytest.approx(2 * fwd)
    ref = counting.step_costs(SMALL, mode="train", batch_size=1, seq_len=256)
    for block in ("attn0", "mlp0", "router", "attn1", "mlp1"):
        labels = np.array(t.column("label").to_pylist())
        got = flops[r0 & (labels == f"L1/{block}")].sum()
        assert got == pytest.approx(2 * ref[f"L1/{block}"].flops, rel=1e-9)  # 2 micro-batches
    # the backward of a dispatch moves the combine's token counts (other direction)
    splits = t.column("splits").to_pylist()
    i_d = np.flatnonzero(r0 & (names == "dispatch.all_to_all"))[0]
    i_cb = np.flatnonzero(r0 & (names == "combine.all_to_all.bwd"))[-1]  # same layer 0, micro-batch 0
    np.testing.assert_allclose(np.array(splits[i_cb]) / 2.0, np.array(splits[i_d]) / plan.dispatch_bytes)
    kinds = np.array(t.column("coll").to_pylist())
    assert (kinds[r0] == "all_reduce").sum() == SMALL.num_layers  # one gradient bucket per layer


def test_pipeline_stages_pair_sends_and_receives():
    plan = ParallelPlan(gpus=16, mode="train", batch_per_gpu=2, context=128, schedule="sequential", pp=2,
                        micro_batches=2)
    t = build_workload(SMALL, plan, np.random.default_rng(0))
    coll = np.array(t.column("coll").to_pylist())
    group = np.array(t.column("group").to_pylist())
    seq = t.column("seq").to_numpy()
    sends = {(g, s) for g, s in zip(group[coll == "send"], seq[coll == "send"])}
    recvs = {(g, s) for g, s in zip(group[coll == "recv"], seq[coll == "recv"])}
    assert sends == recvs and len(sends) == 8 * 2 * 2  # 8 rank pairs, 2 micro-batches, fwd + bwd


def test_baselines_generate():
    for name in ("deepseek-v3", "qwen3-235b-a22b", "kimi-k2"):
        arch = get_arch(name)
        plan = ParallelPlan(gpus=16, mode="decode", batch_per_gpu=4,
                            context=128, schedule="tbo")
        t = build_workload(arch, plan, np.random.default_rng(0))
        labels = set(t.column("label").to_pylist())
        assert f"L{arch.num_layers - 1}/dispatch" in labels
        if arch.first_k_dense:
            assert "L0/dispatch" not in labels and "L0/mlp0" in labels


# ------------------------------------------------------------------------- bad plans
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(gpus=24, ep=24), "ep 24 does not divide the 512"),
        (dict(gpus=8, batch_per_gpu=0), "batch_per_gpu must be positive"),
        (dict(gpus=12), "not a multiple of the node size"),
        (dict(gpus=8, schedule="tbo", batch_per_gpu=1), "batch_per_gpu must be >= 2"),
        (dict(gpus=8, mode="decode", pp=2), "training only"),
    ],
)
def test_bad_plans_raise(kwargs, match):
    plan = ParallelPlan(**{"mode": "decode", "context": 64, **kwargs})
    with pytest.raises(SimulationError, match=match):
        build_workload(LONGCAT, plan, np.random.default_rng(0))
