"""Parameter and FLOP counting against the published figures, the built model and torch's FlopCounterMode."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from model import LongcatConfig, LongcatFlash, activated_params, total_params
from model.counting import BLOCKS, kv_cache_bytes_per_token, step_costs, total_cost


def test_longcat_flash_parameter_figures():
    cfg = LongcatConfig.preset("longcat-flash")
    assert total_params(cfg) / 1e9 == pytest.approx(560.7, abs=0.05)
    assert activated_params(cfg, 0) / 1e9 == pytest.approx(18.7, abs=0.05)
    assert activated_params(cfg, 8) / 1e9 == pytest.approx(27.2, abs=0.06)
    assert activated_params(cfg, 12) / 1e9 == pytest.approx(31.4, abs=0.05)
    # one FFN expert in every layer: 28 x 3 x 6144 x 2048
    assert activated_params(cfg, 1) - activated_params(cfg, 0) == 28 * 3 * 6144 * 2048
    # 56 attention blocks x (512 + 64) latents x 2 bytes: the ~64.5 KB per token of the reference sheet
    assert kv_cache_bytes_per_token(cfg) == 64_512


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_total_params_equals_the_built_model(name):
    cfg = LongcatConfig.preset(name)
    model = LongcatFlash(cfg)
    built = sum(p.numel() for p in model.parameters())
    assert total_params(cfg) == built


def _small_model() -> tuple[LongcatConfig, LongcatFlash]:
    cfg = LongcatConfig.preset("small", default_batch_size=2, default_seq_len=32)
    model = LongcatFlash(cfg, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        for layer in model.model.layers:  # uneven routing, some experts idle
            layer.mlp.router.classifier.weight.normal_(0.0, 0.3, generator=gen)
    for module in model.modules():
        if hasattr(module, "flash_pad_v"):
            module.flash_pad_v = False  # the unpadded math path, whose matmuls FlopCounterMode sees
    return cfg, model


def _count(fn) -> int:
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_prefill_flops_match_flop_counter_on_small():
    cfg, model = _small_model()
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        routing = model(ids, return_routing=True).routing
        measured = _count(lambda: model(ids))
    costs = step_costs(cfg, mode="prefill", batch_size=2, seq_len=32, attention="full",
                       tokens_per_expert=[r.tokens_per_expert.tolist() for r in routing])
    assert set(costs) == {"embed", "head"} | {f"L{i}/{b}" for i in range(cfg.num_layers) for b in BLOCKS}
    assert total_cost(costs).flops == measured
    # the per-block split is right too: the experts' share equals their rows x 6 D I
    rows = sum(int(r.tokens_per_expert[: cfg.n_routed_experts].sum()) for r in routing)
    experts = sum(costs[f"L{i}/experts"].flops for i in range(cfg.num_layers))
    assert experts == rows * 6 * cfg.hidden_size * cfg.expert_ffn_hidden_size


def test_decode_flops_match_flop_counter_on_small():
    cfg, model = _small_model()
    ids = torch.randint(0, cfg.vocab_size, (2, 21), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        cache = model.new_cache()
        model(ids[:, :20], cache=cache)
        snapshot = [(c.clone(), k.clone()) for c, k in zip(cache.c_kv, cache.k_rope)]
        routing = model(ids[:, 20:], cache=cache, return_routing=True).routing
        cache.c_kv, cache.k_rope = [c for c, _ in snapshot], [k for _, k in snapshot]  # rewind
        measured = _count(lambda: model(ids[:, 20:], cache=cache))
    costs = step_costs(cfg, mode="decode", batch_size=2, seq_len=1, context_len=20,
                       tokens_per_expert=[r.tokens_per_expert.tolist() for r in routing])
    assert total_cost(costs).flops == measured
    # causal and full agree for one new token
    causal = step_costs(cfg, mode="decode", batch_size=2, seq_len=1, context_len=20, attention="causal",
                        tokens_per_expert=[r.tokens_per_expert.tolist() for r in routing])
    assert total_cost(causal).flops == measured


def test_training_flops_match_flop_counter_on_small():
    cfg, model = _small_model()
    ids = torch.randint(0, cfg.vocab_size, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        routing = model(ids, return_routing=True).routing

    def step():
        model(ids, labels=ids).loss.backward()

    measured = _count(step)
    costs = step_costs(cfg, mode="train", batch_size=2, seq_len=32, attention="full",
                       tokens_per_expert=[r.tokens_per_expert.tolist() for r in routing])
    assert total_cost(costs).flops == measured


def test_causal_counting_and_bytes_are_sane():
    cfg = LongcatConfig.preset("longcat-flash")
    full = total_cost(step_costs(cfg, mode="prefill", batch_size=1, seq_len=4096, attention="full"))
    causal = total_cost(step_costs(cfg, mode="prefill", batch_size=1, seq_len=4096))
    assert causal.flops < full.flops
    decode = step_costs(cfg, mode="decode", batch_size=1, seq_len=1, context_len=4096)
    # decode reads every layer's dense weights once: at least the activated parameters x 2 bytes
    # minus the embedding, and the whole compressed cache
    weight_bytes = sum(c.weight_bytes for c in decode.values())
    assert weight_bytes >= 2 * activated_params(cfg, 0)
    kv = sum(c.kv_cache_bytes for c in decode.values())
    assert kv == 4097 * kv_cache_bytes_per_token(cfg)
