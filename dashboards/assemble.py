"""Pick the views that apply to the inputs and write one dashboard.

    build(run_dirs, out_path, train_log=None, validation=None, sweep=None) -> Built

Views (each skipped with a note when its data is absent):
  1 Timeline      runs with ops.parquet (dashboards/timeline.py)
  2 Overlap       runs with metrics.json (dashboards/overlap.py)
  3 Zero experts  runs with routing stats, and/or a `moesim train` log (dashboards/experts.py)
  4 Sweep         a sweep results table (dashboards/sweep.py)
  5 Validation    a validation.json (dashboards/validation.py)
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import pyarrow as pa

from dashboards import experts, overlap, sweep, timeline, validation
from dashboards.errors import DashboardError
from dashboards.inputs import Run, load_run, read_train_log, read_validation
from dashboards.page import Section, check_writable, render, summary_table, write_atomic


@dataclass
class Built:
    """What build() wrote."""

    path: Path
    size_bytes: int
    views: list[str]  # titles of the sections that have figures
    n_figures: int
    notes: list[str]  # views or figures skipped, and why


def _run_summary(runs: list[Run]) -> str:
    rows = []
    for r in runs:
        m = r.metrics or {}
        rows.append([r.path.name, r.run.get("source"), r.run.get("preset"), r.schedule, r.run.get("world_size"),
                     r.run.get("backend"), r.step_time_us(), m.get("overlap_pct_mean"),
                     m.get("ffn_experts_per_token_mean"), m.get("zero_expert_share")])
    return summary_table(["run", "source", "preset", "schedule", "ranks", "backend", "step time (µs)",
                          "overlap % (mean)", "FFN experts / token", "zero-expert share"], rows)


def sections_for(
    runs: list[Run],
    train_log: dict | None = None,
    validation_obj: dict | None = None,
    sweep_table: pa.Table | dict | str | os.PathLike | None = None,
) -> list[Section]:
    """The sections (views) that apply, in the order of the module docstring."""
    sections: list[Section] = []
    if runs:
        tl = Section("Timeline", "Per rank and lane: compute, comm and memory ops; the red row under each rank is "
                     "comm hidden behind compute. Runs share one time axis (each starts at its first op). "
                     "Hover for labels; drag to zoom.", table_html=_run_summary(runs))
        fig, notes = timeline.timeline_figure(runs)
        tl.notes += notes
        if fig is not None:
            tl.figures.append(fig)
        small = timeline.small_runs_bars_figure(runs)
        if small is not None:
            tl.figures.append(small)
        for r in runs:  # runs with many ranks: every rank as a bar, the timeline's ranks marked
            if len((r.metrics or {}).get("ranks") or {}) > timeline.FULL_RANKS:
                tl.figures.append(timeline.rank_bars_figure(r, timeline.representative_ranks(r)))
        sections.append(tl)

        ov = Section("Overlap", "Comm per layer and block, split into hidden (behind compute) and exposed, beside "
                     "its overlap window (compute the dependency graph lets run concurrently). Runs with "
                     "different schedules sit side by side.")
        figs, notes = overlap.label_figures(runs)
        ov.figures += figs
        ov.notes += notes
        fig, notes = overlap.rank_overlap_figure(runs)
        ov.notes += notes
        if fig is not None:
            ov.figures.append(fig)
        sections.append(ov)

    if runs or train_log is not None:
        ze = Section("Zero experts", "How many FFN experts tokens use (zero-computation experts cost nothing), "
                     "the activated parameters that follow, expert load across layers and EP ranks, and the "
                     "router's PID controller during training.")
        if runs:
            figs, notes = experts.routing_figures(runs)
            ze.figures += figs
            ze.notes += notes
        if train_log is not None:
            fig = experts.train_figure(train_log)
            if fig is None:
                ze.notes.append("Zero experts: train log has no PID columns")
            else:
                ze.figures.append(fig)
        sections.append(ze)

    if sweep_table is not None:
        figs, notes = sweep.sweep_view(sweep_table)
        sections.append(Section("Sweep", "Every grid point of a `moesim sweep`: the TPS/user vs TGS frontier, "
                                "cost per million tokens, and step time across the grid.", figures=figs, notes=notes))
    if validation_obj is not None:
        sections.append(Section("Validation", "Simulated vs measured step time per configuration; points on "
                                "the dashed line are exact, shaded bands are ±10% and ±25%.",
                                figures=[validation.validation_figure(validation_obj)]))
    return sections


def build(
    run_dirs: Sequence[str | os.PathLike] = (),
    out_path: str | os.PathLike = "dashboard.html",
    *,
    train_log: str | os.PathLike | None = None,
    validation: str | os.PathLike | dict | None = None,
    sweep: pa.Table | dict | str | os.PathLike | None = None,
    title: str = "moesim dashboard",
) -> Built:
    """Read the inputs, build every view that applies, write one self-contained HTML file.

    run_dirs: run directories (live or simulated); validation: a validation.json path or
    its parsed object; sweep: a results table (pyarrow Table, dict of columns, or a
    .parquet/.csv path). Raises DashboardError for unreadable inputs, an output that cannot
    be written, or inputs that give no figure at all. Nothing is written on error.
    """
    out_path = check_writable(out_path)
    runs = [load_run(p) for p in run_dirs]
    log = read_train_log(train_log) if train_log is not None else None
    val = validation if isinstance(validation, dict) else read_validation(validation) if validation else None
    if isinstance(validation, dict) and not validation.get("configs"):
        raise DashboardError("validation: expected a non-empty `configs` list")
    if not runs and log is None and val is None and sweep is None:
        raise DashboardError("nothing to show: give run dirs, --train-log, --validation or --sweep")
    sections = sections_for(runs, log, val, sweep)
    notes = [n for r in runs for n in r.notes]
    shown = [s for s in sections if s.figures]
    if not shown:
        detail = "; ".join(notes + [n for s in sections for n in s.notes][:5])
        raise DashboardError(f"nothing to show: no view applies to the inputs ({detail})")
    text = render(sections, title, notes)
    write_atomic(text, out_path)
    return Built(path=out_path, size_bytes=len(text.encode("utf-8")), views=[s.title for s in shown],
                 n_figures=sum(len(s.figures) for s in sections), notes=notes + [n for s in sections for n in s.notes])
