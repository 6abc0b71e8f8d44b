"""Full-scale what-if: model + plan → analytic workload → simulated step → metrics → run dir.

    run_whatif(preset, plan, cluster_name, out_dir=None, ...) -> metrics dict

The workload comes from simulator/workload.py, the timeline from simulator/engine.py on a
cluster preset, the overlap figures from traces/overlap.py (one definition for live and
simulated runs); this module adds what only an analytic run knows: tokens per step,
throughput, cost, and the routing statistics (activated parameters, zero-expert share,
expert-load imbalance, FLOPs identity experts save). Compute ops are priced by the cost
model's roofline fallback (simulator/costmodel.py: per-kind efficiencies, kernel launch
overhead, the cluster's GPU peak FLOP/s and HBM bandwidth): ONE set of constants for every
model, batch and schedule.

Metrics (../shared/DESIGN.md): decode TPOT = step / tokens accepted per sequence per step
(MTP: 1 + acceptance); TPS/user = 1 / TPOT; TGS = output tokens per step / step / GPUs;
$/M output tokens = price · GPUs / output tokens per hour · 1e6. Training: tokens/s,
MFU = FLOPs of the step / (step · GPUs · dense BF16 peak), days for a token budget.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow as pa

from simulator.baselines import MoeArch, get_arch
from simulator.cluster import Cluster
from simulator.errors import SimulationError
from simulator.workload import ParallelPlan, Workload, generate

KV_BYTES = 2.0  # BF16 KV cache
ACTIVATION_RESERVE = 0.10  # share of GPU memory kept for activations, workspace, fragmentation


def memory_per_gpu_bytes(arch: MoeArch, plan: ParallelPlan) -> dict[str, float]:
    """Bytes each GPU must hold: weights (its experts, replicated dense weights, its stage's
    layers), KV cache (inference), gradients + Adam states (training, mixed precision:
    BF16 weights and gradients, FP32 master weights and two moments)."""
    from simulator.workload import stage_layer_ranges

    stage_layers = stage_layer_ranges(arch.num_layers, plan.pp)[0]
    ep = plan.ep_size
    experts_here = arch.n_routed_experts / ep
    expert_params = sum(experts_here * arch.expert_params() for i in stage_layers if arch.is_moe_layer(i))
    params = sum(arch.layer_params(i, experts_here) for i in stage_layers)
    params += (2 * arch.vocab_size * arch.hidden_size + arch.hidden_size) / plan.pp
    if plan.mtp:
        params += arch.layer_params(0, 0) + arch.hidden_size * 2 * arch.hidden_size
    out = {"weights": params * plan.weight_bytes}
    if plan.mode == "train":
        # BF16 gradients; FP32 master weights + Adam moments (12 B/param) sharded over the
        # data-parallel copies (distributed optimizer / ZeRO-1): dense weights have one copy
        # per rank of the stage, experts one per EP group
        dense = params - expert_params
        stage = plan.gpus // plan.pp
        out["grads_optimizer"] = params * 2.0 + 12.0 * (dense / stage + expert_params / (stage // ep))
    else:
        positions = plan.context + plan.tokens_per_seq_step if plan.mode == "decode" else plan.context
        out["kv_cache"] = plan.batch_per_gpu * positions * arch.kv_cache_bytes_per_token(KV_BYTES) / plan.pp
    return out


def check_fits(arch: MoeArch, plan: ParallelPlan, cluster: Cluster) -> dict[str, float]:
    """Raise SimulationError with bytes needed vs available when the plan does not fit."""
    need = memory_per_gpu_bytes(arch, plan)
    total = sum(need.values())
    avail = cluster.gpu.memory_bytes * (1 - ACTIVATION_RESERVE)
    if total > avail:
        parts = ", ".join(f"{k} {v / 1e9:.1f} GB" for k, v in need.items())
        raise SimulationError(
            f"plan: {arch.name} needs {total / 1e9:.1f} GB per GPU ({parts}) but {cluster.name} "
            f"has {avail / 1e9:.1f} GB usable of {cluster.gpu.memory_bytes / 1e9:.0f} GB per GPU "
            f"({ACTIVATION_RESERVE:.0%} kept for activations)"
        )
    return need


def roofline_compute_time(ops: pa.Table, cluster: Cluster) -> np.ndarray:
    """Per-op µs for the engine: the cost model's per-kind roofline on the cluster's GPU."""
    from simulator.costmodel import DeviceSpec, classify, roofline_us

    dev = DeviceSpec(cluster.gpu.name, cluster.gpu.bf16_flops, cluster.gpu.hbm_bytes_per_s, 4.0)
    names = ops.column("name").to_pylist()
    kinds = ops.column("kind").to_pylist()
    flops = ops.column("flops").to_numpy()
    nbytes = ops.column("bytes").to_numpy()
    cache: dict[str, str] = {}
    out = np.zeros(len(names))
    for i, (n, k) in enumerate(zip(names, kinds)):
        if k == "comm":
            continue
        kind = cache.get(n) or cache.setdefault(n, classify(n))
        out[i] = roofline_us(kind, float(flops[i]), float(nbytes[i]), dev)
    return out


def _block_overlap(labels: list[dict]) -> dict[str, dict[str, float]]:
    """Per comm block (dispatch, combine, ...): comm, hidden and exposed µs per step (summed
    over layers) and overlap %."""
    acc: dict[str, list[float]] = {}
    for row in labels:
        block = row["label"].split("/")[-1]
        a = acc.setdefault(block, [0.0, 0.0, 0.0])
        a[0] += row["comm_us"]
        a[1] += row["hidden_comm_us"]
        a[2] += row["window_us"]
    return {
        b: {"comm_us": c, "hidden_comm_us": h, "exposed_comm_us": c - h, "window_us": w,
            "overlap_pct": 100.0 * h / c if c > 0 else None}
        for b, (c, h, w) in acc.items()
    }


def moe_time_split(sim: pa.Table) -> dict:
    """MoE time per rank per step, mean over ranks: all-to-all time (dispatch + combine, and
    their backward) and expert GEMM time; `moe_comm_share_pct` = comm / (comm + experts),
    the ScMoE paper's "communication share of MoE time" (of a schedule without overlap)."""
    labels = np.array(sim.column("label").to_pylist(), dtype=object)
    dur = sim.column("dur_us").to_numpy()
    n_ranks = len(np.unique(sim.column("rank").to_numpy())) or 1
    block = np.array([lab.rsplit("/", 1)[-1] for lab in labels], dtype=object)
    comm = float(dur[(block == "dispatch") | (block == "combine")].sum()) / n_ranks
    experts = float(dur[block == "experts"].sum()) / n_ranks
    if comm + experts == 0:
        return {}
    return {"moe_comm_us": comm, "moe_expert_compute_us": experts,
            "moe_comm_share_pct": 100.0 * comm / (comm + experts)}


