"""Fixtures shared by the whole test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

# The shared data sets live beside the repository checkout (../shared/data), not in it.
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Folder of the shared real data sets; skips the test where it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data folder {SHARED_DATA} is absent; these tests need ../shared/data")
    return SHARED_DATA


@pytest.fixture(scope="session")
def bps_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated BPS-layout dataset (read-only: copy it before modifying)."""
    from cellclass.data.simulate import simulate_bps

    out = tmp_path_factory.mktemp("bps")
    simulate_bps(out, n_images=68, seed=0)
    return out


@pytest.fixture(scope="session")
def hpa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small simulated HPA-layout dataset (read-only)."""
    from cellclass.data.simulate import simulate_hpa

    out = tmp_path_factory.mktemp("hpa")
    simulate_hpa(out, n_images=24, seed=0)
    return out
