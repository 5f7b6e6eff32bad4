"""Training-throughput benchmark: the cellclass pipeline against a bare PyTorch loop.

For LeNet-5 and ResNet18 at 64 and 128 px (batch 64, one channel, simulated BPS nuclei
of 200 x 200 uint16), measures training images per second of these loops, in short
interleaved rounds so all see the same machine load (ratios are medians of per-round
ratios):

- **cellclass**: the prepared cache read by ``prepare_data``, normalization fitted on the
  training split (the images normalized once when they fit in ``loader_memory_mb``, as
  here, else per batch), the streaming :class:`~cellclass.data.batches.BatchLoader` (worker
  processes as configured by default, batch augmentation: random resized crop, D4,
  intensity jitter), and the Fabric step of ``training/loop.py`` (its fused AdamW,
  one-cycle schedule, class-weighted loss, channels-last), all with the defaults of
  :class:`~cellclass.training.config.TrainConfig`; once in ``32-true`` precision, once
  without augmentation, and once with every default (**cellclass defaults**: ``precision:
  auto``, which times its candidates on the first batches as ``train`` does, here into a
  cache of the benchmark's own, so the choice is made afresh);
- **bare**: the same network, already-normalized tensors in memory, random batches by
  indexing, ``loss.backward()`` and the same fused ``AdamW.step()``: no augmentation, no
  loader, no Fabric; in float32, in bf16 autocast, and in float32 with torch's default
  (per-tensor) AdamW, the loop a researcher writes first.

``ratio`` (the target: >= 0.9) is the worst cellclass/bare ratio over the four
configurations, both in float32 with the same optimizer: what the pipeline costs.
``ratio_no_augment`` shows the augmentation's share (a 2-core machine has no spare core to
hide it). ``ratio_defaults`` (the target: >= 0.95) is the cellclass defaults' rate over the
best plain loop of the same round, bare float32 or bare bf16, whichever was faster: the
defaults must never train slower than the plain loop a user could pick on this machine.
``speedup_over_plain_torch`` is what the defaults give over the plain float32 loop with
torch's default AdamW. Every loop
runs under :func:`~cellclass.allocator.steady_allocator`, as training does. It also
measures, for ResNet18 at 128 px (64 with ``--quick``), eager fp32 (contiguous and
channels-last) against channels-last + bf16 autocast, and (without ``--quick``) whether
accuracy holds under bf16: short ``train`` runs of LeNet-5 and ResNet18, fp32 and
bf16-mixed, same split and seeds.

    python benchmarks/train_step.py            # about 12 minutes on 2 cores
    python benchmarks/train_step.py --quick    # a few steps each, about a minute
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from _common import machine
from cellclass.allocator import steady_allocator
from cellclass.data.batches import BatchLoader, default_workers
from cellclass.data.cache import CachedImages, CacheSettings, iter_images, prepare_cache
from cellclass.data.normalize import Normalizer
from cellclass.data.prepared import prepare_data
from cellclass.data.presets import bps
from cellclass.data.simulate import simulate_bps
from cellclass.models import create_model
from cellclass.training.config import TrainConfig
from cellclass.training.losses import build_loss, multitask_loss
from cellclass.training.loop import _fabric, _first_batches, augmenter, normalized_images, train_step
from cellclass.training.optim import build_optimizer, build_scheduler
from cellclass.training.precision import choose_precision

TASK = "particle_type"
BATCH = 64


class Pipeline:
    """The cellclass training path, step by step as ``_fit_network`` runs it, in the
    precision ``train`` would choose (timed for ``auto``, cached in ``cache_file``)."""

    def __init__(self, spec: Any, cfg: TrainConfig, cache_file: Path | None = None) -> None:
        self.cfg = cfg
        data = prepare_data(spec, cfg)
        if not isinstance(data.images, CachedImages):
            raise RuntimeError("the benchmark expects the prepared cache to be used")
        self.train_idx = data.split.train
        norm = Normalizer(mode=cfg.normalize, low=cfg.norm_low, high=cfg.norm_high)
        norm.fit(iter_images(data.images, self.train_idx), seed=cfg.seed)
        self.x = normalized_images(data, norm, cfg)
        torch.manual_seed(cfg.seed)
        enc = data.encoders[TASK]
        model = create_model(cfg.model, in_chans=1, heads={TASK: enc.n_outputs}, image_size=cfg.image_size,
                             task_types={TASK: enc.type})
        self.loss = multitask_loss({TASK: build_loss(enc, cfg, data.targets[TASK][self.train_idx])}, {})
        self.y = {TASK: torch.from_numpy(data.targets[TASK][self.train_idx])}
        self.choice = choose_precision(cfg, model, lambda n: _first_batches(self.x, data, BATCH, n), self.loss,
                                       device=torch.device("cpu"), batch_size=BATCH, total_steps=100_000,
                                       cache_file=cache_file)
        self.fabric = _fabric(cfg, self.choice.precision)
        channels_last = self.choice.memory_format == "channels_last"
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, cfg)
        self.scheduler = build_scheduler(optimizer, cfg, 100_000)
        self.model, self.optimizer = self.fabric.setup(model, optimizer)
        augment = augmenter(cfg)
        self.workers = default_workers(self.x) if cfg.loader_workers is None else cfg.loader_workers
        self.loader = BatchLoader(self.x, batch_size=BATCH, augment=augment, workers=self.workers,
                                  max_memory_mb=cfg.loader_memory_mb, channels_last=channels_last)
        self.order = torch.Generator().manual_seed(cfg.seed)
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format

    def steps(self, n: int) -> float:
        """Run ``n`` training steps; return images per second."""
        self.model.train()
        start, done = time.perf_counter(), 0
        per_epoch = len(self.train_idx) // BATCH
        while done < n:
            k = min(n - done, per_epoch)
            perm = torch.randperm(len(self.train_idx), generator=self.order)
            batches = self.loader.epoch([self.train_idx[perm[s * BATCH : (s + 1) * BATCH].numpy()] for s in range(k)])
            for s in range(k):
                idx = perm[s * BATCH : (s + 1) * BATCH]
                xb = self.fabric.to_device(next(batches).contiguous(memory_format=self.fmt))
                yb = {t: self.fabric.to_device(v[idx]) for t, v in self.y.items()}
                train_step(self.fabric, self.model, self.optimizer, self.scheduler, self.loss, xb, yb)
            done += k
        return n * BATCH / (time.perf_counter() - start)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The training rows, normalized, in memory, and their labels (for the bare loop)."""
        return torch.from_numpy(self.x[self.train_idx]), self.y[TASK]

    def close(self) -> None:
        self.loader.close()


