"""The LongCat-Flash decoder layer (shortcut-connected MoE) and the causal LM around it.

Shape legend: B batch, T tokens in this call, D hidden, V vocab.

One layer (ScMoE, `config.shortcut = True`), exactly transformers' LongcatFlashDecoderLayer:
    x = x + self_attn[0](input_layernorm[0](x))
    u = post_attention_layernorm[0](x)
    moe_out = mlp(u)                      # the MoE reads the same normed tensor as mlps[0]
    x = x + mlps[0](u)
    x = x + self_attn[1](input_layernorm[1](x))
    v = post_attention_layernorm[1](x)
    x = x + mlps[1](v) + moe_out          # the shortcut joins at the end
so the MoE's dispatch/combine can hide behind mlps[0], self_attn[1] and mlps[1].

`config.shortcut = False` is the conventional layer with the same parameters: the MoE moves
after attention 1 and reads v, like a routed MoE next to a shared expert (mlps[1]):
    moe_out = mlp(v);  x = x + mlps[1](v) + moe_out
Nothing independent of the MoE's input is left to overlap its communication with.

State-dict keys equal transformers' LongcatFlashForCausalLM (5.x layout); see
model/checkpoint.py for loading and the per-expert-layout converter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import counting
from model.attention import MLA, KVCache
from model.config import LongcatConfig
from model.layers import RMSNorm, RotaryEmbedding, SwiGLUMLP
from model.moe import MoE, LayerRouting


class DecoderLayer(nn.Module):
    """Layer `layer_index`: 2 MLA blocks, 2 dense SwiGLU MLPs, 4 RMSNorms and 1 MoE (`mlp`)."""

    def __init__(self, config: LongcatConfig, layer_index: int) -> None:
        super().__init__()
        self.config = config
        self.layer_index = layer_index
        D, eps = config.hidden_size, config.rms_norm_eps
        self.mlp = MoE(config, layer_index)
        self.self_attn = nn.ModuleList([MLA(config, cache_index=2 * layer_index + j) for j in (0, 1)])
        self.mlps = nn.ModuleList([SwiGLUMLP(D, config.ffn_hidden_size) for _ in (0, 1)])
        self.input_layernorm = nn.ModuleList([RMSNorm(D, eps) for _ in (0, 1)])
        self.post_attention_layernorm = nn.ModuleList([RMSNorm(D, eps) for _ in (0, 1)])

    def forward(
        self,
        x_BTD: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: KVCache | None = None,
        routing: list[LayerRouting] | None = None,
    ) -> torch.Tensor:
        """x_BTD [B, T, D] -> [B, T, D].

        rope: (cos, sin) of the T positions from `LongcatFlash.rope_angles(position_ids)`.
        cache: the model's KVCache (attention block j uses slot 2 * layer_index + j).
        routing: if a list, this layer's LayerRouting is appended to it.
        """
        x = x_BTD
        x = x + self.self_attn[0](self.input_layernorm[0](x), rope, cache)
        u = self.post_attention_layernorm[0](x)
        if self.config.shortcut:
            moe_out = self.mlp(u, routing)
        x = x + self.mlps[0](u)
        x = x + self.self_attn[1](self.input_layernorm[1](x), rope, cache)
        v = self.post_attention_layernorm[1](x)
        if not self.config.shortcut:
            moe_out = self.mlp(v, routing)
        return x + self.mlps[1](v) + moe_out


class LongcatModel(nn.Module):
    """Embedding, the decoder layers and the final norm (the `model.` prefix of the state dict)."""

    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([DecoderLayer(config, i) for i in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config.qk_rope_head_dim, config.rope_theta)


@dataclass
class LongcatOutput:
    """logits [B, T, V]; loss (mean next-token cross entropy) when labels were given;
    cache (the KVCache passed in, now extended); routing (one LayerRouting per layer) when asked."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    cache: KVCache | None = None
    routing: list[LayerRouting] | None = None


