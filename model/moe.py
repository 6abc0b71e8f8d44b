"""The MoE of a LongCat-Flash layer: router, FFN experts, identity (zero-computation) experts.

Shape legend: T tokens (batch x seq flattened), D hidden, K moe_topk, E = N + Z experts
(N FFN experts, then Z zero experts), I expert_ffn_hidden_size, M routed (token, slot) rows.

Routing rules (LongCat-Flash, transformers' LongcatFlashTopkRouter):
- logits = x @ classifier.T in fp32 over all E experts; scores = softmax(logits).
- the K experts are chosen on scores + e_score_correction_bias; the bias changes which
  experts are chosen, never the weights.
- weight of a chosen expert = its score * routed_scaling_factor (no renormalisation).
- ids >= N are identity experts: their output is x * weight, no FLOPs, no communication.
MoE(x) = sum over the K chosen experts of weight * expert(x).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.config import LongcatConfig


class Router(nn.Module):
    """Top-k router over FFN + zero experts.

    forward(x_TD) -> (ids_TK int64, weights_TK fp32). Set `keep_scores = True` to also keep
    the last call's `last_logits_TE` and `last_scores_TE` (fp32, still in the autograd graph)
    on the module, for balance losses and routing statistics.
    """

    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        self.top_k = config.moe_topk
        self.n_routed_experts = config.n_routed_experts
        self.routed_scaling_factor = config.routed_scaling_factor
        self.classifier = nn.Linear(config.hidden_size, config.n_experts_total, bias=False)
        self.register_buffer("e_score_correction_bias", torch.zeros(config.n_experts_total))
        self.keep_scores = False
        self.last_logits_TE: torch.Tensor | None = None
        self.last_scores_TE: torch.Tensor | None = None

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # The router is computed in fp32 even under autocast (which would run this linear in
        # bf16 despite the casts): selection is sensitive to tiny score differences.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.classifier.weight.float())
        scores_TE = logits_TE.softmax(dim=-1)
        with torch.no_grad():  # selection only: the bias never reaches the weights
            _, ids_TK = torch.topk(scores_TE + self.e_score_correction_bias, self.top_k, dim=-1)
        weights_TK = scores_TE.gather(1, ids_TK) * self.routed_scaling_factor
        if self.keep_scores:
            self.last_logits_TE, self.last_scores_TE = logits_TE, scores_TE
        return ids_TK, weights_TK


def grouped_expert_ffn(
    x_MD: torch.Tensor,
    tokens_per_expert: torch.Tensor | list[int],
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> torch.Tensor:
    """Unweighted SwiGLU outputs of a group of FFN experts, one matmul pair per expert.

    x_MD: rows already sorted by expert: the first tokens_per_expert[0] rows go to expert 0
          of the passed weights, the next ones to expert 1, ...
    tokens_per_expert: [E'] row counts (sum = M) for the E' experts whose weights are passed.
    gate_up_proj: [E', 2I, D], gate rows first; down_proj: [E', D, I]. Slices of the stacked
          weights (`experts.gate_up_proj[lo:hi]`) are fine: expert parallelism calls it so.
    Returns y_MD = down(silu(gate x) * up x) per row, in the same row order.
    """
    counts = tokens_per_expert.tolist() if isinstance(tokens_per_expert, torch.Tensor) else list(tokens_per_expert)
    if len(counts) != down_proj.shape[0] or gate_up_proj.shape[0] < down_proj.shape[0]:
        raise ValueError(
            f"grouped_expert_ffn: {len(counts)} counts for gate_up_proj {tuple(gate_up_proj.shape)} "
            f"and down_proj {tuple(down_proj.shape)}"
        )
    if sum(counts) != x_MD.shape[0]:
        raise ValueError(f"grouped_expert_ffn: counts sum to {sum(counts)}, x has {x_MD.shape[0]} rows")
    inter = down_proj.shape[2]
    # Split and unbind once: indexing x_MD[a:b] or gate_up_proj[e] per expert would make
    # autograd build one full-size zero gradient per expert; split/unbind backward is one cat.
    gate_up_EFD, down_EDI = gate_up_proj.unbind(0), down_proj.unbind(0)
    outputs = []
    for e, x_nD in enumerate(x_MD.split(counts)):  # a loop over experts, never over tokens
        if x_nD.shape[0] == 0:
            continue
        gate_nI, up_nI = F.linear(x_nD, gate_up_EFD[e]).split(inter, dim=-1)
        outputs.append(F.linear(F.silu(gate_nI) * up_nI, down_EDI[e]))
    if not outputs:
        return x_MD.new_zeros(0, down_proj.shape[1])
    return torch.cat(outputs) if len(outputs) > 1 else outputs[0]


class Experts(nn.Module):
    """N stacked SwiGLU FFN experts plus Z identity experts.

    Parameters follow transformers' layout (5.25 on): gate_up_proj [N, 2I, D], down_proj
    [N, D, I]; identity experts own no weights.
    """

    def __init__(self, config: LongcatConfig) -> None:
        super().__init__()
        self.n_routed_experts = config.n_routed_experts
        self.zero_expert_num = config.zero_expert_num
        N, I, D = config.n_routed_experts, config.expert_ffn_hidden_size, config.hidden_size
        self.gate_up_proj = nn.Parameter(torch.empty(N, 2 * I, D))
        self.down_proj = nn.Parameter(torch.empty(N, D, I))

    def forward(self, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
        """sum_k weights_TK[t, k] * expert_{ids_TK[t, k]}(x_TD[t]) -> [T, D].

        Tokens are grouped by expert with one argsort; identity experts are one multiply.
        """
        T, K = ids_TK.shape
        N = self.n_routed_experts
        weights_TK = weights_TK.to(x_TD.dtype)
        is_identity_TK = ids_TK >= N
        # Identity experts: x * (sum of the weights of the identity experts a token chose).
        y_TD = x_TD * (weights_TK * is_identity_TK).sum(dim=-1, keepdim=True)

        ids_M = ids_TK.reshape(-1)
        order_M = torch.argsort(ids_M, stable=True)  # FFN slots first (ids < N), grouped by expert
        tokens_per_expert_N = torch.bincount(ids_M, minlength=N + self.zero_expert_num)[:N]
        n_ffn = int(tokens_per_expert_N.sum())
        if n_ffn == 0:
            return y_TD
        slot_M = order_M[:n_ffn]
        token_M = slot_M // K
        out_MD = grouped_expert_ffn(
            x_TD.index_select(0, token_M), tokens_per_expert_N, self.gate_up_proj, self.down_proj
        )
        out_MD = out_MD * weights_TK.reshape(-1).index_select(0, slot_M)[:, None]
        return y_TD.index_add(0, token_M, out_MD)


@dataclass
class LayerRouting:
    """What one layer's router decided for the T tokens of a forward (all tensors detached, CPU).

    expert_ids [T, K] int64 (>= n_routed_experts = identity expert), weights [T, K] fp32,
    ffn_experts_per_token [T] int64 (0..K), tokens_per_expert [N + Z] int64 (FFN then zero experts).
    Tokens are in (batch, seq) row-major order.
    """

    layer: int
    n_routed_experts: int
    expert_ids: torch.Tensor
    weights: torch.Tensor
    ffn_experts_per_token: torch.Tensor
    tokens_per_expert: torch.Tensor

    @classmethod
    def from_router(cls, layer: int, n_routed_experts: int, n_experts_total: int,
                    ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> "LayerRouting":
        ids = ids_TK.detach().cpu()
        return cls(
            layer=layer,
            n_routed_experts=n_routed_experts,
            expert_ids=ids,
            weights=weights_TK.detach().float().cpu(),
            ffn_experts_per_token=(ids < n_routed_experts).sum(dim=-1),
            tokens_per_expert=torch.bincount(ids.reshape(-1), minlength=n_experts_total),
        )


class MoE(nn.Module):
    """Router + experts of layer `layer_index`. forward(x [..., D], routing=None) -> [..., D].

    If `routing` (a list) is given, the layer's LayerRouting is appended to it; the output
    does not depend on it.
    """

    def __init__(self, config: LongcatConfig, layer_index: int) -> None:
        super().__init__()
        self.layer_index = layer_index
        self.n_experts_total = config.n_experts_total
        self.router = Router(config)
        self.experts = Experts(config)

    def forward(self, x: torch.Tensor, routing: list[LayerRouting] | None = None) -> torch.Tensor:
        x_TD = x.reshape(-1, x.shape[-1])
        ids_TK, weights_TK = self.router(x_TD)
        if routing is not None:
            routing.append(LayerRouting.from_router(
                self.layer_index, self.router.n_routed_experts, self.n_experts_total, ids_TK, weights_TK))
        return self.experts(x_TD, ids_TK, weights_TK).view_as(x)


def reference_moe(experts: Experts, x_TD: torch.Tensor, ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> torch.Tensor:
    """Slow, obviously-correct MoE: a Python loop over tokens and their K slots (tests only)."""
    N, I = experts.n_routed_experts, experts.down_proj.shape[2]
    y_TD = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(ids_TK.shape[1]):
            e, w = int(ids_TK[t, k]), weights_TK[t, k].to(x_TD.dtype)
            if e >= N:
                y_TD[t] += w * x_TD[t]
                continue
            gate = experts.gate_up_proj[e, :I] @ x_TD[t]
            up = experts.gate_up_proj[e, I:] @ x_TD[t]
            y_TD[t] += w * (experts.down_proj[e] @ (F.silu(gate) * up))
    return y_TD
