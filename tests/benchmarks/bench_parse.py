"""Parse speed and peak memory: gzipped Kineto JSON → normalized ops table, vs HTA's loader.

    python3 tests/benchmarks/bench_parse.py [--copies 4] [--repeat 3]

Files: the largest shared third-party trace (../shared/traces/hta/trace_diff/control) and a
generated trace of ≥ 100 MB uncompressed made by repeating that one `--copies` times (each
copy shifted in time past the previous one, correlation / External ids offset so launches
still match their kernels), written in Kineto's layout (one "  {...}" block per event). Each measurement runs in a fresh subprocess so peak RSS is its
own: moesim = traces.kineto.parse_traces; HTA = hta.trace_analysis.TraceAnalysis(trace_dir)
(HTA's load: parse + its own preprocessing). Prints MB/s of gzipped and of uncompressed
JSON, the speed ratio moesim/HTA measured in this run, and peak RSS (also net of the
interpreter + imports) against the uncompressed size.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import orjson

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "traces" / "hta" / "trace_diff" / "control" / "control.json.gz"

_CHILD = r"""
import gc, json, os, resource, sys, time, logging, warnings
warnings.filterwarnings("ignore")
logging.disable(logging.WARNING)
tool, path = sys.argv[1], sys.argv[2]
if tool == "moesim":
    from traces.kineto import parse_traces
    import traces.lanes, traces.schema  # imports are not part of the parse
else:
    from hta.trace_analysis import TraceAnalysis
def vm_kb(key):  # VmHWM (peak RSS) starts afresh at exec, unlike ru_maxrss which inherits the parent's
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))
base_kb = vm_kb("VmHWM")
t0 = time.perf_counter()
if tool == "moesim":
    rows = parse_traces([path]).num_rows
else:
    rows = sum(len(df) for df in TraceAnalysis(trace_dir=os.path.dirname(path)).t.traces.values())
seconds = time.perf_counter() - t0
peak_kb = vm_kb("VmHWM")
print(json.dumps({"seconds": seconds, "rows": rows, "peak_mb": peak_kb / 1024, "base_mb": base_kb / 1024}))
"""


def make_repeated_trace(src: Path, copies: int, out: Path) -> Path:
    """Repeat `src`'s events `copies` times, back to back in time, into a gzipped file."""
    doc = orjson.loads(gzip.decompress(src.read_bytes()))
    events = doc["traceEvents"]
    timed = [e for e in events if e.get("ph") == "X" and isinstance(e.get("ts"), (int, float))]
    span = max(e["ts"] + e.get("dur", 0) for e in timed) - min(e["ts"] for e in timed) + 1000
    id_keys = ("correlation", "External id")
    max_id = max((e.get("args", {}).get(k, 0) for e in events for k in id_keys if isinstance(e.get("args", {}).get(k, 0), int)), default=0) + 1
    repeated = []
    for k in range(copies):
        for e in events:
            if e.get("ph") == "M" and k:
                continue
            e2 = dict(e)
            if isinstance(e2.get("ts"), (int, float)):
                e2["ts"] = e2["ts"] + k * span
            if k and isinstance(e2.get("id"), int):
                e2["id"] = e2["id"] + k * max_id
            if k and isinstance(e2.get("args"), dict):
                a = dict(e2["args"])
                for key in id_keys:
                    if isinstance(a.get(key), int) and a[key] >= 0:
                        a[key] += k * max_id
                e2["args"] = a
            repeated.append(e2)
    # Kineto's layout: head keys, then one "  {...}" block per event, then the tail keys
    del doc["traceEvents"]
    head = orjson.dumps(doc)[:-1] + b', "traceEvents": [\n'
    body = b",\n".join(b"  " + orjson.dumps(e) for e in repeated)
    out.write_bytes(gzip.compress(head + body + b"\n]}\n", compresslevel=6))
    return out


def measure(tool: str, path: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", _CHILD, tool, str(path)], capture_output=True, text=True, env=env, cwd=str(REPO))
    if proc.returncode:
        raise SystemExit(f"{tool} on {path} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--copies", type=int, default=4, help="repeats of the shared trace in the big file")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool and file; the fastest counts")
    args = parser.parse_args()
    if not SHARED.is_file():
        raise SystemExit(f"{SHARED} absent")
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for name, make in [
            ("shared control.json.gz", lambda d: Path(os.symlink(SHARED, d / SHARED.name) or d / SHARED.name)),
            (f"generated x{args.copies}", lambda d: make_repeated_trace(SHARED, args.copies, d / "big.pt.trace.json.gz")),
        ]:
            d = Path(tmp) / name.split()[0]
            d.mkdir()
            files.append((name, make(d)))
        print(f"machine: {platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
              f"load {os.getloadavg()[0]:.1f} (timings on a shared machine are noisy)")
        header = f"{'file':<24} {'gz MB':>7} {'json MB':>8} {'tool':<7} {'s':>7} {'gz MB/s':>8} {'json MB/s':>9} {'peak MB':>8} {'net MB':>7} {'net/json':>8}"
        print(header)
        for name, path in files:
            gz_mb = path.stat().st_size / 1e6
            json_mb = len(gzip.decompress(path.read_bytes())) / 1e6
            best = {}
            for tool in ("moesim", "hta"):
                runs = [measure(tool, path) for _ in range(args.repeat)]
                best[tool] = min(runs, key=lambda r: r["seconds"])
                r = best[tool]
                net = r["peak_mb"] - r["base_mb"]
                print(f"{name:<24} {gz_mb:>7.1f} {json_mb:>8.1f} {tool:<7} {r['seconds']:>7.2f} {gz_mb / r['seconds']:>8.2f} "
                      f"{json_mb / r['seconds']:>9.1f} {r['peak_mb']:>8.0f} {net:>7.0f} {net / json_mb:>8.2f}")
            print(f"{name:<24} speed ratio moesim/HTA = {best['hta']['seconds'] / best['moesim']['seconds']:.2f}x "
                  f"(rows: moesim ops {best['moesim']['rows']}, HTA events {best['hta']['rows']})")


if __name__ == "__main__":
    main()
