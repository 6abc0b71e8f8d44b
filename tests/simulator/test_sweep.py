"""`moesim sweep`: grid, parallel workers, resume, infeasible points, bad grids."""

import json

import pyarrow.parquet as pq
import pytest

from moesim.cli import main
from simulator.errors import SimulationError
from simulator.sweep import JOURNAL, grid, run_point, run_sweep

# A small model on one 8-GPU node keeps each point well under a second.
GRID = dict(presets=["small"], clusters=["h800"], gpus=[8], batches=[2, 4], schedules=["sbo", "sequential"])


def test_sweep_runs_every_point_and_resume_skips_them(tmp_path):
    points = grid(**GRID, context=256)
    table = run_sweep(points, tmp_path, workers=2)
    assert table.num_rows == len(points) == 4
    assert set(table.column("status").to_pylist()) == {"ok"}
    journal_lines = (tmp_path / JOURNAL).read_text().splitlines()
    assert len(journal_lines) == 4
    assert pq.read_table(tmp_path / "results.parquet").num_rows == 4
    assert len((tmp_path / "results.csv").read_text().splitlines()) == 5

    calls = []
    again = run_sweep(points, tmp_path, workers=1, progress=lambda done, total: calls.append((done, total)))
    assert (tmp_path / JOURNAL).read_text().splitlines() == journal_lines  # nothing recomputed
    assert calls == [(4, 4)]
    assert again.column("step_time_us").to_pylist() == table.column("step_time_us").to_pylist()


def test_sweep_results_are_the_same_as_single_runs_and_deterministic(tmp_path):
    points = grid(**GRID, context=256)
    table = run_sweep(points, tmp_path, workers=2)
    by_key = {p.key: p for p in points}
    for row in table.to_pylist():
        point = next(p for p in by_key.values() if (p.batch_per_gpu, p.schedule) == (row["batch_per_gpu"], row["schedule"]))
        single = run_point(point)
        assert single["step_time_us"] == row["step_time_us"]
    # Sequential never beats the overlapped schedule at the same batch.
    rows = {(r["batch_per_gpu"], r["schedule"]): r for r in table.to_pylist()}
    for b in (2, 4):
        assert rows[(b, "sequential")]["step_time_us"] >= rows[(b, "sbo")]["step_time_us"]


def test_infeasible_points_are_kept_with_the_reason(tmp_path):
    # TBO splits the batch in two: one sequence per GPU cannot run it.
    points = grid(["small"], ["h800"], [8], [1], ["tbo"], context=256)
    row = run_sweep(points, tmp_path).to_pylist()[0]
    assert row["status"] == "infeasible"
    assert "batch_per_gpu" in row["error"]
    assert row["step_time_us"] is None


@pytest.mark.parametrize(
    "change, message",
    [({"clusters": ["h999"]}, "h800"), ({"presets": ["gpt-9"]}, "longcat-flash"),
     ({"schedules": ["zigzag"]}, "sbo"), ({"gpus": [0]}, "positive")],
)
def test_bad_grid_fails_before_running(change, message):
    with pytest.raises(SimulationError, match=message):
        grid(**(GRID | change))


def test_cli_bad_grid_is_one_line_exit_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", "--preset", "small", "--cluster", "h800,nope", "--gpus", "8", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "nope" in err
    assert not out.exists()


def test_cli_sweep_writes_results_and_dashboard(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", "--preset", "small", "--cluster", "h800", "--gpus", "8", "--batch-per-gpu", "2,4",
                 "--schedule", "sbo,tbo", "--context", "256", "--workers", "1", "-o", str(out)])
    assert code == 0
    assert (out / "dashboard.html").stat().st_size > 100_000  # plotly.js embedded
    rows = [json.loads(line) for line in (out / JOURNAL).read_text().splitlines()]
    assert {(r["batch_per_gpu"], r["schedule"]) for r in rows} == {(2, "sbo"), (2, "tbo"), (4, "sbo"), (4, "tbo")}
