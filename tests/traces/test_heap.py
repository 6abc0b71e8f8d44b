"""keep_heap: a rank's freed tensors stay in its heap, so the next step's tensors of the
same size do not fault in fresh pages (glibc's default hands blocks of ≥ 32 MiB back to
the kernel on every free). Counted in minor page faults, not timed."""

import platform
import subprocess
import sys

import pytest

PROBE = r"""
import resource, sys
import torch
from traces.capture import keep_heap
torch.set_num_threads(1)
kept = keep_heap() if sys.argv[1] == "keep" else "default"
def step():  # a step's activations: several tensors alive at once, 3-64 MiB, all freed after
    xs = [torch.ones(mib << 18) for mib in (8, 24, 64, 3, 40)]
    del xs
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print(kept, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""
PAGES_PER_STEP = (8 + 24 + 64 + 3 + 40) * (1 << 20) // 4096


def probe(mode: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True).stdout
    kept, faults = out.strip().rsplit(" ", 1)
    return kept, int(faults)


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc malloc only")
def test_keep_heap_reuses_freed_tensors():
    kept, faults = probe("keep")
    assert kept.startswith("glibc heap kept"), kept
    assert faults < PAGES_PER_STEP // 20, f"{faults} page faults per step of {PAGES_PER_STEP} pages"
    # the control: glibc's defaults map most of it afresh every step
    _, faults_default = probe("default")
    assert faults_default > PAGES_PER_STEP // 2, faults_default
