"""``precision = auto`` picks bf16 where the hardware runs it natively, and says which it used."""

from __future__ import annotations

import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import yaml

from cellclass.data.presets import bps
from cellclass.training import loop
from cellclass.training.config import TrainConfig


@pytest.mark.parametrize(("cuda", "accelerator", "native", "expected"), [
    (False, "auto", True, "bf16-mixed"),
    (False, "auto", False, "32-true"),
    (True, "auto", False, "bf16-mixed"),  # a GPU runs bf16 natively whatever the CPU
    (True, "cpu", False, "32-true"),  # told to train on the CPU: the CPU decides
    (True, "cpu", True, "bf16-mixed"),
])
def test_auto_precision_follows_where_bf16_is_native(monkeypatch: pytest.MonkeyPatch, cuda: bool, accelerator: str,
                                                     native: bool, expected: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: native)
    assert loop.resolve_precision(TrainConfig(precision="auto", accelerator=accelerator)) == expected
    assert loop.resolve_precision(TrainConfig(precision="32-true")) == "32-true"  # explicit: kept
    assert loop.resolve_precision(TrainConfig(precision="bf16-mixed")) == "bf16-mixed"


# Excerpts of /proc/cpuinfo as Linux writes them on these processors, with what each has.
_SAPPHIRE_RAPIDS = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
                    "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 amx_bf16 amx_tile amx_int8\n\n")
_ZEN4 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 9654 96-Core Processor\n"
         "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni\n\n")
_SKYLAKE = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz\n"
            "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n\n")
_ZEN3 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7763 64-Core Processor\n"
         "flags\t\t: fpu sse2 avx2 fma bmi2\nbugs\t\t: sysret_ss_attrs spectre_v1 spectre_v2\n\n")
_AARCH64 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\nCPU implementer\t: 0x41\n\n"


@pytest.mark.parametrize(("cpuinfo", "native"), [
    (_SAPPHIRE_RAPIDS, True),  # AMX and AVX-512 BF16
    (_ZEN4, True),  # AVX-512 BF16 without AMX
    (_SAPPHIRE_RAPIDS.replace(" avx512_bf16", ""), True),  # AMX alone is enough
    (_SKYLAKE, False),  # AVX-512 without its BF16 extension: bfloat16 is emulated
    (_ZEN3, False),  # no AVX-512 at all
    (_ZEN4 + _SKYLAKE.replace("processor\t: 0", "processor\t: 1"), True),  # the first processor's flags
    (_AARCH64, False),  # only x86 flags are read
    ("", False),
], ids=["sapphire-rapids", "zen4", "amx-only", "skylake", "zen3", "two-processors", "aarch64", "empty"])
@pytest.mark.usefixtures("fresh_flag_reader")
def test_native_bf16_is_read_from_the_cpuinfo_flags(monkeypatch: pytest.MonkeyPatch, cpuinfo: str,
                                                    native: bool) -> None:
    opened = []

    def fake_open(path: str, *args: object, **kwargs: object) -> io.StringIO:
        opened.append(path)
        return io.StringIO(cpuinfo)

    _cpuinfo_reads(monkeypatch, fake_open)
    assert loop.cpu_has_native_bf16() is native
    assert opened == ["/proc/cpuinfo"]


@pytest.mark.usefixtures("fresh_flag_reader")
def test_native_bf16_is_false_without_cpuinfo(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(path: str, *args: object, **kwargs: object) -> io.StringIO:
        raise FileNotFoundError(2, "No such file or directory", path)

    _cpuinfo_reads(monkeypatch, missing)
    assert loop.cpu_has_native_bf16() is False


@pytest.fixture
def fresh_flag_reader() -> Iterator[None]:
    """The flag reader's cached answer dropped before and after the test (others see this machine's)."""
    loop.cpu_has_native_bf16.cache_clear()
    yield
    loop.cpu_has_native_bf16.cache_clear()


def _cpuinfo_reads(monkeypatch: pytest.MonkeyPatch, fake_open: Callable[..., io.StringIO]) -> None:
    """Make the flag reader's module call ``fake_open`` where it opens ``/proc/cpuinfo``."""
    monkeypatch.setattr(sys.modules[loop.cpu_has_native_bf16.__module__], "open", fake_open, raising=False)


@pytest.mark.slow
def test_the_run_records_the_precision_it_used(bps_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loop, "cpu_has_native_bf16", lambda: False)
    cfg = TrainConfig(model="lenet5", image_size=32, epochs=1, tasks=["particle_type"], tta=False)
    loop.train(bps(bps_dir), cfg, tmp_path / "run")
    recorded = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert recorded["train"]["precision"] == "auto" and recorded["runtime"]["precision"] == "32-true"


@pytest.mark.slow
def test_images_normalized_once_train_as_per_batch(bps_dir: Path, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    # Within loader_memory_mb the loop normalizes every image once; with a bound below the
    # data (68 images of 64 x 64 float32: 1.1 MB) it normalizes each batch as read. Same
    # seed, same batches: the same training.
    from cellclass.data.normalize import NormalizedView

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
