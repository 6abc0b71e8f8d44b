"""Multi-head latent attention (MLA) as LongCat-Flash uses it, and its compressed KV cache.

Shape legend: B batch, T new tokens, S cached + new tokens, D hidden, H heads,
Q q_lora_rank, C kv_lora_rank, N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim.

Dataflow of one block (LongCat's twist on DeepSeek-V3 MLA is the two LoRA scales):
    q    = q_b_proj(q_a_layernorm(q_a_proj(x)))            [B, T, H, N + R]
    q_nope, q_rope  *= sqrt(D / Q)                          (mla_scale_q_lora)
    c_kv, k_rope    = split(kv_a_proj_with_mqa(x))          [B, T, C], [B, T, R]
    c_kv  = kv_a_layernorm(c_kv) * sqrt(D / C)              (mla_scale_kv_lora; k_rope unscaled)
    q_rope, k_rope  = rope(q_rope), rope(k_rope)            interleaved pairs
    cache  <- (c_kv, k_rope)                                the compressed latents only
    k_nope, v = split(kv_b_proj(c_kv))                      [B, S, H, N], [B, S, H, V]
    y = o_proj(softmax((q . k) / sqrt(N + R), causal) v)
A call that continues a cache (decode, or a chunk after a prefix) runs the same math
"absorbed": kv_b_proj is folded into q and the output, and attention runs over the
C-wide latents, so the S cached tokens are never expanded into H heads.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import LongcatConfig
from model.layers import RMSNorm, apply_rope

# transformers' LongCat (and DeepSeek-V3) build the two latent norms with eps 1e-6, not
# config.rms_norm_eps; we follow it so logits match the reference implementation.
LATENT_NORM_EPS = 1e-6


class KVCache:
    """Compressed MLA cache for token-by-token decode.

    Slot `2 * layer + j` holds attention block j of that layer: c_kv [B, S, C] (normed and
    scaled) and k_rope [B, S, R] (rotated). Bytes per token per block: (C + R) * element size.
    """

    def __init__(self, num_blocks: int) -> None:
        self.c_kv: list[torch.Tensor | None] = [None] * num_blocks
        self.k_rope: list[torch.Tensor | None] = [None] * num_blocks

    def length(self, index: int = 0) -> int:
        """Tokens cached in slot `index` (slot 0 is written first in every forward)."""
        c_kv = self.c_kv[index]
        return 0 if c_kv is None else c_kv.shape[1]

    @property
    def seq_len(self) -> int:
        return self.length(0)

    def append(
        self, index: int, c_kv_BTC: torch.Tensor, k_rope_BTR: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this call's latents to slot `index`; return the whole slot ([B, S, C], [B, S, R])."""
        if self.c_kv[index] is not None:
            c_kv_BTC = torch.cat([self.c_kv[index], c_kv_BTC], dim=1)
            k_rope_BTR = torch.cat([self.k_rope[index], k_rope_BTR], dim=1)
        self.c_kv[index], self.k_rope[index] = c_kv_BTC, k_rope_BTR
        return c_kv_BTC, k_rope_BTR

    def nbytes(self) -> int:
        """Bytes held over all slots."""
        return sum(t.numel() * t.element_size() for t in self.c_kv + self.k_rope if t is not None)


