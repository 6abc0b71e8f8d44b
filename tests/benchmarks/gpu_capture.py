"""Capture LongCat-Flash on one GPU: real Kineto traces with kernels, live step times, a
GPU calibration. The device session's one prepared script; on a CPU machine it runs the
same stages on gloo (a dry run of the script itself).

    python3 tests/benchmarks/gpu_capture.py OUT [--work DIR] [--deadline-s 330] [--rounds 2]

Stages, each started only while enough of the deadline is left, each archived as
OUT/<stage>.tar.gz when it ends (under 15 MiB: the largest traces outside the stage's kept
configs are dropped until it fits):
    env        torch, CUDA device, nvidia-smi -> OUT/env.json
    tiny       prefill, decode, train x sequential, shortcut; profiled; one visit each
    calibrate  `moesim calibrate --backend nccl --world-size 1` (kernel times under the profiler)
    cli        `moesim profile` once, as a user runs it
    small-prefill, small-train
               prefill and train at 3 (batch, seq) sizes, decode at one, x both schedules x
               profiler on/off (train profiled at the first size only: its traces are ~3x
               prefill's), `--rounds` serpentine rounds in one process per stage
               (capture_interleaved); only round 0 keeps its traces
    medium-prefill, medium-train
               the same for `medium` (GPU-bound at the larger sizes), its second size the
               base (train profiled there)
    whatif     the commands end to end: calibrate, profile medium at 4 x 512, `moesim simulate
               --to-batch/--to-seq` to 16 x 512 and 2 x 256, those sizes live (whatif.json)
Run it with `| tee OUT/log.txt`. Nothing here asserts: the tests read the committed
results (tests/data/h200/), and the README's H200 figures come from them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

SCHEDULES = ("sequential", "shortcut")
TAR_LIMIT = 15 * 2**20


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def stage_env(out: Path) -> None:
    import torch

    env = {
        "python": platform.python_version(), "torch": torch.__version__, "cuda_available": torch.cuda.is_available(),
        "cpu_count": os.cpu_count(), "host": platform.node(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        env.update(device=torch.cuda.get_device_name(0), cuda=torch.version.cuda, sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1))
        try:
            env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem",
                                                "--format=csv"], capture_output=True, text=True, timeout=20).stdout
        except (OSError, subprocess.SubprocessError) as err:
            env["nvidia_smi"] = f"failed: {err}"
    (out / "env.json").write_text(json.dumps(env, indent=2))
    log(f"env {env}")


def interleaved(specs_by_name: dict, rounds: int, work: Path, timeout_s: float) -> None:
    """One capture_interleaved of every spec, `rounds` serpentine rounds, into
    work/NAME/rep{r}; traces kept for round 0 only."""
    from traces.capture import capture_interleaved

    names = list(specs_by_name)
    specs = [specs_by_name[n] for n in names]
    visits = []
    for r in range(rounds):
        order = range(len(names)) if r % 2 == 0 else reversed(range(len(names)))
        visits += [(k, work / names[k] / f"rep{r}") for k in order]
    t0 = time.time()
    capture_interleaved(specs, visits, work / ".status", timeout_s=timeout_s, progress=lambda line: None)
    log(f"{work.name}: {len(visits)} visits in {time.time() - t0:.0f} s")
    for _, d in visits:
        if d.name != "rep0":
            for trace in d.glob("*.pt.trace.json*"):
                trace.unlink()
        run = json.loads((d / "run.json").read_text())
        log(f"  {d.parent.name}/{d.name}: median {run['step_time_us_median'] / 1e3:.3f} ms "
            f"({run['steps']} steps, profiler {run.get('profiler', '?')})")


def stage_tiny(work: Path, timeout_s: float) -> None:
    from traces.capture import CaptureSpec

    specs = {}
    for mode in ("prefill", "decode", "train"):
        for schedule in SCHEDULES:
            specs[f"{mode}-{schedule}"] = CaptureSpec(
                out_dir="", preset="tiny", world_size=1, schedule=schedule, mode=mode, batch=2,
                seq=1 if mode == "decode" else 16, context=16 if mode == "decode" else 0, steps=5, warmup=2)
    interleaved(specs, 1, work, timeout_s)


def stage_matrix(work: Path, timeout_s: float, rounds: int, preset: str, modes: tuple[str, ...],
                 sizes: list[tuple[int, int]], base: tuple[int, int]) -> None:
    """`preset` at every size x schedule x profiler on/off (train profiled at `base` only:
    its traces are ~3x prefill's; decode at 4 x 1 after 128), `rounds` serpentine rounds."""
    from traces.capture import CaptureSpec

    specs = {}
    for mode in modes:
        for batch, seq in (sizes if mode != "decode" else [(4, 1)]):
            for schedule in SCHEDULES:
                for profiled in ((True, False) if mode != "train" or (batch, seq) == base else (False,)):
                    name = f"{mode}-b{batch}-t{seq}-{schedule}-{'prof' if profiled else 'noprof'}"
                    specs[name] = CaptureSpec(
                        out_dir="", preset=preset, world_size=1, schedule=schedule, mode=mode, batch=batch, seq=seq,
                        context=128 if mode == "decode" else 0, steps=3 if profiled else 20, warmup=2,
                        profiler=profiled)
    interleaved(specs, rounds, work, timeout_s)


def stage_calibrate(work: Path, timeout_s: float, backend: str) -> None:
    cmd = [sys.executable, "-m", "moesim", "calibrate", "--backend", backend, "--world-size", "1", "-o", str(work)]
    log(" ".join(cmd[1:]))
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=timeout_s)


