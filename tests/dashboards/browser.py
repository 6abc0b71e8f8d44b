"""Open dashboards in headless Chromium and report what the page saw.

A copy of the page gets two small scripts: one at the top of <head> that records
JavaScript errors (window.onerror and console.error) and one at the end of <body> that,
after the load event, writes into the DOM, as JSON, the errors, each plotly figure's traces
(type and point count, from plotly's own `_fullData`) and the number of WebGL canvases.
`chromium --dump-dom` then prints the DOM, and the JSON is read back. Screenshots are
taken by a second run with `--screenshot`.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in CI containers
    "--disable-gpu",
    "--enable-unsafe-swiftshader",  # software WebGL for plotly's scattergl
    "--hide-scrollbars",
    "--virtual-time-budget=4000",  # let timers and animation frames run before the dump
]

_HEAD = """<script>window.__moesimErrors=[];
window.addEventListener('error',function(e){window.__moesimErrors.push(String(e.message))});
var __ce=console.error;console.error=function(){
window.__moesimErrors.push('console.error: '+Array.prototype.join.call(arguments,' '));__ce.apply(console,arguments)};
</script>"""
_TAIL = """<script>window.addEventListener('load',function(){setTimeout(function(){
var figs=[].map.call(document.querySelectorAll('.js-plotly-plot'),function(d){
 return {id:d.id,traces:(d._fullData||[]).map(function(t){
  return {type:t.type,n:Math.max((t.x||[]).length,(t.y||[]).length,(t.z||[]).length)}})}});
var pre=document.createElement('pre');pre.id='moesim-check';
pre.textContent=JSON.stringify({errors:window.__moesimErrors,figs:figs,
 canvases:document.querySelectorAll('canvas').length,
 plot_divs:document.querySelectorAll('div[id^="moesim-fig-"]').length});
document.body.appendChild(pre);},0)})</script>"""


def instrumented_copy(page: Path, out_dir: Path) -> Path:
    """The page with the error hook and the check script added."""
    text = page.read_text(encoding="utf-8")
    assert "<head>" in text and "</body>" in text, f"{page}: not a full HTML page"
    copy = out_dir / f"checked-{page.name}"
    copy.write_text(text.replace("<head>", "<head>" + _HEAD, 1).replace("</body>", _TAIL + "</body>", 1),
                    encoding="utf-8")
    return copy


def _chromium(args: list[str], timeout_s: float = 120) -> tuple[str, float]:
    t0 = time.perf_counter()
    proc = subprocess.run([CHROMIUM, *FLAGS, *args], capture_output=True, text=True, timeout=timeout_s)
    return proc.stdout, time.perf_counter() - t0


def page_report(page: Path, work_dir: Path) -> dict:
    """{errors, figs: [{id, traces: [{type, n}]}], canvases, plot_divs, wall_s} for `page`."""
    copy = instrumented_copy(page, work_dir)
    dom, wall_s = _chromium(["--dump-dom", copy.resolve().as_uri()])
    match = re.search(r'<pre id="moesim-check">(.*?)</pre>', dom, re.S)
    assert match, f"{page}: the check script never ran (DOM of {len(dom)} chars)"
    report = json.loads(match.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">")
                        .replace("&amp;", "&"))
    report["wall_s"] = wall_s
    return report


def open_wall_s(page: Path) -> float:
    """Wall time of `chromium --dump-dom` on the page as is (browser start-up included)."""
    return _chromium(["--dump-dom", page.resolve().as_uri()])[1]


def screenshot(page: Path, png: Path, width: int = 1400, height: int = 2400) -> Path:
    _chromium([f"--window-size={width},{height}", f"--screenshot={png.resolve()}", page.resolve().as_uri()])
    assert png.is_file(), f"chromium wrote no screenshot of {page}"
    return png


def pixel_std(png: Path) -> float:
    """Standard deviation of the grey levels: ~0 for a blank page."""
    import numpy as np
    from PIL import Image

    grey = np.asarray(Image.open(png).convert("L"), dtype=np.float64)
    return float(grey.std())