class Bare:
    """A plain PyTorch loop over in-memory tensors (``fused``: the AdamW kernel cellclass uses)."""

    def __init__(self, model_name: str, size: int, x: torch.Tensor, y: torch.Tensor, *, channels_last: bool,
                 bf16: bool = False, fused: bool = True) -> None:
        torch.manual_seed(0)
        self.model = create_model(model_name, in_chans=1, heads={TASK: 2}, image_size=size,
                                  task_types={TASK: "single"})
        self.fmt = torch.channels_last if channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.fmt)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, fused=fused or None)
        self.x, self.y, self.bf16 = x, y, bf16
        self.gen = torch.Generator().manual_seed(0)

    def steps(self, n: int) -> float:
        self.model.train()
        start = time.perf_counter()
        for _ in range(n):
            idx = torch.randint(len(self.x), (BATCH,), generator=self.gen)
            xb = self.x[idx].contiguous(memory_format=self.fmt)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                loss = F.cross_entropy(self.model(xb)[TASK], self.y[idx])
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            float(loss.detach())
        return n * BATCH / (time.perf_counter() - start)


def interleaved(sides: dict[str, Any], n_steps: int, rounds: int, warmup: int) -> dict[str, list[float]]:
    """Images/s of every side in short rounds, alternating the order; pipelines closed after.

    Each side is compared with the others of its own round: on a shared machine the load
    drifts by tens of percent within a minute.
    """
    for side in sides.values():
        side.steps(warmup)  # warm-up: workers started, kernels chosen
    rates: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(rounds):
        for name in (list(sides) if r % 2 == 0 else list(reversed(sides))):
            rates[name].append(sides[name].steps(n_steps))
    for side in sides.values():
        if isinstance(side, Pipeline):
            side.close()
    return rates


