"""What-if runs end to end (simulator/whatif.py, `moesim simulate --preset`): small clusters,
closed-form metric identities, schedule orderings that follow from the op graph, bad plans."""

from __future__ import annotations

import json

import numpy as np
import pytest

from moesim.cli import main
from simulator.baselines import get_arch
from simulator.errors import SimulationError
from simulator.whatif import memory_per_gpu_bytes, routing_from_file, run_whatif
from simulator.workload import ParallelPlan
from traces.rundir import METRICS_JSON, RUN_JSON, read_json
from traces.schema import read_ops


def _decode(schedule: str, B: int = 8, G: int = 8, preset: str = "small", **kw):
    plan = ParallelPlan(gpus=G, mode="decode", batch_per_gpu=B, context=2048, schedule=schedule, **kw)
    return run_whatif(preset, plan, "h800", None, metric_ranks=0)


def test_metric_identities_and_run_dir(tmp_path):
    plan = ParallelPlan(gpus=8, mode="decode", batch_per_gpu=4, context=1024, schedule="sbo", mtp=True, mtp_accept=0.5)
    m = run_whatif("small", plan, "h800", tmp_path / "sim", price_per_gpu_hour=3.0)
    step_s = m["step_time_us"] / 1e6
    assert m["tpot_ms"] == pytest.approx(m["step_time_us"] / 1e3 / 1.5)
    assert m["tps_per_user"] == pytest.approx(1e3 / m["tpot_ms"])
    assert m["tgs"] == pytest.approx(4 * 1.5 / step_s)  # users per GPU x accepted tokens / step
    assert m["cost_usd_per_m_tokens"] == pytest.approx(3.0 / (m["tgs"] * 3600) * 1e6)
    run = read_json(tmp_path / "sim" / RUN_JSON)
    assert run["source"] == "simulated" and run["world_size"] == 8 and run["mode"] == "decode"
    saved = read_json(tmp_path / "sim" / METRICS_JSON)
    assert saved["tgs"] == pytest.approx(m["tgs"])
    ops = read_ops(tmp_path / "sim" / "ops.parquet")
    assert (ops.column("dur_us").to_numpy() > 0).any()
    ends = ops.column("start_us").to_numpy() + ops.column("dur_us").to_numpy()
    assert ends.max() == pytest.approx(m["step_time_us"])
    # per-rank overlap figures exist and hidden ≤ comm
    for r in saved["ranks"].values():
        assert r["hidden_comm_us"] <= r["comm_us"] + 1e-6


def test_schedules_order_as_the_graph_implies():
    """SBO hides comm that sequential exposes (same work → never slower); TBO in memory-bound
    decode reads every weight twice (two half batches), so it is slower than SBO."""
    seq, sbo, tbo = (_decode(s, preset="longcat-flash", G=64, B=8) for s in ("sequential", "sbo", "tbo"))
    assert sbo["step_time_us"] < seq["step_time_us"]
    assert sbo["exposed_comm_us_mean"] < seq["exposed_comm_us_mean"]
    assert tbo["step_time_us"] > sbo["step_time_us"]
    assert seq["overlap_pct_mean"] < 5.0  # nothing overlaps in the sequential schedule


def test_training_metrics():
    plan = ParallelPlan(gpus=8, mode="train", batch_per_gpu=2, context=512, schedule="sbo", micro_batches=2)
    m = run_whatif("small", plan, "a800", None, train_tokens=1e9)
    tokens = 8 * 2 * 512
    assert m["tokens_per_s"] == pytest.approx(tokens / (m["step_time_us"] / 1e6))
    assert 0 < m["mfu_pct"] < 100
    assert m["days_for_train_tokens"] == pytest.approx(1e9 / m["tokens_per_s"] / 86400)


def test_memory_check_reports_bytes():
    arch = get_arch("longcat-flash")
    plan = ParallelPlan(gpus=8, mode="decode", batch_per_gpu=8, context=5000, schedule="sbo")
    need = memory_per_gpu_bytes(arch, ParallelPlan(gpus=8, mode="decode", batch_per_gpu=8, context=5000))
    experts = arch.num_layers * arch.n_routed_experts * arch.expert_params()
    # EP 8: an eighth of the experts, a full copy of everything else (attention DP)
    assert need["weights"] == pytest.approx((arch.total_params() - experts * 7 / 8) * 2, rel=1e-9)
    assert need["kv_cache"] == pytest.approx(8 * 5001 * 56 * 576 * 2)
    with pytest.raises(SimulationError, match=r"needs \d+\.\d GB per GPU .* but h800 has 72\.0 GB"):
        run_whatif("longcat-flash", plan, "h800", None)


