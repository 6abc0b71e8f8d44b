"""Analytic workloads: a model + a parallel plan → the normalized op graph of one step, per rank.

    generate(arch, plan, rng) -> Workload          (ops table + routing statistics)
    build_workload(config, plan, rng) -> pa.Table  (the ops table alone)

The table has the schema of traces/schema.py and the labels parsed traces carry
(`L{i}/{attn0,mlp0,router,dispatch,experts,combine,attn1,mlp1}`, `head`, `mtp`,
`optimizer`), so the simulator replays it like a trace. Compute ops carry FLOPs and bytes
and `dur_us = 0`: the simulator prices them on its cluster. Lanes per rank:
`gpu:{r}/compute`, `gpu:{r}/comm` (expert-parallel all-to-alls, TP all-reduces, gradient
all-reduces) and `gpu:{r}/p2p` (pipeline sends/receives).

Routing at scale lives in simulator/expert_routing.py (re-exported here): per-token FFN
expert counts from a distribution (default mean 8 of 12, std 3), expert choice uniform / Zipf
/ replayed, identity experts never sent; per-rank expert loads and all-to-all-v splits follow
from the draw, so load imbalance makes stragglers.

Schedules (per layer, per micro-batch; the deps are data dependencies, the lane order is
the schedule):
    sequential  every op waits for the previous one: nothing overlaps
    sbo         one batch; comm on its own lane: dispatch ∥ mlp0 + attn1 projections,
                experts, combine ∥ attn1 core + o_proj + mlp1 (shortcut layout); the
                conventional layout overlaps only its shared expert with the dispatch
    tbo         two micro-batches of half the batch, interleaved: one's all-to-all runs
                under the other's compute (DeepSeek-V3 serving)
Training: forward then backward per micro-batch (GPipe over `pp` stages, send/recv between
stages); backward ops are the forward graph reversed (backward of dispatch = an all-to-all
in the combine direction and vice versa), with 2x the forward FLOPs; one gradient
all-reduce per layer over the stage's data-parallel ranks on the comm lane (DDP buckets).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pyarrow as pa

from simulator.baselines import MoeArch, arch_from_longcat
from simulator.errors import SimulationError
from simulator.expert_routing import (  # noqa: F401  (re-exported: the routing half of the generator)
    EXACT_TOKENS_PER_RANK,
    LayerRouting,
    RoutingSpec,
    beta_binomial_probs,
    draw_experts,
    expert_distribution,
    k_distribution,
    route_layer,
)
from traces.schema import SCHEMA

Mode = Literal["prefill", "decode", "train"]
Schedule = Literal["sequential", "tbo", "sbo"]

# ----------------------------------------------------------------------------- the plan
@dataclass
class ParallelPlan:
    """One deployment / training step. Units: tokens, sequences, bytes."""

    gpus: int
    mode: Mode = "decode"
    batch_per_gpu: int = 1  # decode: concurrent sequences per GPU; prefill/train: sequences per GPU
    context: int = 4096  # decode: cached tokens per sequence; prefill/train: sequence length
    schedule: Schedule = "sbo"
    ep: int = 0  # expert-parallel group size; 0 = all GPUs of a pipeline stage
    tp: int = 1  # attention tensor parallelism inside the data-parallel attention
    pp: int = 1  # pipeline stages (training)
    micro_batches: int = 0  # training: per step (0 = 2 * pp); tbo inference: always 2
    mtp: bool = False  # decode: one MTP draft token verified per step
    mtp_accept: float = 0.0  # acceptance rate of the draft token
    node_size: int = 8
    weight_bytes: float = 2.0  # per parameter (BF16)
    dispatch_bytes: float = 0.0  # per hidden element on the wire; 0 = auto: FP8 (1, DeepEP)
    # where the GPU has FP8, else 2 (whatif resolves it from the cluster; generate() alone: 1)
    combine_bytes: float = 2.0  # BF16 combine
    routing: RoutingSpec = field(default_factory=RoutingSpec)
    ep_experts: int = 0  # set by validate(): the model's FFN expert count (caps the default EP)

    def validate(self, arch: MoeArch) -> None:
        """Raise SimulationError naming the field when the plan cannot run `arch`."""
        def bad(msg: str) -> None:
            raise SimulationError(f"plan: {msg}")

        for name in ("gpus", "batch_per_gpu", "context", "tp", "pp", "node_size"):
            if getattr(self, name) <= 0:
                bad(f"{name} must be positive, got {getattr(self, name)}")
        if self.mode not in ("prefill", "decode", "train"):
            bad(f"mode {self.mode!r}: expected prefill, decode or train")
        if self.schedule not in ("sequential", "tbo", "sbo"):
            bad(f"schedule {self.schedule!r}: expected sequential, tbo or sbo")
        if self.gpus % self.node_size and self.gpus > self.node_size:
            bad(f"gpus {self.gpus} is not a multiple of the node size {self.node_size}")
        if self.gpus % self.pp:
            bad(f"gpus {self.gpus} not divisible by pp {self.pp}")
        if self.pp > 1 and self.mode != "train":
            bad("pipeline stages (pp > 1) are modelled for training only")
        if self.pp > arch.num_layers:
            bad(f"pp {self.pp} exceeds the {arch.num_layers} layers")
        stage = self.gpus // self.pp
        self.ep_experts = arch.n_routed_experts
        ep = self.ep_size
        if stage % ep:
            bad(f"ep {ep} does not divide the {stage} GPUs of a stage")
        if arch.n_routed_experts % ep:
            bad(f"ep {ep} does not divide the {arch.n_routed_experts} FFN experts of {arch.name}")
        if stage % self.tp:
            bad(f"tp {self.tp} does not divide the {stage} GPUs of a stage")
        if self.schedule == "tbo" and self.mode == "decode" and self.batch_per_gpu < 2:
            bad("tbo splits the batch in two micro-batches: batch_per_gpu must be >= 2")
        # (prefill TBO with one sequence splits its tokens: half the tokens, half the pairs each)
        if self.mode == "train" and self.batch_per_gpu % self.n_micro:
            bad(f"batch_per_gpu {self.batch_per_gpu} not divisible by {self.n_micro} micro-batches")
        if not 0.0 <= self.mtp_accept <= 1.0:
            bad(f"mtp_accept must be in [0, 1], got {self.mtp_accept}")
        if self.mtp and self.mode != "decode":
            bad("mtp applies to decode only")
        if self.mtp and arch.mtp_layers < 1:
            bad(f"{arch.name} has no MTP module")

    @property
    def ep_size(self) -> int:
        """Explicit `ep`, else the stage's GPUs, capped at the FFN expert count (beyond it
        the experts are replicated in EP groups of that size)."""
        stage = self.gpus // self.pp
        if self.ep:
            return self.ep
        if self.ep_experts and stage > self.ep_experts and stage % self.ep_experts == 0:
            return self.ep_experts
        return stage

    @property
    def n_micro(self) -> int:
        if self.mode == "train":
            return self.micro_batches or 2 * self.pp
        return 2 if self.schedule == "tbo" else 1

    @property
    def tokens_per_seq_step(self) -> int:
        """New positions per sequence in one step: decode 1 (2 with an MTP draft), else context."""
        if self.mode == "decode":
            return 2 if self.mtp else 1
        return self.context

    @property
    def accepted_tokens_per_seq_step(self) -> float:
        return 1.0 + (self.mtp_accept if self.mtp else 0.0)


# ----------------------------------------------------------------------------- op costs
@dataclass
class Cost:
    flops: float
    bytes: float

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


class BlockCosts:
    """FLOPs (matmul, 2 per multiply-add; model/counting.py's convention) and bytes of the
    blocks of `arch` for U sequences of T new tokens after P cached ones on one rank."""

    def __init__(self, arch: MoeArch, plan: ParallelPlan, seqs: float):
        self.a, self.plan = arch, plan
        self.U = seqs
        self.T = plan.tokens_per_seq_step
        self.P = plan.context if plan.mode == "decode" else 0
        self.tokens = seqs * self.T
        self.wb = plan.weight_bytes
        self.act = 2.0  # activation bytes per element (BF16)

    def _io(self, width_in: float, width_out: float) -> float:
        return self.tokens * (width_in + width_out) * self.act

    def attention(self, part: Literal["proj", "core", "out"]) -> Cost:
        """One attention block in three kernels: projections (q, kv; with the absorbed MLA
        decode also W_uk), the core over the cache (scores + values), the output (o_proj;
        absorbed MLA also W_uv). TP: the group's tokens, 1/tp of the heads and weights."""
        a, tp = self.a, self.plan.tp
        h, nh = a.hidden_size, a.num_attention_heads
        tokens_g = self.tokens * tp  # the TP group's tokens, 1/tp of the heads each
        pairs = self.U * tp * (self.T * self.P + self.T * (self.T + 1) / 2)
        absorbed = self.P > 0
        if a.attention == "mla":
            C, R, N, V, Q = a.kv_lora_rank, a.qk_rope_head_dim, a.qk_nope_head_dim, a.v_head_dim, a.q_lora_rank
            q_w = (h * Q + Q * nh * (N + R)) if Q else h * nh * (N + R)
            kva_w = h * (C + R)
            kvb_k, kvb_v = C * nh * N, C * nh * V
            o_w = nh * V * h
            if absorbed:  # kv_b folded into q (W_uk) and the output (W_uv)
                proj_w, out_w = q_w + kva_w + kvb_k, kvb_v + o_w
            else:  # expanded: kv_b on every key (the keys are the prompt itself)
                proj_w, out_w = q_w + kva_w + kvb_k + kvb_v, o_w
            kv_bytes = self.U * tp * (self.P + self.T) * (C + R) * self.act  # latent, shared by heads
        else:
            hd, nkv = a.head_dim, a.num_key_value_heads
            proj_w, out_w = h * nh * hd + 2 * h * nkv * hd, nh * hd * h
            kv_bytes = self.U * tp * (self.P + self.T) * 2 * nkv * hd * self.act / tp
        if part == "proj":
            return Cost(2 * tokens_g * proj_w / tp, proj_w * self.wb / tp + self._io(h, h))
        if part == "core":
            core_f = a.attn_core_flops(pairs, 1.0, absorbed)
            return Cost(core_f / tp, kv_bytes + self._io(h, h))
        return Cost(2 * tokens_g * out_w / tp, out_w * self.wb / tp + self._io(h, h))

    def mlp(self, ffn: int, tokens: float | None = None) -> Cost:
        t = self.tokens if tokens is None else tokens
        h = self.a.hidden_size
        return Cost(2 * t * 3 * h * ffn, 3 * h * ffn * self.wb + t * (2 * h + 3 * ffn) * self.act)

    def router(self) -> Cost:
        a = self.a
        width = a.n_routed_experts + a.zero_expert_num
        return Cost(2 * self.tokens * a.hidden_size * width,
                    a.hidden_size * width * 4 + self._io(a.hidden_size, 0) + 2 * self.tokens * width * 4)

    def experts(self, slots: np.ndarray, hit: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-rank (flops, bytes) of the grouped expert GEMMs for `slots` token-expert pairs."""
        h, f = self.a.hidden_size, self.a.expert_ffn_hidden_size
        flops = 2.0 * slots * 3 * h * f
        nbytes = hit * 3 * h * f * self.wb + slots * (2 * h + 3 * f) * self.act
        return flops, nbytes

    def head(self, tokens: float) -> Cost:
        a = self.a
        return Cost(2 * tokens * a.hidden_size * a.vocab_size,
                    a.vocab_size * a.hidden_size * self.wb + tokens * (a.hidden_size + a.vocab_size) * self.act)


# ----------------------------------------------------------------------------- op templates
@dataclass
class _Op:
    """One op of a stage's template (the same on every rank of the stage).

    flops / bytes / coll_bytes: a scalar for every rank or an (R,) array per rank;
    splits: (R, group) per-peer bytes (all-to-all-v) or None; deps: template indices.
    """

    lane: str
    kind: str
    name: str
    label: str
    deps: list[int]
    flops: float | np.ndarray = 0.0
    bytes: float | np.ndarray = 0.0
    coll: str = ""
    group: str = ""  # "ep", "tp", "dp" (the stage), or "p2p:{peer stage}"
    coll_bytes: float | np.ndarray = 0.0
    splits: np.ndarray | None = None
    seq: int = -1
    bwd_splits: np.ndarray | None = None  # the backward all-to-all's splits (other direction)


class _Template:
    def __init__(self) -> None:
        self.ops: list[_Op] = []

    def add(self, op: _Op) -> int:
        self.ops.append(op)
        return len(self.ops) - 1


@dataclass
class _LayerMb:
    """One layer of one micro-batch: op keys grouped by schedule stage."""

    ops: dict[str, _Op]
    pre: list[str]
    mid_a: list[str]
    experts: list[str]
    mid_b: list[str]
    dispatch: str | None
    combine: str | None
    out: list[str]
    deps: dict[str, list[str]]  # data deps by key; "IN" = the layer's input


def _layer_ops(arch: MoeArch, layer: int, costs: BlockCosts, moe: tuple | None) -> _LayerMb:
    """The ops of layer `layer` for one micro-batch; moe = (expert flops, bytes,
    (dispatch splits, their backward), (combine splits, their backward)) per rank, None for
    a dense layer."""
    L = f"L{layer}/"
    ops: dict[str, _Op] = {}
    deps: dict[str, list[str]] = {}

    def comp(key: str, block: str, name: str, cost: Cost | tuple, d: list[str]) -> None:
        f, b = (cost.flops, cost.bytes) if isinstance(cost, Cost) else cost
        ops[key] = _Op("compute", "compute", name, L + block, [], f, b)
        deps[key] = d

    def a2a(key: str, splits: np.ndarray, bwd: np.ndarray, d: list[str]) -> None:
        ops[key] = _Op("comm", "comm", f"{key}.all_to_all", L + key, [], coll="all_to_all",
                       group="ep", coll_bytes=splits.sum(axis=1), splits=splits, bwd_splits=bwd)
        deps[key] = d

    def attn(blk: str, d: list[str]) -> list[str]:
        """Projections (GEMMs), attention core over the cache, output projection: three
        kernels with different bounds, so each gets its own roofline. The last key is `blk`."""
        kind = "mla" if arch.attention == "mla" else "gqa"
        comp(f"{blk}.proj", blk, f"{blk}.{kind}_proj_gemm", costs.attention("proj"), d)
        comp(f"{blk}.core", blk, f"{blk}.{kind}_core_attention", costs.attention("core"), [f"{blk}.proj"])
        comp(blk, blk, f"{blk}.{kind}_out_gemm", costs.attention("out"), [f"{blk}.core"])
        return [f"{blk}.proj", f"{blk}.core", blk]

    two_blocks = arch.attn_blocks_per_layer == 2
    if moe is None:
        a0 = attn("attn0", ["IN"])
        comp("mlp0", "mlp0", "mlp0.gemm", costs.mlp(arch.dense_ffn_hidden_size), ["attn0"])
        return _LayerMb(ops, a0 + ["mlp0"], [], [], [], None, None, ["mlp0"], deps)
    exp_cost, (disp, disp_bwd), (comb, comb_bwd) = (moe[0], moe[1]), moe[2], moe[3]
    if arch.layout == "shortcut":
        a0 = attn("attn0", ["IN"])
        comp("router", "router", "router.gemm", costs.router(), ["attn0"])
        a2a("dispatch", disp, disp_bwd, ["router"])
        comp("mlp0", "mlp0", "mlp0.gemm", costs.mlp(arch.ffn_hidden_size), ["attn0"])
        a1 = attn("attn1", ["mlp0"])
        comp("experts", "experts", "experts.grouped_gemm", exp_cost, ["dispatch"])
        a2a("combine", comb, comb_bwd, ["experts"])
        mid_b = a1[1:]
        if arch.dense_mlps_per_layer >= 2:
            comp("mlp1", "mlp1", "mlp1.gemm", costs.mlp(arch.ffn_hidden_size), ["attn1"])
            mid_b.append("mlp1")
        # SBO stages: attn0 | dispatch ∥ mlp0 + attn1 projections | experts | combine ∥ rest
        return _LayerMb(ops, a0 + ["router"], ["mlp0", a1[0]], ["experts"], mid_b,
                        "dispatch", "combine", [mid_b[-1], "combine"], deps)
    if two_blocks:  # conventional variant of a two-attention layer: MoE in sequence after attn1
        a0 = attn("attn0", ["IN"])
        comp("mlp0", "mlp0", "mlp0.gemm", costs.mlp(arch.ffn_hidden_size), ["attn0"])
        a1 = attn("attn1", ["mlp0"])
        comp("router", "router", "router.gemm", costs.router(), ["attn1"])
        a2a("dispatch", disp, disp_bwd, ["router"])
        comp("experts", "experts", "experts.grouped_gemm", exp_cost, ["dispatch"])
        a2a("combine", comb, comb_bwd, ["experts"])
        mid_b, out = [], ["combine"]
        if arch.dense_mlps_per_layer >= 2:
            comp("mlp1", "mlp1", "mlp1.gemm", costs.mlp(arch.ffn_hidden_size), ["combine"])
            mid_b, out = ["mlp1"], ["mlp1"]
        return _LayerMb(ops, a0 + ["mlp0"] + a1 + ["router"], [], ["experts"], mid_b,
                        "dispatch", "combine", out, deps)
    # conventional single-attention layer (DeepSeek-V3 style): shared expert beside the routed
    a0 = attn("attn0", ["IN"])
    comp("router", "router", "router.gemm", costs.router(), ["attn0"])
    a2a("dispatch", disp, disp_bwd, ["router"])
    mid_a, out = [], ["combine"]
    if arch.n_shared_experts:
        comp("shared", "mlp0", "shared_expert.gemm", costs.mlp(arch.n_shared_experts * arch.expert_ffn_hidden_size),
             ["attn0"])
        mid_a, out = ["shared"], ["combine", "shared"]
    comp("experts", "experts", "experts.grouped_gemm", exp_cost, ["dispatch"])
    a2a("combine", comb, comb_bwd, ["experts"])
    return _LayerMb(ops, a0 + ["router"], mid_a, ["experts"], [], "dispatch", "combine", out, deps)


def _schedule_layer(layers: list[_LayerMb], schedule: Schedule) -> list[tuple[int, str]]:
    """Global (topologically valid) order of (micro-batch, key) for one layer."""
    if schedule == "sequential":
        order = []
        for m, lm in enumerate(layers):
            keys = lm.pre + ([lm.dispatch] if lm.dispatch else []) + lm.experts
            keys += ([lm.combine] if lm.combine else []) + lm.mid_a + lm.mid_b
            order += [(m, k) for k in keys]
        return order
    if len(layers) == 1:  # sbo
        lm = layers[0]
        keys = lm.pre + ([lm.dispatch] if lm.dispatch else []) + lm.mid_a + lm.experts
        keys += ([lm.combine] if lm.combine else []) + lm.mid_b
        return [(0, k) for k in keys]
    # tbo: pre0, d0, pre1, d1, mid_a0, E0, c0, mid_a1, E1, c1, mid_b0, mid_b1
    order: list[tuple[int, str]] = []
    for m, lm in enumerate(layers):
        order += [(m, k) for k in lm.pre] + ([(m, lm.dispatch)] if lm.dispatch else [])
    for m, lm in enumerate(layers):
        order += [(m, k) for k in lm.mid_a + lm.experts] + ([(m, lm.combine)] if lm.combine else [])
    for m, lm in enumerate(layers):
        order += [(m, k) for k in lm.mid_b]
    return order


# ----------------------------------------------------------------------------- the generator
@dataclass
class Workload:
    """An analytic step: the ops table and what the metrics need besides timing.

    ffn_per_token: (layers_sampled, tokens_sampled) FFN experts per sampled token and layer.
    expert_slots: (moe layers × micro-batches, ranks) token-expert pairs per rank.
    """

    ops: pa.Table
    arch: MoeArch
    plan: ParallelPlan
    ffn_per_token: np.ndarray
    expert_slots: np.ndarray
    zero_slots: float
    all_slots: float
    tokens_per_step: float  # positions the model processes per step, all GPUs
    output_tokens_per_step: float  # decode: accepted tokens; prefill: prompt tokens; train: tokens
    model_flops: float  # sum of the ops' FLOPs


def stage_layer_ranges(num_layers: int, pp: int) -> list[list[int]]:
    """Layers of each pipeline stage: contiguous, sizes differing by at most one."""
    return [a.tolist() for a in np.array_split(np.arange(num_layers), pp)]


def build_workload(config: object, plan: ParallelPlan, rng: np.random.Generator) -> pa.Table:
    """The ops table of one step of `config` (a LongcatConfig or a MoeArch) under `plan`."""
    return generate(config, plan, rng).ops


def generate(config: object, plan: ParallelPlan, rng: np.random.Generator) -> Workload:
    """Build one step. Raises SimulationError for a plan that cannot run the model."""
    arch = config if isinstance(config, MoeArch) else arch_from_longcat(config)
    plan.validate(arch)
    if plan.dispatch_bytes <= 0:
        plan.dispatch_bytes = 1.0
    G, pp = plan.gpus, plan.pp
    S = G // pp  # ranks per stage
    m_total = plan.n_micro
    seqs_mb = plan.batch_per_gpu / m_total
    costs = BlockCosts(arch, plan, seqs_mb)
    tokens_mb = int(round(costs.tokens))
    k_probs = k_distribution(arch, plan.routing)
    expert_probs = expert_distribution(arch, plan.routing, rng)
    ep = plan.ep_size
    h = arch.hidden_size
    stage_layers = stage_layer_ranges(arch.num_layers, pp)
    train = plan.mode == "train"
    group_size = 2 if plan.schedule == "tbo" else 1
    mb_groups = [list(range(i, min(i + group_size, m_total))) for i in range(0, m_total, group_size)]

    ffn_samples: list[np.ndarray] = []
    slots_rows: list[np.ndarray] = []
    zero_slots = all_slots = 0.0
    templates: list[_Template] = []
    for stage in range(pp):
        layers = stage_layers[stage]
        routing: dict[tuple[int, int], tuple] = {}
        for layer in layers:
            if not arch.is_moe_layer(layer):
                continue
            for m in range(m_total):
                lr = route_layer(arch, S, ep, tokens_mb, k_probs, expert_probs, rng)
                flops, nbytes = costs.experts(lr.expert_slots, lr.experts_hit)
                # (S, ep): tokens each rank sends to / receives from the ranks of its EP group
                # (the send matrix is block diagonal: tokens stay inside their group)
                own = np.arange(S) // ep
                sent = lr.send_tokens.reshape(S, S // ep, ep)[np.arange(S), own].astype(np.float64)
                recv = lr.send_tokens.T.reshape(S, S // ep, ep)[np.arange(S), own].astype(np.float64)
                disp = (sent * h * plan.dispatch_bytes, recv * h * costs.act)
                comb = (recv * h * plan.combine_bytes, sent * h * costs.act)
                routing[(layer, m)] = (flops, nbytes, disp, comb)
                if stage == 0 and m == 0:
                    ffn_samples.append(lr.ffn_per_token)
                slots_rows.append(lr.expert_slots)
                zero_slots += lr.zero_slots
                all_slots += lr.all_slots
        templates.append(_stage_template(arch, plan, stage, layers, costs, routing, mb_groups))
    ops = _assemble(templates, plan, S, ep)
    model_flops = float(ops.column("flops").to_numpy().sum())
    if train:
        positions = G / pp * plan.batch_per_gpu * plan.context
        out_tokens = positions
    elif plan.mode == "prefill":
        positions = out_tokens = G * plan.batch_per_gpu * plan.context
    else:
        positions = G * plan.batch_per_gpu * plan.tokens_per_seq_step
        out_tokens = G * plan.batch_per_gpu * plan.accepted_tokens_per_seq_step
    n_tok = min(len(s) for s in ffn_samples) if ffn_samples else 0
    ffn = np.vstack([s[:n_tok] for s in ffn_samples]) if ffn_samples else np.zeros((0, 0), np.int8)
    return Workload(
        ops=ops, arch=arch, plan=plan, ffn_per_token=ffn,
        expert_slots=np.vstack(slots_rows) if slots_rows else np.zeros((0, S)),
        zero_slots=zero_slots, all_slots=all_slots, tokens_per_step=positions,
        output_tokens_per_step=out_tokens, model_flops=model_flops,
    )


def _stage_template(
    arch: MoeArch, plan: ParallelPlan, stage: int, layers: list[int], costs: BlockCosts,
    routing: dict[tuple[int, int], tuple], mb_groups: list[list[int]],
) -> _Template:
    """The op list every rank of pipeline stage `stage` runs, in a topologically valid order."""
    tpl = _Template()
    pp, h = plan.pp, arch.hidden_size
    first, last = stage == 0, stage == pp - 1
    train = plan.mode == "train"
    act_bytes = costs.tokens * h * costs.act
    fwd_groups: list[list[int]] = []
    for group in mb_groups:
        fwd: list[int] = []
        inputs: dict[int, list[int]] = {}
        for m in group:
            inputs[m] = []
            if not first:
                inputs[m] = [tpl.add(_Op("p2p", "comm", "recv_activation", "", [], coll="recv",
                                         group="p2p:recv:-1", coll_bytes=act_bytes, seq=1_000_000 + 2 * m))]
                fwd += inputs[m]
        for layer in layers:
            lms = [_layer_ops(arch, layer, costs, routing.get((layer, m))) for m in group]
            index: dict[tuple[int, str], int] = {}
            prev = None
            for mi, key in _schedule_layer(lms, plan.schedule):
                lm, m = lms[mi], group[mi]
                op = lm.ops[key]
                op.deps = [d for k in lm.deps[key] for d in (inputs[m] if k == "IN" else [index[(mi, k)]])]
                if plan.schedule == "sequential" and prev is not None and prev not in op.deps:
                    op.deps.append(prev)
                t = tpl.add(op)
                fwd.append(t)
                index[(mi, key)] = prev = t
                if plan.tp > 1 and key in ("attn0", "attn1"):  # after the output projection
                    ar = tpl.add(_Op("comm", "comm", f"{key}.tp_all_reduce", op.label, [t], coll="all_reduce",
                                     group="tp", coll_bytes=act_bytes * plan.tp))
                    fwd.append(ar)
                    index[(mi, key)] = prev = ar
            for mi, m in enumerate(group):
                inputs[m] = [index[(mi, k)] for k in lms[mi].out]
        for m in group:
            if last:
                n_head = costs.tokens if plan.mode != "prefill" else costs.U
                hc = costs.head(n_head)
                t = tpl.add(_Op("compute", "compute", "lm_head.gemm", "head", list(inputs[m]), hc.flops, hc.bytes))
                fwd.append(t)
                if plan.mtp:  # the draft module: one attention block, one dense FFN, the head
                    a = costs.attention("proj") + costs.attention("core") + costs.attention("out")
                    ffn = costs.mlp(arch.ffn_hidden_size or arch.dense_ffn_hidden_size)
                    t1 = tpl.add(_Op("compute", "compute", "mtp.mla_attention", "mtp", [t], a.flops, a.bytes))
                    t2 = tpl.add(_Op("compute", "compute", "mtp.gemm", "mtp", [t1], ffn.flops, ffn.bytes))
                    t3 = tpl.add(_Op("compute", "compute", "mtp.lm_head_gemm", "mtp", [t2], hc.flops, hc.bytes))
                    fwd += [t1, t2, t3]
            else:
                fwd.append(tpl.add(_Op("p2p", "comm", "send_activation", "", list(inputs[m]), coll="send",
                                       group="p2p:send:+1", coll_bytes=act_bytes, seq=1_000_000 + 2 * m)))
        fwd_groups.append(fwd)
    if not train:
        return tpl
    bwd_last_by_layer: dict[str, list[int]] = {}
    for fwd in reversed(fwd_groups):
        bwd_last_by_layer = _backward(tpl, fwd)
    # gradient all-reduce of the dense (replicated) weights, one bucket per layer
    ar_ids = []
    for layer in reversed(layers):
        dense = arch.layer_params(layer, ffn_experts=0) * 2.0
        deps = bwd_last_by_layer.get(f"L{layer}", [])
        ar_ids.append(tpl.add(_Op("dp", "comm", f"grad_all_reduce.L{layer}", "optimizer", deps,
                                  coll="all_reduce", group="dp", coll_bytes=dense)))
    # Adam on this rank's shard (distributed optimizer): dense weights split over the stage's
    # ranks, experts over the EP-group copies; ~10 FLOPs and 16 bytes of state traffic per weight
    stage_ranks, ep = plan.gpus // pp, plan.ep_size
    dense = sum(arch.layer_params(i, 0) for i in layers)
    experts = sum(arch.n_routed_experts / ep * arch.expert_params() for i in layers if arch.is_moe_layer(i))
    shard = dense / stage_ranks + experts / (stage_ranks // ep)
    tpl.add(_Op("compute", "compute", "optimizer.adam_elementwise", "optimizer", ar_ids, 10.0 * shard, 16.0 * shard))
    return tpl


def _backward(tpl: _Template, fwd: list[int]) -> dict[str, list[int]]:
    """Append the backward of forward ops `fwd` (reverse order, reversed data deps).

    Returns, per layer prefix "L{i}", the backward op ids of that layer (for gradient sync).
    """
    in_fwd = set(fwd)
    consumers: dict[int, list[int]] = {t: [] for t in fwd}
    for t in fwd:
        for d in tpl.ops[t].deps:
            if d in in_fwd:
                consumers[d].append(t)
    bwd_of: dict[int, int] = {}
    by_layer: dict[str, list[int]] = {}
    for t in reversed(fwd):
        f = tpl.ops[t]
        deps = [bwd_of[c] for c in consumers[t]]
        if f.coll == "all_to_all":
            splits = f.bwd_splits
            op = _Op(f.lane, f.kind, f.name + ".bwd", f.label, deps, coll="all_to_all", group=f.group,
                     coll_bytes=splits.sum(axis=1), splits=splits)
        elif f.coll in ("send", "recv"):
            kind, delta = f.group.split(":")[1:]
            flipped = "recv" if kind == "send" else "send"
            op = _Op(f.lane, f.kind, f.name.replace("activation", "grad"), f.label, deps, coll=flipped,
                     group=f"p2p:{flipped}:{delta}", coll_bytes=f.coll_bytes, seq=f.seq + 1)
        elif f.coll:
            op = _Op(f.lane, f.kind, f.name + ".bwd", f.label, deps, coll=f.coll, group=f.group,
                     coll_bytes=f.coll_bytes)
        else:
            op = _Op(f.lane, f.kind, f.name + ".bwd", f.label, deps, 2.0 * f.flops, 2.0 * f.bytes)
        bwd_of[t] = tpl.add(op)
        if f.label.startswith("L"):
            by_layer.setdefault(f.label.split("/")[0], []).append(bwd_of[t])
    return by_layer


def _assemble(templates: list[_Template], plan: ParallelPlan, S: int, ep: int) -> pa.Table:
    """Tile each stage's template over its ranks into one normalized ops table."""
    cols: dict[str, list] = {k: [] for k in ("id", "rank", "lane", "kind", "name", "label", "flops", "bytes",
                                             "coll", "group", "coll_bytes", "seq", "deps_flat", "deps_len",
                                             "split_flat", "split_len")}
    next_id = 0
    group_cache: dict[tuple[str, int], str] = {}
    group_size = {"ep": ep, "tp": plan.tp, "dp": S}  # contiguous rank blocks of this size

    def group_str(key: str, r: int) -> str:
        size = group_size.get(key)
        if size is not None:
            lo = r // size * size
            k = (key, lo)
            if k not in group_cache:
                group_cache[k] = ",".join(map(str, range(lo, lo + size)))
            return group_cache[k]
        _, kind, delta = key.split(":")
        peer = r + int(delta) * S
        return f"{r},{peer}" if kind == "send" else f"{peer},{r}"

    for stage, tpl in enumerate(templates):
        n_t = len(tpl.ops)
        ranks = np.arange(stage * S, (stage + 1) * S)
        base = next_id + np.arange(S) * n_t
        next_id += S * n_t
        cols["id"].append((base[:, None] + np.arange(n_t)[None, :]).reshape(-1))
        cols["rank"].append(np.repeat(ranks, n_t))
        lanes = [op.lane for op in tpl.ops]
        cols["lane"] += [f"gpu:{r}/{ln}" for r in ranks for ln in lanes]
        for key in ("kind", "name", "label", "coll"):
            cols[key] += [getattr(op, key) for op in tpl.ops] * S
        cols["group"] += [group_str(op.group, int(r)) if op.group else "" for r in ranks for op in tpl.ops]
        for key in ("flops", "bytes", "coll_bytes"):
            mat = np.empty((S, n_t))
            for t, op in enumerate(tpl.ops):
                mat[:, t] = getattr(op, key)
            cols[key].append(mat.reshape(-1))
        cols["seq"].append(np.tile([op.seq if op.seq >= 0 or not op.coll else t
                                    for t, op in enumerate(tpl.ops)], S))
        dep_lens = np.array([len(op.deps) for op in tpl.ops], dtype=np.int64)
        dep_flat = np.array([d for op in tpl.ops for d in op.deps], dtype=np.int64)
        cols["deps_len"].append(np.tile(dep_lens, S))
        cols["deps_flat"].append((base[:, None] + dep_flat[None, :]).reshape(-1))
        split_ts = [t for t, op in enumerate(tpl.ops) if op.splits is not None]
        lens = np.zeros(n_t, dtype=np.int64)
        lens[split_ts] = ep
        cols["split_len"].append(np.tile(lens, S))
        if split_ts:
            flat = np.empty((S, len(split_ts), ep))  # rank-major, then op order: the list layout
            for k, t in enumerate(split_ts):
                flat[:, k, :] = tpl.ops[t].splits
            cols["split_flat"].append(flat.reshape(-1))

    def cat(key: str) -> np.ndarray:
        parts = cols[key]
        if not parts:
            return np.zeros(0)
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    n = int(sum(len(a) for a in cols["id"]))

    def list_col(flat: np.ndarray, lens: np.ndarray, typ: pa.DataType) -> pa.Array:
        offsets = np.zeros(len(lens) + 1, dtype=np.int32 if flat.size < 2**31 else np.int64)
        np.cumsum(lens, out=offsets[1:])
        if offsets.dtype == np.int64:
            return pa.LargeListArray.from_arrays(offsets, pa.array(flat, type=typ.value_type)).cast(typ)
        return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=typ.value_type))

    arrays = {
        "id": pa.array(cat("id"), pa.int64()),
        "rank": pa.array(cat("rank"), pa.int32()),
        "lane": pa.array(cols["lane"], pa.string()),
        "kind": pa.array(cols["kind"], pa.string()),
        "name": pa.array(cols["name"], pa.string()),
        "label": pa.array(cols["label"], pa.string()),
        "start_us": pa.array(np.zeros(n), pa.float64()),
        "dur_us": pa.array(np.zeros(n), pa.float64()),
        "flops": pa.array(cat("flops"), pa.float64()),
        "bytes": pa.array(cat("bytes"), pa.float64()),
        "coll": pa.array(cols["coll"], pa.string()),
        "group": pa.array(cols["group"], pa.string()),
        "coll_bytes": pa.array(cat("coll_bytes"), pa.float64()),
        "splits": list_col(cat("split_flat"), cat("split_len").astype(np.int64),
                           SCHEMA.field("splits").type),
        "seq": pa.array(cat("seq").astype(np.int64), pa.int64()),
        "step": pa.array(np.zeros(n, dtype=np.int32), pa.int32()),
        "deps": list_col(cat("deps_flat").astype(np.int64), cat("deps_len").astype(np.int64),
                         SCHEMA.field("deps").type),
    }
    return pa.Table.from_arrays([arrays[f.name] for f in SCHEMA], schema=SCHEMA)
