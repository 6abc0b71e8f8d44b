"""State-dict loading errors and layouts, the ScMoE vs sequential layer, RoPE, training step."""

from __future__ import annotations

import pytest
import torch

from model import LongcatConfig, LongcatFlash
from model.checkpoint import StateDictError, to_per_expert, to_stacked_experts
from model.layers import RotaryEmbedding, apply_rope

CFG = LongcatConfig.preset("tiny", num_layers=2, n_routed_experts=6, zero_expert_num=3, moe_topk=4)


def seeded_model(cfg: LongcatConfig = CFG, seed: int = 0) -> LongcatFlash:
    model = LongcatFlash(cfg, generator=torch.Generator().manual_seed(seed)).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 100)
        for p in model.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_state_dict_errors_list_every_bad_key():
    model = seeded_model()
    sd = model.state_dict()
    sd.pop("model.layers.0.mlps.1.up_proj.weight")
    sd.pop("lm_head.weight")
    sd["model.layers.0.extra.weight"] = torch.zeros(3)
    sd["model.norm.weight"] = torch.ones(7)
    with pytest.raises(StateDictError) as err:
        LongcatFlash(CFG).load_state_dict(sd)
    message = str(err.value)
    for key in ["model.layers.0.mlps.1.up_proj.weight", "lm_head.weight", "model.layers.0.extra.weight",
                "model.norm.weight (expected [144], got [7])"]:
        assert key in message


def test_per_expert_layout_converts_both_ways():
    model = seeded_model()
    sd = model.state_dict()
    per_expert = to_per_expert(sd, CFG)
    assert "model.layers.1.mlp.experts.5.down_proj.weight" in per_expert
    assert not any(k.endswith("experts.gate_up_proj") for k in per_expert)
    other = LongcatFlash(CFG)
    other.load_state_dict({**per_expert, "model.mtp.layers.0.foo.weight": torch.zeros(1)})  # MTP ignored
    ids = torch.randint(0, CFG.vocab_size, (2, 6))
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)
    back = to_stacked_experts(per_expert, CFG)
    N = CFG.n_routed_experts
    assert torch.equal(back["model.layers.0.mlp.experts.gate_up_proj"][:N], sd["model.layers.0.mlp.experts.gate_up_proj"][:N])
    with pytest.raises(StateDictError, match=r"experts \[2\] missing"):
        to_stacked_experts({k: v for k, v in per_expert.items() if ".experts.2." not in k}, CFG)


def test_shortcut_false_differs_only_in_dataflow():
    seq_cfg = LongcatConfig.preset("tiny", num_layers=2, n_routed_experts=6, zero_expert_num=3, moe_topk=4,
                                   shortcut=False)
    sc, seq = seeded_model(), LongcatFlash(seq_cfg)
    seq.load_state_dict(sc.state_dict(), strict=True)  # same parameters, same names
    assert sum(p.numel() for p in sc.parameters()) == sum(p.numel() for p in seq.parameters())
    ids = torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_sc, out_seq = sc(ids).logits, seq(ids).logits
    assert not torch.allclose(out_sc, out_seq, atol=1e-4)

    # Each variant equals its dataflow written out by hand from the same sub-modules.
    x = torch.randn(2, 6, CFG.hidden_size, generator=torch.Generator().manual_seed(2))
    rope = sc.rope_angles(torch.arange(6)[None])
    for model, shortcut in ((sc, True), (seq, False)):
        layer = model.model.layers[0]
        with torch.no_grad():
            h = x + layer.self_attn[0](layer.input_layernorm[0](x), rope)
            u = layer.post_attention_layernorm[0](h)
            h = h + layer.mlps[0](u)
            h = h + layer.self_attn[1](layer.input_layernorm[1](h), rope)
            v = layer.post_attention_layernorm[1](h)
            expected = h + layer.mlps[1](v) + layer.mlp(u if shortcut else v)
            torch.testing.assert_close(layer(x, rope), expected)


def test_shortcut_false_decode_matches_its_full_forward():
    cfg = LongcatConfig.preset("tiny", num_layers=2, shortcut=False)
    model = seeded_model(cfg)
    ids = torch.randint(0, cfg.vocab_size, (1, 9))
    with torch.no_grad():
        full = model(ids).logits
        cache = model.new_cache()
        model(ids[:, :5], cache=cache)
        for t in range(5, 9):
            torch.testing.assert_close(model(ids[:, t : t + 1], cache=cache).logits[:, 0], full[:, t],
                                       rtol=1e-5, atol=1e-5)


def test_rope_rotates_interleaved_pairs_and_is_relative():
    rope = RotaryEmbedding(8, theta=10_000.0)
    x = torch.randn(1, 1, 8)
    cos, sin = rope(torch.tensor([[3]]))
    y = apply_rope(x, cos, sin)
    # pair i = (x[2i], x[2i+1]) rotated by angle 3 * theta^(-2i/8); written half-split
    for i in range(4):
        angle = torch.tensor(3 * 10_000.0 ** (-2 * i / 8))
        a, b = x[0, 0, 2 * i], x[0, 0, 2 * i + 1]
        torch.testing.assert_close(y[0, 0, i], a * angle.cos() - b * angle.sin())
        torch.testing.assert_close(y[0, 0, 4 + i], b * angle.cos() + a * angle.sin())
    # q.k depends on the position difference only
    q, k = torch.randn(1, 1, 8), torch.randn(1, 1, 8)
    def dot(pq, pk):
        return (apply_rope(q, *rope(torch.tensor([[pq]]))) * apply_rope(k, *rope(torch.tensor([[pk]])))).sum()
    torch.testing.assert_close(dot(7, 2), dot(15, 10), rtol=1e-5, atol=1e-5)


def test_training_step_reaches_every_parameter():
    model = seeded_model().train()
    ids = torch.randint(0, CFG.vocab_size, (2, 8))
    out = model(ids, labels=ids)
    out.loss.backward()
    N = CFG.n_routed_experts
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        if name.endswith("experts.gate_up_proj"):  # the identity experts' rows are never read
            assert p.grad[N:].abs().sum() == 0 and p.grad[:N].abs().sum() > 0
        elif "embed_tokens" not in name:
            assert p.grad.abs().sum() > 0, name


def test_stacked_layout_of_transformers_before_5_25_loads():
    """transformers 5.0-5.24 stacked gate_up_proj as [N + Z, 2I, D] (identity experts'
    rows never read): converting drops those rows and the model computes the same."""
    model = seeded_model()
    sd = model.state_dict()
    Z = CFG.zero_expert_num
    legacy = dict(sd)
    for key in [k for k in sd if k.endswith("experts.gate_up_proj")]:
        legacy[key] = torch.cat([sd[key], torch.randn(Z, *sd[key].shape[1:])])
        assert legacy[key].shape[0] == CFG.n_experts_total
    other = LongcatFlash(CFG)
    other.load_state_dict(to_stacked_experts(legacy, CFG), strict=True)
    ids = torch.randint(0, CFG.vocab_size, (2, 6), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert torch.equal(other(ids).logits, model(ids).logits)
