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


def test_images_normalized_once_train_as_per_batch(bps_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Within loader_memory_mb the loop normalizes every image once; with a bound below the
    # data (68 images of 64 x 64 float32: 1.1 MB) it normalizes each batch as read. Same
    # seed, same batches: the same training.
    from cellclass.data.loading import NormalizedView

    materialized = []
    original = NormalizedView.materialize
    monkeypatch.setattr(NormalizedView, "materialize", lambda self, *a: materialized.append(1) or original(self, *a))
    results = {}
    for bound in (512, 1):
        cfg = TrainConfig(model="lenet5", image_size=64, epochs=2, tasks=["particle_type"], tta=False,
                          precision="32-true", loader_memory_mb=bound)
        run = loop.train(bps(bps_dir), cfg, tmp_path / f"run-{bound}")
        history = (tmp_path / f"run-{bound}" / "metrics.csv").read_text()
        results[bound] = (run["tasks"]["particle_type"]["accuracy"], history.splitlines()[-1].split(",")[1:3])
    assert len(materialized) == 1  # the 512 MB run only
    assert results[512] == results[1]
