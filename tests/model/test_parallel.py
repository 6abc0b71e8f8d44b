"""Expert parallelism on 2 gloo ranks equals the single-device model with the same weights.

Each rank builds the model twice from one seed: an untouched single-device copy that runs the
whole global batch (the reference) and an expert-parallel copy that runs the rank's half. The
checks run inside the ranks; a failed assertion there fails the test with the rank's message.
"""

from __future__ import annotations

import pytest
import torch

from model.config import ConfigError, LongcatConfig
from traces.capture import RankFailure, next_token_loss, spawn_ranks

WORLD = 2
BATCH, SEQ = 4, 12


def _models(schedule: str, config: LongcatConfig):
    from model.longcat import LongcatFlash
    from model.parallel import apply_expert_parallel

    reference = LongcatFlash(config, generator=torch.Generator().manual_seed(7))
    parallel = LongcatFlash(config, generator=torch.Generator().manual_seed(7))
    parallel = apply_expert_parallel(parallel, None, schedule)
    parallel.expert_parallel.records = []
    return reference, parallel


def _assert_routing_exercised(parallel, rank: int, world: int) -> None:
    """The comparison means something only if rows went to the peer and identity experts were hit."""
    records = parallel.expert_parallel.records
    n_ffn = parallel.config.n_routed_experts
    assert any(rec["send_rows"][1 - rank] > 0 for rec in records), f"rank {rank} sent nothing to its peer"
    assert any(sum(rec["tokens_per_expert"][n_ffn:]) > 0 for rec in records), "no identity expert chosen"


def _batch(config: LongcatConfig) -> torch.Tensor:
    return torch.randint(0, config.vocab_size, (BATCH, SEQ), generator=torch.Generator().manual_seed(3))


def _check_forward(rank: int, world: int, device, schedule: str, shortcut: bool = True) -> None:
    """Logits of a full forward and of KV-cache decoding equal the single-process model's.
    shortcut=False (MoE after attention 1) takes its own path through parallel.py."""
    config = LongcatConfig.preset("tiny", num_layers=2, shortcut=shortcut)
    reference, parallel = _models(schedule, config)
    tokens = _batch(config)
    b = BATCH // world
    with torch.no_grad():
        expected = reference(tokens).logits[rank * b : (rank + 1) * b]
        got = parallel(tokens[rank * b : (rank + 1) * b]).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # decode with the KV cache: prompt then two single tokens
    cache_ref, cache_par = reference.new_cache(), parallel.new_cache()
    with torch.no_grad():
        reference(tokens[:, :8], cache=cache_ref)
        parallel(tokens[rank * b : (rank + 1) * b, :8], cache=cache_par)
        for t in (8, 9):
            expected = reference(tokens[:, t : t + 1], cache=cache_ref).logits[rank * b : (rank + 1) * b]
            got = parallel(tokens[rank * b : (rank + 1) * b, t : t + 1], cache=cache_par).logits
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    _assert_routing_exercised(parallel, rank, world)


def _check_grads(rank: int, world: int, device, schedule: str) -> None:
    from model.parallel import sync_dense_grads

    config = LongcatConfig.preset("tiny", num_layers=2)
    reference, parallel = _models(schedule, config)
    tokens = _batch(config)
    b = BATCH // world
    next_token_loss(reference(tokens).logits, tokens).backward()
    local = tokens[rank * b : (rank + 1) * b]
    (next_token_loss(parallel(local).logits, local) / world).backward()
    sync_dense_grads(parallel)
    _assert_routing_exercised(parallel, rank, world)
    ref_params = dict(reference.named_parameters())
    n = parallel.expert_parallel.experts_per_rank
    checked = 0
    for name, param in parallel.named_parameters():
        expected = ref_params[name].grad
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            expected = expected[rank * n : (rank + 1) * n]
        assert param.grad is not None, f"rank {rank}: no gradient for {name}"
        assert param.grad.abs().sum() > 0 or expected.abs().sum() == 0, name
        torch.testing.assert_close(param.grad, expected, rtol=1e-4, atol=1e-7, msg=lambda m: f"{name}: {m}")
        checked += 1
    assert checked == len(ref_params), (checked, len(ref_params))


def _check_all(rank: int, world: int, device, schedule: str) -> None:
    # One spawn per schedule runs every check: starting ranks costs more than the checks.
    _check_forward(rank, world, device, schedule)
    _check_forward(rank, world, device, schedule, shortcut=False)
    _check_grads(rank, world, device, schedule)
    _check_uneven_split(rank, world, device)


@pytest.mark.parametrize("schedule", ["sequential", "shortcut"])
def test_forward_decode_and_gradients_match_single_device(tmp_path, schedule):
    spawn_ranks(_check_all, WORLD, (schedule,), backend="gloo", timeout_s=120, status_dir=tmp_path)


def _fails(rank: int, world: int, device) -> None:
    if rank == 1:
        raise ValueError("rank one says no")


def test_a_failing_check_in_a_rank_fails_the_caller(tmp_path):
    # The harness above is only meaningful if an assertion inside a rank reaches the test.
    with pytest.raises(RankFailure, match="rank 1 failed: ValueError: rank one says no"):
        spawn_ranks(_fails, WORLD, (), backend="gloo", timeout_s=60, status_dir=tmp_path)


def _check_uneven_split(rank: int, world: int, device) -> None:
    from model.longcat import LongcatFlash
    from model.parallel import apply_expert_parallel

    model = LongcatFlash(LongcatConfig.preset("tiny", n_routed_experts=3))
    try:
        apply_expert_parallel(model, None, "shortcut")
    except ConfigError as err:
        assert "3 FFN experts do not split evenly over 2" in str(err)
    else:
        raise AssertionError("uneven expert split accepted")
