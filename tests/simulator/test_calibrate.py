"""Calibration file: fitted from points, round-trips, refuses the wrong backend / world size,
names the command that creates it; a small live gloo calibration runs end to end."""

import json

import numpy as np
import pytest

from moesim.cli import main
from simulator.calibrate import calibration_path, fit_calibration, load_calibration, write_calibration
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


@pytest.mark.slow
def test_live_gloo_calibration_cli(tmp_path, capsys):
    out = tmp_path / "CAL"
    rc = main(["calibrate", "--backend", "gloo", "--world-size", "2", "-o", str(out),
               "--sizes-kib", "1,4096", "--comm-reps", "9", "--compute-reps", "2"])
    assert rc == 0
    raw, model, comm = load_calibration(out, backend="gloo", world_size=2)
    assert raw["torch_version"] and raw["device"]["type"] == "cpu"
    assert {p["coll"] for p in raw["points"]["comm"]} == {"all_to_all", "all_reduce", "all_gather"}
    assert {"gemm", "elementwise", "norm", "attention", "movement"} <= set(model.fits)
    # physical sanity: bigger messages and bigger GEMMs take longer
    assert comm.predict_us("all_reduce", 2, 4e6) > comm.predict_us("all_reduce", 2, 1e3)
    assert model.predict_us("gemm", 1e10, 1e7) > model.predict_us("gemm", 1e7, 1e5)
    assert "wrote" in capsys.readouterr().out
