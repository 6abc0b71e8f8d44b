"""One self-contained HTML page: plotly.js embedded once, then each view's figures.

The page opens offline (no CDN): plotly.js (about 4.7 MB) is inlined in <head>. Figures are
serialised by plotly (numpy arrays as base64 typed arrays, which keeps large timelines
small). The file is written to a temp file beside the target and renamed over it, so a
failure never leaves half a dashboard.
"""

from __future__ import annotations

import html
import os
from dataclasses import dataclass, field
from pathlib import Path

import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs

from dashboards.errors import DashboardError

PLOTLY_CONFIG = {"displaylogo": False, "responsive": True}
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 2em 3em; color: #222; }
h1 { font-size: 1.5em; margin: 0.8em 0 0.2em; }
h2 { font-size: 1.2em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
p.intro { color: #555; max-width: 60em; }
ul.notes { color: #8a6d3b; font-size: 0.9em; }
table.summary { border-collapse: collapse; font-size: 0.9em; }
table.summary td, table.summary th { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
table.summary th { background: #f4f4f4; }
nav a { margin-right: 1em; }
"""


@dataclass
class Section:
    """One view: a heading, a line of explanation, its figures and its notes."""

    title: str
    intro: str = ""
    figures: list[go.Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    table_html: str = ""

    @property
    def anchor(self) -> str:
        return self.title.lower().replace(" ", "-")


def summary_table(header: list[str], rows: list[list[object]]) -> str:
    """A small HTML table (values escaped; floats to 4 significant digits)."""

    def cell(v: object) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.4g}"
        return html.escape(str(v))

    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{cell(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f'<table class="summary"><tr>{head}</tr>{body}</table>'


def render(sections: list[Section], title: str, notes: list[str]) -> str:
    """The whole page as a string. Sections without figures or table show only their notes."""
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{CSS}</style>",
        f'<script type="text/javascript">{get_plotlyjs()}</script>',
        "</head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<nav>" + "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections) + "</nav>",
    ]
    if notes:
        parts.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")
    n_fig = 0
    for section in sections:
        parts.append(f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>')
        if section.intro:
            parts.append(f'<p class="intro">{html.escape(section.intro)}</p>')
        if section.notes:
            parts.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in section.notes) + "</ul>")
        parts.append(section.table_html)
        for fig in section.figures:
            fig.update_layout(template="plotly_white")
            parts.append(pio.to_html(fig, full_html=False, include_plotlyjs=False, div_id=f"moesim-fig-{n_fig}",
                                     config=PLOTLY_CONFIG, validate=False))
            n_fig += 1
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts)


def check_writable(out_path: str | os.PathLike) -> Path:
    """Fail early (DashboardError) when `out_path` cannot be written."""
    out_path = Path(out_path)
    parent = out_path.parent if str(out_path.parent) else Path(".")
    if out_path.is_dir():
        raise DashboardError(f"{out_path}: is a directory (expected an .html file path)")
    if not parent.is_dir():
        raise DashboardError(f"{out_path}: cannot write, folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DashboardError(f"{out_path}: cannot write, folder {parent} is not writable")
    return out_path


def write_atomic(text: str, out_path: str | os.PathLike) -> Path:
    """Write `text` to a temp file beside `out_path`, then rename it into place."""
    out_path = check_writable(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out_path)
    except OSError as err:
        raise DashboardError(f"{out_path}: cannot write ({err.strerror or err})") from None
    finally:
        tmp.unlink(missing_ok=True)
    return out_path