def routing_metrics(w: Workload) -> dict:
    """Activated parameters per token, zero-expert share, expert-load imbalance, FLOPs saved."""
    a = w.arch
    out: dict = {}
    moe_layers = [i for i in range(a.num_layers) if a.is_moe_layer(i)]
    if not moe_layers or w.ffn_per_token.size == 0:
        return out
    k = w.ffn_per_token.astype(np.float64)  # (sampled moe layers, tokens)
    # each token's FFN experts summed over the MoE layers (layers the sample missed: scaled)
    per_token_total = k.sum(axis=0) * len(moe_layers) / k.shape[0]
    base = a.activated_params(0)
    act = base + per_token_total * a.expert_params()
    hist, edges = np.histogram(act, bins=20)
    out.update({
        "ffn_experts_per_token_mean": float(k.mean()),
        "ffn_experts_per_token_std": float(k.std()),
        "activated_params_mean": float(act.mean()),
        "activated_params_min": float(act.min()),
        "activated_params_max": float(act.max()),
        "activated_params_histogram": {"edges": edges.tolist(), "counts": hist.tolist()},
        "activated_params_at_min_max_experts": [float(a.activated_params(k.min())), float(a.activated_params(k.max()))],
        "zero_expert_share": w.zero_slots / w.all_slots if w.all_slots else 0.0,
    })
    slots = w.expert_slots
    if slots.size:
        ratio = slots.max(axis=1) / np.maximum(slots.mean(axis=1), 1e-12)
        out["expert_load_max_over_mean"] = float(ratio.mean())
        out["expert_load_max_over_mean_worst"] = float(ratio.max())
    expert_flops_per_slot = 2.0 * 3 * a.hidden_size * a.expert_ffn_hidden_size
    saved = w.zero_slots * expert_flops_per_slot * (3.0 if w.plan.mode == "train" else 1.0)
    out["flops_saved_by_identity_experts"] = saved
    out["flops_saved_by_identity_experts_pct"] = 100.0 * saved / (w.model_flops + saved) if w.model_flops else 0.0
    return out


