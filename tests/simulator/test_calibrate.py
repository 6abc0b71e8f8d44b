"""Calibration file: fitted from points, round-trips, refuses the wrong backend / world size,
names the command that creates it; a small live gloo calibration runs end to end."""

import json
import statistics
from pathlib import Path

import numpy as np
import pytest

from moesim.cli import main
from simulator.calibrate import (
    DEFAULT_COMM_LOAD_EXPONENT,
    calibration_path,
    fit_calibration,
    fit_comm_load,
    load_calibration,
    stall_points,
    write_calibration,
)
from simulator.costmodel import CommModel
from simulator.errors import SimulationError


def _synthetic_points():
    rng = np.random.default_rng(3)
    compute = []
    for _ in range(30):
        f, b = 10 ** rng.uniform(5, 9), 10 ** rng.uniform(4, 7)
        compute.append({"name": "aten::mm", "kind": "gemm", "shapes": [], "flops": f, "bytes": b,
                        "dur_us": 3.0 + 0.01 * f / 1e6 + 0.2 * b / 1e6})
    comm = [{"coll": "all_to_all", "world_size": 2, "coll_bytes": m, "dur_us": 50 + 0.5 * m / 1e3, "dur_us_all": []}
            for m in (1e3, 1e4, 1e5, 1e6)]
    return compute, comm


def test_stall_points_split_the_sweeps_two_modes():
    # a loaded transfer takes about its idle time or about a quantum more: 14 of 20 stalled
    # (3100-3230 µs), 6 not (110 µs); 2 of 20 idle ones stalled too, so the loaded share
    # beyond them is (14/20 − 2/20) / (1 − 2/20) = 2/3, and a stall lasts the stalled ones'
    # median (3165) − the median idle time (100)
    idle = [100.0] * 18 + [3100.0, 3200.0]
    loaded = [3100.0 + 10 * k for k in range(14)] + [110.0] * 6
    assert stall_points([{"coll_bytes": 1 << 20, "idle_us_all": idle, "loaded_us_all": loaded}]) == \
        [(1 << 20, pytest.approx(2 / 3), pytest.approx(3065.0))]
    # none stalled: probability 0, no stall
    assert stall_points([{"coll_bytes": 1 << 18, "idle_us_all": idle, "loaded_us_all": [150.0] * 20}]) == [(1 << 18, 0.0, 0.0)]
    # per payload: log-linear between the sizes, held beyond; nothing without points
    m = CommModel(load_stall_points=[(1 << 20, 0.7, 3200.0), (1 << 18, 0.5, 3000.0)])
    assert m.load_stall_at(1 << 19) == pytest.approx((0.6, 3100.0))
    assert m.load_stall_at(1 << 10) == pytest.approx((0.5, 3000.0)) and m.load_stall_at(1 << 30) == pytest.approx((0.7, 3200.0))
    assert CommModel().load_stall_at(1e6) == (0.0, 0.0)


def test_round_trip_and_recovered_coefficients(tmp_path):
    compute, comm = _synthetic_points()
    cal = fit_calibration("gloo", 2, {"type": "cpu", "name": "test", "threads_per_rank": 1}, compute, comm, "x")
    path = write_calibration(cal, tmp_path / "CAL")
    assert path == tmp_path / "CAL" / "calibration.json"
    raw, model, comm_model = load_calibration(tmp_path / "CAL", backend="gloo", world_size=2)
    assert raw == json.loads(json.dumps(cal))
    fit = model.fits["gemm"]
    assert (fit.overhead_us, fit.us_per_mflop, fit.us_per_mb) == pytest.approx((3.0, 0.01, 0.2), rel=1e-6)
    # all_to_all at n=2: wire = m/2, so 0.5 µs per KB of message = 1 µs per KB on the wire
    assert comm_model.predict_us("all_to_all", 2, 2e6) == pytest.approx(50 + 0.5 * 2e3, rel=1e-6)
    assert model.predict_us("gemm", 1e9, 1e6) == pytest.approx(3.0 + 10 + 0.2, rel=1e-6)


def _load_points(exponent, share, idle=(300.0, 500.0, 2000.0), world_size=2):
    """Synthetic comm load points: loaded = idle / share ** exponent, with ±10 % noise that
    the medians must see through."""
    rng = np.random.default_rng(5)
    return [{"coll": "all_to_all", "world_size": world_size, "coll_bytes": 2.0**k * 262144, "chunk_us": 30.0,
             "idle_us_all": list(t * rng.uniform(0.9, 1.1, 41)), "loaded_us_all": list(t / share**exponent * rng.uniform(0.9, 1.1, 41))}
            for k, t in enumerate(idle)]


