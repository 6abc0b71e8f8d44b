"""Small building blocks: RMSNorm (fp32 compute), interleaved RoPE, SwiGLU MLP.

Shape legend: B batch, T tokens in this call, D hidden, R rope dims, F ffn hidden.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """y = weight * (x / rms(x)), computed in fp32 and cast back to x's dtype before the weight."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


class RotaryEmbedding(nn.Module):
    """Angles for rotary position embedding over `dim` rope dimensions (no scaling).

    forward(position_ids_BT) -> (cos_BTh, sin_BTh), h = dim / 2: one angle per rotated pair,
    computed in fp32 (cast to the activation dtype by `apply_rope`).
    """

    def __init__(self, dim: int, theta: float) -> None:
        super().__init__()
        inv_freq_h = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        self.register_buffer("inv_freq", inv_freq_h, persistent=False)

    def forward(self, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles_BTh = position_ids_BT[..., None].float() * self.inv_freq
        return angles_BTh.cos(), angles_BTh.sin()


def apply_rope(x: torch.Tensor, cos_BTh: torch.Tensor, sin_BTh: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the last dim (DeepSeek/LongCat layout).

    x: [B, T, R] or [B, T, heads, R]; cos/sin: [B, T, R/2] (broadcast over heads). The result is written half-split (all rotated first members, then all second members), the
    same permutation for q and k, so q.k is unchanged; transformers' LongCat does the same,
    which keeps our cached k_rope bit-compatible with its cache.
    """
    while cos_BTh.dim() < x.dim():
        cos_BTh, sin_BTh = cos_BTh.unsqueeze(-2), sin_BTh.unsqueeze(-2)
    cos, sin = cos_BTh.to(x.dtype), sin_BTh.to(x.dtype)
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense `mlps[j]` of a layer. x [..., D] -> [..., D]."""

    def __init__(self, hidden_size: int, ffn_hidden_size: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.down_proj = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
