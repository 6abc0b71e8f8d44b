"""Synthetic but realistic dashboard inputs, written with the project's own writers.

`make_run` lays out ScMoE (shortcut) or sequential layers on a compute and a comm lane per
rank with a small list scheduler (an op starts when its lane is free and its deps are
done), writes ops.parquet with traces.schema, metrics.json with traces.overlap (the one
shared definition) plus routing statistics drawn from a seeded router, and run.json with
per-rank step times. Other helpers write: train logs, validation.json, sweep tables.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from traces import rundir
from traces.schema import make_ops, write_ops

COMPUTE_LANE = "cuda:0/stream:7"
COMM_LANE = "cuda:0/stream:13"
MEMORY_LANE = "cuda:0/stream:20"
# (block, kind, base µs) in issue order; deps are wired in _layer_ops
BLOCKS_US = {"attn0": 120.0, "mlp0": 90.0, "router": 12.0, "dispatch": 110.0, "experts": 150.0,
             "combine": 100.0, "attn1": 120.0, "mlp1": 90.0}


def _layer_plan(shortcut: bool) -> list[tuple[str, str, list[str]]]:
    """(block, lane, blocks it waits for) in issue order per lane."""
    if shortcut:  # ScMoE: the MoE branch starts after attn0 and runs beside mlp0/attn1/mlp1
        return [("attn0", COMPUTE_LANE, []), ("router", COMPUTE_LANE, ["attn0"]),
                ("dispatch", COMM_LANE, ["router"]), ("mlp0", COMPUTE_LANE, []), ("attn1", COMPUTE_LANE, []),
                ("experts", COMPUTE_LANE, ["dispatch"]), ("combine", COMM_LANE, ["experts"]),
                ("mlp1", COMPUTE_LANE, [])]
    return [("attn0", COMPUTE_LANE, []), ("mlp0", COMPUTE_LANE, []), ("attn1", COMPUTE_LANE, []),
            ("router", COMPUTE_LANE, []), ("dispatch", COMM_LANE, ["router"]),
            ("experts", COMPUTE_LANE, ["dispatch"]), ("combine", COMM_LANE, ["experts"]),
            ("mlp1", COMPUTE_LANE, ["combine"])]


def make_ops_columns(world_size: int, n_layers: int, n_steps: int, shortcut: bool,
                     rng: np.random.Generator) -> dict[str, list]:
    """Columns for traces.schema.make_ops: every rank, step and layer scheduled."""
    cols: dict[str, list] = {k: [] for k in ("id", "rank", "lane", "kind", "name", "label", "start_us", "dur_us",
                                             "coll", "group", "coll_bytes", "seq", "step", "deps")}
    group = ",".join(str(r) for r in range(world_size))
    rank_speed = rng.uniform(0.85, 1.25, size=world_size)
    next_id = 0
    for rank in range(world_size):
        lane_free = {COMPUTE_LANE: 0.0, COMM_LANE: 0.0, MEMORY_LANE: 0.0}
        seq = 0
        for step in range(n_steps):
            step_start = max(lane_free.values()) + 50.0
            lane_free = {k: step_start for k in lane_free}
            ends: dict[str, tuple[int, float]] = {}
            # a host-to-device copy at the start of every step
            plan = [("h2d", MEMORY_LANE, [], "memory", 40.0, "")]
            for layer in range(n_layers):
                for block, lane, waits in _layer_plan(shortcut):
                    kind = "comm" if block in ("dispatch", "combine") else "compute"
                    plan.append((block, lane, [f"L{layer}/{w}" for w in waits], kind, BLOCKS_US[block], f"L{layer}/{block}"))
            for block, lane, waits, kind, base_us, label in plan:
                dur = base_us * (rank_speed[rank] if kind == "compute" else 1.0) * rng.uniform(0.9, 1.1)
                deps = [ends[w][0] for w in waits if w in ends]
                start = max([lane_free[lane]] + [ends[w][1] for w in waits if w in ends])
                cols["id"].append(next_id)
                cols["rank"].append(rank)
                cols["lane"].append(lane)
                cols["kind"].append(kind)
                cols["name"].append({"comm": "ncclDevKernel_SendRecv", "memory": "Memcpy HtoD"}.get(kind, f"{block}_kernel"))
                cols["label"].append(label)
                cols["start_us"].append(start)
                cols["dur_us"].append(dur)
                cols["coll"].append("all_to_all" if kind == "comm" else "")
                cols["group"].append(group if kind == "comm" else "")
                cols["coll_bytes"].append(2.0e6 if kind == "comm" else 0.0)
                cols["seq"].append(seq if kind == "comm" else -1)
                seq += kind == "comm"
                cols["step"].append(step)
                cols["deps"].append(deps)
                lane_free[lane] = start + dur
                ends[label or block] = (next_id, start + dur)
                next_id += 1
    return cols


def routing_stats(n_layers: int, n_ffn: int, n_zero: int, topk: int, n_tokens: int, world_size: int,
                  rng: np.random.Generator) -> tuple[dict, dict]:
    """A seeded router: each token picks `topk` of n_ffn + n_zero experts in every layer.

    Returns (run.json `routing` in traces/capture.py's per-layer layout, metrics.json routing
    keys). activated params per token = DENSE + (FFN experts used, all layers) · EXPERT params.
    """
    dense, per_expert = 2.0e9, 25.0e6
    popularity = rng.dirichlet(np.full(n_ffn + n_zero, 2.0), size=n_layers)
    load = np.zeros((n_layers, n_ffn + n_zero), dtype=np.int64)
    ffn_used = np.zeros((n_tokens, n_layers), dtype=np.int64)
    for layer in range(n_layers):
        for t in range(n_tokens):
            chosen = rng.choice(n_ffn + n_zero, size=topk, replace=False, p=popularity[layer])
            load[layer, chosen] += 1
            ffn_used[t, layer] = int(np.sum(chosen < n_ffn))
    n_local = n_ffn // world_size
    routing = {}
    for layer in range(n_layers):
        ffn = load[layer, :n_ffn]
        rows = [int(ffn[r * n_local:(r + 1) * n_local].sum()) for r in range(world_size)]
        routing[str(layer)] = {
            "tokens": n_tokens,
            "ffn_experts_per_token_mean": float(ffn_used[:, layer].mean()),
            "ffn_experts_per_token_hist": np.bincount(ffn_used[:, layer], minlength=topk + 1).tolist(),
            "zero_expert_share": float(load[layer, n_ffn:].sum() / (n_tokens * topk)),
            "tokens_per_expert": load[layer].tolist(),
            "expert_load_max_over_mean": float(ffn.max() / ffn.mean()),
            "rank_load_rows": rows,
            "rank_load_max_over_mean": float(max(rows) / np.mean(rows)),
        }
    activated = dense + ffn_used.sum(axis=1) * per_expert
    edges = np.linspace(activated.min(), activated.max() + 1, 9)
    counts, _ = np.histogram(activated, bins=edges)
    metrics = {
        "ffn_experts_per_token_mean": float(ffn_used.mean()),
        "activated_params_mean": float(activated.mean()),
        "activated_params_min": float(activated.min()),
        "activated_params_max": float(activated.max()),
        "activated_params_histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "zero_expert_share": float(load[:, n_ffn:].sum() / load.sum()),
        "expert_load_max_over_mean": float(np.mean([r["expert_load_max_over_mean"] for r in routing.values()])),
    }
    return routing, metrics


def make_run(path: Path, *, world_size: int = 2, schedule: str = "sbo", source: str = "live", n_layers: int = 3,
             n_steps: int = 2, seed: int = 0, routing: bool = True, metrics: bool = True) -> Path:
    """Write a run dir at `path` (ops.parquet, run.json, metrics.json) and return it."""
    from traces.overlap import compute_metrics

    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    ops = make_ops(make_ops_columns(world_size, n_layers, n_steps, schedule != "sequential", rng))
    write_ops(ops, path / rundir.OPS_PARQUET)
    rank = ops.column("rank").to_numpy()
    step = ops.column("step").to_numpy()
    start = ops.column("start_us").to_numpy()
    end = start + ops.column("dur_us").to_numpy()
    step_times = {str(r): [float(end[(rank == r) & (step == s)].max() - start[(rank == r) & (step == s)].min())
                           for s in range(n_steps)] for r in range(world_size)}
    n_ffn, n_zero = 8 * world_size, 4 * world_size
    config = {"n_routed_experts": n_ffn, "zero_expert_num": n_zero, "moe_topk": 4, "num_layers": n_layers}
    run = {"source": source, "preset": "tiny", "config": config, "schedule": schedule, "mode": "train",
           "world_size": world_size, "backend": "gloo" if source == "live" else "h800",
           "step_times_us": step_times,
           "step_time_us_median": float(np.median([max(v[s] for v in step_times.values()) for s in range(n_steps)]))}
    if routing:
        run["routing"], stats = routing_stats(n_layers, n_ffn, n_zero, 4, 64, world_size, rng)
        run["parallel"] = {"expert_parallel": world_size, "experts_per_rank": n_ffn // world_size}
    rundir.write_json_atomic(path / rundir.RUN_JSON, run)
    if metrics:
        obj = compute_metrics(ops)
        if routing:
            obj.update(stats)
        rundir.write_json_atomic(path / rundir.METRICS_JSON, obj)
    return path


def make_train_log(path: Path, n_steps: int = 60, seed: int = 0) -> Path:
    """A `moesim train` log: experts per token driven towards a target by a PID controller."""
    rng = np.random.default_rng(seed)
    target, value, integral = 3.0, 4.0, 0.0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "loss", "ffn_experts_per_token", "ffn_experts_std", "zero_share",
                    "load_max_over_mean", "device_load_max_over_mean", "activated_params_mean"])
        for s in range(n_steps):
            err = target - value
            integral += err
            value += 0.3 * err + 0.02 * integral + rng.normal(0, 0.03)
            w.writerow([s, 5.0 * np.exp(-s / 40) + 1 + rng.normal(0, 0.02), value, 0.2 + rng.uniform(0, 0.05),
                        1 - value / 4, 1.5 + rng.uniform(0, 0.3), 1.2 + rng.uniform(0, 0.2), 2.0e9 + value * 25e6])
    return path


def make_validation(path: Path) -> Path:
    configs = []
    for i, (measured, err) in enumerate([(1500.0, 4.0), (2200.0, -7.5), (3100.0, 12.0), (900.0, -2.0)]):
        configs.append({"name": f"cfg{i}", "measured_step_us": measured, "predicted_step_us": measured * (1 + err / 100),
                        "error_pct": err, "measured_overlap_pct": 40.0 + 10 * i, "predicted_overlap_pct": 43.0 + 9 * i})
    errors = [abs(c["error_pct"]) for c in configs]
    rundir.write_json_atomic(path, {"configs": configs, "median_abs_error_pct": float(np.median(errors)),
                                    "max_abs_error_pct": max(errors)})
    return path


def sweep_table(seed: int = 0) -> dict[str, list]:
    """A sweep results grid with throughput and cost that trade off like the real thing."""
    rng = np.random.default_rng(seed)
    cols: dict[str, list] = {k: [] for k in ("preset", "cluster", "gpus", "ep_size", "batch_per_gpu", "schedule",
                                             "step_time_us", "tpot_ms", "tps_per_user", "tgs", "cost_usd_per_m_tokens")}
    price = {"h800": 2.0, "h100": 2.5, "h200": 3.2}
    speed = {"h800": 1.0, "h100": 1.05, "h200": 1.3}
    for cluster in ("h800", "h100", "h200"):
        for gpus in (32, 64, 128):
            for batch in (8, 32, 128):
                for schedule in ("sbo", "sequential"):
                    step_us = (8000 + 120 * batch) / speed[cluster] * (1.0 if schedule == "sbo" else 1.25)
                    step_us *= (1 + 0.1 * np.log2(gpus / 32)) * rng.uniform(0.97, 1.03)
                    tpot_ms = step_us / 1e3
                    tgs = batch / (step_us / 1e6)
                    cols["preset"].append("longcat-flash")
                    cols["cluster"].append(cluster)
                    cols["gpus"].append(gpus)
                    cols["ep_size"].append(gpus)
                    cols["batch_per_gpu"].append(batch)
                    cols["schedule"].append(schedule)
                    cols["step_time_us"].append(step_us)
                    cols["tpot_ms"].append(tpot_ms)
                    cols["tps_per_user"].append(1e3 / tpot_ms)
                    cols["tgs"].append(tgs)
                    cols["cost_usd_per_m_tokens"].append(price[cluster] / (tgs * 3600) * 1e6)
    return cols