def median_ratio(rates: dict[str, list[float]], a: str, b: str) -> float:
    """Median over rounds of ``a``'s rate over ``b``'s."""
    return statistics.median(o / t for o, t in zip(rates[a], rates[b], strict=True))


def compare(spec: Any, model_name: str, size: int, n_steps: int, rounds: int, warmup: int,
            cache_file: Path) -> dict[str, Any]:
    cfg = TrainConfig(model=model_name, image_size=size, batch_size=BATCH, tasks=[TASK], precision="32-true")
    pipe = Pipeline(spec, cfg)
    x, y = pipe.tensors()
    defaults = Pipeline(spec, cfg.override({"precision": "auto"}), cache_file=cache_file)
    sides = {
        "bare": Bare(model_name, size, x, y, channels_last=cfg.channels_last),
        "cellclass": pipe,
        "no_augment": Pipeline(spec, cfg.override({"augment": False})),
        "bare_torch_defaults": Bare(model_name, size, x, y, channels_last=cfg.channels_last, fused=False),
        "bare_bf16": Bare(model_name, size, x, y, channels_last=cfg.channels_last, bf16=True),
        "cellclass_defaults": defaults,
    }
    rates = interleaved(sides, n_steps, rounds, warmup)

    def ratio(a: str, b: str) -> float:
        return median_ratio(rates, a, b)

    rates["best_plain"] = [max(f, b) for f, b in zip(rates["bare"], rates["bare_bf16"], strict=True)]
    med = {k: statistics.median(v) for k, v in rates.items()}
    chosen = f"{defaults.choice.precision}/{defaults.choice.memory_format}"
    out = {f"{k}_img_s": v for k, v in med.items()}
    out.update(ratio=ratio("cellclass", "bare"), ratio_no_augment=ratio("no_augment", "bare"),
               ratio_vs_torch_defaults=ratio("cellclass", "bare_torch_defaults"),
               ratio_defaults=ratio("cellclass_defaults", "best_plain"),
               speedup_over_plain_torch=ratio("cellclass_defaults", "bare_torch_defaults"),
               defaults_precision=chosen, defaults_precision_from=defaults.choice.source,
               defaults_precision_timings=defaults.choice.timings, loader_workers=pipe.workers, steps=n_steps,
               rounds=rounds,
               round_ratios=[round(o / t, 3) for o, t in zip(rates["cellclass"], rates["bare"], strict=True)])
    print(f"{model_name:8s} {size:3d}px fp32: cellclass {med['cellclass']:7.1f} img/s, bare {med['bare']:7.1f}, "
          f"ratio {out['ratio']:.3f} (per round {out['round_ratios']}); without augmentation ratio "
          f"{out['ratio_no_augment']:.3f}; vs torch's default AdamW {out['ratio_vs_torch_defaults']:.3f} | "
          f"cellclass defaults ({chosen}, {defaults.choice.source}) {med['cellclass_defaults']:7.1f} img/s, "
          f"plain fp32 {med['bare']:7.1f}, plain bf16 {med['bare_bf16']:7.1f}: ratio over the best plain "
          f"{out['ratio_defaults']:.3f}; over the plain fp32 loop with torch's AdamW "
          f"{out['speedup_over_plain_torch']:.2f}x (loader workers {pipe.workers})", flush=True)
    return out


