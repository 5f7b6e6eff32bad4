"""``precision = auto`` trains in what is fastest here: it times a few steps of each
candidate on the run's first batches, keeps the fastest, caches the choice per machine and
model shape, and records it in the run; an explicit precision and a resumed run are not timed."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml

from cellclass.data.presets import bps
from cellclass.inference.checkpoint import Checkpoint
from cellclass.models import create_model
from cellclass.training import precision
from cellclass.training.config import TrainConfig
from cellclass.training.loop import train
from cellclass.training.precision import Batch, PrecisionChoice, cache_path, candidates, choose_precision

CPU = torch.device("cpu")
# 68 simulated images, 40 on the training side: batch 8, 5 steps an epoch, 15 in 3 epochs (timed).
RUN = {"model": "lenet5", "image_size": 32, "epochs": 3, "tasks": ["particle_type"], "tta": False, "workers": 1}


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache of choices of this test's own (the session's is shared by every test)."""
    folder = tmp_path / "user-cache"
    monkeypatch.setenv("CELLCLASS_USER_CACHE_DIR", str(folder))
    return folder


def runtime(run: Path) -> dict[str, Any]:
    return yaml.safe_load((run / "config.yaml").read_text())["runtime"]


def lenet() -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("lenet5", in_chans=1, heads={"t": 3}, image_size=16, task_types={"t": "single"})


def batches(n: int) -> Sequence[Batch]:
    generator = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 1, 16, 16, generator=generator), {"t": torch.randint(0, 3, (8,), generator=generator)})
            for _ in range(n)]


def not_timed(n: int) -> Sequence[Batch]:
    raise AssertionError("the candidates were timed")


def loss(logits: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]) -> torch.Tensor:
    return F.cross_entropy(logits["t"], targets["t"])


def choose(config: TrainConfig, make: Any = batches, total_steps: int = 100, **kwargs: Any) -> PrecisionChoice:
    return choose_precision(config, lenet(), make, loss, device=CPU, batch_size=8, total_steps=total_steps, **kwargs)


@pytest.mark.slow
def test_auto_trains_in_the_fastest_candidate_and_records_it(bps_dir: Path, tmp_path: Path,
                                                             cache_dir: Path) -> None:
    out = tmp_path / "run"
    result = train(bps(bps_dir), TrainConfig(**RUN), out)
    steps = runtime(out)["steps"]
    assert steps["total_steps"] >= precision.MIN_STEPS_TO_TIME and steps["precision_from"] == "auto: timed"
    names = [c.name for c in candidates(lenet(), CPU)]
    assert names == ["32-true/contiguous", "32-true/channels_last", "bf16-mixed/channels_last"]
    timings = steps["precision_timings"]
    assert list(timings) == names and all(rate > 0 for rate in timings.values())
    chosen = f"{steps['precision']}/{steps['memory_format']}"
    assert timings[chosen] == max(timings.values())  # the fastest of those timed
    assert runtime(out)["precision"] == steps["precision"]
    assert result["steps"] == steps and Checkpoint.load(out).steps == steps  # metrics.json and checkpoints too
    # Kept for this machine and model shape; the next run of that shape takes it untimed.
    cached = json.loads(cache_path().read_text())
    assert cache_path() == cache_dir / "precision.json"
    assert [(e["precision"], e["memory_format"], e["timings"]) for e in cached["choices"]] == \
        [(steps["precision"], steps["memory_format"], timings)]
    assert cached["choices"][0]["key"]["model"]["name"] == "lenet5"
    train(bps(bps_dir), TrainConfig(**RUN), tmp_path / "again")
    again = runtime(tmp_path / "again")["steps"]
    assert again["precision_from"] == "auto: cached"
    assert (again["precision"], again["memory_format"], again["precision_timings"]) == \
        (steps["precision"], steps["memory_format"], timings)  # timing again would give other rates