def throughput_metrics(w: Workload, step_us: float, cluster: Cluster, price_per_gpu_hour: float,
                       train_tokens: float) -> dict:
    p = w.plan
    step_s = step_us / 1e6
    out: dict = {"step_time_ms": step_us / 1e3}
    if p.mode == "decode":
        tpot_ms = step_us / 1e3 / p.accepted_tokens_per_seq_step
        out.update({
            "tpot_ms": tpot_ms,
            "tps_per_user": 1e3 / tpot_ms,
            "tgs": w.output_tokens_per_step / step_s / p.gpus,
            "users_per_gpu": p.batch_per_gpu,
        })
    elif p.mode == "prefill":
        out.update({"tgs": w.output_tokens_per_step / step_s / p.gpus,
                    "ttft_ms": step_us / 1e3})
    else:
        tokens_s = w.output_tokens_per_step / step_s
        out.update({
            "tokens_per_s": tokens_s,
            "tgs": tokens_s / p.gpus,
            "mfu_pct": 100.0 * w.model_flops / (step_s * p.gpus * cluster.gpu.bf16_flops),
            "train_tokens": train_tokens,
            "days_for_train_tokens": train_tokens / tokens_s / 86400.0,
        })
    if p.mode != "train" and price_per_gpu_hour > 0:
        per_hour = w.output_tokens_per_step / step_s * 3600.0
        out["price_per_gpu_hour"] = price_per_gpu_hour
        out["cost_usd_per_m_tokens"] = price_per_gpu_hour * p.gpus / per_hour * 1e6
    return out