class MLA(nn.Module):
    """One MLA attention block. `cache_index` is its slot in a KVCache (2 * layer + j)."""

    def __init__(self, config: LongcatConfig, cache_index: int) -> None:
        super().__init__()
        self.cache_index = cache_index
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        H, D = config.num_attention_heads, config.hidden_size
        bias = config.attention_bias

        self.q_a_proj = nn.Linear(D, config.q_lora_rank, bias=bias)
        self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
        self.q_b_proj = nn.Linear(config.q_lora_rank, H * config.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, config.kv_lora_rank + config.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(config.kv_lora_rank, H * (config.qk_nope_head_dim + config.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * config.v_head_dim, D, bias=bias)

        self.softmax_scale = config.qk_head_dim ** -0.5
        self.q_scale = (D / config.q_lora_rank) ** 0.5 if config.mla_scale_q_lora else 1.0
        self.kv_scale = (D / config.kv_lora_rank) ** 0.5 if config.mla_scale_kv_lora else 1.0
        # sdpa only takes its fused flash kernel when q/k and v head dims agree (on CPU here:
        # ~3x faster than the math fallback, and causal-aware), so prefill pads V with zeros
        # to N + R. False: the unpadded math path, whose matmuls FlopCounterMode counts.
        self.flash_pad_v = True

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Causal self-attention of the T new tokens over the cached ones and themselves.

        x_BTD: the normed hidden states [B, T, D].
        rope: (cos, sin), each [B or 1, T, R/2], the angles of the T new positions
              (`LongcatFlash.rope_angles(position_ids)`).
        cache: if given, this block's slot `cache_index` is read and extended by T tokens;
               the new tokens sit at positions cache.length(cache_index) ... + T - 1.
        Returns the block's output [B, T, D] (before the residual add).
        """
        B, T, _ = x_BTD.shape
        H, N, R, V = self.num_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        cos, sin = rope

        q_BTHK = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD))).view(B, T, H, N + R)
        q_nope_BTHN, q_rope_BTHR = q_BTHK.split([N, R], dim=-1)
        c_kv_BTC, k_rope_BTR = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_lora_rank, R], dim=-1)
        c_kv_BTC = self.kv_a_layernorm(c_kv_BTC)
        if self.q_scale != 1.0:
            q_nope_BTHN, q_rope_BTHR = q_nope_BTHN * self.q_scale, q_rope_BTHR * self.q_scale
        if self.kv_scale != 1.0:
            c_kv_BTC = c_kv_BTC * self.kv_scale
        q_rope_BTHR = apply_rope(q_rope_BTHR, cos, sin)
        k_rope_BTR = apply_rope(k_rope_BTR, cos, sin)

        past = 0
        if cache is not None:
            past = cache.length(self.cache_index)
            c_kv_BTC, k_rope_BTR = cache.append(self.cache_index, c_kv_BTC, k_rope_BTR)
        S = c_kv_BTC.shape[1]  # from here on the latents cover all S positions
        mask_TS = None
        if past > 0 and T > 1:  # a chunk after a prefix: query i sees keys 0 .. past + i
            mask_TS = torch.arange(S, device=x_BTD.device) <= (past + torch.arange(T, device=x_BTD.device))[:, None]
        if past > 0:
            out_BTHV = self._absorbed(q_nope_BTHN, q_rope_BTHR, c_kv_BTC, k_rope_BTR, mask_TS)
        else:
            out_BTHV = self._expanded(q_nope_BTHN, q_rope_BTHR, c_kv_BTC, k_rope_BTR)
        return self.o_proj(out_BTHV.reshape(B, T, H * V))

    def _expanded(
        self, q_nope_BTHN: torch.Tensor, q_rope_BTHR: torch.Tensor, c_kv_BSC: torch.Tensor, k_rope_BSR: torch.Tensor
    ) -> torch.Tensor:
        """Prefill: expand every key/value through kv_b_proj, causal attention per head."""
        (B, S, _), H = c_kv_BSC.shape, self.num_heads
        N, R, V = self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim
        kv_BSHK = self.kv_b_proj(c_kv_BSC).view(B, S, H, N + V)
        k_nope_BSHN, v_BSHV = kv_BSHK.split([N, V], dim=-1)
        k_BSHK = torch.cat([k_nope_BSHN, k_rope_BSR[:, :, None, :].expand(B, S, H, R)], dim=-1)
        q_BTHK = torch.cat([q_nope_BTHN, q_rope_BTHR], dim=-1)
        if self.flash_pad_v and V < N + R:  # zero columns: same softmax, extra outputs sliced off
            v_BSHV = F.pad(v_BSHV, (0, N + R - V))
        out_BHTV = F.scaled_dot_product_attention(
            q_BTHK.transpose(1, 2), k_BSHK.transpose(1, 2), v_BSHV.transpose(1, 2),
            is_causal=q_BTHK.shape[1] > 1, scale=self.softmax_scale,
        )
        return out_BHTV.transpose(1, 2)[..., :V]

    def _absorbed(
        self,
        q_nope_BTHN: torch.Tensor,
        q_rope_BTHR: torch.Tensor,
        c_kv_BSC: torch.Tensor,
        k_rope_BSR: torch.Tensor,
        mask_TS: torch.Tensor | None,
    ) -> torch.Tensor:
        """Decode: fold kv_b_proj into the query and the output and attend over the latents.

        q.k = (q_nope W_uk) . c_kv + q_rope . k_rope and out = (p c_kv) W_uv: the same numbers
        as the expanded form without expanding the S cached latents into H heads.
        """
        H, N = self.num_heads, self.qk_nope_head_dim
        w_HKC = self.kv_b_proj.weight.view(H, N + self.v_head_dim, self.kv_lora_rank)
        w_uk_HNC, w_uv_HVC = w_HKC[:, :N], w_HKC[:, N:]
        q_lat_BTHC = torch.einsum("bthn,hnc->bthc", q_nope_BTHN, w_uk_HNC)
        scores_BHTS = torch.einsum("bthc,bsc->bhts", q_lat_BTHC, c_kv_BSC)
        scores_BHTS = scores_BHTS + torch.einsum("bthr,bsr->bhts", q_rope_BTHR, k_rope_BSR)
        scores_BHTS = scores_BHTS * self.softmax_scale
        if mask_TS is not None:
            scores_BHTS = scores_BHTS.masked_fill(~mask_TS, float("-inf"))
        p_BHTS = scores_BHTS.float().softmax(dim=-1).to(c_kv_BSC.dtype)
        o_lat_BTHC = torch.einsum("bhts,bsc->bthc", p_BHTS, c_kv_BSC)
        return torch.einsum("bthc,hvc->bthv", o_lat_BTHC, w_uv_HVC)