@pytest.mark.slow
def test_an_explicit_precision_is_used_untimed(bps_dir: Path, tmp_path: Path, cache_dir: Path) -> None:
    train(bps(bps_dir), TrainConfig(**RUN, precision="32-true", channels_last=False), tmp_path / "run")
    steps = runtime(tmp_path / "run")["steps"]
    assert (steps["precision"], steps["memory_format"], steps["precision_from"], steps["precision_timings"]) == \
        ("32-true", "contiguous", "set", None)
    assert not cache_path().exists()


@pytest.mark.slow
def test_a_resumed_run_keeps_its_choice_untimed(bps_dir: Path, tmp_path: Path, cache_dir: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "run"
    train(bps(bps_dir), TrainConfig(**RUN), out)
    before = runtime(out)["steps"]
    cache_path().unlink()  # a timing on resume would write it again
    caplog.clear()  # the first run's records (captured too when another test left the logger at INFO)
    with caplog.at_level(logging.INFO, logger="cellclass"):
        train(bps(bps_dir), TrainConfig(**{**RUN, "epochs": 4}), out, resume=True)
    after = runtime(out)["steps"]
    keys = ("precision", "memory_format", "precision_from", "precision_timings")
    assert {k: after[k] for k in keys} == {k: before[k] for k in keys} and after["precision_from"] == "auto: timed"
    assert Checkpoint.load(out / "checkpoints" / "last.ckpt").steps["precision_timings"] == before["precision_timings"]
    assert not cache_path().exists()
    assert not [r for r in caplog.records if "img/s" in r.getMessage()]


def test_explicit_precisions_are_kept_and_not_timed(cache_dir: Path) -> None:
    for value, channels_last, layout in (("32-true", True, "channels_last"), ("bf16-mixed", False, "contiguous"),
                                         ("16-mixed", True, "channels_last")):
        choice = choose(TrainConfig(precision=value, channels_last=channels_last), not_timed)
        assert (choice.precision, choice.memory_format, choice.source, choice.timings) == \
            (value, layout, "set", None)
    assert not cache_path().exists()


def test_a_short_run_trains_in_float32_untimed_unless_a_choice_is_cached(cache_dir: Path) -> None:
    short = choose(TrainConfig(), not_timed, total_steps=precision.MIN_STEPS_TO_TIME - 1)
    assert (short.precision, short.memory_format, short.timings) == ("32-true", "channels_last", None)
    assert short.source == f"auto: {precision.MIN_STEPS_TO_TIME - 1} steps, too few to time (float32)"
    assert not cache_path().exists()
    timed = choose(TrainConfig())
    assert timed.source == "auto: timed"
    cached = choose(TrainConfig(), not_timed, total_steps=1)
    assert (cached.source, cached.precision, cached.memory_format, cached.timings) == \
        ("auto: cached", timed.precision, timed.memory_format, timed.timings)


def test_the_cache_is_keyed_by_the_model_shape_and_the_batch(cache_dir: Path) -> None:
    choose(TrainConfig())
    other_batch = choose_precision(TrainConfig(), lenet(), batches, loss, device=CPU, batch_size=16, total_steps=100)
    assert other_batch.source == "auto: timed"
    no_channels_last = choose(TrainConfig(channels_last=False))  # other candidates
    assert no_channels_last.source == "auto: timed" and list(no_channels_last.timings or {}) == \
        ["32-true/contiguous", "bf16-mixed/contiguous"]
    entries = json.loads(cache_path().read_text())["choices"]
    assert len(entries) == 3 and len({json.dumps(e["key"], sort_keys=True) for e in entries}) == 3
    assert {e["key"]["cpu"] for e in entries} == {precision.cpu_name()}
    assert {e["key"]["torch"] for e in entries} == {torch.__version__}


@pytest.mark.parametrize("content", [
    "{not json",
    "[]",
    json.dumps({"format": "cellclass-precision/0", "choices": []}),
    json.dumps({"format": "cellclass-precision/1", "choices": [{"key": {}, "precision": "32-true"}]}),
    json.dumps({"format": "cellclass-precision/1", "choices": [
        {"key": {}, "precision": "32-true", "memory_format": "contiguous", "timings": {"32-true/contiguous": "x"}}]}),
    "\udcff",
], ids=["not-json", "a-list", "other-format", "entry-incomplete", "rate-not-a-number", "not-utf8"])
def test_a_corrupt_cache_is_ignored_with_a_warning_and_rewritten(cache_dir: Path, content: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    cache_path().parent.mkdir(parents=True)
    if content == "\udcff":
        cache_path().write_bytes(b"\xff\xfe{")
    else:
        cache_path().write_text(content)
    with caplog.at_level(logging.WARNING, logger="cellclass"):
        choice = choose(TrainConfig())
    assert choice.source == "auto: timed"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and f"precision cache {cache_path()} is unreadable" in warnings[0]
    rewritten = json.loads(cache_path().read_text())
    assert rewritten["format"] == "cellclass-precision/1" and len(rewritten["choices"]) == 1
    assert choose(TrainConfig(), not_timed).source == "auto: cached"


def test_a_cached_choice_that_is_no_candidate_now_is_timed_again(cache_dir: Path) -> None:
    choose(TrainConfig())
    content = json.loads(cache_path().read_text())
    content["choices"][0]["memory_format"] = "sideways"  # edited by hand
    cache_path().write_text(json.dumps(content))
    assert choose(TrainConfig()).source == "auto: timed"


def test_candidates_offer_channels_last_to_convolutional_networks_only() -> None:
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16 * 16, 3))
    assert [c.name for c in candidates(mlp, CPU)] == ["32-true/contiguous", "bf16-mixed/contiguous"]
    assert [c.name for c in candidates(lenet(), CPU, channels_last=False)] == \
        ["32-true/contiguous", "bf16-mixed/contiguous"]
    assert precision.bf16_autocast_works(CPU)  # torch's CPU autocast runs bfloat16 (emulated where not native)


