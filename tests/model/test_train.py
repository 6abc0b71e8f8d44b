"""The training loop with budget control (model/train.py, `moesim train`) on the tiny preset.

The must-show of issue 3: from a skewed start (every FFN expert's bias 1/E below the zero
experts'), the PID controller brings the mean FFN experts per token to the target and
holds it within ±5%, with balanced expert load, while the model learns; without the
controller the budget stays off target. Also: the bias never changes logits except
through which experts are chosen, and bad input is one line + exit 2.
"""

from __future__ import annotations

import csv
import subprocess
import sys

import pytest
import torch

from model.config import LongcatConfig
from model.longcat import LongcatFlash
from model.train import LOG_COLUMNS, TrainConfig, load_checkpoint, train

TARGET = 1.5  # of top-2 (tiny: 4 FFN + 2 zero experts)


def _run(controller: str, steps: int, **kw):
    cfg = TrainConfig(preset="tiny", steps=steps, controller=controller, target_ffn_experts=TARGET,
                      skew="zero", balance_loss=0.1, seed=0, **kw)
    return train(cfg, None, progress=None)


@pytest.fixture(scope="module")
def pid_run():
    torch.set_num_threads(1)
    return _run("pid", 150)


@pytest.mark.slow
def test_pid_reaches_and_holds_the_target_with_balanced_load(pid_run) -> None:
    s = pid_run.summary
    rows = pid_run.rows
    assert rows[0]["ffn_experts_per_token"] < 0.3 * TARGET  # the skewed start really is skewed
    assert s["settle_step"] is not None and s["settle_step"] <= 120
    assert s["tail_max_abs_error_pct"] <= 5.0  # every smoothed value of the last 20% within ±5%
    assert abs(s["tail_ffn_experts_per_token"] - TARGET) <= 0.05 * TARGET
    assert s["tail_load_max_over_mean_pooled"] <= 1.3
    assert s["tail_device_load_max_over_mean"] <= 1.3
    # zero-expert biases were never updated: still exactly 0 (the skew moved FFN biases only)
    bias = pid_run.model.model.layers[0].mlp.router.e_score_correction_bias
    assert torch.all(bias[4:] == 0)


@pytest.mark.slow
def test_the_model_learns(pid_run) -> None:
    s = pid_run.summary
    assert s["eval_loss_after"] < s["eval_loss_before"] - 1.0  # held-out bytes, nats/token
    assert s["train_loss_last"] < s["train_loss_first"] - 0.8


@pytest.mark.slow
def test_without_controller_the_budget_stays_off_target() -> None:
    off = _run("off", 60)
    assert off.summary["settle_step"] is None
    assert off.summary["tail_max_abs_error_pct"] > 10.0
    bias = off.model.model.layers[0].mlp.router.e_score_correction_bias
    assert torch.allclose(bias[:4], torch.full((4,), -1 / 6))  # nothing moved it


def test_bias_changes_logits_only_through_selection() -> None:
    """A model whose router bias differs gives exactly the logits of an unbiased model that is
    forced to choose the same experts: the bias never enters a weight."""
    config = LongcatConfig.preset("tiny", num_layers=2)
    biased = LongcatFlash(config, generator=torch.Generator().manual_seed(1))
    plain = LongcatFlash(config)
    plain.load_state_dict(biased.state_dict())
    gen = torch.Generator().manual_seed(2)
    for layer in biased.model.layers:
        layer.mlp.router.e_score_correction_bias.copy_(torch.randn(6, generator=gen) * 0.2)
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=gen)
    out = biased(ids, return_routing=True)
    plain_choice = plain(ids, return_routing=True).routing
    assert any(not torch.equal(a.expert_ids, b.expert_ids) for a, b in zip(out.routing, plain_choice))

    for layer, routing in zip(plain.model.layers, out.routing):
        router = layer.mlp.router
        forced = routing.expert_ids

        def forward(x_TD, router=router, forced=forced):
            scores = torch.nn.functional.linear(x_TD.float(), router.classifier.weight.float()).softmax(-1)
            return forced, scores.gather(1, forced) * router.routed_scaling_factor

        router.forward = forward
    assert torch.allclose(plain(ids).logits, out.logits, atol=1e-6)
    # and a bias shift common to all experts changes nothing at all
    shifted = LongcatFlash(config)
    shifted.load_state_dict(biased.state_dict())
    for layer in shifted.model.layers:
        layer.mlp.router.e_score_correction_bias.add_(0.37)
    assert torch.equal(shifted(ids).logits, out.logits)


def test_cli_writes_log_and_checkpoint(tmp_path) -> None:
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "moesim", "train", "--preset", "tiny", "--steps", "3",
         "--target-ffn-experts", "1", "--controller", "p", "--out", str(out), "--data", "zipf",
         "--batch-size", "2", "--seq-len", "16"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "step     0" in proc.stdout
    with open(out / "train_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == LOG_COLUMNS and len(rows) == 3
    assert all(0 <= float(r["ffn_experts_per_token"]) <= 2 for r in rows)
    model, state = load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 3 and model.config.num_layers == 1
    assert state["controllers"][0]["target_ffn_experts"] == 1.0


def test_bf16_keeps_router_logits_fp32() -> None:
    cfg = TrainConfig(preset="tiny", steps=2, dtype="bf16", batch_size=2, seq_len=16, data="zipf")
    result = train(cfg, None, progress=None)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.rows)
    router = result.model.model.layers[0].mlp.router
    router.keep_scores = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        router(torch.randn(4, 144))
    assert router.last_logits_TE.dtype == torch.float32


@pytest.mark.parametrize(
    "args, message",
    [
        (["--target-ffn-experts", "0"], "target_ffn_experts"),
        (["--target-ffn-experts", "2.5"], "target_ffn_experts"),
        (["--controller", "pd"], "--controller"),
        (["--steps", "0"], "--steps"),
        (["--steps", "-3"], "--steps"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "moesim", "train", "--preset", "tiny", "--out", str(tmp_path / "x"), *args],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "x").exists()