class LongcatFlash(nn.Module):
    """LongCat-Flash causal LM with an untied lm_head.

    model = LongcatFlash(LongcatConfig.preset("tiny"), generator=torch.Generator().manual_seed(0))
    out = model(input_ids_BT)                        # out.logits [B, T, V]
    cache = model.new_cache(); model(prompt_BT, cache=cache); model(next_B1, cache=cache)
    """

    # closed-form counts (model/counting.py), also reachable as LongcatFlash.total_params(cfg)
    total_params = staticmethod(counting.total_params)
    activated_params = staticmethod(counting.activated_params)

    def __init__(self, config: LongcatConfig, generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.config = config
        self.model = LongcatModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.init_weights(generator)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """Normal(0, initializer_range) for matrices and embeddings, ones for norms, zeros for
        biases and the router's correction bias (transformers' initialisation)."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, std, generator=generator)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for layer in self.model.layers:
            # drawn as [N + Z, 2I, D] and cut to the N FFN experts: the same weights for a seed
            # as when the identity experts had (unused) rows too (transformers before 5.25)
            gate_up = layer.mlp.experts.gate_up_proj
            drawn = torch.empty(self.config.n_experts_total, *gate_up.shape[1:], dtype=gate_up.dtype)
            gate_up.copy_(nn.init.normal_(drawn, 0.0, std, generator=generator)[: gate_up.shape[0]])
            nn.init.normal_(layer.mlp.experts.down_proj, 0.0, std, generator=generator)
            nn.init.zeros_(layer.mlp.router.e_score_correction_bias)

    def new_cache(self) -> KVCache:
        return KVCache(self.config.num_attention_blocks)

    def rope_angles(self, position_ids_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin), each [B, T, R/2], for the given absolute positions."""
        return self.model.rotary_emb(position_ids_BT)

    def forward(
        self,
        input_ids: torch.Tensor,
        cache: KVCache | None = None,
        position_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_routing: bool = False,
        logits_to_keep: int = 0,
    ) -> LongcatOutput:
        """input_ids [B, T] int64 -> LongcatOutput (logits [B, T, V]).

        cache: a KVCache from `new_cache()`; the tokens continue after what it holds.
        position_ids [B or 1, T]: defaults to cache.seq_len + arange(T).
        labels [B, T]: next-token targets aligned with input_ids (shifted inside; -100 ignored).
        return_routing: also return each layer's LayerRouting (does not change the logits).
        logits_to_keep: n > 0 computes logits for the last n positions only (a serving
            prefill needs just the last one); 0 = all positions.
        All sequences of a batch have the same length (no padding mask).
        """
        B, T = input_ids.shape
        if position_ids is None:
            past = cache.seq_len if cache is not None else 0
            position_ids = torch.arange(past, past + T, device=input_ids.device)[None, :]
        rope = self.rope_angles(position_ids)
        routing: list[LayerRouting] | None = [] if return_routing else None

        x_BTD = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x_BTD = layer(x_BTD, rope, cache, routing)
        if logits_to_keep > 0:
            x_BTD = x_BTD[:, -logits_to_keep:]
        logits_BTV = self.lm_head(self.model.norm(x_BTD))

        loss = None
        if labels is not None:
            if logits_to_keep > 0:
                raise ValueError("labels need the logits of every position: pass logits_to_keep=0")
            loss = F.cross_entropy(
                logits_BTV[:, :-1].reshape(-1, logits_BTV.shape[-1]).float(),
                labels[:, 1:].reshape(-1),
                ignore_index=-100,
            )
        return LongcatOutput(logits=logits_BTV, loss=loss, cache=cache, routing=routing)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):  # type: ignore[override]
        """Load transformers' LongcatFlashForCausalLM layout (or the per-expert layout, converted).

        With strict=True a mismatch raises model.checkpoint.StateDictError listing every
        missing, unexpected and mis-shaped key.
        """
        from model.checkpoint import check_state_dict, to_stacked_experts

        state_dict = to_stacked_experts(state_dict, self.config)
        if strict:
            check_state_dict(self, state_dict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

