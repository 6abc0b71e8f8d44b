"""Dashboards in a real browser: headless Chromium, no JavaScript errors, every figure drawn.

Skipped only where chromium is absent (.ci/run installs Debian's `chromium`).
"""

from __future__ import annotations


import pytest

import dashboards
from tests.dashboards import browser

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(browser.CHROMIUM is None, reason="chromium not installed (apt-get install chromium)"),
]


def _check_page(page, work_dir, expect_figures: int) -> dict:
    report = browser.page_report(page, work_dir)
    assert report["errors"] == [], report["errors"]
    assert report["plot_divs"] == expect_figures
    assert len(report["figs"]) == expect_figures, "a figure div was not turned into a plot"
    for fig in report["figs"]:
        assert fig["traces"], f"{fig['id']}: no traces"
        assert any(t["n"] > 0 for t in fig["traces"]), f"{fig['id']}: traces without points {fig['traces']}"
    return report


@pytest.fixture(scope="module")
def pages(inputs, big_run, tmp_path_factory):
    """Every view: all five on two small runs (live shortcut + simulated sequential), a
    128-rank run, and sweep only (what `moesim sweep` writes)."""
    from dashboards import timeline

    root = tmp_path_factory.mktemp("pages")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(timeline, "SVG_MAX_SEGMENTS", 0)  # this page takes the WebGL (scattergl) path
        all_views = dashboards.build([inputs["live"], inputs["seq"]], root / "all.html", train_log=inputs["train_log"],
                                     validation=inputs["validation"], sweep=inputs["sweep"])
    built = {
        "all": all_views,
        "big": dashboards.build([big_run], root / "big.html"),
        "sweep": dashboards.build([], root / "sweep.html", sweep=inputs["sweep_csv"]),
    }
    return root, built, {}


@pytest.mark.parametrize("kind", ["all", "big", "sweep"])
def test_page_opens_without_errors_and_draws_every_figure(pages, kind):
    root, built, reports = pages
    assert set(built["all"].views) == {"Timeline", "Overlap", "Zero experts", "Sweep", "Validation"}
    reports[kind] = _check_page(built[kind].path, root, built[kind].n_figures)
    if kind == "all":
        assert any(t["type"] == "scattergl" for t in reports[kind]["figs"][0]["traces"])
        assert reports[kind]["canvases"] > 0  # the WebGL timeline was drawn


def test_screenshot_is_not_blank(pages):
    """The page with every view (WebGL timeline included) renders to pixels."""
    root, built, _ = pages
    png = browser.screenshot(built["all"].path, root / "all.png")
    assert browser.pixel_std(png) > 10.0, f"{png} looks blank"


def test_128_rank_page_stays_under_20_mb(pages):
    """The issue's size budget for a 128-rank run (test_page_opens_..._figure[big] opens it).

    Its open time (< 5 s) is a performance target, measured by
    tests/benchmarks/dashboard_open.py against an empty and a plotly.js-only page, not in a
    timed assertion here, which would fail on noise on a shared 2-core CI machine.
    """
    _, built, _ = pages
    assert built["big"].size_bytes < 20e6