def precision_speedups(spec: Any, size: int, n_steps: int, rounds: int) -> dict[str, Any]:
    """ResNet18: eager fp32 (contiguous, channels-last) against bf16 autocast + channels-last.

    Bare loops and the cellclass pipeline (``precision`` 32-true and bf16-mixed, both
    channels-last, the default) in the same interleaved rounds; speed-ups are medians of
    per-round ratios.
    """
    cfg = TrainConfig(model="resnet18", image_size=size, batch_size=BATCH, tasks=[TASK], precision="32-true")
    fp32_pipe = Pipeline(spec, cfg)
    bf16_pipe = Pipeline(spec, cfg.override({"precision": "bf16-mixed"}))
    x, y = fp32_pipe.tensors()
    variants = {
        "fp32_contiguous": Bare("resnet18", size, x, y, channels_last=False),
        "fp32_channels_last": Bare("resnet18", size, x, y, channels_last=True),
        "bf16_channels_last": Bare("resnet18", size, x, y, channels_last=True, bf16=True),
        "cellclass_fp32": fp32_pipe,
        "cellclass_bf16_mixed": bf16_pipe,
    }
    rates = interleaved(variants, n_steps, rounds, warmup=1)

    def speedup(a: str, b: str) -> float:
        return median_ratio(rates, a, b)

    out: dict[str, Any] = {"image_size": size, **{k: statistics.median(v) for k, v in rates.items()}}
    out["speedup_bf16_cl_vs_fp32"] = speedup("bf16_channels_last", "fp32_contiguous")
    out["speedup_fp32_cl_vs_fp32"] = speedup("fp32_channels_last", "fp32_contiguous")
    out["speedup_bf16_cl_vs_fp32_cl"] = speedup("bf16_channels_last", "fp32_channels_last")
    out["speedup_cellclass_bf16_vs_fp32"] = speedup("cellclass_bf16_mixed", "cellclass_fp32")
    print(f"ResNet18 {size}px bare: fp32 {out['fp32_contiguous']:.1f}, fp32 channels-last "
          f"{out['fp32_channels_last']:.1f} ({out['speedup_fp32_cl_vs_fp32']:.2f}x), bf16 + channels-last "
          f"{out['bf16_channels_last']:.1f} img/s ({out['speedup_bf16_cl_vs_fp32']:.2f}x over fp32, "
          f"{out['speedup_bf16_cl_vs_fp32_cl']:.2f}x over fp32 channels-last); cellclass fp32 "
          f"{out['cellclass_fp32']:.1f}, bf16-mixed {out['cellclass_bf16_mixed']:.1f} img/s "
          f"({out['speedup_cellclass_bf16_vs_fp32']:.2f}x)", flush=True)
    return out


