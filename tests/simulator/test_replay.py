"""Replay of traced timelines, the simulated run dir, and the CLI verbs."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from simulator.cluster import get_cluster, load_cluster, save_cluster
from simulator.errors import SimulationError
from simulator.replay import replay, replay_gaps, write_dir_atomic, write_sim_run
from tests.simulator.helpers import Ops
from traces.overlap import compute_metrics
from traces.rundir import read_json
from traces.schema import read_ops, write_ops


def _self_consistent() -> Ops:
    """Two ranks; compute with host gaps, an all-to-all ending at 25 µs on both, data deps."""
    ops = Ops()
    a0 = ops.add(0, "cpu:main", dur=10.0, start=0.0)
    ops.add(0, "cpu:main", dur=8.0, start=12.0)  # 2 µs host gap
    x0 = ops.add(0, "cpu:gloo", "comm", "gloo:all_to_all", 15.0, start=10.0, coll="all_to_all", group="0,1",
                 coll_bytes=1e5, seq=0, deps=[a0])
    ops.add(0, "cpu:main", dur=5.0, start=25.0, deps=[x0])
    a1 = ops.add(1, "cpu:main", dur=15.0, start=0.0)
    x1 = ops.add(1, "cpu:gloo", "comm", "gloo:all_to_all", 10.0, start=15.0, coll="all_to_all", group="0,1",
                 coll_bytes=1e5, seq=0, deps=[a1])
    ops.add(1, "cpu:main", dur=8.0, start=27.0, deps=[x1])  # waits for the a2a, then 2 µs gap
    return ops


def test_gaps_are_the_unexplained_host_time():
    gaps = replay_gaps(_self_consistent().table())
    assert gaps.tolist() == [0.0, 2.0, 0.0, 0.0, 0.0, 0.0, 2.0]


def test_replay_with_comm_from_trace_reproduces_a_self_consistent_timeline_exactly():
    table = _self_consistent().table()
    sim = replay(table, get_cluster("cpu-loopback", gpus=2, cores=2), comm_from_trace=True)
    np.testing.assert_array_equal(sim.column("start_us").to_numpy(), table.column("start_us").to_numpy())
    np.testing.assert_array_equal(sim.column("dur_us").to_numpy(), table.column("dur_us").to_numpy())


def test_replay_with_the_network_model_changes_only_comm():
    table = _self_consistent().table()
    sim = replay(table, get_cluster("cpu-loopback", gpus=2, cores=2))
    d = sim.to_pydict()
    # 1e5 / 2 bytes each way over 3 GB/s loopback + 2 × 15 µs hops, comm thread on a free core
    a2a = 30.0 + 0.5e5 / 3e3
    # rank 1 arrives last (15 µs); rank 0's op also holds its 5 µs wait. The latency ends at
    # 45 µs, after rank 0's compute (3 jobs on 2 cores until 20 µs), so bytes move at full speed.
    assert d["dur_us"][5] == pytest.approx(a2a) and d["dur_us"][2] == pytest.approx(5.0 + a2a)
    assert d["start_us"][3] == pytest.approx(15.0 + a2a)
    assert d["start_us"][6] == pytest.approx(15.0 + a2a + 2.0)
    assert [d["dur_us"][i] for i in (0, 1, 3, 4, 6)] == [10.0, 8.0, 5.0, 15.0, 8.0]


def test_simulated_run_dir_reads_like_a_live_one(tmp_path):
    cluster = get_cluster("h800", gpus=8)
    table = _self_consistent().table()
    sim = replay(table, cluster)
    out = write_sim_run(tmp_path / "sim", sim, cluster, seed=3, run_info={"input": "hand-built"})
    run = read_json(out / "run.json")
    assert run["source"] == "simulated" and run["cluster"] == "h800" and run["seed"] == 3
    assert run["world_size"] == 2 and set(run["step_times_us"]) == {"0", "1"}
    back = read_ops(out / "ops.parquet")
    assert read_json(out / "metrics.json")["step_time_us"] == compute_metrics(back)["step_time_us"]
    from traces.kineto import parse_traces

    import gzip
    import json

    for path in sorted(out.glob("rank*.pt.trace.json.gz")):
        events = json.load(gzip.open(path))["traceEvents"]
        names = {e["tid"]: e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
        tracks: dict[int, list] = {}
        for e in events:
            if e["ph"] == "X":
                assert e["cat"] == "kernel" and e["tid"] in names
                tracks.setdefault(e["tid"], []).append((e["ts"], e["ts"] + e["dur"]))
        for spans in tracks.values():  # Perfetto: slices on one track must nest, not straddle
            spans.sort()
            assert all(b[0] >= a[1] - 1e-3 for a, b in zip(spans, spans[1:]))
    parsed = parse_traces(sorted(out.glob("rank*.pt.trace.json.gz")))
    kinds = parsed.column("kind").to_pylist()
    assert kinds.count("comm") == 2 and parsed.column("coll").to_pylist().count("all_to_all") == 2
    assert sorted(parsed.column("rank").unique().to_pylist()) == [0, 1]


@pytest.mark.slow
def test_torch_tb_profiler_lists_the_simulated_workers(tmp_path):
    pytest.importorskip("torch_tb_profiler")
    cluster = get_cluster("h800", gpus=8)
    out = write_sim_run(tmp_path / "sim", replay(_self_consistent().table(), cluster), cluster)
    script = textwrap.dedent(
        """
        import sys
        if __name__ == "__main__":
            from torch_tb_profiler import io
            from torch_tb_profiler.profiler.loader import RunLoader
            run = RunLoader("sim", sys.argv[1], io.Cache()).load()
            print(sorted(w for w, _ in run.profiles))
        """
    )
    path = tmp_path / "load.py"
    path.write_text(script)
    res = subprocess.run([sys.executable, str(path), str(out)], capture_output=True, text=True, timeout=120,
                         cwd=tmp_path)
    assert "['rank0', 'rank1']" in res.stdout, res.stderr[-2000:]


def test_cluster_files_round_trip(tmp_path):
    for suffix in ("graphml", "json"):
        c = get_cluster("a30-pcie", gpus=16)
        back = load_cluster(save_cluster(c, tmp_path / f"c.{suffix}"))
        assert back.num_gpus == 16 and back.gpu == c.gpu and back.gpus_per_node == 8
        assert sorted(back.graph.edges(data=True)) == sorted(c.graph.edges(data=True))


def test_cli_cluster_and_simulate(tmp_path, capsys):
    assert main(["cluster", "show", "h800", "--gpus", "16"]) == 0
    assert "16 x H800" in capsys.readouterr().out
    assert main(["cluster", "show", "nope"]) == 2
    err = capsys.readouterr().err
    assert "valid: h800, h100, h200, a100, a800, a30-pcie, cpu-loopback" in err and len(err.strip().splitlines()) == 1
    run = tmp_path / "run"
    run.mkdir()
    write_ops(_self_consistent().table(), run / "ops.parquet")
    assert main(["simulate", "--trace", str(run), "--cluster", "nope", "-o", str(tmp_path / "s")]) == 2
    assert main(["simulate", "--trace", str(run), "--cluster", "cpu-loopback", "--cores", "2",
                 "--comm-from-trace", "-o", str(tmp_path / "s")]) == 0
    assert read_json(tmp_path / "s" / "metrics.json")["step_time_us"] == pytest.approx(35.0)
    bad = Ops()
    bad.add(0, "a", "comm", coll="all_reduce", group="0,1", coll_bytes=1.0, seq=0)
    write_ops(bad.table(), run / "ops.parquet")
    assert main(["simulate", "--trace", str(run), "--cluster", "cpu-loopback", "--gpus", "2", "-o", str(tmp_path / "t")]) == 2
    assert "never reached by rank(s) 1" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


SAMPLES = Path(__file__).resolve().parents[2] / "traces" / "samples"


@pytest.mark.parametrize("run", ["tiny-prefill-sequential", "tiny-prefill-shortcut"])
def test_replaying_live_cpu_runs_with_comm_from_trace_reproduces_step_and_overlap(run):
    src = SAMPLES / run
    if not src.is_dir():
        pytest.skip(f"{src} absent")
    from traces.kineto import parse_traces

    live = parse_traces(sorted(src.glob("rank*.pt.trace.json.gz")))
    cluster = get_cluster("cpu-loopback", gpus=2, cores=2)
    sim = replay(live, cluster, comm_from_trace=True)
    want, got = compute_metrics(live), compute_metrics(sim)
    assert got["step_time_us"] == pytest.approx(want["step_time_us"], rel=0.02)
    for rank, figures in want["ranks"].items():
        if figures["overlap_pct"] is not None:
            assert got["ranks"][rank]["overlap_pct"] == pytest.approx(figures["overlap_pct"], abs=3.0)
        assert got["ranks"][rank]["compute_us"] == pytest.approx(figures["compute_us"], rel=0.02)


@pytest.mark.slow
def test_hta_reads_the_simulated_gpu_run_with_our_overlap(tmp_path):
    hta = pytest.importorskip("hta.trace_analysis")
    ops = Ops()
    group = ",".join(map(str, range(8)))
    for r in range(8):
        a = ops.add(r, "cuda:0/stream:7", dur=20.0 + 5 * r)
        ops.add(r, "cuda:0/stream:20", "comm", "a2a", coll="all_to_all", group=group, coll_bytes=8e6, seq=0, deps=[a])
        ops.add(r, "cuda:0/stream:7", dur=40.0, start=1)
    cluster = get_cluster("h800", gpus=8)
    from simulator.engine import simulate

    sim = simulate(ops.table(), cluster)
    out = write_sim_run(tmp_path / "sim", sim, cluster)
    ours = compute_metrics(sim)["ranks"]
    assert 0 < ours["0"]["overlap_pct"] < 100
    theirs = hta.TraceAnalysis(trace_dir=str(out)).get_comm_comp_overlap(visualize=False)
    got = dict(zip(theirs["rank"].tolist(), theirs["comp_comm_overlap_pctg"].tolist()))
    assert sorted(got) == list(range(8))
    for rank, pct in got.items():
        assert pct == pytest.approx(ours[str(rank)]["overlap_pct"], abs=0.5)


def test_collectives_without_sizes_fall_back_to_traced_time_and_are_counted():
    ops = _self_consistent()
    for k in ("coll_bytes",):
        ops.cols[k] = [0.0] * len(ops.cols[k])
    table = ops.table()
    cluster = get_cluster("cpu-loopback", gpus=2, cores=2)
    notes: dict = {}
    sim = replay(table, cluster, notes=notes)
    np.testing.assert_array_equal(sim.column("start_us").to_numpy(), table.column("start_us").to_numpy())
    assert notes == {"replay_dropped_deps": 0, "unsized_collectives_from_trace": 1}
    latency_only = replay(table, cluster, unsized_from_trace=False).to_pydict()
    assert latency_only["dur_us"][5] == pytest.approx(30.0)  # two 15 µs loopback hops, no bytes


def test_run_dir_is_replaced_whole_or_not_at_all(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "old.txt").write_text("old")

    def fails_half_way(tmp: Path) -> None:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_dir_atomic(out, fails_half_way)
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temp dir left behind
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    write_dir_atomic(out, lambda tmp: (tmp / "new.txt").write_text("new"))
    assert [p.name for p in tmp_path.iterdir()] == ["run"]
    assert [p.name for p in out.iterdir()] == ["new.txt"]  # replaced, not merged
    (tmp_path / "file").write_text("")
    with pytest.raises(SimulationError, match="not a directory"):
        write_dir_atomic(tmp_path / "file", lambda tmp: None)


H200_RUNS = Path(__file__).resolve().parents[1] / "data" / "h200"


def test_preset_for_devices():
    from simulator.cluster import preset_for_devices

    assert preset_for_devices(["NVIDIA H200"]) == "h200"
    assert preset_for_devices(["NVIDIA H100 80GB HBM3", "NVIDIA H100 80GB HBM3"]) == "h100"
    assert preset_for_devices(["NVIDIA A100-SXM4-80GB"]) == "a100"
    assert preset_for_devices(["NVIDIA A30"]) == "a30-pcie"
    assert preset_for_devices(["NVIDIA H200", "NVIDIA H100"]) is None  # mixed
    assert preset_for_devices(["Tesla T4"]) is None and preset_for_devices([]) is None


@pytest.mark.parametrize("name", ["small/prefill-b4-t128-sequential-prof/rep0", "small/prefill-b4-t128-shortcut-prof/rep0",
                                  "tiny/train-shortcut"])
def test_replaying_an_h200_trace_picks_the_h200_cluster_and_keeps_its_step_time(name, tmp_path, capsys):
    """A real GPU step on the H200 is host-bound (the GPU busy ~7 %): its replay only comes
    out right if every kernel waits for its launch and the host for its syncs. Reference:
    the step times the live run measured with its own timer (run.json)."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(H200_RUNS / name, run)
    assert main(["parse", str(run)]) == 0
    assert main(["simulate", "--trace", str(run), "-o", str(tmp_path / "sim")]) == 0
    assert "cluster h200 (the run's GPUs: NVIDIA H200)" in capsys.readouterr().out
    live = read_json(run / "run.json")
    simulated = read_json(tmp_path / "sim" / "metrics.json")["step_time_us"]
    assert simulated == pytest.approx(live["step_time_us_median"], rel=0.02)
    ops = read_ops(tmp_path / "sim" / "ops.parquet")
    busy = sum(d for lane, d in zip(ops.column("lane").to_pylist(), ops.column("dur_us").to_pylist()) if lane.startswith("cuda:"))
    assert busy / live["steps"] < 0.25 * simulated  # host-bound, as the live trace


def test_simulate_names_the_gpu_it_has_no_preset_for(tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(H200_RUNS / "tiny" / "prefill-shortcut", run)
    info = read_json(run / "run.json")
    info["devices"] = {"0": "Tesla T4"}
    (run / "run.json").write_text(__import__("json").dumps(info))
    assert main(["parse", str(run)]) == 0
    assert main(["simulate", "--trace", str(run), "-o", str(tmp_path / "sim")]) == 2
    err = capsys.readouterr().err
    assert "--cluster NAME is required (the trace's run.json ran on Tesla T4, which names no cluster preset)" in err
    assert not (tmp_path / "sim").exists()
