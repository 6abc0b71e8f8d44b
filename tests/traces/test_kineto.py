"""The Kineto reader on hand-built traces with exactly known lanes, labels, deps and overlap."""

import numpy as np
import pytest

from tests.traces.trace_builder import cpu_rank1_events, gpu_rank0_events, write_trace
from traces.errors import TraceError
from traces.kineto import parse_traces
from traces.overlap import compute_metrics


@pytest.fixture
def run(tmp_path):
    write_trace(tmp_path / "rank0.pt.trace.json.gz", gpu_rank0_events(), rank=0, base_ns=1_700_000_000_000_000_000)
    # rank 1 in the older absolute-epoch style, plain JSON
    write_trace(tmp_path / "rank1.pt.trace.json", cpu_rank1_events(), rank=1, gz=False, offset_us=1.7e15)
    return sorted(tmp_path.iterdir())


def _rows(ops, rank):
    return [r for r in ops.to_pylist() if r["rank"] == rank]


def test_overlap_is_exact_for_deepep_nccl_all_to_all_and_gloo(run):
    m = compute_metrics(parse_traces(run))
    r0, r1 = m["ranks"]["0"], m["ranks"]["1"]
    assert (r0["comm_us"], r0["compute_us"], r0["hidden_comm_us"]) == pytest.approx((190, 250, 110))
    # idle counts against the rank's whole span, CPU ops included: [10,500) − busy 360
    assert (r0["memory_us"], r0["idle_us"]) == pytest.approx((50, 130))
    assert r0["overlap_pct"] == pytest.approx(100 * 110 / 190)
    assert (r1["comm_us"], r1["compute_us"], r1["hidden_comm_us"]) == pytest.approx((310, 350, 170))
    assert r1["overlap_pct"] == pytest.approx(100 * 170 / 310)
    labels = {row["label"]: row for row in m["labels"]}
    assert labels["L1/dispatch"]["window_us"] == pytest.approx(250)  # issue → wait, nothing else
    assert labels["L1/dispatch"]["comm_us"] == pytest.approx(270)
    assert labels["L0/dispatch"]["comm_us"] == pytest.approx(120)
    assert labels["L0/dispatch"]["hidden_comm_us"] == pytest.approx(60)
    assert labels["L0/dispatch"]["window_us"] == pytest.approx(250)  # no cross-stream deps


def test_lanes_kinds_and_labels_follow_the_documented_conventions(run):
    ops = parse_traces(run)
    by_name = {(r["rank"], r["name"]): r for r in ops.to_pylist()}
    notify = by_name[(0, "void notify_dispatch<8>(int*)")]
    assert (notify["lane"], notify["kind"], notify["label"]) == ("cuda:0/stream:20", "comm", "L0/dispatch")
    permute = by_name[(0, "void moe::dispatch_permute<float>(float*)")]
    assert permute["kind"] == "compute"  # "dispatch" on a compute stream is not comm
    nccl = by_name[(0, "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)")]
    assert (nccl["coll"], nccl["group"], nccl["coll_bytes"], nccl["splits"]) == ("all_to_all", "0,1", 4000, [1200, 2800])
    assert nccl["label"] == "L0/combine" and nccl["step"] == 7
    memcpy = by_name[(0, "Memcpy DtoD (Device -> Device)")]
    assert (memcpy["kind"], memcpy["bytes"]) == ("memory", 4096)
    # the launch piece is the dep of the kernel it launched, and is its own op
    launcher = next(r for r in ops.to_pylist() if r["id"] == notify["deps"][0])
    assert (launcher["name"], launcher["lane"], launcher["kind"], launcher["dur_us"]) == ("cudaLaunchKernel", "cpu:main", "host", 5)
    # aten::mm with a nested launch is cut into aten::mm | cudaLaunchKernel | aten::mm
    main0 = [(r["name"], r["dur_us"]) for r in _rows(ops, 0) if r["lane"] == "cpu:main"][:3]
    assert main0 == [("aten::mm", 5), ("cudaLaunchKernel", 5), ("aten::mm", 10)]
    rank1 = _rows(ops, 1)
    lanes = {r["name"]: r["lane"] for r in rank1}
    assert lanes["gloo:all_to_all"] == "cpu:gloo" and lanes["gloo:all_reduce"] == "cpu:gloo/1"
    assert "aten::addmm" not in lanes  # nested op: its parent counts
    kinds = {r["name"]: r["kind"] for r in rank1}
    assert (kinds["aten::mm"], kinds["c10d::alltoall_base_"], kinds["c10d::wait"]) == ("compute", "host", "sync")
    a2a = next(r for r in rank1 if r["name"] == "gloo:all_to_all")
    issue = next(r for r in rank1 if r["name"] == "c10d::alltoall_base_")
    wait = next(r for r in rank1 if r["name"] == "c10d::wait")
    assert a2a["deps"] == [issue["id"]] and wait["deps"] == [a2a["id"]]
    assert (a2a["label"], a2a["coll"], a2a["seq"], a2a["group"]) == ("L1/dispatch", "all_to_all", 0, "0,1")
    allreduce = next(r for r in rank1 if r["name"] == "gloo:all_reduce")
    assert (allreduce["coll"], allreduce["seq"], allreduce["label"]) == ("all_reduce", 1, "L1/combine")