def test_comm_load_exponent_is_recovered_and_round_trips(tmp_path):
    # 2 ranks computing beside a 2-rank transfer on 2 cores: 4 jobs, a share of 1/2
    load = fit_comm_load(_load_points(2.5, 0.5), cores=2)
    assert load["share"] == 0.5 and load["measured"]
    assert load["exponent"] == pytest.approx(2.5, abs=0.1)
    # 4 ranks on 2 cores: 8 jobs, a share of 1/4
    assert fit_comm_load(_load_points(1.5, 0.25, world_size=4), cores=2)["exponent"] == pytest.approx(1.5, abs=0.1)
    # loaded faster than idle (a busy machine's medians): the sizes' exponents stay at 0, so
    # the file written loads
    fast = fit_comm_load(_load_points(-0.5, 0.5), cores=2)
    assert [s["exponent"] for s in fast["sizes"]] == [0.0, 0.0, 0.0] and fast["exponent"] == 0.0
    # enough cores for every job: nothing to measure, the default stays
    spare = fit_comm_load(_load_points(0.0, 1.0), cores=4)
    assert (spare["exponent"], spare["measured"]) == (DEFAULT_COMM_LOAD_EXPONENT, False)
    compute, comm = _synthetic_points()
    write_calibration(fit_calibration("gloo", 2, {"type": "cpu"}, compute, comm, "x", fast), tmp_path / "fast.json")
    assert load_calibration(tmp_path / "fast.json")[2].load_points == [(p["coll_bytes"], 0.0) for p in fast["sizes"]]
    cal = fit_calibration("gloo", 2, {"type": "cpu"}, compute, comm, "x", load)
    write_calibration(cal, tmp_path / "c.json")
    comm_model = load_calibration(tmp_path / "c.json")[2]
    assert comm_model.load_exponent == load["exponent"]
    # per size: the sizes' own exponents, log-linear between them, held beyond
    sizes = [(p["coll_bytes"], p["exponent"]) for p in load["sizes"]]
    assert len(sizes) >= 2 and comm_model.load_points == sizes
    (b0, e0), (b1, e1) = sizes[0], sizes[1]
    assert comm_model.load_exponent_at(b0) == pytest.approx(e0)
    assert comm_model.load_exponent_at((b0 * b1) ** 0.5) == pytest.approx((e0 + e1) / 2)
    assert comm_model.load_exponent_at(b0 / 8) == pytest.approx(e0)
    assert comm_model.load_exponent_at(sizes[-1][0] * 8) == pytest.approx(sizes[-1][1])
    assert comm_model.load_exponent_at(0.0) == load["exponent"]
    # the additive alternative: (median loaded − median idle) / (1 / share − 1) per size, from
    # the sweep's own points (medians taken here, independently of the fit)
    expected = [(p["coll_bytes"], (statistics.median(p["loaded_us_all"]) - statistics.median(p["idle_us_all"])) / (1 / 0.5 - 1))
                for p in _load_points(2.5, 0.5)]
    assert comm_model.load_delay_points == pytest.approx(expected)
    assert comm_model.load_model == "exponent"  # used only when asked for (validate --comm-load delay)
    assert CommModel().load_delay_at(1e6) is None
    pts = CommModel(load_delay_points=[(1 << 20, 1000.0), (1 << 18, 3000.0)])
    assert [pts.load_delay_at(b) for b in (1 << 16, 1 << 19, 1 << 24)] == pytest.approx([3000, 2000, 1000])
    # the stall model: every loaded time here is > 1 ms above the median idle one (and no idle
    # one is), so each size stalls with probability 1, by median loaded − median idle
    expected = [(p["coll_bytes"], 1.0, statistics.median(p["loaded_us_all"]) - statistics.median(p["idle_us_all"]))
                for p in _load_points(2.5, 0.5)]
    assert comm_model.load_stall_points == pytest.approx(expected)
    two = CommModel(load_exponent=3.0, load_points=[(1 << 20, 2.0), (1 << 18, 4.0)])
    assert [two.load_exponent_at(b) for b in (1 << 16, 1 << 18, 1 << 19, 1 << 20, 1 << 24)] == pytest.approx([4, 4, 3, 2, 2])
    # a calibration without the sweep (older files, NCCL) → plain processor sharing
    write_calibration(fit_calibration("gloo", 2, {"type": "cpu"}, compute, comm, "x"), tmp_path / "old.json")
    assert load_calibration(tmp_path / "old.json")[2].load_exponent == DEFAULT_COMM_LOAD_EXPONENT == 1.0
    assert load_calibration(tmp_path / "old.json")[2].load_delay_points == []
    assert load_calibration(tmp_path / "old.json")[2].load_stall_points == []
    del cal["comm_load"]["points"][2]["loaded_us_all"]
    write_calibration(cal, tmp_path / "bad.json")
    with pytest.raises(SimulationError, match=r"bad.json: comm_load.points needs coll_bytes > 0 and non-empty idle_us_all "
                                              r"and loaded_us_all of times > 0 per point \(the point at coll_bytes 1048576.0\)"):
        load_calibration(tmp_path / "bad.json")
    del cal["comm_load"]["sizes"][1]["loaded_us"]
    write_calibration(cal, tmp_path / "bad.json")
    with pytest.raises(SimulationError, match=r"bad.json: comm_load.sizes needs idle_us and loaded_us > 0 per size"):
        load_calibration(tmp_path / "bad.json")
    cal["comm_load"]["sizes"][0]["coll_bytes"] = 0
    write_calibration(cal, tmp_path / "bad.json")
    with pytest.raises(SimulationError, match=r"bad.json: comm_load.sizes needs coll_bytes > 0"):
        load_calibration(tmp_path / "bad.json")
    cal["comm_load"]["exponent"] = -1
    write_calibration(cal, tmp_path / "bad.json")
    with pytest.raises(SimulationError, match=r"bad.json: comm_load.exponent must be a number ≥ 0, got -1"):
        load_calibration(tmp_path / "bad.json")


