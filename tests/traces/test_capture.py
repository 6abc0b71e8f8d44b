"""`moesim profile` live runs on 2 gloo ranks with the tiny preset.

What is checked against something independent of the capture code:
- the Kineto traces themselves (written by torch.profiler): ranks, step markers, labels, the
  gloo thread, and the all-to-all split sizes torch recorded for each `c10d::alltoall_base_`,
  which must equal the split sizes run.json reports;
- torch-tb-profiler's RunLoader finds the run and one worker per rank;
- HTA's TraceAnalysis loads the run dir and sees both ranks and the profiled iterations.
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import json
import os
import platform
import statistics
import time
from pathlib import Path

import pytest

from moesim.cli import main
from traces.rundir import read_run_json, trace_files

BLOCKS = ("attn0", "mlp0", "router", "dispatch", "experts", "combine", "attn1", "mlp1")
STEPS, WARMUP = 3, 1


def _profile(out: Path, *extra: str) -> int:
    return main(["profile", "--preset", "tiny", "--world-size", "2", "--batch", "4", "--seq", "8",
                 "--steps", str(STEPS), "--warmup", str(WARMUP), "--out", str(out), *extra])


def _events(path: Path) -> tuple[dict, list[dict]]:
    with gzip.open(path, "rt") as f:
        trace = json.load(f)
    return trace, [e for e in trace["traceEvents"] if e.get("ph") == "X"]


@pytest.fixture(scope="module")
def prefill_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("prefill") / "run"
    assert _profile(out, "--schedule", "shortcut", "--mode", "prefill") == 0
    return out


def test_run_json_has_the_stable_keys_and_consistent_step_times(prefill_run):
    run = read_run_json(prefill_run)
    for key in ("source", "preset", "config", "schedule", "mode", "world_size", "backend",
                "step_times_us", "step_time_us_median"):
        assert key in run, key
    assert (run["source"], run["preset"], run["schedule"], run["mode"]) == ("live", "tiny", "shortcut", "prefill")
    assert run["world_size"] == 2 and run["backend"] == "gloo"
    if platform.libc_ver()[0] == "glibc":  # every rank kept its heap (traces.capture.keep_heap)
        assert sorted(run["allocator"]) == ["0", "1"]
        assert all(a.startswith("glibc heap kept") for a in run["allocator"].values()), run["allocator"]
    assert run["config"]["n_routed_experts"] == 4 and run["batch"] == 4 and run["seq"] == 8
    assert sorted(run["step_times_us"]) == ["0", "1"]
    assert all(len(times) == STEPS for times in run["step_times_us"].values())
    per_step = [max(ts) for ts in zip(*run["step_times_us"].values())]
    assert run["step_time_us_median"] == pytest.approx(statistics.median(per_step), rel=1e-6)
    assert run["step_time_us_min"] <= run["step_time_us_median"] <= run["step_time_us_max"]
    routing = run["routing"]["0"]
    assert routing["tokens"] == 4 * 8 * STEPS
    assert sum(routing["tokens_per_expert"]) == routing["tokens"] * run["config"]["moe_topk"]
    assert 0 <= routing["zero_expert_share"] <= 1


def test_traces_carry_rank_steps_labels_and_the_gloo_thread(prefill_run):
    files = trace_files(prefill_run)
    assert [p.name for p in files] == ["rank0.pt.trace.json.gz", "rank1.pt.trace.json.gz"]
    for rank, path in enumerate(files):
        trace, events = _events(path)
        assert trace["distributedInfo"]["rank"] == rank
        assert trace["distributedInfo"]["world_size"] == 2
        assert len([e for e in events if e["name"].startswith("ProfilerStep#")]) == STEPS
        main_tid = next(e["tid"] for e in events if e["name"].startswith("ProfilerStep#"))
        labels = [e["name"] for e in events if e["name"].startswith("L0/")]
        for block in BLOCKS:
            assert labels.count(f"L0/{block}") >= STEPS, block
        # shortcut: the dispatch is issued before mlp0 and waited on after attn1
        first_step = [e for e in events if e["name"].startswith("L0/") and e["tid"] == main_tid]
        order = [e["name"][3:] for e in sorted(first_step, key=lambda e: e["ts"])][:10]
        assert order == ["attn0", "router", "dispatch", "mlp0", "attn1", "dispatch", "experts",
                         "combine", "mlp1", "combine"]
        gloo = [e for e in events if e["name"] == "gloo:all_to_all"]
        assert gloo and all(e["tid"] != main_tid for e in gloo)


SAMPLES = Path(__file__).resolve().parents[2] / "traces" / "samples"


def _check_split_sizes(run_dir: Path, steps: int) -> None:
    run = read_run_json(run_dir)
    layers = run["config"]["num_layers"]
    for rank, path in enumerate(trace_files(run_dir)):
        _, events = _events(path)
        calls = sorted((e for e in events if e["name"] == "c10d::alltoall_base_"), key=lambda e: e["ts"])
        # (counts exchange: no split sizes) then rows out (dispatch), rows back (combine)
        row_calls = [c for c in calls if c["args"]["Concrete Inputs"][4] not in ("", "[]")]
        dispatch_input_splits = [ast.literal_eval(c["args"]["Concrete Inputs"][4]) for c in row_calls[0::2]]
        assert dispatch_input_splits == run["dispatch_send_rows"][str(rank)]
        assert len(dispatch_input_splits) == steps * layers


def test_split_sizes_in_run_json_match_the_profiler_record(prefill_run):
    _check_split_sizes(prefill_run, STEPS)


@pytest.mark.parametrize("name", ["tiny-prefill-sequential", "tiny-prefill-shortcut"])
def test_committed_samples_are_whole_and_consistent(name):
    run_dir = SAMPLES / name
    run = read_run_json(run_dir)
    assert (run["source"], run["preset"], run["world_size"]) == ("live", "tiny", 2)
    assert run["schedule"] == name.rsplit("-", 1)[1]
    _check_split_sizes(run_dir, run["steps"])


def _load_tensorboard_run(run_dir: Path):
    # The loader parses each worker in a child process; fork starts them in a blink (the
    # variable is read when torch_tb_profiler.multiprocessing is first imported).
    os.environ.setdefault("TORCH_PROFILER_START_METHOD", "fork")
    from torch_tb_profiler import io
    from torch_tb_profiler.profiler.loader import RunLoader

    return RunLoader("live", str(run_dir), io.Cache()).load()


def test_tensorboard_plugin_loader_finds_the_run_and_its_workers(prefill_run):
    run = _load_tensorboard_run(prefill_run)
    assert sorted(run.workers) == ["rank0", "rank1"]
    assert "trace" in [view.name for view in run.views]


def test_hta_loads_both_ranks_and_the_profiled_iterations(prefill_run):
    hta = pytest.importorskip("hta.trace_analysis", reason="HolisticTraceAnalysis not installed")
    analysis = hta.TraceAnalysis(trace_dir=str(prefill_run))
    assert sorted(analysis.t.get_ranks()) == [0, 1]
    iterations = set(int(i) for i in analysis.t.get_trace(0)["iteration"].unique()) - {-1}
    # HTA drops the last ProfilerStep by default (include_last_profiler_step=False); the
    # profiler numbers the active steps from WARMUP (its warmup step is number 0).
    assert iterations == set(range(WARMUP, WARMUP + STEPS - 1))


@pytest.mark.slow
@pytest.mark.parametrize("mode,schedule", [("train", "shortcut"), ("decode", "sequential")])
def test_train_and_decode_runs(tmp_path, mode, schedule):
    extra = ["--context", "6", "--seq", "1"] if mode == "decode" else []
    assert _profile(tmp_path, "--schedule", schedule, "--mode", mode, *extra) == 0
    run = read_run_json(tmp_path)
    assert (run["mode"], run["schedule"]) == (mode, schedule)
    _, events = _events(tmp_path / "rank1.pt.trace.json.gz")
    names = {e["name"] for e in events}
    if mode == "train":
        assert {"loss", "backward", "grad_sync", "optimizer"} <= names
        # the backward of each exchange is an all-to-all too: 3 per forward + 2 per backward
        assert sum(e["name"] == "gloo:all_to_all" for e in events) == 5 * STEPS
        assert "gloo:all_reduce" in names
        _check_backward_labels(tmp_path)
    else:
        assert run["context"] == 6 and run["routing"]["0"]["tokens"] == 4 * STEPS


def _check_backward_labels(run_dir):
    """On CPU autograd runs the backward pass on the calling thread, inside the plain
    `backward` range: each autograd node takes its forward op's label + ":bwd" (traces.lanes,
    from the fwdbwd flows). Counted independently: every forward aten::linear (no bias, 2-D:
    one mm) has exactly one MmBackward0 node, so per block and step the two counts match."""
    from collections import Counter

    from traces.kineto import parse_traces
    from traces.rundir import trace_files

    ops = parse_traces(trace_files(run_dir)).select(["rank", "step", "name", "label"]).to_pylist()
    fwd = Counter((o["rank"], o["step"], o["label"]) for o in ops if o["name"] == "aten::linear")
    bwd = Counter((o["rank"], o["step"], o["label"].removesuffix(":bwd")) for o in ops
                  if o["name"] == "autograd::engine::evaluate_function: MmBackward0")
    assert fwd == bwd and any(label.endswith("/experts") for _, _, label in fwd)
    assert all(o["label"].endswith(":bwd") for o in ops if o["name"].startswith("autograd::engine::evaluate_function: Mm"))


def test_zero_bias_steers_the_zero_expert_share(tmp_path):
    """--zero-bias adds to the routers' correction bias of the zero experts: the share of
    slots they take (counted by the routing records into run.json) rises with it, and the
    run says which bias it ran with. Same weights and tokens, so only the bias differs."""
    shares = {}
    for bias in ("-0.05", "0", "0.05"):
        out = tmp_path / bias
        assert main(["profile", "--preset", "tiny", "--world-size", "1", "--batch", "2", "--seq", "16", "--steps", "1",
                     "--warmup", "0", "--no-profiler", "--zero-bias", bias, "--out", str(out)]) == 0
        run = read_run_json(out)
        assert run["zero_bias"] == float(bias)
        shares[bias] = [r["zero_expert_share"] for r in run["routing"].values()]
    assert all(lo < mid < hi for lo, mid, hi in zip(shares["-0.05"], shares["0"], shares["0.05"])), shares


def test_a_raising_rank_fails_the_run_and_finished_traces_are_kept(tmp_path, capsys):
    # Rank 1 raises after writing its trace, before the results are gathered: rank 0 is then
    # stuck in the gather until it is stopped.
    started = time.monotonic()
    assert _profile(tmp_path, "--inject-fault", "raise-after-trace:1", "--timeout", "300") == 1
    assert time.monotonic() - started < 300
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "rank 1 failed: RuntimeError: injected fault on rank 1 after its trace" in err[0]
    assert (tmp_path / "rank0.pt.trace.json.gz").is_file() and (tmp_path / "rank1.pt.trace.json.gz").is_file()
    assert not (tmp_path / "run.json").exists()


def test_a_hanging_rank_is_stopped_at_the_timeout(tmp_path, capsys):
    # Rank 0 hangs outside any collective; rank 1 waits for it in the next all-to-all.
    started = time.monotonic()
    # (On a loaded machine the deadline may pass before the ranks are set up; the report is
    # the same then, naming where each rank was.)
    assert _profile(tmp_path, "--inject-fault", "hang:0", "--timeout", "15") == 1
    elapsed = time.monotonic() - started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "did not finish within 15 s" in err[0] and "rank 0 (last at" in err[0], err
    assert elapsed < 15 + 15  # stopped promptly, not left hanging


@pytest.mark.parametrize("args,message", [
    (["--world-size", "0"], "--world-size 0: expected at least 1"),
    (["--batch", "3"], "--batch 3: expected a positive multiple of the world size 2"),
    (["--schedule", "eager"], "--schedule eager: expected sequential or shortcut"),
    (["--mode", "serve"], "--mode serve: expected prefill, decode, train"),
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--world-size", "3", "--batch", "3"], "4 FFN experts, which must split evenly"),
    (["--zero-bias", "nan"], "--zero-bias nan: expected a finite number"),
])
def test_bad_arguments_exit_2_with_one_line(tmp_path, capsys, args, message):
    assert main(["profile", "--out", str(tmp_path / "x"), "--preset", "tiny", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "x").exists()


def test_interleaved_visits_are_runs_of_their_own_spec(tmp_path):
    """capture_interleaved: each visit's run dir is a whole run of its spec (run.json,
    a trace per rank with exactly its profiled steps and its split sizes), visits of
    the same spec share one model, and the first visit alone gets the full warmup."""
    from traces.capture import CaptureSpec, capture_interleaved
    from traces.kineto import parse_traces

    base = CaptureSpec(out_dir="", preset="tiny", world_size=2, schedule="sequential", mode="prefill",
                       batch=2, seq=8, steps=2, warmup=2, backend="gloo", threads=1)
    specs = [base, dataclasses.replace(base, schedule="shortcut", batch=4, seq=12, steps=3)]
    visits = [(0, tmp_path / "a" / "rep0"), (1, tmp_path / "b" / "rep0"), (1, tmp_path / "b" / "rep1"),
              (0, tmp_path / "a" / "rep1")]
    seen = []
    dirs = capture_interleaved(specs, visits, tmp_path, progress=seen.append)
    assert dirs == [d for _, d in visits]
    for i, (k, d) in enumerate(visits):
        run, spec = read_run_json(d), specs[k]
        assert (run["schedule"], run["batch"], run["seq"], run["steps"]) == (spec.schedule, spec.batch, spec.seq, spec.steps)
        assert run["interleaved"] == {"visit": i, "visits": 4}
        assert run["warmup"] == (2 if i < 2 else 1)
        assert all(len(t) == spec.steps for t in run["step_times_us"].values())
        assert run["routing"]["0"]["tokens"] == spec.batch * spec.seq * spec.steps
        ops = parse_traces(trace_files(d))
        assert len({int(s) for s in ops.column("step").to_pylist() if s >= 0}) == spec.steps
        _check_split_sizes(d, spec.steps)
        _, events = _events(d / "rank0.pt.trace.json.gz")
        order = [e["name"][3:] for e in sorted((e for e in events if e["name"].startswith("L0/")), key=lambda e: e["ts"])]
        assert order[3] == ("mlp0" if spec.schedule == "shortcut" else "dispatch")
    assert seen and all(line.startswith(("setup", "visit", "gather")) for line in seen)


def test_interleaved_specs_must_share_the_model(tmp_path):
    from traces.capture import CaptureError, CaptureSpec, capture_interleaved

    base = CaptureSpec(out_dir="", preset="tiny", world_size=2, backend="gloo")
    with pytest.raises(CaptureError, match="--seed 1: interleaved runs must share it"):
        capture_interleaved([base, dataclasses.replace(base, seed=1)], [(0, tmp_path / "a"), (1, tmp_path / "b")], tmp_path)
    with pytest.raises(CaptureError, match="two visits write the same run dir"):
        capture_interleaved([base], [(0, tmp_path / "a"), (0, tmp_path / "a")], tmp_path)
    assert not (tmp_path / "a").exists()
