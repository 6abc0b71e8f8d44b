import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SHARED_TRACES = SHARED / "traces"


@pytest.fixture
def shared_traces() -> Path:
    if not SHARED_TRACES.is_dir():
        pytest.skip(f"{SHARED_TRACES} absent")
    return SHARED_TRACES


def pytest_configure(config):
    # Repeatable timings and no oversubscription on the 2-core machine.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
