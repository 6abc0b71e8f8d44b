"""`dashboards.build` and `moesim dashboard`: views chosen, skipped with notes, bad input, size."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

import dashboards
from dashboards.assemble import sections_for
from dashboards.errors import DashboardError
from dashboards.inputs import load_run, read_train_log, read_validation
from moesim.cli import main
from tests.dashboards.runs import make_ops_columns
from traces import rundir


def _traces_have_data(fig) -> bool:
    def n(t):
        return max(len(getattr(t, a)) if getattr(t, a, None) is not None else 0 for a in ("x", "y", "z"))

    return any(n(t) > 0 for t in fig.data)


def test_every_view_applies_and_every_figure_has_data(inputs):
    runs = [load_run(inputs["live"]), load_run(inputs["seq"])]
    sections = sections_for(runs, read_train_log(inputs["train_log"]), read_validation(inputs["validation"]),
                            inputs["sweep"])
    assert [s.title for s in sections] == ["Timeline", "Overlap", "Zero experts", "Sweep", "Validation"]
    for section in sections:
        assert section.figures, f"{section.title}: no figures ({section.notes})"
        assert not section.notes, section.notes
        for fig in section.figures:
            assert _traces_have_data(fig), f"{section.title}: {fig.layout.title.text} has no data"


def test_missing_optional_inputs_become_notes(inputs, tmp_path):
    built = dashboards.build([inputs["bare"]], tmp_path / "bare.html")
    # ops only: the timeline and (metrics computed from the ops) overlap apply; routing does not
    assert "Timeline" in built.views and "Overlap" in built.views and "Zero experts" not in built.views
    assert any("no metrics.json" in n for n in built.notes)
    assert any("no expert load" in n for n in built.notes)
    html = (tmp_path / "bare.html").read_text()
    assert "no metrics.json" in html  # the page says what it skipped


def test_page_is_self_contained(inputs, tmp_path):
    built = dashboards.build([inputs["live"]], tmp_path / "d.html", sweep=inputs["sweep_csv"])
    html = built.path.read_text()
    assert built.size_bytes == len(html.encode())
    assert not re.search(r"<script[^>]+src=", html), "page loads a script from elsewhere"
    from plotly.offline import get_plotlyjs

    assert get_plotlyjs()[:2000] in html  # plotly.js itself is inlined
    assert html.count("Plotly.newPlot") == built.n_figures


def test_cli_builds_all_views(inputs, tmp_path, capsys):
    out = tmp_path / "all.html"
    rc = main(["dashboard", str(inputs["live"]), str(inputs["seq"]), "--train-log", str(inputs["train_log"]),
               "--validation", str(inputs["validation"]), "--sweep", str(inputs["sweep"]), "-o", str(out)])
    assert rc == 0 and out.is_file()
    assert "views: Timeline, Overlap, Zero experts, Sweep, Validation" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["not_a_run", "missing_dir", "no_parent", "parent_is_file", "corrupt_json",
                                  "binary_json", "validation_not_json", "sweep_not_a_table", "sweep_missing_column"])
def test_bad_input_one_line_exit_2_nothing_written(case, inputs, tmp_path, capsys):
    out = tmp_path / "out" / "d.html"
    out.parent.mkdir()
    out.write_text("previous dashboard")
    run = str(inputs["live"])
    if case == "not_a_run":
        (tmp_path / "empty").mkdir()
        run = str(tmp_path / "empty")
    elif case == "missing_dir":
        run = str(tmp_path / "nope")
    elif case == "no_parent":
        out = tmp_path / "missing" / "d.html"
    elif case == "parent_is_file":
        out = tmp_path / "out" / "d.html" / "x.html"
    elif case == "corrupt_json":
        bad = tmp_path / "corrupt"
        bad.mkdir()
        (bad / rundir.RUN_JSON).write_text("{not json")
        run = str(bad)
    elif case == "binary_json":
        bad = tmp_path / "binary"
        bad.mkdir()
        (bad / rundir.RUN_JSON).write_bytes(b"\x80\x81{}")
        run = str(bad)
    extra: list[str] = []
    if case == "validation_not_json":
        extra = ["--validation", str(inputs["sweep"])]  # a Parquet file
    elif case == "sweep_not_a_table":
        extra = ["--sweep", str(inputs["validation"])]
    elif case == "sweep_missing_column":
        csv_path = tmp_path / "results.csv"
        csv_path.write_text("preset,cluster,gpus\nlongcat-flash,h800,32\n")
        extra = ["--sweep", str(csv_path)]
    rc = main(["dashboard", run, *extra, "-o", str(out)])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.count("\n") == 1 and err.startswith("moesim dashboard: "), err
    assert (tmp_path / "out" / "d.html").read_text() == "previous dashboard"  # untouched
    leftovers = [p.name for p in (tmp_path / "out").iterdir() if p.name != "d.html"]
    assert not leftovers


def test_failure_while_writing_leaves_no_file(inputs, tmp_path, monkeypatch):
    import dashboards.page as page

    def broken_write(*args, **kwargs):
        raise OSError(28, "No space left on device")

    out = tmp_path / "d.html"
    monkeypatch.setattr(page.os, "replace", broken_write)
    with pytest.raises(DashboardError, match="No space left"):
        dashboards.build([inputs["live"]], out)
    assert list(tmp_path.iterdir()) == []


def test_nothing_to_show_is_an_error(tmp_path):
    with pytest.raises(DashboardError, match="nothing to show"):
        dashboards.build([], tmp_path / "d.html")


def test_128_rank_dashboard_is_small_and_quick(big_run, tmp_path):
    """The size budget (< 20 MB) on 128 ranks × 28 layers × 2 steps; build time printed."""
    run = load_run(big_run)
    assert run.ops.num_rows > 50_000
    t0 = time.perf_counter()
    built = dashboards.build([big_run], tmp_path / "big.html")
    build_s = time.perf_counter() - t0
    print(f"128-rank dashboard: {built.size_bytes / 1e6:.2f} MB, built in {build_s:.2f} s, {run.ops.num_rows} ops")
    assert built.size_bytes < 20e6
    assert {"Timeline", "Overlap", "Zero experts"} <= set(built.views)


def test_ops_columns_fixture_is_valid():
    """The fixture's scheduler respects lanes: ops on one lane never overlap."""
    import numpy as np

    cols = make_ops_columns(2, 2, 1, True, np.random.default_rng(0))
    for rank in (0, 1):
        for lane in set(cols["lane"]):
            idx = [i for i, (r, ln) in enumerate(zip(cols["rank"], cols["lane"])) if r == rank and ln == lane]
            s = np.array([cols["start_us"][i] for i in idx])
            e = s + np.array([cols["dur_us"][i] for i in idx])
            order = np.argsort(s)
            assert (s[order][1:] >= e[order][:-1] - 1e-9).all()