def run_whatif(
    preset: str | MoeArch,
    plan: ParallelPlan,
    cluster_name: str | Cluster = "h800",
    out_dir: str | Path | None = None,
    *,
    seed: int = 0,
    shortcut: bool | None = None,
    price_per_gpu_hour: float = 2.0,
    train_tokens: float = 20e12,
    write_traces: bool = True,
    metric_ranks: int = 32,
) -> dict:
    """Simulate one step of `preset` under `plan` on `cluster_name` (a preset name or a
    Cluster with plan.gpus GPUs). Writes a run dir when `out_dir` is given. Returns the
    metrics dict (the metrics.json object plus throughput / cost / routing keys and
    `timing_s`, the wall time of each phase). Overlap figures (metrics `ranks`, `labels`)
    are computed on all ranks up to `metric_ranks` GPUs, else on that many sampled ranks
    (always rank 0 and the straggler; `metrics_ranks_sampled` lists them); 0 = all."""
    from simulator.cluster import get_cluster
    from simulator.engine import simulate
    from traces.overlap import compute_metrics

    timing: dict[str, float] = {}
    t0 = time.perf_counter()
    arch = get_arch(preset, shortcut=shortcut) if isinstance(preset, str) else preset
    cluster = cluster_name if isinstance(cluster_name, Cluster) else None
    if cluster is None:
        if plan.gpus <= 0:
            raise SimulationError(f"plan: gpus must be positive, got {plan.gpus}")
        probe = get_cluster(cluster_name)  # one node of it: the node size (a CPU cluster is one host)
        node_size = plan.gpus if probe.kind == "cpu" else probe.gpus_per_node
        if plan.gpus % node_size:
            raise SimulationError(f"plan: gpus {plan.gpus} is not a multiple of the node size {node_size}"
                                  f" of cluster {cluster_name}")
        cluster = get_cluster(cluster_name, gpus=plan.gpus)
    elif cluster.num_gpus != plan.gpus:
        raise SimulationError(f"plan: gpus {plan.gpus} but cluster {cluster.name} has {cluster.num_gpus}")
    plan.node_size = cluster.gpus_per_node
    plan.validate(arch)
    if plan.dispatch_bytes <= 0:  # FP8 dispatch only where the GPU has FP8 (Ampere has not)
        plan.dispatch_bytes = 1.0 if cluster.gpu.fp8_flops > cluster.gpu.bf16_flops else 2.0
    memory = check_fits(arch, plan, cluster)
    rng = np.random.default_rng(seed)
    w = generate(arch, plan, rng)
    timing["workload_s"] = time.perf_counter() - t0
    t1 = time.perf_counter()
    sim = simulate(w.ops, cluster, seed=seed, compute_time=roofline_compute_time)
    timing["simulate_s"] = time.perf_counter() - t1
    t2 = time.perf_counter()
    ends = sim.column("start_us").to_numpy() + sim.column("dur_us").to_numpy()
    step_us = float(ends.max()) if ends.size else 0.0
    sample = _metric_ranks(sim, ends, metric_ranks)
    if sample is None:
        metrics = compute_metrics(sim)
    else:  # overlap figures on a sample of ranks (rank 0, the straggler, evenly spaced others)
        import pyarrow.compute as pc

        metrics = compute_metrics(sim.filter(pc.is_in(sim.column("rank"), pa.array(sample, pa.int32()))))
        metrics["metrics_ranks_sampled"] = sample
    timing["metrics_s"] = time.perf_counter() - t2
    metrics["step_time_us"] = step_us
    ranks = metrics.get("ranks", {})
    if ranks:
        metrics["comm_us_mean"] = float(np.mean([r["comm_us"] for r in ranks.values()]))
        metrics["hidden_comm_us_mean"] = float(np.mean([r["hidden_comm_us"] for r in ranks.values()]))
        metrics["exposed_comm_us_mean"] = float(np.mean([r["exposed_comm_us"] for r in ranks.values()]))
        metrics["compute_us_mean"] = float(np.mean([r["compute_us"] for r in ranks.values()]))
    metrics["blocks"] = _block_overlap(metrics.get("labels", []))
    metrics.update(moe_time_split(sim))
    metrics.update(throughput_metrics(w, step_us, cluster, price_per_gpu_hour, train_tokens))
    metrics.update(routing_metrics(w))
    metrics["memory_per_gpu_bytes"] = memory
    metrics["source"] = "simulated"
    metrics["analytic"] = {"preset": arch.name, "cluster": cluster.name, "gpus": plan.gpus,
                           "plan": _plan_dict(plan), "ops": w.ops.num_rows, "seed": seed}
    if out_dir is not None:
        t3 = time.perf_counter()
        _write_run(out_dir, sim, cluster, w, metrics, seed, write_traces)
        timing["write_s"] = time.perf_counter() - t3
    timing["total_s"] = time.perf_counter() - t0
    metrics["timing_s"] = timing
    return metrics


def _metric_ranks(sim: pa.Table, ends: np.ndarray, limit: int) -> list[int] | None:
    """None (all ranks) up to `limit` ranks; else rank 0, the last rank to finish, and
    evenly spaced others, `limit` in all."""
    ranks = sim.column("rank").to_numpy()
    n = int(ranks.max()) + 1 if ranks.size else 0
    if limit <= 0 or n <= limit:
        return None
    last = np.zeros(n)
    np.maximum.at(last, ranks, ends)
    picks = {0, int(np.argmax(last))}
    for r in np.linspace(0, n - 1, limit).astype(int):
        if len(picks) >= limit:
            break
        picks.add(int(r))
    return sorted(picks)


def _plan_dict(plan: ParallelPlan) -> dict:
    d = asdict(plan)
    d["ep"] = plan.ep_size
    d["micro_batches"] = plan.n_micro
    return d


