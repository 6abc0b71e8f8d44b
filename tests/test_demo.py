"""`moesim demo` end to end (on the tiny preset to keep CI short)."""

import json
import re

import pytest

from moesim.cli import main


@pytest.mark.slow
def test_demo_runs_every_stage_and_reports_what_the_run_dirs_hold(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", "-o", str(out), "--preset", "tiny", "--steps", "2", "--warmup", "1", "--timeout", "240"])
    text = capsys.readouterr().out
    assert code == 0, text
    for name in ("live-sequential", "live-shortcut", "sim-sequential", "sim-shortcut"):
        assert (out / name / "ops.parquet").is_file()
        assert (out / name / "metrics.json").is_file()
    assert (out / "whatif-longcat-flash-128xh800" / "metrics.json").is_file()
    assert (out / "dashboard.html").stat().st_size > 100_000

    # The summary's measured / replayed figures are the run dirs' own numbers.
    for schedule in ("sequential", "shortcut"):
        measured_ms = json.loads((out / f"live-{schedule}" / "run.json").read_text())["step_time_us_median"] / 1e3
        replayed_ms = json.loads((out / f"sim-{schedule}" / "metrics.json").read_text())["step_time_us"] / 1e3
        row = re.search(rf"^\s*{schedule}\s+([\d.]+)\s+([\d.]+)\s+(-?[\d.]+)", text, re.M)
        assert row, text
        assert float(row.group(1)) == pytest.approx(measured_ms, abs=0.006)
        assert float(row.group(2)) == pytest.approx(replayed_ms, abs=0.006)
        assert float(row.group(3)) == pytest.approx(100 * (replayed_ms - measured_ms) / measured_ms, abs=0.06)
    whatif = json.loads((out / "whatif-longcat-flash-128xh800" / "metrics.json").read_text())
    assert f"TGS {whatif['tgs']:.0f}" in text
    assert "dashboard:" in text
