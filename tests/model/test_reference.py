"""Our LongcatFlash against transformers' LongcatFlashForCausalLM with identical weights (fp32).

Weights are drawn larger than the 0.02 init (so logits and routing are far from uniform),
the router's correction bias is non-zero and non-uniform, and the tolerance is 1e-5 of the
logit scale. Covers the tiny config of transformers' own tests and a 2-layer config with
more experts and top-k > 2, for a full forward and for prefill + decode through the cache.
"""

from __future__ import annotations

import pytest
import torch

from model import LongcatConfig, LongcatFlash

transformers = pytest.importorskip("transformers")
from transformers import DynamicCache, LongcatFlashConfig, LongcatFlashForCausalLM  # noqa: E402

REL_TOL = 1e-5

CONFIGS = {
    "tiny": LongcatConfig.preset("tiny"),
    "2layer-12e-top5": LongcatConfig.preset(
        "tiny", num_layers=2, n_routed_experts=12, zero_expert_num=4, moe_topk=5, routed_scaling_factor=2.5
    ),
    "no-zero-experts": LongcatConfig.preset("tiny", num_layers=2, n_routed_experts=8, zero_expert_num=0, moe_topk=3),
}


def paired_models(cfg: LongcatConfig, seed: int = 0) -> tuple[LongcatFlashForCausalLM, LongcatFlash]:
    """A transformers model with random weights and a non-uniform bias, and ours loaded from it."""
    gen = torch.Generator().manual_seed(seed)
    ref = LongcatFlashForCausalLM(LongcatFlashConfig(**cfg.to_hf_dict())).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
            else:  # norm weights (and biases): around one, not exactly one
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
        for layer in ref.model.layers:
            bias = layer.mlp.router.e_score_correction_bias
            bias.copy_(torch.rand(bias.shape, generator=gen) * 0.1)
    ours = LongcatFlash(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def assert_close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    scale = ref.abs().max().item()
    diff = (ours - ref).abs().max().item()
    assert diff <= REL_TOL * scale, f"max |diff| {diff:.3g} > {REL_TOL} x logit scale {scale:.3g}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_state_dict_keys_and_shapes_equal_transformers(name):
    cfg = CONFIGS[name]
    ref = LongcatFlashForCausalLM(LongcatFlashConfig(**cfg.to_hf_dict()))
    ours = LongcatFlash(cfg)
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    mine = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == theirs


@pytest.mark.parametrize("name", list(CONFIGS))
def test_full_forward_matches_transformers(name):
    cfg = CONFIGS[name]
    ref, ours = paired_models(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = ref(ids).logits
        got = ours(ids).logits
    assert got.shape == (2, 11, cfg.vocab_size)
    assert_close(got, expected)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prefill_then_decode_matches_transformers(name):
    cfg = CONFIGS[name]
    ref, ours = paired_models(cfg, seed=2)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    prompt, steps = 7, 5
    ref_cache, cache = DynamicCache(config=ref.config), ours.new_cache()
    with torch.no_grad():
        assert_close(ours(ids[:, :prompt], cache=cache).logits, ref(ids[:, :prompt], cache=ref_cache, use_cache=True).logits)
        full = ours(ids).logits
        for t in range(prompt, prompt + steps):
            step_ref = ref(ids[:, t : t + 1], cache=ref_cache, use_cache=True).logits
            step = ours(ids[:, t : t + 1], cache=cache).logits
            assert_close(step, step_ref)
            assert_close(step[:, 0], full[:, t])  # decode through the cache == the full forward
    assert cache.seq_len == prompt + steps
    # the compressed cache holds (C + R) values per token per attention block
    assert cache.nbytes() == 2 * (prompt + steps) * cfg.num_attention_blocks * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4


def test_chunked_prefill_matches_one_pass():
    cfg = CONFIGS["2layer-12e-top5"]
    _, ours = paired_models(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = ours(ids).logits
        cache = ours.new_cache()
        ours(ids[:, :5], cache=cache)
        assert_close(ours(ids[:, 5:], cache=cache).logits, full[:, 5:])


def test_correction_bias_changes_selection_in_this_test():
    """The bias used above really moves the choice (else the bias tests prove nothing)."""
    cfg = CONFIGS["2layer-12e-top5"]
    _, ours = paired_models(cfg)
    ids = torch.randint(0, cfg.vocab_size, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        with_bias = ours(ids, return_routing=True).routing
        for layer in ours.model.layers:
            layer.mlp.router.e_score_correction_bias.zero_()
        without = ours(ids, return_routing=True).routing
    differs = [
        (a.expert_ids.sort(-1).values != b.expert_ids.sort(-1).values).any().item() for a, b in zip(with_bias, without)
    ]
    assert any(differs)
