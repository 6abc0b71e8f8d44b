"""Model-growth initialisation: stack a trained half-depth model into a deeper one.

LongCat-Flash was initialised by growing a trained 14-layer model to 28 layers (technical
report, "Model growth initialization"): the deeper model starts from copies of the
shallower one's layers instead of from random weights. Two orders:
    stack       new layer j = old layer j mod L     (the whole stack repeated: 0..L-1, 0..L-1)
    interleave  new layer j = old layer j // f      (each layer repeated in place: 0,0,1,1,...)
Embedding, final norm, lm_head and every router's `e_score_correction_bias` are copied
as they are (a copied layer keeps its routing bias).
"""

from __future__ import annotations

import os
import re
from typing import Literal

import torch

from model.config import ConfigError, LongcatConfig
from model.longcat import LongcatFlash

GrowthOrder = Literal["stack", "interleave"]
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def source_layer(new_index: int, old_layers: int, factor: int, order: GrowthOrder) -> int:
    """Which old layer new layer `new_index` copies."""
    if order == "stack":
        return new_index % old_layers
    if order == "interleave":
        return new_index // factor
    raise ConfigError(f"growth order: expected 'stack' or 'interleave', got {order!r}")


def grow_state_dict(
    state: dict[str, torch.Tensor], old_layers: int, factor: int = 2, order: GrowthOrder = "stack"
) -> dict[str, torch.Tensor]:
    """The state dict of a model `factor` times deeper (keys model.layers.{i}.* remapped)."""
    if factor < 1:
        raise ConfigError(f"growth factor: must be >= 1, got {factor}")
    per_layer: dict[int, dict[str, torch.Tensor]] = {}
    grown: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _LAYER_KEY.match(key)
        if match is None:
            grown[key] = value.clone()
        else:
            per_layer.setdefault(int(match.group(1)), {})[match.group(2)] = value
    if sorted(per_layer) != list(range(old_layers)):
        raise ConfigError(
            f"checkpoint: expected layers 0..{old_layers - 1}, found {sorted(per_layer)}"
        )
    for j in range(old_layers * factor):
        src = source_layer(j, old_layers, factor, order)
        for name, value in per_layer[src].items():
            grown[f"model.layers.{j}.{name}"] = value.clone()
    return grown


def grow_model(model: LongcatFlash, factor: int = 2, order: GrowthOrder = "stack") -> LongcatFlash:
    """A new LongcatFlash with factor × model's layers, initialised by copying them."""
    old = model.config
    config = LongcatConfig.from_dict({**old.to_dict(), "num_layers": old.num_layers * factor})
    grown = LongcatFlash(config)
    grown.load_state_dict(grow_state_dict(model.state_dict(), old.num_layers, factor, order))
    return grown


def grow_checkpoint(path: str | os.PathLike, factor: int = 2, order: GrowthOrder = "stack") -> LongcatFlash:
    """Load a `moesim train` checkpoint.pt and grow it (see `grow_model`)."""
    from model.train import load_checkpoint

    model, _ = load_checkpoint(path)
    return grow_model(model, factor, order)