def stage_cli(work: Path, timeout_s: float) -> None:
    cmd = [sys.executable, "-m", "moesim", "profile", "--preset", "small", "--world-size", "1",
           "--schedule", "shortcut", "--out", str(work / "small-prefill-shortcut")]
    log(" ".join(cmd[1:]))
    subprocess.run(cmd, cwd=ROOT, check=True, timeout=timeout_s)


def stage_whatif(work: Path, timeout_s: float, backend: str, preset: str = "medium") -> None:
    """The user's what-if workflow end to end on this machine, with the commands: calibrate,
    capture `medium` prefill at 4 x 512, move it to 16 x 512 and 2 x 256 with `moesim
    simulate --to-batch/--to-seq`, and run those sizes live (profiled, as the trace, and
    not) for the comparison (whatif.json)."""
    deadline = time.time() + timeout_s

    def moesim(*argv: str) -> str:
        cmd = [sys.executable, "-m", "moesim", *argv]
        log(" ".join(cmd[2:]))
        done = subprocess.run(cmd, cwd=ROOT, check=True, timeout=max(deadline - time.time(), 1),
                              capture_output=True, text=True)
        return done.stdout

    runs: dict[str, float] = {}
    predicted: dict[str, float] = {}

    def save() -> None:  # after every measurement: a run stopped at its limit keeps what it has
        (work / "whatif.json").write_text(json.dumps({"live_step_us_median": runs, "predicted_step_us": predicted},
                                                     indent=2))

    moesim("calibrate", "--backend", backend, "--world-size", "1", "-o", str(work / "cal"))
    for (batch, seq), profiled in [((4, 512), True), ((16, 512), True), ((16, 512), False), ((2, 256), False),
                                   ((2, 256), True), ((4, 512), False)]:
        name = f"b{batch}-t{seq}-{'prof' if profiled else 'noprof'}"
        moesim("profile", "--preset", preset, "--world-size", "1", "--schedule", "sequential", "--batch", str(batch),
               "--seq", str(seq), "--steps", "3" if profiled else "20", "--warmup", "2", "--out", str(work / name),
               *([] if profiled else ["--no-profiler"]))
        runs[name] = json.loads((work / name / "run.json").read_text())["step_time_us_median"]
        save()
        if name == "b2-t256-noprof":  # the what-ifs as soon as their references are in
            moesim("parse", str(work / "b4-t512-prof"))
            for size in ((16, 512), (2, 256)):
                out = work / "sim-b{}-t{}".format(*size)
                moesim("simulate", "--trace", str(work / "b4-t512-prof"), "--to-batch", str(size[0]), "--to-seq",
                       str(size[1]), "--calibration", str(work / "cal"), "-o", str(out))
                predicted["b{}-t{}".format(*size)] = json.loads((out / "metrics.json").read_text())["step_time_us"]
                for trace in out.glob("*.pt.trace.json*"):
                    trace.unlink()  # the moved step's traces: large, and rebuilt by the same command
            save()
    for size, us in predicted.items():
        log(f"what-if {size}: predicted {us / 1e3:.1f} ms, live profiled {runs.get(size + '-prof', 0) / 1e3:.1f}, "
            f"unprofiled {runs.get(size + '-noprof', 0) / 1e3:.1f}")