def test_timing_leaves_the_model_and_the_random_generator_as_they_were(cache_dir: Path) -> None:
    model = lenet()
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    choose_precision(TrainConfig(), model, batches, loss, device=CPU, batch_size=8, total_steps=100)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_the_cache_lives_in_the_user_cache_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CELLCLASS_USER_CACHE_DIR", str(tmp_path / "mine"))
    assert cache_path() == tmp_path / "mine" / "precision.json"
    monkeypatch.delenv("CELLCLASS_USER_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_path() == tmp_path / "xdg" / "cellclass" / "precision.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_path() == tmp_path / "home" / ".cache" / "cellclass" / "precision.json"


def test_an_unwritable_cache_is_skipped_with_a_warning(cache_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    cache_dir.write_text("a file where the folder should be")
    with caplog.at_level(logging.WARNING, logger="cellclass"):
        assert choose(TrainConfig()).source == "auto: timed"
    assert any("could not write the precision cache" in r.getMessage() for r in caplog.records)


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
        run = train(bps(bps_dir), cfg, tmp_path / f"run-{bound}")
        history = (tmp_path / f"run-{bound}" / "metrics.csv").read_text()
        results[bound] = (run["tasks"]["particle_type"]["accuracy"], history.splitlines()[-1].split(",")[1:3])
    assert len(materialized) == 1  # the 512 MB run only
    assert results[512] == results[1]


def test_a_far_slower_candidate_is_retired_after_one_timed_step(cache_dir: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 made far slower than a float32 step (as on a CPU without native bfloat16) is
    timed once; the others are timed as before."""
    calls: dict[str, int] = {}
    step = precision._Runner.step

    def counted(self: Any, k: int) -> float:
        calls[self.option.name] = calls.get(self.option.name, 0) + 1
        seconds = step(self, k)
        return seconds + (0.5 if self.option.precision == "bf16-mixed" else 0.0)

    monkeypatch.setattr(precision._Runner, "step", counted)
    choice = choose(TrainConfig())
    assert choice.precision == "32-true" and choice.source == "auto: timed"
    assert calls["bf16-mixed/channels_last"] == precision.WARMUP_STEPS + 1
    assert calls["32-true/contiguous"] >= precision.WARMUP_STEPS + precision.TIMED_STEPS
    # the rate of its one timed (slowed) step; rates are rounded to 0.1 image/s, so 8 / 0.5003 shows as 16.0
    assert choice.timings["bf16-mixed/channels_last"] <= 8 / 0.5