def _write_run(out_dir: str | Path, sim: pa.Table, cluster: Cluster, w: Workload, metrics: dict,
               seed: int, write_traces: bool) -> None:
    """The simulated run dir (replay.write_sim_run's layout), metrics.json with our keys added."""
    from simulator.export import step_times_us, write_kineto_traces
    from simulator.replay import write_dir_atomic
    from traces.rundir import METRICS_JSON, OPS_PARQUET, RUN_JSON, write_json_atomic
    from traces.schema import write_ops

    def fill(tmp: Path) -> None:
        write_ops(sim, tmp / OPS_PARQUET)
        if write_traces:
            write_kineto_traces(sim, tmp, cluster)
        steps = step_times_us(sim)
        run = {
            "source": "simulated", "analytic": True, "preset": w.arch.name, "config": asdict(w.arch),
            "schedule": w.plan.schedule, "mode": w.plan.mode, "world_size": w.plan.gpus,
            "backend": "nccl" if cluster.kind == "gpu" else "gloo", "cluster": cluster.name,
            "cluster_gpus": cluster.num_gpus, "seed": seed, "plan": _plan_dict(w.plan),
            "step_times_us": steps, "step_time_us_median": metrics["step_time_us"],
        }
        write_json_atomic(tmp / RUN_JSON, run)
        write_json_atomic(tmp / METRICS_JSON, metrics)

    write_dir_atomic(out_dir, fill)


def summary_lines(m: dict) -> list[str]:
    """A compact human table of a what-if's metrics."""
    a = m["analytic"]
    p = a["plan"]
    lines = [f"{a['preset']} on {a['gpus']} x {a['cluster']}: {p['mode']}, batch/GPU {p['batch_per_gpu']}, "
             f"context {p['context']}, schedule {p['schedule']}, EP {p['ep']}"
             + (f", MTP accept {p['mtp_accept']}" if p["mtp"] else "")]
    lines.append(f"  step time        {m['step_time_us'] / 1e3:10.2f} ms")
    for key, fmt in [("tpot_ms", "TPOT             {:10.2f} ms"), ("tps_per_user", "TPS per user     {:10.1f}"),
                     ("tgs", "TGS (tok/s/GPU)  {:10.1f}"), ("cost_usd_per_m_tokens", "$ / M out tokens {:10.3f}"),
                     ("tokens_per_s", "tokens/s         {:10.3g}"), ("mfu_pct", "MFU              {:10.1f} %"),
                     ("days_for_train_tokens", "days for budget  {:10.1f}"),
                     ("overlap_pct_mean", "comm overlap     {:10.1f} %"),
                     ("exposed_comm_us_mean", "exposed comm     {:10.1f} us/step"),
                     ("activated_params_mean", "activated/token  {:10.4g}"),
                     ("zero_expert_share", "zero-expert share{:10.3f}"),
                     ("moe_comm_share_pct", "MoE comm share   {:10.1f} % of all-to-all + expert time"),
                     ("flops_saved_by_identity_experts_pct", "FLOPs saved by identity experts {:.1f} % of all-FFN top-k"),
                     ("expert_load_max_over_mean", "expert load max/mean {:6.2f}")]:
        if m.get(key) is not None:
            lines.append("  " + fmt.format(m[key]))
    if "activated_params_min" in m:
        lines.append(f"  activated range  {m['activated_params_min'] / 1e9:.1f}B .. {m['activated_params_max'] / 1e9:.1f}B"
                     f" (per token over layers); {m['activated_params_at_min_max_experts'][0] / 1e9:.1f}B .. "
                     f"{m['activated_params_at_min_max_experts'][1] / 1e9:.1f}B at the fewest / most FFN experts")
    for block, b in m.get("blocks", {}).items():
        if b["comm_us"] > 0:
            pct = b["overlap_pct"]
            lines.append(f"  {block:9s} comm {b['comm_us']:9.1f} us, hidden {b['hidden_comm_us']:9.1f} us"
                         + (f" ({pct:.0f}%)" if pct is not None else ""))
    return lines