def archive(out: Path, stage_dir: Path, keep: str) -> None:
    """OUT/<stage>.tar.gz of stage_dir; while it is over TAR_LIMIT, the largest trace of a
    config whose name does not start with `keep` is deleted first (the device returns files
    of at most 16 MiB)."""
    path, tmp = out / f"{stage_dir.name}.tar.gz", out / f".{stage_dir.name}.tar.gz.partial"
    while True:
        with tarfile.open(tmp, "w:gz", compresslevel=6) as tar:
            tar.add(stage_dir, arcname=stage_dir.name, filter=lambda t: None if "/.status" in t.name else t)
        os.replace(tmp, path)
        size = path.stat().st_size
        log(f"archive {path.name} {size / 2**20:.1f} MiB")
        if size <= TAR_LIMIT:
            return
        traces = sorted((t for t in stage_dir.rglob("*.pt.trace.json*")
                         if keep and not t.parent.parent.name.startswith(keep)),
                        key=lambda t: t.stat().st_size, reverse=True)
        if not traces:
            log(f"archive {path.name}: over {TAR_LIMIT / 2**20:.0f} MiB and no trace left to drop")
            return
        log(f"  dropping {traces[0].relative_to(stage_dir)} ({traces[0].stat().st_size / 2**20:.1f} MiB)")
        traces[0].unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--deadline-s", type=float, default=330.0, help="start no stage after this (default 330)")
    parser.add_argument("--rounds", type=int, default=2, help="serpentine rounds of the small matrix (default 2)")
    parser.add_argument("--work", type=Path, default=None,
                        help="where the stages write before archiving (default OUT/work; emptied first)")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip")
    parser.add_argument("--small-sizes", default="4x128,8x256,16x512",
                        help="small's prefill/train (global batch)x(seq) sizes (default 4x128,8x256,16x512: 512-8192 tokens)")
    parser.add_argument("--whatif-preset", default="medium", help="the whatif stage's model (default medium; tiny for a dry run)")
    parser.add_argument("--medium-sizes", default="2x256,4x512,16x512",
                        help="medium's sizes, the second the base (default 2x256,4x512,16x512: 512-8192 tokens)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    sizes = [tuple(int(x) for x in size.split("x")) for size in args.small_sizes.split(",")]
    start = time.time()
    out, work = args.out, args.work or args.out / "work"
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    keep = "prefill-b{}-t{}".format(*sizes[0])
    medium_sizes = [tuple(int(x) for x in size.split("x")) for size in args.medium_sizes.split(",")]
    # (name, seconds it needs left, run(stage dir, seconds left), configs whose traces stay when trimming)
    stages = [
        ("env", 0, lambda d, left: stage_env(out), None),
        ("tiny", 30, lambda d, left: stage_tiny(d, left), ""),
        ("calibrate", 40, lambda d, left: stage_calibrate(d, left, backend), ""),
        ("cli", 30, lambda d, left: stage_cli(d, left), ""),
        ("small-prefill", 60, lambda d, left: stage_matrix(d, left, args.rounds, "small", ("prefill", "decode"),
                                                           sizes, sizes[0]), keep),
        ("small-train", 60, lambda d, left: stage_matrix(d, left, args.rounds, "small", ("train",), sizes, sizes[0]),
         "train"),
        ("medium-prefill", 60, lambda d, left: stage_matrix(d, left, args.rounds, "medium", ("prefill",),
                                                            medium_sizes, medium_sizes[1]), ""),
        ("medium-train", 60, lambda d, left: stage_matrix(d, left, args.rounds, "medium", ("train",),
                                                          medium_sizes, medium_sizes[1]), "train"),
        ("whatif", 90, lambda d, left: stage_whatif(d, left, backend, args.whatif_preset), "b4-t512-prof"),
    ]
    failed = []
    for name, need, fn, keep in stages:
        left = args.deadline_s - (time.time() - start)
        if name in args.skip.split(","):
            continue
        if left < need:
            log(f"{name}: skipped, {left:.0f} s left")
            failed.append(name)
            continue
        log(f"{name}: start ({left:.0f} s left)")
        stage_dir = work / name
        stage_dir.mkdir()
        try:
            fn(stage_dir, left)
        except Exception:  # a stage's failure must not lose the others' results
            log(f"{name}: FAILED\n{traceback.format_exc()}")
            failed.append(name)
        if keep is not None:
            archive(out, stage_dir, keep)
    log(f"done in {time.time() - start:.0f} s; failed or skipped: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
