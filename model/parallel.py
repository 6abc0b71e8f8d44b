"""Expert parallelism for LongcatFlash, applied from outside to an already-built model.

Shape legend: B batch, T tokens per sequence, D hidden, K moe_topk, N FFN experts,
W ranks in the group, n = N / W experts per rank, M routed (token, FFN slot) rows.

`apply_expert_parallel(model, group, schedule)` changes a single-device `LongcatFlash` in place:
- FFN experts are sharded: rank r keeps experts [r*n, (r+1)*n) (its slices of the stacked
  `gate_up_proj` / `down_proj` become the parameters). Identity (zero-computation) experts are
  served on every rank: tokens routed to them never travel.
- Attention, dense MLPs, router, norms, embedding and head are replicated and data-parallel:
  every rank runs its own sequences. In training, `sync_dense_grads` averages their gradients.
- Each decoder layer's forward is replaced by one that moves routed rows with all-to-all-v
  (`all_to_all_single` with per-rank split sizes; the per-expert counts are exchanged first) and
  labels every sub-block with `torch.profiler.record_function("L{layer}/{block}")`,
  block in attn0 mlp0 router dispatch experts combine attn1 mlp1.

Schedules (the ScMoE layer of model/longcat.py; the arithmetic is the single-device layer's):
    sequential  attn0 | router | dispatch (wait) | experts | combine (wait) | mlp0 | attn1 | mlp1
    shortcut    attn0 | router | dispatch issued async | mlp0 | attn1 | dispatch wait | experts |
                combine issued async | mlp1 | combine wait + join
In `shortcut`, a label appears twice in a layer: once where the exchange is issued and once
where the rank waits for it. On gloo the transfer itself runs on gloo's worker thread
(`gloo:all_to_all` in the trace); on NCCL it runs on NCCL's stream and the wait only makes
the compute stream wait. `router` includes the post-attention norm that feeds the MoE;
`dispatch` includes the synchronous exchange of per-expert counts; `experts` includes the
identity experts' multiply; `combine` includes the scatter-add back to the tokens.
With `config.shortcut = False` (the MoE reads attention 1's output) only the combine can
overlap (with mlps[1]) under `shortcut`.

Backward (train): the transpose of each exchange is a synchronous all-to-all with the split
sizes swapped; expert gradients stay on the rank that owns the expert.

Only this module of model/ imports torch.distributed (see ../shared/DESIGN.md).
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn
from torch.profiler import record_function

from model.config import ConfigError
from model.moe import LayerRouting, grouped_expert_ffn

Schedule = Literal["sequential", "shortcut"]
SCHEDULES: tuple[str, ...] = ("sequential", "shortcut")
BLOCKS = ("attn0", "mlp0", "router", "dispatch", "experts", "combine", "attn1", "mlp1")


@dataclass
class ExpertParallel:
    """What apply_expert_parallel attached to the model (`model.expert_parallel`).

    records: set to a list to collect one dict per MoE forward (see `_record`); None = off.
    """

    group: Any
    rank: int
    world_size: int
    schedule: str
    experts_per_rank: int
    first_expert: int
    records: list[dict] | None = None
    dense_params: list[nn.Parameter] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# The exchange: all-to-all-v with an autograd transpose, issued async and waited on separately
# ---------------------------------------------------------------------------------------------


class _InFlight:
    """The Work handle of one issued exchange, passed from _ExchangeStart to _ExchangeWait."""

    work: Any = None


class _ExchangeStart(torch.autograd.Function):
    """Issue rows_MD → peers (send_splits rows to each rank), receive recv_splits rows from each.

    Returns the receive buffer, which is valid only after _ExchangeWait.
    """

    @staticmethod
    def forward(ctx, rows_MD, send_splits, recv_splits, group, in_flight):  # type: ignore[override]
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = rows_MD.new_empty(sum(recv_splits), rows_MD.shape[1])
        in_flight.work = dist.all_to_all_single(
            out, rows_MD.contiguous(), recv_splits, send_splits, group=group, async_op=True
        )
        return out

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_in = grad_out.new_empty(sum(ctx.send_splits), grad_out.shape[1])
        dist.all_to_all_single(grad_in, grad_out.contiguous(), ctx.send_splits, ctx.recv_splits, group=ctx.group)
        return grad_in, None, None, None, None


class _ExchangeWait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, in_flight):  # type: ignore[override]
        in_flight.work.wait()
        in_flight.work = None
        return out

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        return grad, None


def exchange_start(rows_MD: torch.Tensor, send_splits: list[int], recv_splits: list[int], group: Any) -> tuple[torch.Tensor, _InFlight]:
    """Issue an all-to-all-v of rows_MD asynchronously; returns (buffer, handle for exchange_wait)."""
    in_flight = _InFlight()
    return _ExchangeStart.apply(rows_MD, send_splits, recv_splits, group, in_flight), in_flight


def exchange_wait(buffer: torch.Tensor, in_flight: _InFlight) -> torch.Tensor:
    """Wait for the exchange that fills `buffer`; returns it (in the autograd graph)."""
    return _ExchangeWait.apply(buffer, in_flight)


# ---------------------------------------------------------------------------------------------
# The MoE split into its stages
# ---------------------------------------------------------------------------------------------


@dataclass
class _Dispatch:
    """State of one MoE forward between its stages (local tokens T, routed rows M)."""

    x_TD: torch.Tensor
    ids_TK: torch.Tensor
    weights_TK: torch.Tensor
    slot_M: torch.Tensor  # FFN slots in expert order (= the model's argsort order)
    token_M: torch.Tensor
    send_splits: list[int]
    recv_splits: list[int]
    recv_counts_Wn: torch.Tensor  # rows received from rank w for local expert e
    recv_MD: torch.Tensor | None = None
    in_flight: _InFlight | None = None


def _route_and_issue(layer: nn.Module, ep: ExpertParallel, x: torch.Tensor, norm: nn.Module,
                     routing: list | None) -> tuple[torch.Tensor, _Dispatch]:
    """Norm + router (`router`), then the counts exchange (synchronous) and the row exchange
    (issued async) (`dispatch`). Returns (the normed input u, the dispatch state)."""
    moe = layer.mlp
    N, W, n = moe.router.n_routed_experts, ep.world_size, ep.experts_per_rank
    with record_function(f"L{layer.layer_index}/router"):
        u = norm(x)
        x_TD = u.reshape(-1, u.shape[-1])
        ids_TK, weights_TK = moe.router(x_TD)
        if routing is not None:
            routing.append(LayerRouting.from_router(layer.layer_index, N, moe.n_experts_total, ids_TK, weights_TK))
    with record_function(f"L{layer.layer_index}/dispatch"):
        K = ids_TK.shape[1]
        ids_M = ids_TK.reshape(-1)
        order_M = torch.argsort(ids_M, stable=True)  # FFN slots first, grouped by expert
        counts_E = torch.bincount(ids_M, minlength=moe.n_experts_total)
        send_counts_N = counts_E[:N].contiguous()
        recv_counts_N = torch.empty_like(send_counts_N)
        dist.all_to_all_single(recv_counts_N, send_counts_N, group=ep.group)  # n counts per peer
        send_splits = send_counts_N.view(W, n).sum(1).tolist()
        recv_counts_Wn = recv_counts_N.view(W, n)
        recv_splits = recv_counts_Wn.sum(1).tolist()
        slot_M = order_M[: sum(send_splits)]
        token_M = slot_M // K
        state = _Dispatch(x_TD, ids_TK, weights_TK, slot_M, token_M, send_splits, recv_splits, recv_counts_Wn)
        state.recv_MD, state.in_flight = exchange_start(x_TD[token_M], send_splits, recv_splits, ep.group)
        if ep.records is not None:
            _record(ep, layer.layer_index, ids_TK, counts_E, N, send_splits, recv_splits)
    return u, state


def _wait_dispatch_and_compute(layer: nn.Module, ep: ExpertParallel, state: _Dispatch) -> tuple[torch.Tensor, torch.Tensor, _InFlight]:
    """Wait for the rows, run the local experts, issue the combine. Returns (identity part of
    the output [T, D], combine buffer, its handle)."""
    experts = layer.mlp.experts
    with record_function(f"L{layer.layer_index}/dispatch"):
        recv_MD = exchange_wait(state.recv_MD, state.in_flight)
    with record_function(f"L{layer.layer_index}/experts"):
        weights_TK = state.weights_TK.to(state.x_TD.dtype)
        is_identity_TK = state.ids_TK >= experts.n_routed_experts
        identity_TD = state.x_TD * (weights_TK * is_identity_TK).sum(dim=-1, keepdim=True)
        # Received rows are grouped by source rank, then by expert; group them by expert.
        n = ep.experts_per_rank
        expert_of_row = torch.repeat_interleave(
            torch.arange(n, device=recv_MD.device).repeat(ep.world_size), state.recv_counts_Wn.reshape(-1)
        )
        by_expert = torch.argsort(expert_of_row, stable=True)
        y_sorted = grouped_expert_ffn(
            recv_MD[by_expert], state.recv_counts_Wn.sum(0), experts.gate_up_proj, experts.down_proj
        )
        y_MD = y_sorted[torch.argsort(by_expert)]
    with record_function(f"L{layer.layer_index}/combine"):
        back_MD, in_flight = exchange_start(y_MD, state.recv_splits, state.send_splits, ep.group)
    return identity_TD, back_MD, in_flight


def _finish_combine(layer: nn.Module, state: _Dispatch, identity_TD: torch.Tensor, back_MD: torch.Tensor,
                    in_flight: _InFlight, shape: torch.Size) -> torch.Tensor:
    with record_function(f"L{layer.layer_index}/combine"):
        back_MD = exchange_wait(back_MD, in_flight)
        weights_M = state.weights_TK.to(state.x_TD.dtype).reshape(-1)[state.slot_M]
        return identity_TD.index_add(0, state.token_M, back_MD * weights_M[:, None]).view(shape)


def _record(ep: ExpertParallel, layer_index: int, ids_TK: torch.Tensor, counts_E: torch.Tensor, N: int,
            send_splits: list[int], recv_splits: list[int]) -> None:
    """One MoE forward on this rank: rows sent to / received from each peer, tokens per expert
    (FFN then zero experts, this rank's tokens), histogram of FFN experts per token (0..K)."""
    ffn_per_token_T = (ids_TK < N).sum(dim=-1)
    ep.records.append({
        "layer": layer_index,
        "tokens": int(ids_TK.shape[0]),
        "send_rows": list(send_splits),
        "recv_rows": list(recv_splits),
        "tokens_per_expert": counts_E.tolist(),
        "ffn_experts_per_token_hist": torch.bincount(ffn_per_token_T, minlength=ids_TK.shape[1] + 1).tolist(),
    })


# ---------------------------------------------------------------------------------------------
# The layer forward (replaces DecoderLayer.forward on each layer)
# ---------------------------------------------------------------------------------------------


def _ep_layer_forward(layer: nn.Module, x_BTD: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                      cache: Any = None, routing: list | None = None) -> torch.Tensor:
    """DecoderLayer.forward's arithmetic with the MoE expert-parallel; x_BTD [B, T, D] -> [B, T, D]."""
    ep: ExpertParallel = layer.expert_parallel
    i = layer.layer_index
    x = x_BTD
    with record_function(f"L{i}/attn0"):
        x = x + layer.self_attn[0](layer.input_layernorm[0](x), rope, cache)
    if not layer.config.shortcut:
        return _ep_layer_forward_no_shortcut(layer, ep, x, rope, cache, routing)
    u, state = _route_and_issue(layer, ep, x, layer.post_attention_layernorm[0], routing)
    if ep.schedule == "sequential":
        identity_TD, back_MD, in_flight = _wait_dispatch_and_compute(layer, ep, state)
        moe_out = _finish_combine(layer, state, identity_TD, back_MD, in_flight, u.shape)
    with record_function(f"L{i}/mlp0"):
        x = x + layer.mlps[0](u)
    with record_function(f"L{i}/attn1"):
        x = x + layer.self_attn[1](layer.input_layernorm[1](x), rope, cache)
    if ep.schedule == "shortcut":
        identity_TD, back_MD, in_flight = _wait_dispatch_and_compute(layer, ep, state)
    with record_function(f"L{i}/mlp1"):
        mlp1_out = layer.mlps[1](layer.post_attention_layernorm[1](x))
    if ep.schedule == "shortcut":
        moe_out = _finish_combine(layer, state, identity_TD, back_MD, in_flight, u.shape)
    return x + mlp1_out + moe_out


def _ep_layer_forward_no_shortcut(layer: nn.Module, ep: ExpertParallel, x: torch.Tensor, rope: Any,
                                  cache: Any, routing: list | None) -> torch.Tensor:
    """config.shortcut = False: the MoE reads v after attention 1; only mlps[1] can overlap
    the combine, so both schedules run the exchange in sequence except that one."""
    i = layer.layer_index
    with record_function(f"L{i}/mlp0"):
        x = x + layer.mlps[0](layer.post_attention_layernorm[0](x))
    with record_function(f"L{i}/attn1"):
        x = x + layer.self_attn[1](layer.input_layernorm[1](x), rope, cache)
    v, state = _route_and_issue(layer, ep, x, layer.post_attention_layernorm[1], routing)
    identity_TD, back_MD, in_flight = _wait_dispatch_and_compute(layer, ep, state)
    if ep.schedule == "sequential":
        moe_out = _finish_combine(layer, state, identity_TD, back_MD, in_flight, v.shape)
    with record_function(f"L{i}/mlp1"):
        mlp1_out = layer.mlps[1](v)
    if ep.schedule == "shortcut":
        moe_out = _finish_combine(layer, state, identity_TD, back_MD, in_flight, v.shape)
    return x + mlp1_out + moe_out


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


def apply_expert_parallel(model: nn.Module, group: Any = None, schedule: Schedule = "shortcut") -> nn.Module:
    """Shard `model`'s FFN experts over `group` (default: the world) and switch its layers to
    the expert-parallel forward with `schedule`. Returns the same model (changed in place).

    Every rank must pass a model with the same weights (build it from the same seed). Raises
    ConfigError when the experts do not split evenly or the schedule is unknown.
    """
    if schedule not in SCHEDULES:
        raise ConfigError(f"schedule: expected one of {', '.join(SCHEDULES)}, got {schedule!r}")
    world_size, rank = dist.get_world_size(group), dist.get_rank(group)
    N = model.config.n_routed_experts
    if N % world_size:
        raise ConfigError(
            f"n_routed_experts: {N} FFN experts do not split evenly over {world_size} expert-parallel ranks"
        )
    n = N // world_size
    ep = ExpertParallel(group, rank, world_size, schedule, n, rank * n)
    expert_params: set[int] = set()
    for layer in model.model.layers:
        experts = layer.mlp.experts
        with torch.no_grad():
            experts.gate_up_proj = nn.Parameter(experts.gate_up_proj[rank * n : (rank + 1) * n].clone())
            experts.down_proj = nn.Parameter(experts.down_proj[rank * n : (rank + 1) * n].clone())
        experts.first_expert = rank * n  # local expert e is global expert first_expert + e
        expert_params |= {id(experts.gate_up_proj), id(experts.down_proj)}
        layer.expert_parallel = ep
        layer.forward = types.MethodType(_ep_layer_forward, layer)
    ep.dense_params = [p for p in model.parameters() if id(p) not in expert_params]
    model.expert_parallel = ep
    return model


def sync_dense_grads(model: nn.Module) -> None:
    """Data-parallel gradient sync: sum the replicated parameters' gradients over the group
    (one flat all-reduce). With each rank's loss divided by the world size before backward,
    dense and expert gradients then equal the single-device gradients of the mean loss."""
    ep: ExpertParallel = model.expert_parallel
    params = [p for p in ep.dense_params if p.grad is not None]
    if ep.world_size == 1 or not params:
        return
    with record_function("grad_sync"):
        flat = torch.cat([p.grad.reshape(-1) for p in params])
        dist.all_reduce(flat, group=ep.group)
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
            offset += p.numel()