# ----------------------------------------------------------------------------- CLI glue
def routing_from_file(path: str | Path, arch: MoeArch, choice: str = "replay") -> "RoutingSpec":
    """A RoutingSpec from a recorded run, for `arch` at full scale. Accepted:
    - a `moesim train` log (train_log.csv): mean / std of ffn_experts_per_token over the last
      fifth of the steps;
    - a live run dir or its run.json (traces/capture.py): `routing` → {layer:
      {ffn_experts_per_token_hist, tokens_per_expert}}, summed over layers;
    - a routing record JSON: {"ffn_experts_per_token": [k per token] (or per layer),
      or "ffn_experts_per_token_hist": [count of k = 0..K], "tokens_per_expert": [...]}.
    A histogram over another top-k is mapped by k → round(k · K / K_record). With
    choice="replay" the per-expert load profile becomes the choice probabilities; a record
    of another expert count keeps its sorted profile, interpolated to arch's experts."""
    import csv
    import json

    from simulator.workload import RoutingSpec

    path = Path(path)
    if path.is_dir():
        path = path / "run.json"
    if not path.is_file():
        raise SimulationError(f"{path}: no routing record, run.json or train log")
    K, E = arch.moe_topk, arch.n_routed_experts
    if path.suffix == ".csv":
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows or "ffn_experts_per_token" not in rows[0]:
            raise SimulationError(f"{path}: expected a moesim train log with an ffn_experts_per_token column")
        tail = rows[-max(1, len(rows) // 5):]
        try:
            mean = float(np.mean([float(r["ffn_experts_per_token"]) for r in tail]))
            std = float(np.mean([float(r.get("ffn_experts_std") or 0.0) for r in tail]))
        except (TypeError, ValueError) as err:
            raise SimulationError(f"{path}: ffn_experts_per_token / ffn_experts_std must be numbers ({err})") from None
        return RoutingSpec(k_mean=min(mean, K), k_std=max(std, 1e-3))
    try:
        rec = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise SimulationError(f"{path}: not valid JSON ({err.msg})") from None
    if not isinstance(rec, dict):
        raise SimulationError(f"{path}: expected a JSON object (a routing record or run.json)")
    hist, tpe = None, None
    if isinstance(rec.get("routing"), dict) and rec["routing"]:  # a live run's run.json
        layers = list(rec["routing"].values())
        hist = np.sum([np.asarray(v["ffn_experts_per_token_hist"], dtype=np.float64) for v in layers], axis=0)
        tpe = np.sum([np.asarray(v["tokens_per_expert"], dtype=np.float64) for v in layers], axis=0)
        tpe = tpe[: int(rec.get("config", {}).get("n_routed_experts", len(tpe)))]  # FFN experts only
    else:
        ks = rec.get("ffn_experts_per_token")
        if ks is not None:
            flat = np.concatenate([np.ravel(np.asarray(k, dtype=np.int64))
                                   for k in (ks if ks and isinstance(ks[0], list) else [ks])])
            if flat.size == 0 or flat.min() < 0:
                raise SimulationError(f"{path}: ffn_experts_per_token must be counts >= 0")
            hist = np.bincount(flat).astype(np.float64)
        elif rec.get("ffn_experts_per_token_hist") is not None:
            hist = np.asarray(rec["ffn_experts_per_token_hist"], dtype=np.float64)
        if rec.get("tokens_per_expert") is not None:
            tpe = np.asarray(rec["tokens_per_expert"], dtype=np.float64)
            tpe = tpe.sum(axis=0) if tpe.ndim == 2 else tpe
    if hist is None and tpe is None:
        raise SimulationError(f"{path}: no routing in it (expected routing, ffn_experts_per_token, "
                              "ffn_experts_per_token_hist or tokens_per_expert)")
    spec = RoutingSpec()
    if hist is not None:
        if hist.sum() <= 0:
            raise SimulationError(f"{path}: empty FFN-experts-per-token histogram")
        k_rec = len(hist) - 1
        mapped = np.zeros(K + 1)
        for j, c in enumerate(hist):
            mapped[min(K, int(round(j * K / k_rec)) if k_rec else 0)] += c
        spec.k_probs = (mapped / mapped.sum()).tolist()
    if tpe is not None and choice == "replay":
        counts = tpe[:E] if tpe.size >= E and tpe.size <= E + arch.zero_expert_num else None
        if counts is None or counts.size != E:  # another model: keep the sorted load profile,
            prof = np.sort(tpe)[::-1]            # placed on experts by the run's seeded shuffle
            counts = np.interp(np.linspace(0, prof.size - 1, E), np.arange(prof.size), prof)
            spec.shuffle_experts = True
        if counts.sum() <= 0:
            raise SimulationError(f"{path}: tokens_per_expert are all zero")
        spec.choice = "replay"
        spec.expert_probs = counts.tolist()
    return spec


def search_batch_for_tps(preset: str | MoeArch, plan: ParallelPlan, cluster_name: str, target_tps_per_user: float,
                         *, max_batch: int = 512, **kw) -> tuple[int, dict, list[tuple[int, float]]]:
    """The largest batch per GPU whose predicted TPS/user is ≥ the target (decode), by
    bisection (TPS/user falls as the batch grows), up to `max_batch` and the largest batch
    whose KV cache fits GPU memory. Returns (batch, its metrics, the (batch, TPS/user)
    points tried). Batch 1 (or 2 for TBO) when even that misses the target."""
    import dataclasses

    def at(b: int) -> dict:
        return run_whatif(preset, dataclasses.replace(plan, batch_per_gpu=b), cluster_name, None,
                          write_traces=False, **kw)

    from simulator.cluster import get_cluster

    arch = get_arch(preset) if isinstance(preset, str) else preset
    cluster = get_cluster(cluster_name, gpus=plan.gpus)
    fixed = sum(v for k, v in memory_per_gpu_bytes(arch, dataclasses.replace(plan, batch_per_gpu=1)).items()
                if k != "kv_cache")
    per_user = memory_per_gpu_bytes(arch, dataclasses.replace(plan, batch_per_gpu=1)).get("kv_cache", 0.0)
    avail = cluster.gpu.memory_bytes * (1 - ACTIVATION_RESERVE)
    if per_user > 0:  # the largest batch whose KV cache still fits
        max_batch = max(1, min(max_batch, int((avail - fixed) // per_user)))
    lo = 2 if plan.schedule == "tbo" else 1
    tried: list[tuple[int, float]] = []
    best = at(lo)
    tried.append((lo, best["tps_per_user"]))
    if best["tps_per_user"] < target_tps_per_user:
        return lo, best, tried
    hi = max_batch
    top = at(hi)
    tried.append((hi, top["tps_per_user"]))
    if top["tps_per_user"] >= target_tps_per_user:
        return hi, top, tried
    while hi - lo > 1:
        mid = (lo + hi) // 2
        m = at(mid)
        tried.append((mid, m["tps_per_user"]))
        if m["tps_per_user"] >= target_tps_per_user:
            lo, best = mid, m
        else:
            hi = mid
    return lo, best, tried


def run_from_args(args) -> int:
    """The analytic branch of `moesim simulate`: build the plan, run, print, write SIMRUN."""
    import json

    from simulator.workload import RoutingSpec

    shortcut = None if args.layout is None else args.layout == "shortcut"
    arch = get_arch(args.preset, shortcut=shortcut)
    if args.gpus is None:
        raise SimulationError("--gpus N is required with --preset")
    routing = RoutingSpec(k_mean=args.k_mean, k_std=args.k_std, choice=args.routing, zipf_s=args.zipf_s)
    if args.routing_record:
        routing = routing_from_file(args.routing_record, arch, args.routing)
        if args.routing == "zipf":
            routing.choice, routing.zipf_s = "zipf", args.zipf_s
    plan = ParallelPlan(
        gpus=args.gpus, mode=args.mode, batch_per_gpu=args.batch_per_gpu, context=args.context,
        schedule=args.schedule, ep=args.ep, tp=args.tp, pp=args.pp, micro_batches=args.micro_batches,
        mtp=args.mtp_accept is not None, mtp_accept=args.mtp_accept or 0.0, weight_bytes=args.weight_bytes,
        routing=routing,
    )
    if getattr(args, "target_tps_per_user", None):
        if plan.mode != "decode":
            raise SimulationError("--target-tps-per-user applies to --mode decode")
        batch, _, tried = search_batch_for_tps(arch, plan, args.cluster or "h800", args.target_tps_per_user,
                                               seed=args.seed, price_per_gpu_hour=args.price_per_gpu_hour)
        print("batch search (batch/GPU: TPS/user): " + ", ".join(f"{b}: {t:.1f}" for b, t in sorted(tried)))
        plan.batch_per_gpu = batch
    metrics = run_whatif(arch, plan, args.cluster or "h800", args.out, seed=args.seed,
                         price_per_gpu_hour=args.price_per_gpu_hour, train_tokens=args.train_tokens,
                         write_traces=not args.no_traces)
    if args.json:
        print(json.dumps({k: v for k, v in metrics.items() if k not in ("ranks", "labels")}, indent=1, default=float))
    else:
        print("\n".join(summary_lines(metrics)))
        print(f"wrote {args.out}  ({metrics['timing_s']['total_s']:.1f} s)")
    return 0