def test_core_use_is_recovered_and_round_trips(tmp_path):
    """n compute loops beside n transfers on `cores`: each loop runs at
    (cores − n · use) / n of a core, its run-in pace min(1, cores / n); the fit inverts that
    per size from the median pace ratio."""
    rng = np.random.default_rng(7)
    points = _load_points(2.5, 0.5)
    uses = [0.05, 0.1, 0.2]
    for p, use in zip(points, uses):  # 2 ranks, 2 cores: run-in pace 1, in flight 1 − use
        p["compute_speed_all"] = list((1 - use) * rng.uniform(0.97, 1.03, 41))
    load = fit_comm_load(points, cores=2)
    assert [s["core_use"] for s in load["sizes"]] == pytest.approx(uses, abs=0.01)
    # 4 ranks on 2 cores: run-in pace 1/2; a use of 0.1 leaves (2 − 0.4) / 4 = 0.4, a ratio of 0.8
    four = _load_points(1.5, 0.25, world_size=4)
    for p in four:
        p["compute_speed_all"] = [0.8] * 41
    assert [s["core_use"] for s in fit_comm_load(four, cores=2)["sizes"]] == pytest.approx([0.1] * 3)
    compute, comm = _synthetic_points()
    cal = fit_calibration("gloo", 2, {"type": "cpu"}, compute, comm, "x", load)
    write_calibration(cal, tmp_path / "c.json")
    model = load_calibration(tmp_path / "c.json")[2]
    sizes = [p["coll_bytes"] for p in load["sizes"]]
    assert model.core_use_points == pytest.approx(list(zip(sizes, [s["core_use"] for s in load["sizes"]])))
    # log-linear between sizes, held beyond
    u0, u1 = model.core_use_points[0][1], model.core_use_points[1][1]
    assert model.core_use_at((sizes[0] * sizes[1]) ** 0.5) == pytest.approx((u0 + u1) / 2)
    assert model.core_use_at(sizes[0] / 16) == pytest.approx(u0)
    assert model.core_use_at(sizes[-1] * 16) == pytest.approx(model.core_use_points[-1][1])
    # a sweep without the compute pace (calibrations before it): no core use, 0 everywhere
    old = fit_comm_load(_load_points(2.5, 0.5), cores=2)
    assert all("core_use" not in s for s in old["sizes"])
    write_calibration(fit_calibration("gloo", 2, {"type": "cpu"}, compute, comm, "x", old), tmp_path / "old.json")
    old_model = load_calibration(tmp_path / "old.json")[2]
    assert old_model.core_use_points == [] and old_model.core_use_at(1e6) == 0.0
    cal["comm_load"]["sizes"][1]["core_use"] = 1.5
    write_calibration(cal, tmp_path / "bad.json")
    with pytest.raises(SimulationError, match=r"bad.json: comm_load.sizes core_use must be a number in \[0, 1\], got 1.5"):
        load_calibration(tmp_path / "bad.json")


