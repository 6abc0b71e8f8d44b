"""Self-contained plotly HTML dashboards built from run dirs and result tables."""