SAMPLES = Path(__file__).resolve().parents[2] / "traces" / "samples"


@pytest.mark.slow
def test_real_live_runs_parsed_by_moesim_parse(tmp_path, capsys):
    """The committed live 2-rank runs (shortcut and sequential), parsed by `moesim parse`:
    every view that applies is drawn from what the real pipeline writes."""
    import shutil

    runs = []
    for name in ("tiny-prefill-shortcut", "tiny-prefill-sequential"):
        if not (SAMPLES / name / rundir.RUN_JSON).is_file():
            pytest.skip(f"{SAMPLES / name} absent")
        shutil.copytree(SAMPLES / name, tmp_path / name)
        assert main(["parse", str(tmp_path / name)]) == 0
        runs.append(tmp_path / name)
    capsys.readouterr()
    loaded = [load_run(r) for r in runs]
    sections = {s.title: s for s in sections_for(loaded)}
    assert set(sections) == {"Timeline", "Overlap", "Zero experts"}
    for section in sections.values():
        for fig in section.figures:
            assert _traces_have_data(fig), f"{section.title}: {fig.layout.title.text}"
    (side_by_side, per_rank) = sections["Overlap"].figures
    titles = [a.text for a in side_by_side.layout.annotations]
    assert titles[0].startswith("shortcut") and titles[1].startswith("sequential")
    ze_titles = [f.layout.title.text for f in sections["Zero experts"].figures]
    assert "FFN experts per token" in ze_titles
    assert any("expert load (layer × expert)" in t for t in ze_titles)
    assert any("per EP rank" in t for t in ze_titles)
    built = dashboards.build(runs, tmp_path / "live.html")
    assert built.size_bytes < 20e6
