"""State-dict checks and layout conversion for LongcatFlash.

Our parameter names and shapes are exactly transformers' LongcatFlashForCausalLM (5.25 on):
    model.layers.{i}.mlp.experts.gate_up_proj  [N, 2I, D]   gate rows first
    model.layers.{i}.mlp.experts.down_proj     [N, D, I]
The earlier layouts `to_stacked_experts` converts: per expert (transformers 4.x and the hub
checkpoint's own names)
    model.layers.{i}.mlp.experts.{e}.{gate_proj,up_proj,down_proj}.weight   e < N only
and transformers 5.0-5.24's stacked gate_up_proj [N + Z, 2I, D], whose Z identity-expert
rows were never read (they are dropped).
MTP weights (`model.mtp.*`) are dropped: we do not model multi-token prediction.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from model.config import ConfigError, LongcatConfig

_PER_EXPERT = re.compile(r"^(model\.layers\.(\d+)\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")


class StateDictError(ConfigError):
    """A state dict that does not fit the model; the message lists the offending keys."""


def to_stacked_experts(state_dict: Mapping[str, torch.Tensor], config: LongcatConfig) -> dict[str, torch.Tensor]:
    """Return a state dict in the stacked 5.x layout (unchanged if it already is; MTP keys dropped)."""
    out: dict[str, torch.Tensor] = {}
    per_expert: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for key, tensor in state_dict.items():
        if key.startswith("model.mtp."):
            continue
        match = _PER_EXPERT.match(key)
        if match is None:
            stacked_with_identity_rows = (key.endswith(".mlp.experts.gate_up_proj") and config.zero_expert_num
                                          and tensor.dim() == 3 and tensor.shape[0] == config.n_experts_total)
            out[key] = tensor[: config.n_routed_experts] if stacked_with_identity_rows else tensor
            continue
        prefix, _, expert, proj = match.groups()
        per_expert.setdefault(prefix, {}).setdefault(int(expert), {})[proj] = tensor
    N = config.n_routed_experts
    for prefix, experts in per_expert.items():
        bad = sorted(e for e in experts if e >= N or set(experts[e]) != {"gate_proj", "up_proj", "down_proj"})
        missing = [e for e in range(N) if e not in experts]
        if bad or missing:
            raise StateDictError(
                f"per-expert layout under {prefix}: experts {missing} missing, "
                f"experts {bad} out of range or incomplete (expected gate/up/down for 0..{N - 1})"
            )
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]], dim=0) for e in range(N)])
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in range(N)])
    return out


def to_per_expert(state_dict: Mapping[str, torch.Tensor], config: LongcatConfig) -> dict[str, torch.Tensor]:
    """The inverse of `to_stacked_experts`: the stacked layout split into per-expert weights."""
    out: dict[str, torch.Tensor] = {}
    I = config.expert_ffn_hidden_size
    for key, tensor in state_dict.items():
        if key.endswith(".mlp.experts.gate_up_proj"):
            prefix = key[: -len(".gate_up_proj")]
            for e in range(config.n_routed_experts):
                out[f"{prefix}.{e}.gate_proj.weight"] = tensor[e, :I].clone()
                out[f"{prefix}.{e}.up_proj.weight"] = tensor[e, I:].clone()
        elif key.endswith(".mlp.experts.down_proj"):
            prefix = key[: -len(".down_proj")]
            for e in range(config.n_routed_experts):
                out[f"{prefix}.{e}.down_proj.weight"] = tensor[e].clone()
        else:
            out[key] = tensor
    return out


def check_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Raise StateDictError listing every missing, unexpected and mis-shaped key (all at once)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    misshaped = sorted(
        f"{k} (expected {list(expected[k])}, got {list(state_dict[k].shape)})"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"missing keys: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"mis-shaped keys: {', '.join(misshaped)}")
    if problems:
        raise StateDictError("state dict does not fit LongcatFlash: " + "; ".join(problems))