def bf16_accuracy(spec: Any, work: Path) -> dict[str, Any]:
    """Short LeNet-5 and ResNet18 runs on the same split and seeds, fp32 and bf16-mixed: test metrics.

    The split is random (not by plate): this checks that bf16 numerics learn what fp32
    learns, so it needs a task a few epochs can learn; a plate-grouped split of this small
    simulated set stays at chance for both.
    """
    from cellclass.training.loop import train

    out: dict[str, Any] = {}
    for old in work.glob("run-*"):
        shutil.rmtree(old)  # a reused --workdir: train again, do not resume
    for model, epochs in (("lenet5", 15), ("resnet18", 6)):
        for seed in (0, 1):
            for precision in ("32-true", "bf16-mixed"):
                cfg = TrainConfig(model=model, image_size=64, epochs=epochs, tasks=[TASK], precision=precision,
                                  tta=False, split="random", seed=seed)
                start = time.perf_counter()
                result = train(spec, cfg, work / f"run-{model}-{seed}-{precision}")
                m = result["tasks"][TASK]
                key = f"{model}_seed{seed}_{precision}"
                out[key] = {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "roc_auc": m.get("roc_auc"),
                            "seconds": round(time.perf_counter() - start, 1)}
                print(f"{model} 64px seed {seed} {precision}: test accuracy {m['accuracy']:.3f}, macro F1 "
                      f"{m['macro_f1']:.3f}, ROC-AUC {m.get('roc_auc', float('nan')):.3f} "
                      f"({out[key]['seconds']} s)", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few steps each (under a minute)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    parser.add_argument("--workdir", type=Path, help="folder for the simulated data (default: a temporary one)")
    parser.add_argument("--only", action="append", default=[], metavar="MODEL_SIZE",
                        help="measure only this configuration (lenet5_64, lenet5_128, resnet18_64, resnet18_128); "
                             "repeatable; skips the precision and accuracy parts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    work = args.workdir or Path(tempfile.mkdtemp(prefix="cellclass-bench-"))
    plan = {  # (model, size): steps per round
        ("lenet5", 64): 20 if quick else 50,
        ("lenet5", 128): 8 if quick else 20,
        ("resnet18", 64): 2 if quick else 4,
        ("resnet18", 128): 1 if quick else 2,
    }
    rounds = 1 if quick else 9
    try:
        data = work / "bps"
        if not (data / "meta.csv").is_file():
            simulate_bps(data, n_images=340 if quick else 1360, image_size=200, workers=2)
        spec = bps(data)
        for size in (64, 128):
            prepare_cache(spec, CacheSettings(size), workers=2)
        info = machine()
        print(f"machine: {info}", flush=True)
        warmup = 1 if quick else 2
        # The allocator setting the training loop runs under; process-wide, so the bare
        # loops run under it too.
        with steady_allocator():
            cache_file = work / "precision.json"  # the defaults' choice made afresh, not a user's cached one
            cache_file.unlink(missing_ok=True)
            results = {f"{m}_{s}px": compare(spec, m, s, n, rounds, warmup, cache_file)
                       for (m, s), n in plan.items() if not args.only or f"{m}_{s}" in args.only}
            # --quick measures the precision speed-up at 64 px to stay under a minute.
            precision = None if args.only else precision_speedups(spec, 64 if quick else 128, 2, 1 if quick else 5)
        accuracy = None if quick or args.only else bf16_accuracy(spec, work)
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    ratio = min(r["ratio"] for r in results.values())
    worst = min(results, key=lambda k: results[k]["ratio"])
    defaults = min(r["ratio_defaults"] for r in results.values())
    worst_defaults = min(results, key=lambda k: results[k]["ratio_defaults"])
    print(f"ratio (worst cellclass over bare, fp32, same optimizer): {ratio:.3f} ({worst}; target >= 0.9); "
          f"cellclass defaults over the best plain loop (fp32 or bf16): {defaults:.3f} at worst ({worst_defaults}; "
          f"target >= 0.95); cellclass defaults over the plain fp32 loop with torch's AdamW: "
          f"{min(r['speedup_over_plain_torch'] for r in results.values()):.2f}x at worst"
          + ("" if precision is None else f"; bf16 + channels-last over eager fp32 for bare ResNet18 "
             f"{precision['image_size']}px: {precision['speedup_bf16_cl_vs_fp32']:.2f}x"))

    def rounded(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        return round(value, 3) if isinstance(value, float) else value

    print(json.dumps({"benchmark": "train_step", "quick": quick, "ratio": round(ratio, 3), "target": ">= 0.9",
                      "ratio_defaults": round(defaults, 3), "target_defaults": ">= 0.95", "machine": info, "results": rounded(results), "resnet18_precision": rounded(precision),
                      "bf16_accuracy": rounded(accuracy)}))


if __name__ == "__main__":
    sys.exit(main())
