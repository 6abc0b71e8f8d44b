"""Model architectures as the analytic workload generator sees them, and the baseline presets.

`MoeArch` is the small description the generator (simulator/workload.py) needs: sizes of the
attention (MLA or GQA), the dense MLPs, the routed / shared / zero experts and the layer
layout. LongCat-Flash comes from a `model.config.LongcatConfig` (`arch_from_longcat`); the
conventional-layer baselines are presets here, each figure checked against the model's
official `config.json` (cited next to it).

Layouts:
    shortcut      LongCat-Flash / ScMoE: per layer attn0, mlp0, attn1, mlp1 and one MoE that
                  reads mlp0's input; the MoE output joins at the end of the layer
    conventional  attn0 then MoE (DeepSeek-V3 style, shared expert beside the routed ones);
                  the first `first_k_dense` layers have a dense FFN instead of the MoE.
                  A LongCat config with `shortcut=False` keeps its two attention blocks and
                  dense MLPs but runs the MoE in sequence after attn1 (model/config.py).

Counting conventions (used by the generator; 1 multiply-add = 2 FLOPs):
    params        weight matrices + norm vectors; the embedding is not activated compute
    decode MLA    the absorbed form (SGLang / FlashMLA): the latent cache is read once per
                  head, kv_b_proj folded into q and the output (same FLOPs as its params)
    prefill       causal attention over a fresh prompt: query t attends to t keys
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from simulator.errors import SimulationError


@dataclass(frozen=True)
class MoeArch:
    name: str
    hidden_size: int
    num_layers: int
    vocab_size: int
    layout: Literal["shortcut", "conventional"]
    # attention
    attention: Literal["mla", "gqa"]
    num_attention_heads: int
    attn_blocks_per_layer: int = 1
    q_lora_rank: int = 0  # 0 = no q low-rank (plain q_proj)
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    num_key_value_heads: int = 0  # gqa
    head_dim: int = 0  # gqa
    # dense FFN: `dense_mlps_per_layer` SwiGLU MLPs in every layer (LongCat: 2), and a dense
    # FFN of `dense_ffn_hidden_size` replacing the MoE in the first `first_k_dense` layers
    ffn_hidden_size: int = 0
    dense_mlps_per_layer: int = 0
    first_k_dense: int = 0
    dense_ffn_hidden_size: int = 0
    # MoE
    n_routed_experts: int = 0
    expert_ffn_hidden_size: int = 0
    moe_topk: int = 0
    zero_expert_num: int = 0
    n_shared_experts: int = 0
    # MTP (speculative decoding draft module): one extra layer's attention + dense FFN
    mtp_layers: int = 1

    # ------------------------------------------------------------------ parameter counts
    def attn_params(self) -> int:
        """One attention block: projections and their norms."""
        h, nh = self.hidden_size, self.num_attention_heads
        if self.attention == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * nh * qk
            else:
                q = h * nh * qk
            kv_a = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank
            kv_b = self.kv_lora_rank * nh * (self.qk_nope_head_dim + self.v_head_dim)
            o = nh * self.v_head_dim * h
            return q + kv_a + kv_b + o
        hd, nkv = self.head_dim, self.num_key_value_heads
        return h * nh * hd + 2 * h * nkv * hd + nh * hd * h + 2 * hd  # + q/k norms (Qwen3)

    def mlp_params(self, ffn: int) -> int:
        return 3 * self.hidden_size * ffn

    def expert_params(self) -> int:
        return self.mlp_params(self.expert_ffn_hidden_size)

    def router_params(self) -> int:
        return self.hidden_size * (self.n_routed_experts + self.zero_expert_num)

    def is_moe_layer(self, layer: int) -> bool:
        return self.n_routed_experts > 0 and layer >= self.first_k_dense

    def layer_params(self, layer: int, ffn_experts: float | None = None) -> float:
        """Parameters of one layer; with `ffn_experts` given, the activated ones per token."""
        h = self.hidden_size
        norms = 2 * self.attn_blocks_per_layer * h
        p = self.attn_blocks_per_layer * self.attn_params() + norms
        p += self.dense_mlps_per_layer * self.mlp_params(self.ffn_hidden_size)
        if not self.is_moe_layer(layer):
            return p + self.mlp_params(self.dense_ffn_hidden_size)
        p += self.router_params() + self.n_shared_experts * self.expert_params()
        n = self.n_routed_experts if ffn_experts is None else ffn_experts
        return p + n * self.expert_params()

    def total_params(self) -> float:
        """All weights, embedding and lm_head included, MTP excluded."""
        body = sum(self.layer_params(i) for i in range(self.num_layers))
        return body + 2 * self.vocab_size * self.hidden_size + self.hidden_size

    def activated_params(self, ffn_experts_per_token: float) -> float:
        """Activated per token: lm_head counted, embedding not (the paper's convention)."""
        body = sum(self.layer_params(i, ffn_experts_per_token) for i in range(self.num_layers))
        return body + self.vocab_size * self.hidden_size + self.hidden_size

    def kv_cache_bytes_per_token(self, dtype_bytes: float = 2.0) -> float:
        """KV cache of one token over all attention blocks."""
        if self.attention == "mla":
            per_block = self.kv_lora_rank + self.qk_rope_head_dim
        else:
            per_block = 2 * self.num_key_value_heads * self.head_dim
        return per_block * dtype_bytes * self.attn_blocks_per_layer * self.num_layers

    # ------------------------------------------------------------------ attention FLOPs
    def attn_core_flops(self, queries: float, keys_per_query: float, absorbed: bool) -> float:
        """Score + value FLOPs of one attention block (projections excluded).

        queries: query positions; keys_per_query: mean keys each attends to.
        MLA absorbed (decode): scores over the latent (kv_lora + rope) and values in the
        latent (kv_lora); unabsorbed (prefill/train): per-head qk_dim and v_dim.
        """
        nh = self.num_attention_heads
        if self.attention == "mla":
            if absorbed:
                per = (2 * self.kv_lora_rank + self.qk_rope_head_dim)
            else:
                per = self.qk_nope_head_dim + self.qk_rope_head_dim + self.v_head_dim
        else:
            per = 2 * self.head_dim
        return 2.0 * nh * per * queries * keys_per_query


def arch_from_longcat(config: object) -> MoeArch:
    """The generator's view of a `model.config.LongcatConfig` (any preset, any scale)."""
    c = config
    return MoeArch(
        name="longcat-flash" if c.hidden_size == 6144 and c.num_layers == 28 else "longcat",
        hidden_size=c.hidden_size,
        num_layers=c.num_layers,
        vocab_size=c.vocab_size,
        layout="shortcut" if c.shortcut else "conventional",
        attention="mla",
        num_attention_heads=c.num_attention_heads,
        attn_blocks_per_layer=2,
        q_lora_rank=c.q_lora_rank,
        kv_lora_rank=c.kv_lora_rank,
        qk_nope_head_dim=c.qk_nope_head_dim,
        qk_rope_head_dim=c.qk_rope_head_dim,
        v_head_dim=c.v_head_dim,
        ffn_hidden_size=c.ffn_hidden_size,
        dense_mlps_per_layer=2,
        n_routed_experts=c.n_routed_experts,
        expert_ffn_hidden_size=c.expert_ffn_hidden_size,
        moe_topk=c.moe_topk,
        zero_expert_num=c.zero_expert_num,
    )


# DeepSeek-V3: deepseek-ai/DeepSeek-V3 config.json (model_type deepseek_v3; identical
# architecture block in deepseek-ai/DeepSeek-R1): hidden_size 7168, num_hidden_layers 61,
# first_k_dense_replace 3, intermediate_size 18432, num_attention_heads 128, q_lora_rank 1536,
# kv_lora_rank 512, qk_nope_head_dim 128, qk_rope_head_dim 64, v_head_dim 128,
# n_routed_experts 256, moe_intermediate_size 2048, n_shared_experts 1, num_experts_per_tok 8,
# vocab_size 129280, num_nextn_predict_layers 1. (Checked against copies of the hub file in
# public code, e.g. a DeepSeek-R1 config dict quoted verbatim in a vLLM-style test suite.)
DEEPSEEK_V3 = MoeArch(
    name="deepseek-v3", hidden_size=7168, num_layers=61, vocab_size=129280,
    layout="conventional", attention="mla", num_attention_heads=128,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    first_k_dense=3, dense_ffn_hidden_size=18432,
    n_routed_experts=256, expert_ffn_hidden_size=2048, moe_topk=8, n_shared_experts=1,
)

# Qwen3-235B-A22B: Qwen/Qwen3-235B-A22B config.json (model_type qwen3_moe): hidden_size 4096,
# num_hidden_layers 94, num_attention_heads 64, num_key_value_heads 4, head_dim 128,
# num_experts 128, moe_intermediate_size 1536, num_experts_per_tok 8, decoder_sparse_step 1,
# mlp_only_layers [] (every layer MoE, no shared expert), vocab_size 151936, q/k RMSNorm.
# (Checked against copies in public code: Megatron launch scripts and weight exporters.)
QWEN3_235B_A22B = MoeArch(
    name="qwen3-235b-a22b", hidden_size=4096, num_layers=94, vocab_size=151936,
    layout="conventional", attention="gqa", num_attention_heads=64,
    num_key_value_heads=4, head_dim=128,
    n_routed_experts=128, expert_ffn_hidden_size=1536, moe_topk=8, n_shared_experts=0,
    mtp_layers=0,
)

# Kimi-K2: moonshotai/Kimi-K2-Instruct config.json (model_type kimi_k2, DeepSeek-V3 layout):
# hidden_size 7168, num_hidden_layers 61, first_k_dense_replace 1, intermediate_size 18432,
# num_attention_heads 64, q_lora_rank 1536, kv_lora_rank 512, qk_nope 128, qk_rope 64,
# v_head_dim 128, n_routed_experts 384, moe_intermediate_size 2048, n_shared_experts 1,
# num_experts_per_tok 8, vocab_size 163840. (Checked against copies in public code.)
KIMI_K2 = MoeArch(
    name="kimi-k2", hidden_size=7168, num_layers=61, vocab_size=163840,
    layout="conventional", attention="mla", num_attention_heads=64,
    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    first_k_dense=1, dense_ffn_hidden_size=18432,
    n_routed_experts=384, expert_ffn_hidden_size=2048, moe_topk=8, n_shared_experts=1,
    mtp_layers=0,
)

# The ScMoE paper's setting (arXiv 2404.05019): a GPT-style MoE with MoE every other block,
# 8 experts (one per GPU), top-2, no zero experts. Sizes are ours (GPT-3 Medium-like: the
# paper's exact widths are not restated here); `scmoe_pair` gives the conventional and
# shortcut variants with the same parameter count.
SCMOE_GPT = MoeArch(
    name="scmoe-gpt", hidden_size=1024, num_layers=12, vocab_size=50257,
    layout="shortcut", attention="gqa", num_attention_heads=16, num_key_value_heads=16,
    head_dim=64, attn_blocks_per_layer=2, ffn_hidden_size=4096, dense_mlps_per_layer=1,
    n_routed_experts=8, expert_ffn_hidden_size=4096, moe_topk=2, mtp_layers=0,
)

BASELINES: dict[str, MoeArch] = {
    a.name: a for a in (DEEPSEEK_V3, QWEN3_235B_A22B, KIMI_K2, SCMOE_GPT)
}


def get_arch(preset: str, *, shortcut: bool | None = None) -> MoeArch:
    """`MoeArch` for a baseline name or a LongCat preset (model.config.PRESETS).

    shortcut: override the layout (True = shortcut / ScMoE, False = conventional).
    """
    if preset in BASELINES:
        arch = BASELINES[preset]
    else:
        from model.config import PRESETS, LongcatConfig

        if preset not in PRESETS:
            raise SimulationError(
                f"preset: unknown model {preset!r}; known: {', '.join([*PRESETS, *BASELINES])}"
            )
        arch = arch_from_longcat(LongcatConfig.preset(preset))
    if shortcut is not None:
        if shortcut and arch.attn_blocks_per_layer < 2:
            raise SimulationError(f"{arch.name}: a shortcut layout needs 2 attention blocks per layer")
        arch = replace(arch, layout="shortcut" if shortcut else "conventional")
    return arch
