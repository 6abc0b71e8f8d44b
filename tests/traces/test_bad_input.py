"""Bad traces: one line on stderr naming the file (and event), exit code 2, nothing written."""

import gzip

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesim.cli import main
from tests.traces.trace_builder import cpu_rank1_events, write_trace
from traces.errors import TraceError
from traces.kineto import parse_traces


def _event(**change):
    return {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 1, "tid": 1, "ts": 0.0, "dur": 1.0} | change


def _doc(events, **meta):
    return orjson.dumps({"traceEvents": events, **meta})


def _write(path, raw: bytes):
    path.write_bytes(raw)
    return path


CASES = {
    "truncated_gzip": (lambda d: _write(d / "rank0.pt.trace.json.gz", gzip.compress(_doc([_event()] * 50))[:-30]), "truncated or corrupt gzip"),
    "invalid_json": (lambda d: _write(d / "rank0.pt.trace.json", b'{"traceEvents": [ {"ph": '), "invalid JSON"),
    "not_a_trace": (lambda d: _write(d / "rank0.pt.trace.json", b'{"hello": "world"}'), "not a Kineto"),
    "missing_ts": (lambda d: _write(d / "rank0.pt.trace.json", _doc([_event(), {k: v for k, v in _event().items() if k != "ts"}])), "event 1 .*missing ts"),
    "missing_dur": (lambda d: _write(d / "rank0.pt.trace.json", _doc([_event(), _event(), {k: v for k, v in _event().items() if k != "dur"}])), "event 2 .*missing dur"),
    "negative_dur": (lambda d: _write(d / "rank0.pt.trace.json", _doc([_event(dur=-5)])), "event 0 .*negative dur"),
    "string_ts": (lambda d: _write(d / "rank0.pt.trace.json", _doc([_event(ts="soon")])), "event 0 .*ts is not a number"),
}


def _run_cli(capsys, argv):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_file_is_one_line_exit_2_and_writes_nothing(case, tmp_path, capsys):
    make, message = CASES[case]
    src = tmp_path / "in"
    src.mkdir()
    path = make(src)
    out = tmp_path / "out"
    code, err = _run_cli(capsys, ["parse", str(src), "-o", str(out)])
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert str(path) in err
    assert pytest.importorskip("re").search(message, err), err
    assert not (out / "ops.parquet").exists()


def test_two_files_claiming_one_rank(tmp_path, capsys):
    a = write_trace(tmp_path / "a.pt.trace.json.gz", cpu_rank1_events(), rank=1)
    b = write_trace(tmp_path / "b.pt.trace.json.gz", cpu_rank1_events(), rank=1)
    code, err = _run_cli(capsys, ["parse", str(a), str(b), "-o", str(tmp_path / "out")])
    assert code == 2 and "claims rank 1" in err and str(b) in err and str(a) in err
    assert not (tmp_path / "out" / "ops.parquet").exists()


def test_files_from_different_world_sizes(tmp_path, capsys):
    write_trace(tmp_path / "rank0.pt.trace.json.gz", cpu_rank1_events(), rank=0, world_size=2)
    write_trace(tmp_path / "rank1.pt.trace.json.gz", cpu_rank1_events(), rank=1, world_size=4)
    code, err = _run_cli(capsys, ["parse", str(tmp_path)])
    assert code == 2 and "world_size" in err and "rank1.pt.trace.json.gz" in err
    assert not (tmp_path / "ops.parquet").exists()


def test_empty_dir(tmp_path, capsys):
    code, err = _run_cli(capsys, ["overlap", str(tmp_path)])
    assert code == 2 and str(tmp_path) in err and "no Kineto trace files" in err
    code, err = _run_cli(capsys, ["parse", str(tmp_path)])
    assert code == 2 and str(tmp_path) in err


def test_good_run_round_trips_through_parse_and_overlap(tmp_path, capsys):
    write_trace(tmp_path / "rank1.pt.trace.json.gz", cpu_rank1_events(), rank=1)
    assert main(["parse", str(tmp_path)]) == 0
    assert (tmp_path / "ops.parquet").is_file() and (tmp_path / "run.json").is_file()
    capsys.readouterr()
    assert main(["overlap", str(tmp_path), "--json"]) == 0
    metrics = orjson.loads(capsys.readouterr().out)
    assert metrics["ranks"]["1"]["overlap_pct"] == pytest.approx(100 * 170 / 310)
    saved = orjson.loads((tmp_path / "metrics.json").read_bytes())
    assert saved["ranks"] == metrics["ranks"]


# ---- fuzz: whatever the events hold, only TraceError escapes

_scalar = st.one_of(st.none(), st.booleans(), st.integers(-10, 10**6), st.floats(allow_nan=True), st.text(max_size=8))
_json = st.recursive(_scalar, lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)), max_leaves=6)
_field_value = {
    "ph": st.one_of(st.sampled_from(["X", "M", "i", "s", "f"]), _json),
    "cat": st.one_of(st.sampled_from(["kernel", "cpu_op", "cuda_runtime", "user_annotation", "gpu_memcpy", "cuda_sync", "cuda_driver"]), _json),
    "name": st.one_of(st.sampled_from(["ncclKernel_AllReduce", "gloo:all_to_all", "ProfilerStep#1", "L0/dispatch", "cudaLaunchKernel", "c10d::wait", "cudaDeviceSynchronize"]), _json),
    "pid": st.one_of(st.integers(0, 3), _json),
    "tid": st.one_of(st.integers(0, 3), _json),
    "ts": st.one_of(st.floats(0, 1000), _json),
    "dur": st.one_of(st.floats(0, 100), _json),
    "args": st.one_of(
        st.fixed_dictionaries({}, optional={
            "correlation": st.one_of(st.integers(0, 5), _json), "stream": st.one_of(st.integers(0, 3), _json),
            "device": _json, "Collective name": _json, "In msg nelems": _json, "dtype": _json,
            "In split size": _json, "Process Group Ranks": _json, "Seq": _json, "bytes": _json,
            "cuda_sync_kind": st.one_of(st.sampled_from(["Stream Wait Event", "Event Sync", "Context Sync"]), _json),
            "wait_on_stream": _json, "wait_on_cuda_event_record_corr_id": _json,
        }),
        _json,
    ),
}
_valid_field = {
    "ph": st.just("X"),
    "cat": st.sampled_from(["kernel", "cpu_op", "cuda_runtime", "user_annotation", "gpu_memcpy", "cuda_sync", "cuda_driver"]),
    "name": _field_value["name"].filter(lambda n: isinstance(n, str)) | st.sampled_from(["Memcpy HtoD", "void deep_ep::dispatch", "record_param_comms"]),
    "pid": st.integers(0, 2),
    "tid": st.integers(0, 3),
    "ts": st.floats(0, 1000),
    "dur": st.floats(0, 100),
}
# mostly well-formed events with odd args (reach the lane builder), some garbage (reach the checks)
_good_event = st.fixed_dictionaries(_valid_field, optional={"args": _field_value["args"]})
_events = st.lists(st.one_of(_good_event, _good_event, st.fixed_dictionaries({}, optional=_field_value), _json), max_size=12)
_meta = st.fixed_dictionaries({}, optional={"distributedInfo": _json, "baseTimeNanoseconds": _json})


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(events=_events, meta=_meta)
def test_fuzzed_events_raise_only_trace_error(tmp_path, events, meta):
    path = tmp_path / "rank0.pt.trace.json"
    path.write_bytes(orjson.dumps({"traceEvents": events, **meta}, option=orjson.OPT_NON_STR_KEYS))
    try:
        parse_traces([path])
    except TraceError:
        pass
