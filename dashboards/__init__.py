"""Self-contained plotly HTML dashboards built from run dirs and result tables.

Entry points (imported lazily, so `import dashboards.errors` stays cheap):
    build(run_dirs, out_path, *, train_log=None, validation=None, sweep=None, title=...) -> Built
        every view that applies, written atomically to one HTML file (dashboards/assemble.py)
    sweep_view(table) -> (list[plotly Figure], notes); sweep_figures(table) -> figures
        the sweep view for a results table (pyarrow Table, dict of columns, .parquet/.csv)
    pareto_mask(x, y) -> bool array   points on the (max x, max y) frontier
"""

from __future__ import annotations

_EXPORTS = {
    "build": "dashboards.assemble",
    "Built": "dashboards.assemble",
    "sweep_figures": "dashboards.sweep",
    "sweep_view": "dashboards.sweep",
    "pareto_mask": "dashboards.sweep",
}


def __getattr__(name: str) -> object:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'dashboards' has no attribute {name!r}")
