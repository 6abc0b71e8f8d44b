"""Router rules, the grouped MoE against the per-token reference, identity experts, routing record."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from model import LongcatConfig, LongcatFlash, grouped_expert_ffn
from model.moe import MoE, reference_moe


def make_moe(seed: int = 0, **overrides) -> tuple[LongcatConfig, MoE]:
    cfg = LongcatConfig.preset("tiny", n_routed_experts=6, zero_expert_num=3, moe_topk=4,
                               routed_scaling_factor=2.0, **overrides)
    gen = torch.Generator().manual_seed(seed)
    moe = MoE(cfg, layer_index=0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return cfg, moe


def test_router_follows_longcat_rules():
    cfg, moe = make_moe()
    router = moe.router
    x = torch.randn(20, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    bias = torch.linspace(-0.05, 0.3, cfg.n_experts_total)
    router.e_score_correction_bias.copy_(bias)
    ids, weights = router(x)
    scores = F.softmax(x.double() @ router.classifier.weight.double().T, dim=-1)
    expected_ids = torch.topk(scores + bias.double(), cfg.moe_topk, dim=-1).indices
    assert torch.equal(ids.sort(-1).values, expected_ids.sort(-1).values)
    # weights: the chosen *unbiased* scores times the scaling factor, not renormalised
    torch.testing.assert_close(weights.double(), scores.gather(1, ids) * cfg.routed_scaling_factor, rtol=1e-5, atol=1e-7)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64
    # the bias moved the choice here (otherwise this test would not test it)
    assert not torch.equal(ids.sort(-1).values, torch.topk(scores, cfg.moe_topk, dim=-1).indices.sort(-1).values)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 10_000), tokens=st.integers(1, 40), topk=st.integers(1, 9))
def test_grouped_moe_equals_per_token_reference(seed, tokens, topk):
    cfg, moe = make_moe(seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(tokens, cfg.hidden_size, generator=gen)
    # arbitrary routing (repeats across tokens, any mix of FFN and identity experts)
    ids = torch.stack([torch.randperm(cfg.n_experts_total, generator=gen)[:topk] for _ in range(tokens)])
    weights = torch.rand(tokens, topk, generator=gen)
    with torch.no_grad():
        fast = moe.experts(x, ids, weights)
        slow = reference_moe(moe.experts, x, ids, weights)
    # summation order differs (matmul vs matrix-vector): fp32 rounding relative to the output scale
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5 * max(slow.abs().max().item(), 1e-3))


def test_identity_experts_contribute_x_times_weight():
    cfg, moe = make_moe()
    x = torch.randn(5, cfg.hidden_size)
    N = cfg.n_routed_experts
    ids = torch.tensor([[N, N + 1, N + 2, N]] * 5)  # identity experts only (one chosen twice)
    weights = torch.rand(5, 4)
    out = moe.experts(x, ids, weights)
    torch.testing.assert_close(out, x * weights.sum(-1, keepdim=True))
    # and they add to the FFN experts' output
    ids_mixed = torch.tensor([[0, N + 1, 3, N]] * 5)
    ffn_only = moe.experts(x, ids_mixed, weights * torch.tensor([1.0, 0, 1, 0]))
    mixed = moe.experts(x, ids_mixed, weights)
    torch.testing.assert_close(mixed - ffn_only, x * (weights[:, 1] + weights[:, 3])[:, None], rtol=1e-5, atol=1e-6)


def test_grouped_expert_ffn_on_a_slice_of_experts():
    """Expert parallelism calls it with gate_up_proj[lo:hi], down_proj[lo:hi]."""
    cfg, moe = make_moe()
    E = moe.experts
    I = cfg.expert_ffn_hidden_size
    counts = [3, 0, 2]
    x = torch.randn(sum(counts), cfg.hidden_size)
    y = grouped_expert_ffn(x, torch.tensor(counts), E.gate_up_proj[2:5], E.down_proj[2:5])
    rows = [2, 2, 2, 4, 4]  # the expert of each row
    for r, e in enumerate(rows):
        gate, up = E.gate_up_proj[e, :I] @ x[r], E.gate_up_proj[e, I:] @ x[r]
        torch.testing.assert_close(y[r], E.down_proj[e] @ (F.silu(gate) * up), rtol=1e-5, atol=1e-6)
    assert grouped_expert_ffn(x[:0], [0, 0, 0], E.gate_up_proj[2:5], E.down_proj[2:5]).shape == (0, cfg.hidden_size)


def test_routing_record_is_consistent_and_leaves_logits_alone():
    cfg = LongcatConfig.preset("tiny", num_layers=2, n_routed_experts=8, zero_expert_num=4, moe_topk=5)
    model = LongcatFlash(cfg, generator=torch.Generator().manual_seed(0)).eval()
    ids = torch.randint(0, cfg.vocab_size, (3, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model(ids)
        recorded = model(ids, return_routing=True)
    assert plain.routing is None
    assert torch.equal(plain.logits, recorded.logits)
    assert [r.layer for r in recorded.routing] == [0, 1]
    for r in recorded.routing:
        T, K = 3 * 7, cfg.moe_topk
        assert r.expert_ids.shape == (T, K) and r.weights.shape == (T, K)
        assert torch.equal(r.ffn_experts_per_token, (r.expert_ids < cfg.n_routed_experts).sum(-1))
        assert r.tokens_per_expert.shape == (cfg.n_experts_total,)
        assert int(r.tokens_per_expert.sum()) == T * K
        assert torch.equal(r.tokens_per_expert, torch.bincount(r.expert_ids.flatten(), minlength=cfg.n_experts_total))
        assert not r.expert_ids.requires_grad and not r.weights.requires_grad


def test_router_keeps_scores_when_asked():
    cfg, moe = make_moe()
    x = torch.randn(4, cfg.hidden_size, requires_grad=True)
    moe.router.keep_scores = True
    moe(x)
    scores = moe.router.last_scores_TE
    assert scores.shape == (4, cfg.n_experts_total) and scores.requires_grad
    torch.testing.assert_close(scores.sum(-1), torch.ones(4))


def test_router_stays_fp32_under_bf16_autocast():
    cfg, moe = make_moe()
    router = moe.router
    router.keep_scores = True
    x = torch.randn(16, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    ids_fp32, weights_fp32 = router(x)
    logits_fp32 = router.last_logits_TE
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ids, weights = router(x.bfloat16())
    assert router.last_logits_TE.dtype == torch.float32
    # Same selection as without autocast; the input's bf16 rounding is the only difference.
    torch.testing.assert_close(router.last_logits_TE, logits_fp32, rtol=2e-2, atol=2e-2)
    assert weights.dtype == torch.float32