def test_both_timestamp_styles_give_the_same_table(tmp_path):
    a = write_trace(tmp_path / "a_rank0.json.gz", gpu_rank0_events(), base_ns=1_690_000_000_123_000_000)
    b = write_trace(tmp_path / "b_rank0.json", gpu_rank0_events(), gz=False, offset_us=1.69e15)
    ta, tb = parse_traces([a]), parse_traces([b])
    assert ta.drop_columns([]).equals(tb)


def test_rank_from_file_name_and_errors_for_ambiguous_ranks(tmp_path):
    write_trace(tmp_path / "rank3.pt.trace.json.gz", cpu_rank1_events())
    write_trace(tmp_path / "worker.pt.trace.json.gz", cpu_rank1_events())
    ops = parse_traces([tmp_path / "rank3.pt.trace.json.gz"])
    assert set(ops.column("rank").to_pylist()) == {3}
    with pytest.raises(TraceError, match="worker.pt.trace.json.gz.*cannot tell its rank"):
        parse_traces(sorted(tmp_path.iterdir()))


def test_comm_regex_is_configurable(run):
    from traces.classify import ClassifyConfig

    ops = parse_traces(run, ClassifyConfig(comm_kernel_regex=r"^nccl.*Kernel", comm_stream_kernel_regex=r"$^"))
    kinds = {r["name"]: r["kind"] for r in ops.to_pylist() if r["rank"] == 0}
    assert kinds["void deep_ep::intranode::dispatch<8, 768>(void*)"] == "compute"  # HTA's view
    m = compute_metrics(ops)
    assert m["ranks"]["0"]["overlap_pct"] == pytest.approx(100 * 50 / 70)
    assert np.isclose(m["ranks"]["0"]["comm_us"], 70)


def _kineto_layout(events, meta=None) -> bytes:
    """Kineto's file layout: head keys, one "  {...}" block per event, tail keys."""
    import orjson

    head = orjson.dumps({"schemaVersion": 1, **(meta or {})})[:-1] + b', "traceEvents": [\n'
    body = b",\n".join(b"  " + orjson.dumps(e) for e in events)
    return head + body + b'\n], "traceName": "x", "baseTimeNanoseconds": 1000000000\n}'


def test_streamed_pieces_read_the_same_as_one_whole_parse(tmp_path, monkeypatch):
    import gzip

    import traces.kineto as kineto

    events = gpu_rank0_events() * 40  # same events again: enough text for many pieces
    raw = _kineto_layout(events, {"distributedInfo": {"rank": 0, "world_size": 2}})
    path = tmp_path / "rank0.pt.trace.json.gz"
    half = len(raw) // 2
    path.write_bytes(gzip.compress(raw[:half]) + gzip.compress(raw[half:]))  # two gzip members
    monkeypatch.setattr(kineto, "CHUNK_BYTES", 2048)
    assert sum(1 for _ in kineto._load_streamed(path)) > 5
    streamed, whole = kineto.read_trace(path), kineto.read_trace(path, streamed=False)
    for column in ("cat", "ts_us", "dur_us", "corr", "thread", "device", "stream", "nbytes"):
        assert np.array_equal(getattr(streamed, column), getattr(whole, column)), column
    assert (streamed.name, streamed.args, streamed.meta) == (whole.name, whole.args, whole.meta)
    assert streamed.base_ns == 1_000_000_000 and streamed.rank == 0  # tail key, head key


def test_streamed_errors_name_the_global_event_index_and_truncation(tmp_path, monkeypatch):
    import gzip

    import traces.kineto as kineto

    monkeypatch.setattr(kineto, "CHUNK_BYTES", 2048)
    events = gpu_rank0_events() * 40
    bad = len(events) - 3
    events[bad] = dict(events[bad], dur=-1)
    path = tmp_path / "rank0.pt.trace.json.gz"
    path.write_bytes(gzip.compress(_kineto_layout(events)))
    with pytest.raises(TraceError, match=f"event {bad} .*negative dur"):
        kineto.read_trace(path)
    path.write_bytes(gzip.compress(_kineto_layout(gpu_rank0_events() * 40))[:-100])
    with pytest.raises(TraceError, match="truncated or corrupt gzip"):
        kineto.read_trace(path)


def test_cross_stream_and_device_sync_deps_on_a_real_trace(shared_traces):
    """HTA's cuda_event_sync_multi_stream trace: stream 24 waits (cudaStreamWaitEvent) on the
    event recorded after the sgemm on stream 20; cudaDeviceSynchronize waits for all streams."""
    ops = parse_traces([shared_traces / "hta/critical_path/cuda_event_sync_multi_stream/event_sync_trace.json.gz"]).to_pylist()
    by_id = {o["id"]: o for o in ops}
    first_on_24 = min((o for o in ops if o["lane"] == "cuda:0/stream:24"), key=lambda o: o["start_us"])
    waited = {(by_id[d]["lane"], by_id[d]["name"]) for d in first_on_24["deps"]}
    assert ("cuda:0/stream:20", "ampere_sgemm_128x64_nn") in waited
    (sync,) = [o for o in ops if o["name"] == "cudaDeviceSynchronize"]
    assert sync["kind"] == "sync"
    assert {by_id[d]["lane"] for d in sync["deps"]} == {"cuda:0/stream:20", "cuda:0/stream:24", "cuda:0/stream:28"}
    assert all(not o["deps"] for o in ops if o["name"] == "cudaEventQuery")  # a query never blocks
