"""Model-growth initialisation (model/growth.py): a trained half-depth model stacked to full
depth loads into a LongcatFlash of twice the layers, copies every tensor from the layer it
should, and trains on from there."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from model.config import ConfigError
from model.growth import grow_checkpoint, grow_state_dict, source_layer
from model.train import TrainConfig, load_checkpoint, train


def test_source_layer_orders() -> None:
    assert [source_layer(j, 3, 2, "stack") for j in range(6)] == [0, 1, 2, 0, 1, 2]
    assert [source_layer(j, 3, 2, "interleave") for j in range(6)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ConfigError):
        source_layer(0, 3, 2, "zigzag")


def test_grow_state_dict_rejects_a_checkpoint_with_missing_layers() -> None:
    state = {"model.layers.0.x": torch.zeros(1), "model.layers.2.x": torch.zeros(1)}
    with pytest.raises(ConfigError, match="layers"):
        grow_state_dict(state, 3)


def test_grown_model_loads_copies_and_trains(tmp_path) -> None:
    torch.set_num_threads(1)
    half = TrainConfig(preset="tiny", num_layers=1, steps=6, controller="pid", target_ffn_experts=1.5,
                       batch_size=4, seq_len=32, data="zipf")
    train(half, tmp_path / "half", progress=None)
    small, _ = load_checkpoint(tmp_path / "half" / "checkpoint.pt")

    grown = grow_checkpoint(tmp_path / "half" / "checkpoint.pt")
    assert grown.config.num_layers == 2
    old, new = small.state_dict(), grown.state_dict()
    for key, value in new.items():
        src = key.replace("model.layers.1.", "model.layers.0.")
        assert torch.equal(value, old[src]), key  # every tensor (router bias included) copied
    assert len(new) == len(old) + sum(1 for k in old if ".layers.0." in k)

    ids = torch.randint(0, grown.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = float(grown(ids, labels=ids).loss)
    assert torch.isfinite(torch.tensor(before))

    cont = TrainConfig(preset="tiny", steps=30, controller="pid", target_ffn_experts=1.5, batch_size=4,
                       seq_len=32, data="zipf", seed=1)
    result = train(cont, tmp_path / "grown", progress=None, model=grown)
    losses = [r["loss"] for r in result.rows]
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5  # it trains
    reloaded, state = load_checkpoint(tmp_path / "grown" / "checkpoint.pt")
    assert reloaded.config.num_layers == 2 and len(state["controllers"]) == 2


def test_cli_grow_from(tmp_path) -> None:
    base = [sys.executable, "-m", "moesim", "train", "--steps", "2",
            "--data", "zipf", "--batch-size", "2", "--seq-len", "16"]
    first = subprocess.run([*base, "--preset", "tiny", "--num-layers", "1", "--out", str(tmp_path / "a")],
                           capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([*base, "--grow-from", str(tmp_path / "a" / "checkpoint.pt"),
                             "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    model, _ = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert model.config.num_layers == 2
    # The checkpoint sets the model: a preset beside it would be silently ignored, so it is refused.
    both = subprocess.run([*base, "--preset", "small", "--grow-from", str(tmp_path / "a" / "checkpoint.pt"),
                           "--out", str(tmp_path / "d")], capture_output=True, text=True, timeout=120)
    assert both.returncode == 2 and "--grow-from" in both.stderr and not (tmp_path / "d").exists()
    missing = subprocess.run([*base, "--grow-from", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "c")],
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
