"""Real GPU traces (tests/data/h200: LongCat-Flash on one NVIDIA H200, NCCL, torch 2.11):
what the parser makes of kernels, memcpy/memset and their launches, checked against the
raw JSON read here with nothing but gzip and json, against torch-tb-profiler's step
breakdown and against HTA on the same files."""

from __future__ import annotations

import gzip
import json
import logging
import os
import re
import warnings
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from traces.kineto import parse_traces
from traces.rundir import trace_files

H200 = Path(__file__).resolve().parents[1] / "data" / "h200"
RUNS = sorted(p.parent for p in H200.rglob("rank0.pt.trace.json.gz"))
SMALL_SHORTCUT = H200 / "small" / "prefill-b4-t128-shortcut-prof" / "rep0"
GPU_CATS = ("kernel", "gpu_memcpy", "gpu_memset")
LAUNCH_CATS = ("cuda_runtime", "cuda_driver")
LAYER_LABEL = re.compile(r"^L\d+/")  # the model's per-layer annotations (model/parallel.py)


def _name(run: Path) -> str:
    return str(run.relative_to(H200))


def _raw(run: Path) -> list[dict]:
    with gzip.open(run / "rank0.pt.trace.json.gz", "rt") as f:
        return json.load(f)["traceEvents"]


_parsed: dict[Path, list[dict]] = {}


def _ops(run: Path) -> list[dict]:
    if run not in _parsed:
        _parsed[run] = parse_traces(trace_files(run)).to_pylist()
    return _parsed[run]


def test_the_committed_h200_runs_are_there():
    assert len(RUNS) == 10, RUNS
    for run in RUNS:
        info = json.loads((run / "run.json").read_text())
        assert info["backend"] == "nccl" and info["devices"] == {"0": "NVIDIA H200"}


@pytest.mark.parametrize("run", RUNS, ids=_name)
def test_each_gpu_activity_is_one_op_on_its_stream_lane(run):
    raw = [e for e in _raw(run) if e.get("cat") in GPU_CATS]
    expected_n, expected_us = Counter(), defaultdict(float)
    for e in raw:
        lane = f"cuda:{e['args']['device']}/stream:{e['args']['stream']}"
        expected_n[lane] += 1
        expected_us[lane] += e["dur"]
    gpu = [o for o in _ops(run) if o["lane"].startswith("cuda:")]
    got_n, got_us = Counter(o["lane"] for o in gpu), defaultdict(float)
    for o in gpu:
        got_us[o["lane"]] += o["dur_us"]
    assert got_n == expected_n
    for lane, us in expected_us.items():
        # Kineto's ts are ~5.5e12 µs: float64 resolves them to ~0.001 µs, so each op's
        # start/end may move by that much
        assert got_us[lane] == pytest.approx(us, abs=0.002 * expected_n[lane])
    kinds = Counter(o["kind"] for o in gpu)
    n_memory = sum(1 for e in raw if e["cat"] != "kernel") + sum(
        1 for e in raw if e["cat"] == "kernel" and e["name"].startswith(("Memcpy", "Memset")))
    n_comm = sum(1 for e in raw if e["cat"] == "kernel" and e["name"].startswith("ncclDevKernel"))
    assert kinds["memory"] == n_memory
    assert kinds["comm"] == n_comm > 0  # NCCL runs its world-size-1 all-to-alls as kernels
    assert kinds["compute"] == len(raw) - n_memory - n_comm


@pytest.mark.parametrize("run", RUNS, ids=_name)
def test_each_gpu_op_waits_for_the_call_that_launched_it(run):
    """The launch edge matches the file's correlation ids: GPU op start minus its launching
    CPU piece's start equals kernel ts minus runtime-call ts of the same correlation."""
    raw = _raw(run)
    launch_ts = {e["args"]["correlation"]: (e["ts"], e["name"]) for e in raw
                 if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}
    expected = Counter()
    for e in raw:
        if e.get("cat") in GPU_CATS:
            ts, name = launch_ts[e["args"]["correlation"]]
            expected[(name, round(e["ts"] - ts, 1))] += 1
    ops = _ops(run)
    by_id = {o["id"]: o for o in ops}
    got = Counter()
    for o in ops:
        if o["lane"].startswith("cuda:"):
            launches = [by_id[d] for d in o["deps"] if by_id[d]["lane"].startswith("cpu:")]
            assert len(launches) == 1, (o["name"], [by_id[d]["name"] for d in o["deps"]])
            got[(launches[0]["name"], round(o["start_us"] - launches[0]["start_us"], 1))] += 1
    # start_us is stored relative to the trace's first event; rounding to 0.1 µs can split a
    # few ties differently, so compare the multisets allowing that
    assert sum((got - expected).values()) <= 0.002 * sum(expected.values())
    assert sum(got.values()) == sum(expected.values())