def test_routing_record_and_train_log(tmp_path):
    arch = get_arch("small")
    rec = tmp_path / "routing.json"
    k = [0, 12, 6, 6]
    rec.write_text(json.dumps({"ffn_experts_per_token": k, "tokens_per_expert": list(range(1, arch.n_routed_experts + 1))}))
    spec = routing_from_file(rec, arch)
    assert spec.k_probs[0] == 0.25 and spec.k_probs[6] == 0.5 and spec.k_probs[12] == 0.25
    assert spec.choice == "replay" and len(spec.expert_probs) == arch.n_routed_experts
    log = tmp_path / "train_log.csv"
    log.write_text("step,ffn_experts_per_token,ffn_experts_std\n" + "".join(f"{i},7.0,2.5\n" for i in range(10)))
    spec = routing_from_file(log, arch)
    assert spec.k_mean == 7.0 and spec.k_std == 2.5


def test_cli_analytic_and_bad_plans(tmp_path, capsys):
    out = tmp_path / "sim"
    rc = main(["simulate", "--preset", "small", "--cluster", "h800", "--gpus", "8", "--mode", "decode",
               "--context", "512", "--batch-per-gpu", "4", "--schedule", "sbo", "--mtp-accept", "0.9",
               "--price-per-gpu-hour", "2.0", "-o", str(out), "--no-traces"])
    assert rc == 0
    assert "TGS" in capsys.readouterr().out
    assert (out / METRICS_JSON).is_file()
    bad = [
        (["--gpus", "8", "--ep", "3"], "ep 3 does not divide"),
        (["--gpus", "8", "--batch-per-gpu", "0"], "batch_per_gpu must be positive"),
        (["--gpus", "12"], "not a multiple of the node size"),
    ]
    for extra, msg in bad:
        rc = main(["simulate", "--preset", "small", "--cluster", "h800", "--mode", "decode", "--context", "64",
                   "-o", str(tmp_path / "bad"), *extra])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and err.count("\n") == 1, err
    rc = main(["simulate", "--preset", "longcat-flash", "--cluster", "h800", "--gpus", "8", "--context", "5000",
               "-o", str(tmp_path / "bad")])
    err = capsys.readouterr().err
    assert rc == 2 and "GB per GPU" in err
    assert not (tmp_path / "bad").exists()


def test_routing_from_a_live_run_json(tmp_path):
    """run.json of a live run (traces/capture.summarise_routing layout), another model size:
    the histogram carries over, the load profile is interpolated to the target's experts."""
    arch = get_arch("longcat-flash")
    layer = {"ffn_experts_per_token_hist": [0, 0, 0, 0, 0, 0, 10, 0, 0, 0, 0, 0, 10],
             "tokens_per_expert": [40] * 4 + [10] * 60 + [5] * 32}
    run = {"config": {"n_routed_experts": 64}, "routing": {"0": layer, "1": layer}}
    (tmp_path / "run.json").write_text(json.dumps(run))
    spec = routing_from_file(tmp_path, arch)
    assert spec.k_probs[6] == pytest.approx(0.5) and spec.k_probs[12] == pytest.approx(0.5)
    probs = np.asarray(spec.expert_probs)
    assert probs.size == 512 and spec.shuffle_experts
    assert probs.max() == pytest.approx(80) and probs.min() == pytest.approx(20)
    from simulator.workload import generate

    plan = ParallelPlan(gpus=16, mode="decode", batch_per_gpu=8, context=64, routing=spec)
    w = generate(arch, plan, np.random.default_rng(0))
    k = w.ffn_per_token
    assert set(np.unique(k)) <= {6, 12}


def test_sequential_step_is_the_sum_of_its_ops(tmp_path):
    """Sequential: every op waits for the previous one, so the step is bracketed by the sum of
    one rank's op durations and the sum over op positions of the slowest rank's duration."""
    plan = ParallelPlan(gpus=8, mode="decode", batch_per_gpu=4, context=512, schedule="sequential")
    m = run_whatif("small", plan, "h800", tmp_path / "sim", write_traces=False)
    ops = read_ops(tmp_path / "sim" / "ops.parquet")
    ranks = ops.column("rank").to_numpy()
    dur = ops.column("dur_us").to_numpy().reshape(8, -1)  # rows are rank-major, one template
    assert (ranks.reshape(8, -1) == np.arange(8)[:, None]).all()
    lo, hi = dur.sum(axis=1).max(), dur.max(axis=0).sum()
    assert lo - 1e-6 <= m["step_time_us"] <= hi + 1e-6
    assert m["overlap_pct_mean"] == pytest.approx(0.0, abs=1e-6)


def test_batch_search_brackets_the_target():
    from simulator.whatif import search_batch_for_tps

    plan = ParallelPlan(gpus=8, mode="decode", batch_per_gpu=1, context=4096, schedule="sbo")
    batch, m, tried = search_batch_for_tps("small", plan, "h800", 8000.0, max_batch=64)
    tps = dict(tried)
    assert m["tps_per_user"] >= 8000.0
    assert all(t < 8000.0 for b, t in tps.items() if b > batch)  # every larger batch tried misses
    assert batch + 1 in tps and batch < 64