def test_wrong_backend_or_world_size_and_missing_file(tmp_path):
    compute, comm = _synthetic_points()
    write_calibration(fit_calibration("gloo", 2, {"type": "cpu"}, compute, comm, "x"), tmp_path / "c.json")
    with pytest.raises(SimulationError, match=r"calibrated for backend gloo world size 2, asked for backend nccl"):
        load_calibration(tmp_path / "c.json", backend="nccl", world_size=2)
    with pytest.raises(SimulationError, match=r"world size 4.*moesim calibrate --backend gloo --world-size 4"):
        load_calibration(tmp_path / "c.json", backend="gloo", world_size=4)
    with pytest.raises(SimulationError, match=r"no calibration; create it with `moesim calibrate --backend gloo --world-size 2 -o .*nowhere`"):
        load_calibration(tmp_path / "nowhere", backend="gloo", world_size=2)
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(SimulationError, match="not a moesim calibration"):
        load_calibration(tmp_path / "bad.json")
    assert calibration_path("x.json").name == "x.json"


def test_a_collective_whose_time_does_not_grow_with_size_is_flagged():
    """What a 2-core CI machine measured for gloo all_reduce (stop 18): most repetitions of
    both sizes waited ~3 ms for a descheduled rank, so the 1 KiB median matched the 4 MiB one.
    The fit then has no per-byte cost, and the calibration must say so."""
    compute, comm = _synthetic_points()
    slow = [3324.0, 405, 254, 2929, 3879, 4053, 319, 324, 3660]
    comm += [{"coll": "all_reduce", "world_size": 2, "coll_bytes": 1024.0, "dur_us": float(np.median(slow)), "dur_us_all": slow},
             {"coll": "all_reduce", "world_size": 2, "coll_bytes": 4194304.0, "dur_us": 2850.0, "dur_us_all": []},
             {"coll": "all_reduce", "world_size": 1, "coll_bytes": 1024.0, "dur_us": 40.0, "dur_us_all": []},
             {"coll": "all_reduce", "world_size": 1, "coll_bytes": 4194304.0, "dur_us": 39.0, "dur_us_all": []}]
    cal = fit_calibration("gloo", 2, {"type": "cpu"}, compute, comm, "x")
    # all_to_all grows with size and one rank has nothing to send: neither is flagged
    assert cal["warnings"] == [
        "all_reduce at world size 2: the median time does not grow with message size (1 KiB 2929 µs, 4096 KiB 2850 µs), "
        "so its fit has no per-byte cost; the ranks were likely descheduled — rerun on idle cores or with more --comm-reps"]
    assert "warnings" not in fit_calibration("gloo", 2, {"type": "cpu"}, *_synthetic_points(), "x")


@pytest.mark.slow
def test_live_gloo_calibration_cli(tmp_path, capsys):
    """On 2 shared cores a repetition that waits for a descheduled rank takes ~3 ms at any
    size, so only the fastest repetitions say how time grows with size; a fit that came out
    flat anyway must carry a warning."""
    out = tmp_path / "CAL"
    rc = main(["calibrate", "--backend", "gloo", "--world-size", "2", "-o", str(out),
               "--sizes-kib", "1,4096", "--comm-reps", "9", "--compute-reps", "2", "--load-reps", "9"])
    assert rc == 0
    raw, model, comm = load_calibration(out, backend="gloo", world_size=2)
    assert raw["torch_version"] and raw["device"]["type"] == "cpu"
    assert {p["coll"] for p in raw["points"]["comm"]} == {"all_to_all", "all_reduce", "all_gather"}
    assert {"gemm", "elementwise", "norm", "attention", "movement"} <= set(model.fits)
    # physical sanity: bigger messages and bigger GEMMs take longer
    for coll in ("all_to_all", "all_reduce", "all_gather"):
        fastest = {p["coll_bytes"]: min(p["dur_us_all"]) for p in raw["points"]["comm"] if p["coll"] == coll and p["world_size"] == 2}
        assert fastest[4 * 2**20] > fastest[2**10], coll
        flagged = any(w.startswith(f"{coll} at world size 2:") for w in raw.get("warnings", []))
        assert (comm.predict_us(coll, 2, 4e6) > comm.predict_us(coll, 2, 1e3)) != flagged, coll
    assert model.predict_us("gemm", 1e10, 1e7) > model.predict_us("gemm", 1e7, 1e5)
    load = raw["comm_load"]
    assert [p["coll_bytes"] for p in load["points"]] == [2**k * 256 * 1024 for k in range(5)]
    assert all(len(p["idle_us_all"]) == len(p["loaded_us_all"]) == 9 for p in load["points"])
    assert comm.load_exponent == load["exponent"] >= 0
    if load["measured"]:  # the cores are shared: a transfer beside two computing ranks is slower
        idle = np.median([t for p in load["points"] for t in p["idle_us_all"]])
        assert np.median([t for p in load["points"] for t in p["loaded_us_all"]]) > idle
    out, err = capsys.readouterr()
    assert "comm load exponent" in out and "wrote" in out
    assert err.count("calibrate: warning:") == len(raw.get("warnings", []))


