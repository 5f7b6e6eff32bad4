"""``precision = auto`` picks bf16 where the hardware runs it natively, and says which it used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cellclass.data.presets import bps
from cellclass.training import loop
from cellclass.training.config import TrainConfig


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_precision_on_a_cpu_follows_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool,
                                                     expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    assert loop.resolve_precision(TrainConfig(precision="auto")) == expected
    assert loop.resolve_precision(TrainConfig(precision="32-true")) == "32-true"  # explicit: kept
    assert loop.resolve_precision(TrainConfig(precision="bf16-mixed")) == "bf16-mixed"


def test_cpu_flags_are_read_from_cpuinfo() -> None:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    assert loop.cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


def test_the_run_records_the_precision_it_used(bps_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    cfg = TrainConfig(model="lenet5", image_size=32, epochs=1, tasks=["particle_type"], tta=False)
    loop.train(bps(bps_dir), cfg, tmp_path / "run")
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["train"]["precision"] == "auto" and recorded["runtime"]["precision"] == "32-true"
