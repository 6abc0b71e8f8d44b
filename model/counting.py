"""Parameters, FLOPs and bytes of LongCat-Flash, per sub-block, in closed form.

Sub-blocks of layer i (the labels of DESIGN.md): attn0, mlp0, router, experts, attn1, mlp1;
outside the layers: embed and head (final norm + lm_head).

Conventions
- FLOPs are matmul FLOPs (2 * m * n * k), the quantity torch's FlopCounterMode counts;
  norms, softmax, activations and routing bookkeeping are left out.
- `attention="causal"` counts the query/key pairs a causal mask keeps; `"full"` counts the
  T x S rectangle an unmasked kernel computes (what FlopCounterMode reports for our model).
- MLA runs expanded (kv_b_proj applied to every key) when nothing is cached, and absorbed
  (kv_b_proj folded into q and the output; attention over the latents) when the call
  continues a cache; model/attention.py does the same, so counts match the executed model.
- bytes: weight_bytes = weights read once per step (experts: only the experts that got
  tokens); activation_bytes = the block's input and output plus intermediates written and
  read once; kv_cache_bytes = latents read (context) + written (new tokens).
- training = forward + backward: backward matmul FLOPs are 2x forward (input and weight
  gradients); bytes: weights read twice + gradients written, activations 3x.
- Parameters: identity experts own no weights. The router's correction bias is a buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from model.config import LongcatConfig

BLOCKS = ("attn0", "mlp0", "router", "experts", "attn1", "mlp1")
Mode = Literal["prefill", "decode", "train"]


# --------------------------------------------------------------------------- parameters
def attention_block_params(c: LongcatConfig) -> int:
    """Parameters of one MLA block (projections, latent norms, biases if any)."""
    D, H = c.hidden_size, c.num_attention_heads
    n = D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim
    n += D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank
    n += c.kv_lora_rank * H * (c.qk_nope_head_dim + c.v_head_dim) + H * c.v_head_dim * D
    if c.attention_bias:
        n += c.q_lora_rank + c.kv_lora_rank + c.qk_rope_head_dim + D
    return n


def dense_mlp_params(c: LongcatConfig) -> int:
    return 3 * c.hidden_size * c.ffn_hidden_size


def expert_params(c: LongcatConfig) -> int:
    """One FFN expert (gate, up, down)."""
    return 3 * c.hidden_size * c.expert_ffn_hidden_size


def router_params(c: LongcatConfig) -> int:
    return c.hidden_size * c.n_experts_total


def layer_params_without_experts(c: LongcatConfig) -> int:
    """Everything in a layer every token uses: 2 MLA, 2 dense MLPs, 4 norms, the router."""
    return 2 * attention_block_params(c) + 2 * dense_mlp_params(c) + 4 * c.hidden_size + router_params(c)


def total_params(c: LongcatConfig) -> int:
    """All parameters: embedding, layers (all FFN experts), final norm, untied lm_head. No MTP."""
    per_layer = layer_params_without_experts(c) + c.n_routed_experts * expert_params(c)
    return c.num_layers * per_layer + 2 * c.vocab_size * c.hidden_size + c.hidden_size


def activated_params(c: LongcatConfig, ffn_experts_per_token: float) -> float:
    """Parameters one token uses with `ffn_experts_per_token` FFN experts in every layer.

    lm_head and the final norm counted, the embedding (a lookup) not.
    """
    if not 0 <= ffn_experts_per_token <= c.moe_topk:
        raise ValueError(f"ffn_experts_per_token: expected 0..{c.moe_topk}, got {ffn_experts_per_token}")
    per_layer = layer_params_without_experts(c) + ffn_experts_per_token * expert_params(c)
    return c.num_layers * per_layer + c.vocab_size * c.hidden_size + c.hidden_size


def expected_ffn_experts_per_token(c: LongcatConfig) -> float:
    """K * N / (N + Z): the mean under uniform routing (and with no zero experts, K)."""
    return c.moe_topk * c.n_routed_experts / c.n_experts_total


def kv_cache_bytes_per_token(c: LongcatConfig, dtype_bytes: int = 2) -> int:
    """Compressed MLA cache over all 2 * num_layers attention blocks: (C + R) per block."""
    return c.num_attention_blocks * (c.kv_lora_rank + c.qk_rope_head_dim) * dtype_bytes


# --------------------------------------------------------------------------- costs
@dataclass
class BlockCost:
    flops: float = 0.0
    weight_bytes: float = 0.0
    activation_bytes: float = 0.0
    kv_cache_bytes: float = 0.0

    def __add__(self, other: "BlockCost") -> "BlockCost":
        return BlockCost(
            self.flops + other.flops,
            self.weight_bytes + other.weight_bytes,
            self.activation_bytes + other.activation_bytes,
            self.kv_cache_bytes + other.kv_cache_bytes,
        )

    @property
    def bytes(self) -> float:
        return self.weight_bytes + self.activation_bytes + self.kv_cache_bytes


def _attention_pairs(T: int, P: int, attention: str) -> float:
    """Query/key pairs per sequence and head: T new queries after P cached keys."""
    if attention == "full":
        return T * (P + T)
    return T * P + T * (T + 1) / 2


def attention_cost(c: LongcatConfig, B: int, T: int, P: int, attention: str, dtype_bytes: int) -> BlockCost:
    """One MLA block over B sequences of T new tokens after P cached tokens (forward)."""
    D, H, Q, C, R = c.hidden_size, c.num_attention_heads, c.q_lora_rank, c.kv_lora_rank, c.qk_rope_head_dim
    N, V = c.qk_nope_head_dim, c.v_head_dim
    S, tokens = P + T, B * T
    pairs = B * _attention_pairs(T, P, attention)
    proj = 2 * tokens * (D * Q + Q * H * (N + R) + D * (C + R) + H * V * D)
    if P == 0:  # expanded: k_nope, v for every key, attention in head space
        core = 2 * B * S * C * H * (N + V) + 2 * H * pairs * (N + R + V)
        inter = B * S * H * (N + R + V) + tokens * H * (N + R + V)
    else:  # absorbed: attention over the latents
        core = 2 * tokens * H * N * C + 2 * H * pairs * (C + R + C) + 2 * tokens * H * C * V
        inter = 2 * tokens * H * C + tokens * H * (N + R + V)
    act = (2 * tokens * D + tokens * (Q + C + R) + 2 * inter + H * pairs) * dtype_bytes
    return BlockCost(
        flops=proj + core,
        weight_bytes=attention_block_params(c) * dtype_bytes,
        activation_bytes=act,
        kv_cache_bytes=B * (P + T) * (C + R) * dtype_bytes,
    )


def dense_mlp_cost(c: LongcatConfig, tokens: int, dtype_bytes: int) -> BlockCost:
    D, F = c.hidden_size, c.ffn_hidden_size
    return BlockCost(
        flops=2 * tokens * 3 * D * F,
        weight_bytes=dense_mlp_params(c) * dtype_bytes,
        activation_bytes=(2 * tokens * D + 3 * tokens * F) * dtype_bytes,
    )


def router_cost(c: LongcatConfig, tokens: int, dtype_bytes: int) -> BlockCost:
    """fp32 classifier: weights and logits are 4 bytes whatever the model dtype."""
    E = c.n_experts_total
    return BlockCost(
        flops=2 * tokens * c.hidden_size * E,
        weight_bytes=router_params(c) * 4,
        activation_bytes=tokens * c.hidden_size * dtype_bytes + 2 * tokens * E * 4 + 2 * tokens * c.moe_topk * 8,
    )


def experts_cost(
    c: LongcatConfig,
    tokens: int,
    ffn_experts_per_token: float,
    dtype_bytes: int,
    tokens_per_expert: Sequence[int] | None = None,
) -> BlockCost:
    """FFN experts (identity experts cost no FLOPs: one multiply-add, counted as activation traffic)."""
    D, I, N = c.hidden_size, c.expert_ffn_hidden_size, c.n_routed_experts
    rows = tokens * ffn_experts_per_token  # (token, FFN expert) pairs
    if tokens_per_expert is not None:
        experts_hit = sum(1 for n in list(tokens_per_expert)[:N] if n > 0)
    else:  # expected distinct experts when each of `rows` picks uniformly
        experts_hit = N * (1 - (1 - 1 / N) ** rows) if rows else 0.0
    return BlockCost(
        flops=2 * rows * 3 * D * I,
        weight_bytes=experts_hit * expert_params(c) * dtype_bytes,
        activation_bytes=(2 * rows * D + 3 * rows * I + 2 * tokens * D) * dtype_bytes,
    )


def layer_costs(
    c: LongcatConfig,
    *,
    batch_size: int,
    new_tokens: int,
    context_len: int = 0,
    ffn_experts_per_token: float | None = None,
    tokens_per_expert: Sequence[int] | None = None,
    attention: Literal["causal", "full"] = "causal",
    dtype_bytes: int = 2,
) -> dict[str, BlockCost]:
    """Forward costs of one layer's six sub-blocks, keyed by BLOCKS.

    batch_size sequences of new_tokens tokens each, after context_len cached tokens.
    ffn_experts_per_token: mean over tokens (default: uniform routing, K * N / (N + Z)),
    or derived from tokens_per_expert (counts over FFN then zero experts) when given.
    """
    tokens = batch_size * new_tokens
    if tokens_per_expert is not None and ffn_experts_per_token is None:
        ffn_experts_per_token = sum(list(tokens_per_expert)[: c.n_routed_experts]) / max(tokens, 1)
    if ffn_experts_per_token is None:
        ffn_experts_per_token = expected_ffn_experts_per_token(c)
    attn = attention_cost(c, batch_size, new_tokens, context_len, attention, dtype_bytes)
    mlp = dense_mlp_cost(c, tokens, dtype_bytes)
    return {
        "attn0": attn,
        "mlp0": mlp,
        "router": router_cost(c, tokens, dtype_bytes),
        "experts": experts_cost(c, tokens, ffn_experts_per_token, dtype_bytes, tokens_per_expert),
        "attn1": attn,
        "mlp1": mlp,
    }


def head_cost(c: LongcatConfig, tokens: int, dtype_bytes: int = 2) -> BlockCost:
    """Final norm + lm_head."""
    return BlockCost(
        flops=2 * tokens * c.hidden_size * c.vocab_size,
        weight_bytes=(c.vocab_size + 1) * c.hidden_size * dtype_bytes,
        activation_bytes=(tokens * c.hidden_size * 2 + tokens * c.vocab_size) * dtype_bytes,
    )


def _train(cost: BlockCost) -> BlockCost:
    return BlockCost(3 * cost.flops, 3 * cost.weight_bytes, 3 * cost.activation_bytes, cost.kv_cache_bytes)


def step_costs(
    c: LongcatConfig,
    *,
    mode: Mode,
    batch_size: int,
    seq_len: int,
    context_len: int = 0,
    ffn_experts_per_token: float | Sequence[float] | None = None,
    tokens_per_expert: Sequence[Sequence[int]] | None = None,
    attention: Literal["causal", "full"] = "causal",
    dtype_bytes: int = 2,
) -> dict[str, BlockCost]:
    """Costs of one step, keyed `L{i}/{block}` plus `embed` and `head`.

    prefill: batch_size sequences of seq_len tokens after context_len cached ones.
    decode:  the same formula; seq_len is the tokens per sequence per step (usually 1) and
             context_len the cached context.
    train:   forward + backward of a prefill of batch_size x seq_len (context_len ignored).
    ffn_experts_per_token: one mean for every layer, or one per layer; tokens_per_expert:
    one count list per layer (e.g. LayerRouting.tokens_per_expert of a real forward).
    """
    if mode not in ("prefill", "decode", "train"):
        raise ValueError(f"mode: expected prefill, decode or train, got {mode!r}")
    if mode == "train":
        context_len = 0
    tokens = batch_size * seq_len
    out: dict[str, BlockCost] = {
        "embed": BlockCost(activation_bytes=tokens * c.hidden_size * dtype_bytes,
                           weight_bytes=tokens * c.hidden_size * dtype_bytes)
    }
    for i in range(c.num_layers):
        k_e = ffn_experts_per_token[i] if isinstance(ffn_experts_per_token, Sequence) else ffn_experts_per_token
        tpe = tokens_per_expert[i] if tokens_per_expert is not None else None
        blocks = layer_costs(
            c, batch_size=batch_size, new_tokens=seq_len, context_len=context_len,
            ffn_experts_per_token=k_e, tokens_per_expert=tpe, attention=attention, dtype_bytes=dtype_bytes,
        )
        for name, cost in blocks.items():
            out[f"L{i}/{name}"] = _train(cost) if mode == "train" else cost
    head = head_cost(c, tokens, dtype_bytes)
    out["head"] = _train(head) if mode == "train" else head
    return out


def total_cost(costs: dict[str, BlockCost]) -> BlockCost:
    total = BlockCost()
    for cost in costs.values():
        total = total + cost
    return total


def flops_per_token(
    c: LongcatConfig,
    *,
    ffn_experts_per_token: float | None = None,
    context_len: int = 0,
    mode: Mode = "decode",
) -> float:
    """Forward (or train) FLOPs of one token at position context_len (decode: one new token)."""
    costs = step_costs(c, mode=mode, batch_size=1, seq_len=1, context_len=context_len,
                       ffn_experts_per_token=ffn_experts_per_token)
    return total_cost(costs).flops
