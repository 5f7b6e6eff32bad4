"""The allocator settings: fewer page faults per step on glibc, no-ops elsewhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cellclass import allocator

CHURN = """
import resource, sys
import numpy as np
from cellclass.allocator import steady_allocator

def faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def churn(steps):  # allocate, touch and free batch-sized buffers, as a training step does
    start = faults()
    for _ in range(steps):
        live = [np.ones((5 << 20) // 8) for _ in range(4)]  # 20 MB at once, then freed
        del live
    return faults() - start

if sys.argv[1] == "steady":
    with steady_allocator():
        churn(3)  # the heap grows once
        during = churn(50)
    print(during, churn(50))  # while set, and after the block
else:
    churn(3)
    print(churn(50), churn(50))
"""


def _faults(mode: str) -> list[int]:
    done = subprocess.run([sys.executable, "-c", CHURN, mode], capture_output=True, text=True, check=True)
    return [int(v) for v in done.stdout.split()]


@pytest.mark.slow
@pytest.mark.skipif(allocator._libc() is None, reason="not glibc: the settings are no-ops here")
def test_steady_allocator_stops_page_faults_per_step() -> None:
    plain = _faults("plain")
    steady = _faults("steady")
    assert min(plain) > 500  # glibc's own thresholds: fresh pages every few steps
    assert steady[0] < 50, steady  # none per step once the heap has grown
    assert steady[1] < 50  # after the block: batch-sized buffers still come from the heap


def test_settings_are_no_ops_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator, "_libc", lambda: None)
    with allocator.steady_allocator() as applied:
        assert applied is False
    assert allocator.return_large_buffers() is False
