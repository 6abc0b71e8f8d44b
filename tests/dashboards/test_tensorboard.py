"""TensorBoard's torch-tb-profiler opens a moesim run dir: its own loader lists the workers
(one per rank{r}.pt.trace.json.gz) and builds the overview page from real torch.profiler
traces. This is what `tensorboard --logdir RUN_PARENT` shows (README, "Dashboards")."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import pytest

from traces import rundir


def _profile_rank(rank: int, out_dir: Path) -> Path:
    """A real torch.profiler trace of a few steps of a small matmul chain, as rank{rank}."""
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function, schedule

    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(rank)
    w = torch.randn(64, 64, generator=gen)
    x = torch.randn(32, 64, generator=gen)
    raw = out_dir / f".rank{rank}.json"
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=0, warmup=1, active=2),
                 on_trace_ready=lambda p: p.export_chrome_trace(str(raw))) as prof:
        for _ in range(3):
            with record_function("L0/mlp0"):
                y = torch.relu(x @ w) @ w.T
            y.sum().item()
            prof.step()
    target = out_dir / rundir.rank_trace_name(rank)
    with open(raw, "rb") as src, gzip.open(target, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()
    return target


@pytest.mark.slow
def test_tb_profiler_run_loader_lists_workers_and_builds_overview(tmp_path):
    pytest.importorskip("torch_tb_profiler")
    from torch_tb_profiler import io as tb_io
    from torch_tb_profiler.profiler.loader import RunLoader

    run_dir = tmp_path / "runs" / "live-sbo"
    run_dir.mkdir(parents=True)
    for rank in (0, 1):
        _profile_rank(rank, run_dir)
    rundir.write_json_atomic(run_dir / rundir.RUN_JSON, {"source": "live", "world_size": 2})
    assert [p.name for p in rundir.trace_files(run_dir)] == ["rank0.pt.trace.json.gz", "rank1.pt.trace.json.gz"]

    cache_dir = tmp_path / "tb-cache"
    cache_dir.mkdir()
    run = RunLoader("live-sbo", str(run_dir), tb_io.Cache(str(cache_dir))).load()
    assert sorted(run.workers) == ["rank0", "rank1"]
    for worker in ("rank0", "rank1"):
        (profile,) = run.get_profiles(worker=worker)  # one span per worker ("default")
        assert profile.overview is not None
        steps = profile.overview["steps"]
        assert len(steps["rows"]) == 2  # the two active profiler steps
        perf = profile.overview["performance"][0]
        assert perf["name"] == "Average Step Time" and perf["value"] > 0