H200_CAL = Path(__file__).resolve().parents[1] / "data" / "h200" / "calibration.json"
# NVIDIA's H200 SXM datasheet: FP32 (no tensor cores) 67 TFLOP/s, HBM3e 4.8 TB/s
H200_FP32_FLOPS, H200_HBM_BYTES = 67e12, 4.8e12


def test_h200_calibration_loads_as_nccl_and_names_the_device():
    cal, compute, comm = load_calibration(H200_CAL, backend="nccl", world_size=1)
    assert cal["device"]["name"] == "NVIDIA H200" and compute.device.name == "H200"
    with pytest.raises(SimulationError, match="calibrated for backend nccl world size 1, asked for backend gloo"):
        load_calibration(H200_CAL, backend="gloo", world_size=1)
    assert comm.predict_us("all_to_all", 1, 1 << 20) > 0


def _h200_points() -> list[dict]:
    """The H200 calibration's measured kernels with FLOPs and bytes counted afresh from their
    recorded shapes by today's op_work (float32 tensors, as the cases ran)."""
    from simulator.costmodel import op_work

    points = []
    for p in json.loads(H200_CAL.read_text())["points"]["compute"]:
        work = op_work(p["name"], p["shapes"], ["float" if isinstance(d, list) and d else "" for d in p["shapes"]])
        points.append({**p, "kind": work.kind, "flops": work.flops, "bytes": work.bytes})
    return points


def test_h200_kernel_times_obey_the_datasheet():
    """The kernels measured on the H200 (float32, as the model runs), their work counted by
    op_work, against the H200's datasheet: no GEMM beats the FP32 peak and the LongCat-width
    ones reach over half of it; the largest add moves 805 MB at 60-100 % of HBM bandwidth.
    A FLOP or byte count off by 2x breaks one of these."""
    points = _h200_points()
    gemms = [p for p in points if p["kind"] == "gemm"]
    rates = {tuple(map(tuple, p["shapes"][:2])): p["flops"] / (p["dur_us"] * 1e-6) for p in gemms}
    assert max(rates.values()) < H200_FP32_FLOPS
    big = [r for shapes, r in rates.items() if shapes[0][1] >= 6144 or shapes[1][0] >= 6144]
    assert len(big) >= 8 and min(big) > 0.5 * H200_FP32_FLOPS
    adds = [p for p in points if p["name"] == "aten::add"]
    largest = max(adds, key=lambda p: p["bytes"])
    assert largest["bytes"] == pytest.approx(3 * 4 * (1 << 26))  # two float32 inputs read, one written
    assert 0.6 * H200_HBM_BYTES < largest["bytes"] / (largest["dur_us"] * 1e-6) < H200_HBM_BYTES
    # a kernel cannot outlast the CUDA events recorded around its launch
    assert all(p["dur_us"] <= p["latency_us"] * 1.05 for p in points)


def test_h200_gemm_fit_predicts_its_longcat_width_points():
    """Today's fit on the H200's measured kernels predicts each LongCat-width GEMM within
    15 % (the small ones, launch-bound, set the overhead)."""
    from simulator.costmodel import DEVICES, fit_cost_model

    points = _h200_points()
    model = fit_cost_model(DEVICES["H200"], [p["kind"] for p in points], [p["flops"] for p in points],
                           [p["bytes"] for p in points], [p["dur_us"] for p in points])
    big = [p for p in points if p["kind"] == "gemm" and p["dur_us"] > 200]
    assert len(big) >= 8
    for p in big:
        assert model.predict_us("gemm", p["flops"], p["bytes"]) == pytest.approx(p["dur_us"], rel=0.15), p["shapes"]
