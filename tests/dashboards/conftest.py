"""Inputs shared by the dashboard tests, built once per session (see runs.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.dashboards import runs


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run dirs and files: live (shortcut, 2 ranks), seq (sequential, simulated, 2 ranks),
    bare (ops only), train_log, validation, sweep (.parquet and .csv)."""
    import pyarrow as pa
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("dash-inputs")
    out = {
        "live": runs.make_run(root / "live", schedule="sbo", source="live", seed=0),
        "seq": runs.make_run(root / "seq", schedule="sequential", source="simulated", seed=1),
        "bare": runs.make_run(root / "bare", schedule="sbo", routing=False, metrics=False, seed=2),
        "train_log": runs.make_train_log(root / "train_log.csv"),
        "validation": runs.make_validation(root / "validation.json"),
    }
    table = pa.table(runs.sweep_table())
    pq.write_table(table, root / "results.parquet")
    pcsv.write_csv(table, root / "results.csv")
    out["sweep"] = root / "results.parquet"
    out["sweep_csv"] = root / "results.csv"
    return out


@pytest.fixture(scope="session")
def big_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 128-rank simulated run: 28 layers, 2 steps (≈ 58k ops)."""
    root = tmp_path_factory.mktemp("dash-big")
    return runs.make_run(root / "big128", world_size=128, schedule="sbo", source="simulated", n_layers=28,
                         n_steps=2, seed=3)