@pytest.mark.parametrize("run", RUNS, ids=_name)
def test_gpu_ops_carry_the_model_annotation_around_their_launch(run):
    """A GPU op's label (traces/lanes.py), rebuilt from the raw events: the innermost
    L{layer}/{block} annotation enclosing the midpoint of the runtime call that launched it,
    on the launching thread; else, when the first `fwdbwd` flow ending in the launching
    top-level op starts from a labelled forward op, that label plus ":bwd" (autograd's
    backward, on its own thread on CUDA); else the innermost other annotation there,
    collective ranges (nccl:*) aside."""
    raw = _raw(run)
    spans = {True: defaultdict(list), False: defaultdict(list)}  # is L{layer}/{block} -> tid -> [(start, end, name)]
    for e in raw:
        if e.get("cat") == "user_annotation" and not e["name"].startswith(("ProfilerStep#", "nccl:")):
            spans[bool(LAYER_LABEL.match(e["name"]))][e["tid"]].append((e["ts"], e["ts"] + e["dur"], e["name"]))
    launch = {e["args"]["correlation"]: e for e in raw
              if e.get("cat") in LAUNCH_CATS and "correlation" in e.get("args", {})}

    def annotation_at(tid, t: float, kinds=(True, False)) -> str:
        for layer in kinds:
            inside = [s for s in spans[layer][tid] if s[0] <= t <= s[1]]
            if inside:
                return min(inside, key=lambda s: s[1] - s[0])[2]
        return ""

    flow_start = {e["id"]: e for e in raw if e.get("cat") == "fwdbwd" and e["ph"] == "s"}
    flow_ends = defaultdict(list)  # tid -> sorted [(ts, label of the forward op + ":bwd")]
    for e in raw:
        if e.get("cat") == "fwdbwd" and e["ph"] == "f" and e["id"] in flow_start:
            forward = flow_start[e["id"]]
            label = annotation_at(forward["tid"], forward["ts"])
            flow_ends[e["tid"]].append((e["ts"], f"{label}:bwd" if label else ""))
    for ends in flow_ends.values():
        ends.sort()
    cpu_tops = defaultdict(list)  # tid -> top-level cpu_op / runtime events (start, end)
    for e in raw:
        if e.get("cat") in ("cpu_op", *LAUNCH_CATS):
            cpu_tops[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
    for tid, events in cpu_tops.items():
        events.sort(key=lambda x: (x[0], -x[1]))
        tops, last_end = [], -1.0
        for a, b in events:
            if a >= last_end:
                tops.append((a, b))
                last_end = b
        cpu_tops[tid] = tops

    def label_of(call: dict) -> str:
        mid = call["ts"] + call.get("dur", 0) / 2
        label = annotation_at(call["tid"], mid, (True,))
        if label:
            return label
        if call["tid"] in flow_ends:
            top = next(t for t in cpu_tops[call["tid"]] if t[0] <= call["ts"] <= t[1])
            ts, label = next(((ts, lab) for ts, lab in flow_ends[call["tid"]] if ts >= top[0]), (None, ""))
            if label and ts <= top[1]:
                return label
        return annotation_at(call["tid"], mid, (False,))

    expected = defaultdict(list)  # lane -> labels in start order
    for e in sorted((e for e in raw if e.get("cat") in GPU_CATS), key=lambda e: e["ts"]):
        expected[f"cuda:{e['args']['device']}/stream:{e['args']['stream']}"].append(label_of(launch[e["args"]["correlation"]]))
    got = defaultdict(list)
    for o in sorted((o for o in _ops(run) if o["lane"].startswith("cuda:")), key=lambda o: o["start_us"]):
        got[o["lane"]].append(o["label"])
    assert got == expected
    labelled = Counter(label for labels in got.values() for label in labels)
    assert labelled["L0/experts"] > 0 and labelled[""] < 0.05 * sum(labelled.values())  # batch upload, positions: outside the model
    if "train" in run.name:
        assert labelled["L0/experts:bwd"] > 0


def test_the_main_lane_is_the_thread_that_steps_the_profiler():
    """On CUDA the backward pass runs on autograd's own thread, which issues more ops than
    the Python thread; cpu:main is still the thread with the ProfilerStep annotations."""
    run = H200 / "tiny" / "train-shortcut"
    raw = _raw(run)
    step_tid = {e["tid"] for e in raw if e.get("cat") == "user_annotation" and e["name"].startswith("ProfilerStep#")}
    per_tid = Counter(e["tid"] for e in raw if e.get("cat") == "cpu_op")
    assert len(step_tid) == 1 and per_tid.most_common(1)[0][0] not in step_tid  # the case in point
    labels = Counter(o["label"] for o in _ops(run) if o["lane"] == "cpu:main")
    assert labels["L0/experts"] > 0 and not any(label.endswith(":bwd") for label in labels)


def test_tensorboard_plugin_step_breakdown_matches_our_gpu_time():
    """torch-tb-profiler's overview (Kernel + Memcpy + Memset per step) against the GPU ops
    we put in each step, and its GPU summary names the device. torch 2.11 writes each
    ProfilerStep twice (a CPU user_annotation and a gpu_user_annotation ~0.7 ms later) and
    tb-profiler 0.4.3 lists each step once per span: the CPU span's row is ours."""
    os.environ.setdefault("TORCH_PROFILER_START_METHOD", "fork")
    from torch_tb_profiler import io
    from torch_tb_profiler.profiler.loader import RunLoader

    run = RunLoader("h200", str(SMALL_SHORTCUT), io.Cache()).load()
    profile = next(iter(run.profiles.values()))
    assert {"title": "Name", "value": "NVIDIA H200"} in profile.gpu_summary
    columns = [c.get("name") for c in profile.overview["steps"]["columns"]]  # tooltip columns have none
    gpu_us = defaultdict(float)
    for o in _ops(SMALL_SHORTCUT):
        if o["lane"].startswith("cuda:"):
            gpu_us[o["step"]] += o["dur_us"]
    rows = profile.overview["steps"]["rows"]
    assert sorted({int(r[0]) for r in rows}) == sorted(gpu_us) and len(rows) == 2 * len(gpu_us)
    for step, us in gpu_us.items():
        first = next(r for r in rows if int(r[0]) == step)
        assert sum(first[columns.index(k)] for k in ("Kernel", "Memcpy", "Memset")) == pytest.approx(us, rel=1e-5)


def test_hta_reads_the_same_kernels_in_whole_microseconds(tmp_path):
    """HTA (0.5.0) finds the same GPU ops per iteration, each within 2 µs of ours: it keeps
    whole microseconds at both ends, which on these ~2 µs kernels loses a third of the GPU time."""
    hta = pytest.importorskip("hta.trace_analysis", reason="HTA (holistictraceanalysis 0.5.0) not installed")
    os.symlink(SMALL_SHORTCUT / "rank0.pt.trace.json.gz", tmp_path / "rank0.pt.trace.json.gz")
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            frame = hta.TraceAnalysis(trace_dir=str(tmp_path)).t.get_trace(0)
    finally:
        logging.disable(logging.NOTSET)
    theirs = frame[(frame["stream"] >= 0) & (frame["iteration"] >= 0)]
    ours = defaultdict(list)
    for o in _ops(SMALL_SHORTCUT):
        if o["lane"].startswith("cuda:"):
            ours[o["step"]].append(o)
    compared = 0
    for step, group in theirs.groupby("iteration"):
        mine = sorted(ours[int(step)], key=lambda o: o["start_us"])
        if len(group) < 0.5 * len(mine):
            continue  # HTA drops the last profiler step (include_last_profiler_step=False)
        assert len(group) == len(mine)
        hta_durs = group.sort_values("ts")["dur"].to_numpy(float)
        our_durs = [o["dur_us"] for o in mine]
        assert max(abs(h - m) for h, m in zip(hta_durs, our_durs)) < 2.0
        assert sum(our_durs) - 2 * len(mine) < hta_durs.sum() < 0.75 * sum(our_durs)
        compared += 1
    assert compared == 2


def test_stream_syncs_without_cuda_sync_events_wait_as_the_events_say(tmp_path):
    """torch.profiler records which stream a cudaStreamSynchronize waited on only with
    enable_cuda_sync_events (moesim's captures on CUDA turn it on; most traces lack it).
    Without it, a stream sync waits for the stream of the last GPU op its thread launched:
    on a trace that has the events, that fallback gives exactly the dependencies the events
    give."""
    run = H200 / "sync-events" / "tiny-prefill-shortcut"
    raw = json.loads(gzip.decompress((run / "rank0.pt.trace.json.gz").read_bytes()))
    assert Counter(e["name"] for e in raw["traceEvents"] if e.get("cat") == "cuda_sync")["Stream Sync"] > 0
    raw["traceEvents"] = [e for e in raw["traceEvents"] if e.get("cat") != "cuda_sync"]
    stripped = tmp_path / "rank0.pt.trace.json.gz"
    stripped.write_bytes(gzip.compress(json.dumps(raw).encode()))

    def sync_deps(path: Path) -> list:
        ops = parse_traces([path]).to_pylist()
        by_id = {o["id"]: o for o in ops}
        return [(o["name"], o["start_us"], sorted((by_id[d]["lane"], by_id[d]["start_us"]) for d in o["deps"]))
                for o in ops if o["name"] == "cudaStreamSynchronize"]

    with_events, without = sync_deps(run / "rank0.pt.trace.json.gz"), sync_deps(stripped)
    assert len(with_events) > 50 and all(deps for _, _, deps in with_events)
    assert without == with_events
