"""Active learning on MitoCheck, simulated: how many labels does each ranking strategy need?

The loop `cellclass rank` -> label -> train, played on labelled data. MitoCheck's 3,277 H2B
nuclei (16 phenotypes) are split by plate, as `cellclass train` splits them (seed 0): the
test plates stay fixed and untouched; the other plates are the pool, whose labels are hidden.
Per seed, a stratified seed set (5% of the pool) is labelled; then each round every strategy
ranks the rest of the pool with the current model (the functions `cellclass rank` uses,
`cellclass.evaluation.ranking`), its next batch (5% of the pool) is labelled, and LeNet-5
(64 px) is trained again from scratch on the labels it has and scored on the test plates
(macro F1). Random sampling is the baseline; a run on every pool label is the ceiling.

Training is the library's recipe in memory, kept cheap: `create_model('lenet5')`, the loss,
optimizer, one-cycle schedule and batch augmentation of `cellclass train`'s defaults
(`build_loss`, `build_optimizer`, `build_scheduler`, `augmenter`), batch 64, 20 epochs
bounded to 100..400 steps; images normalized by percentiles fitted on the pool's images
(labels are not needed for that); no validation side (every label counts, none is spent
on choosing an epoch: the last one is scored); test scored without TTA; rankings from
single-view probabilities and the penultimate features (`model_outputs`).

    python benchmarks/active_learning.py --out bench-runs/active_learning     # about 8 minutes on 2 cores
    python benchmarks/active_learning.py --quick                              # a smoke run (about 15 s)

Writes curves.csv (one row per strategy, seed and round), summary.json and
learning_curve.png (macro F1 against labels, mean over seeds with min-max band) to --out,
and ends with one JSON line. `ratio` is the fraction of random sampling's full-budget labels
the best strategy needs to reach random's full-budget macro F1 (mean curves, linear
interpolation between rounds; target <= 0.7); null where no strategy reaches it.
Where ../shared/data is absent the script says so and exits 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.model_selection import train_test_split

from _common import machine
from cellclass.data.labels import TaskEncoder
from cellclass.data.normalize import Normalizer
from cellclass.data.prepared import prepare_data
from cellclass.data.spec import spec_from_manifest
from cellclass.evaluation.metrics import task_metrics
from cellclass.evaluation.ranking import rank_images
from cellclass.inference.embeddings import model_outputs
from cellclass.inference.predictor import Predictor
from cellclass.models import create_model
from cellclass.training.config import TrainConfig
from cellclass.training.loop import augmenter
from cellclass.training.losses import build_loss, multitask_loss
from cellclass.training.optim import build_optimizer, build_scheduler

HERE = Path(__file__).resolve().parent
TASK = "phenotype"
BATCH = 64


@dataclasses.dataclass
class Plan:
    """The simulation's sizes: fractions of the pool, rounds, seeds, and each training's steps."""

    strategies: list[str]
    seeds: int = 3
    seed_fraction: float = 0.05
    batch_fraction: float = 0.05
    rounds: int = 6
    epochs: int = 20
    min_steps: int = 100
    max_steps: int = 400
    pool_limit: int | None = None  # --quick: a subsample of the pool and the test
    full_pool: bool = True

    def steps(self, n_labels: int) -> int:
        """Optimizer steps of one training on ``n_labels`` images."""
        return int(np.clip(self.epochs * math.ceil(n_labels / BATCH), self.min_steps, self.max_steps))


@dataclasses.dataclass
class Data:
    """MitoCheck normalized in memory, with the pool and test positions and the task's encoder."""

    x: np.ndarray
    y: np.ndarray
    pool: np.ndarray
    test: np.ndarray
    encoder: TaskEncoder
    normalizer: Normalizer
    split: dict[str, Any]


def load(manifest: Path, plan: Plan) -> Data:
    """Read MitoCheck, split it by plate as `cellclass train` does (seed 0), normalize on the pool."""
    spec = spec_from_manifest(manifest, image_col="filename", tasks=[TASK], groups=["plate"])
    config = TrainConfig(model="lenet5", image_size=64, workers=2)
    prepared = prepare_data(spec, config)
    pool = np.sort(np.concatenate([prepared.split.train, prepared.split.val]))
    test = prepared.split.test
    y = prepared.targets[TASK]
    if plan.pool_limit:
        rng = np.random.default_rng(0)
        pool = np.sort(rng.choice(pool, min(plan.pool_limit, len(pool)), replace=False))
        test = np.sort(rng.choice(test, min(plan.pool_limit // 2, len(test)), replace=False))
    images = np.asarray(prepared.images, dtype=np.float32)
    normalizer = Normalizer(mode="percentile", low=config.norm_low, high=config.norm_high)
    normalizer.fit(list(images[pool]), seed=0)
    x = normalizer.transform_batch(images).astype(np.float32)
    groups = prepared.groups
    split = {"method": "group by plate (cellclass train's split, seed 0): pool = its train + val plates",
             "pool_images": len(pool), "test_images": len(test),
             "pool_plates": len(set(groups[pool])), "test_plates": len(set(groups[test])),
             "plates_on_both_sides": len(set(groups[pool]) & set(groups[test]))}
    return Data(x, y, pool, test, prepared.encoders[TASK], normalizer, split)


def fit(data: Data, labelled: np.ndarray, steps: int, seed: int) -> Predictor:
    """LeNet-5 trained from scratch on the ``labelled`` positions: the defaults of `cellclass train`, in memory."""
    config = TrainConfig(model="lenet5", image_size=64, seed=seed)
    torch.manual_seed(seed)
    model = create_model("lenet5", in_chans=data.x.shape[1], heads={TASK: data.encoder.n_outputs}, image_size=64,
                         task_types={TASK: data.encoder.type}).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, config)
    scheduler = build_scheduler(optimizer, config, steps)
    loss_fn = multitask_loss({TASK: build_loss(data.encoder, config, data.y[labelled])}, {})
    augment = augmenter(config)
    rng = np.random.default_rng(seed)
    order: list[int] = []
    model.train()
    for _ in range(steps):
        # epochs of the labelled images in a fresh order each; a batch never repeats an image
        while len(order) < BATCH:
            order += rng.permutation(labelled).tolist()
        batch, order = np.asarray(order[:BATCH]), order[BATCH:]
        x = augment(torch.from_numpy(data.x[batch])).contiguous(memory_format=torch.channels_last)
        loss = loss_fn(model(x), {TASK: torch.from_numpy(data.y[batch])})
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    model.eval()
    return Predictor(model=model, kind="network", encoders={TASK: data.encoder}, normalizer=data.normalizer,
                     image_size=64, batch_size=256)


def test_macro_f1(predictor: Predictor, data: Data) -> float:
    """Macro F1 on the fixed test plates (single view)."""
    probs = predictor.predict_normalized(data.x[data.test], tta=False)[TASK]
    return float(task_metrics(data.encoder.type, data.y[data.test], probs, data.encoder.classes)["macro_f1"])


def next_batch(strategy: str, predictor: Predictor, data: Data, labelled: np.ndarray, size: int,
               seed: int) -> np.ndarray:
    """The pool positions ``strategy`` asks to label next (the ranking `cellclass rank` makes)."""
    unlabelled = np.setdiff1d(data.pool, labelled)
    if strategy == "random":
        ranking = rank_images("random", size, probabilities=np.zeros((len(unlabelled), 2)), seed=seed)
        return unlabelled[ranking.order]
    outputs = model_outputs(predictor, data.x[np.concatenate([unlabelled, labelled])], tta=False)
    n = len(unlabelled)
    ranking = rank_images(strategy, size, probabilities=outputs.probabilities[TASK][:n],
                          features=outputs.features[:n], labelled=outputs.features[n:], seed=seed)
    return unlabelled[ranking.order]


def simulate(data: Data, plan: Plan, log: Any) -> pd.DataFrame:
    """Every strategy's learning curve for every seed: one row per strategy, seed and round."""
    rows = []
    seed_size = max(len(np.unique(data.y[data.pool])), round(plan.seed_fraction * len(data.pool)))
    batch = max(1, round(plan.batch_fraction * len(data.pool)))
    for seed in range(plan.seeds):
        start, _ = train_test_split(data.pool, train_size=seed_size, stratify=data.y[data.pool], random_state=seed)
        first = fit(data, np.sort(start), plan.steps(len(start)), seed * 1000)
        score = test_macro_f1(first, data)
        log(f"seed {seed}: {len(start)} seed labels, macro F1 {score:.3f}")
        for strategy in plan.strategies:
            labelled, predictor = np.sort(start), first
            rows.append({"strategy": strategy, "seed": seed, "round": 0, "n_labels": len(labelled), "macro_f1": score})
            for r in range(1, plan.rounds + 1):
                chosen = next_batch(strategy, predictor, data, labelled, batch, seed * 1000 + r)
                labelled = np.sort(np.concatenate([labelled, chosen]))
                predictor = fit(data, labelled, plan.steps(len(labelled)), seed * 1000 + r)
                f1 = test_macro_f1(predictor, data)
                rows.append({"strategy": strategy, "seed": seed, "round": r, "n_labels": len(labelled), "macro_f1": f1})
                log(f"seed {seed} {strategy:>8} round {r}: {len(labelled)} labels, macro F1 {f1:.3f}")
        if plan.full_pool:
            f1 = test_macro_f1(fit(data, data.pool, plan.steps(len(data.pool)), seed * 1000 + 999), data)
            rows.append({"strategy": "all pool labels", "seed": seed, "round": -1, "n_labels": len(data.pool),
                         "macro_f1": f1})
            log(f"seed {seed}: every pool label ({len(data.pool)}), macro F1 {f1:.3f}")
    return pd.DataFrame(rows)


def labels_to_reach(curve: pd.DataFrame, target: float) -> tuple[float | None, int | None]:
    """Labels a mean curve needs to reach ``target``: linearly interpolated, and the first measured round."""
    n, f1 = curve["n_labels"].to_numpy(float), curve["mean"].to_numpy(float)
    hits = np.flatnonzero(f1 >= target)
    if not len(hits):
        return None, None
    i = int(hits[0])
    if i == 0:
        return float(n[0]), int(n[0])
    exact = n[i - 1] + (target - f1[i - 1]) / (f1[i] - f1[i - 1]) * (n[i] - n[i - 1])
    return float(exact), int(n[i])


def summarise(curves: pd.DataFrame, plan: Plan) -> dict[str, Any]:
    """Mean and spread per strategy and round; for the best strategy, the labels it needs to reach
    random sampling's full-budget macro F1, as a fraction of random's full budget."""
    rounds = curves[curves["round"] >= 0]
    stats = (rounds.groupby(["strategy", "round"]).agg(n_labels=("n_labels", "mean"), mean=("macro_f1", "mean"),
                                                       std=("macro_f1", "std"), min=("macro_f1", "min"),
                                                       max=("macro_f1", "max"))
             .reset_index())
    random = stats[stats["strategy"] == "random"].sort_values("round")
    budget, target = float(random["n_labels"].iloc[-1]), float(random["mean"].iloc[-1])
    per_strategy = {}
    for strategy in plan.strategies:
        curve = stats[stats["strategy"] == strategy].sort_values("round")
        exact, measured = labels_to_reach(curve, target)
        per_strategy[strategy] = {
            "curve": [{"n_labels": int(row["n_labels"]),
                       **{k: round(float(row[k]), 4) for k in ("mean", "std", "min", "max") if not pd.isna(row[k])}}
                      for row in curve.to_dict("records")],
            "final_macro_f1": round(float(curve["mean"].iloc[-1]), 4),
            "labels_to_reach_random_full": None if exact is None else round(exact, 1),
            "first_round_reaching_it": measured,
            "fraction_of_random_budget": None if exact is None else round(exact / budget, 3),
        }
    others = {s: v for s, v in per_strategy.items() if s != "random"}
    reached = {s: v for s, v in others.items() if v["fraction_of_random_budget"] is not None}
    best = (min(reached, key=lambda s: reached[s]["fraction_of_random_budget"]) if reached
            else max(others, key=lambda s: others[s]["final_macro_f1"]) if others else None)
    full = curves[curves["round"] == -1]["macro_f1"]
    return {"random_full_budget_labels": int(budget), "random_full_budget_macro_f1": round(target, 4),
            "best_strategy": best, "ratio": None if best is None else per_strategy[best]["fraction_of_random_budget"],
            "strategies": per_strategy,
            "all_pool_labels_macro_f1": None if full.empty else {"mean": round(float(full.mean()), 4),
                                                                 "min": round(float(full.min()), 4),
                                                                 "max": round(float(full.max()), 4)}}


def plot(curves: pd.DataFrame, summary: dict[str, Any], out: Path, title: str) -> Path:
    """Macro F1 against labels: the mean over seeds per strategy, with its min-max band."""
    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    colours = colormaps["tab10"]
    for i, (strategy, block) in enumerate(summary["strategies"].items()):
        curve = pd.DataFrame(block["curve"])
        ax.plot(curve["n_labels"], curve["mean"], marker="o", ms=3, color=colours(i), label=strategy)
        ax.fill_between(curve["n_labels"], curve["min"], curve["max"], color=colours(i), alpha=0.15, linewidth=0)
    ax.axhline(summary["random_full_budget_macro_f1"], color="grey", linestyle="--", linewidth=1,
               label=f"random at {summary['random_full_budget_labels']} labels")
    if summary["all_pool_labels_macro_f1"]:
        full = curves[curves["round"] == -1]
        ax.axhline(summary["all_pool_labels_macro_f1"]["mean"], color="black", linestyle=":", linewidth=1,
                   label=f"every pool label ({int(full['n_labels'].iloc[0])})")
    ax.set_xlabel("labelled images")
    ax.set_ylabel("test macro F1 (fixed test plates)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data")
    parser.add_argument("--out", type=Path, default=None,
                        help="Output folder (default bench-runs/active_learning; a temporary one with --quick).")
    parser.add_argument("--strategies", default="random,margin,hybrid",
                        help="Comma-separated strategies of `cellclass rank` (random is always included).")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="A subsample, 2 rounds, 1 seed: a smoke run, not figures.")
    args = parser.parse_args()
    manifest = args.data / "mitocheck_h2b_phenotypes" / "labels.csv"
    if not manifest.is_file():
        print(f"skipping the active-learning benchmark: {manifest} is absent (needs ../shared/data)")
        print(json.dumps({"benchmark": "active_learning", "skipped": True, "ratio": None}))
        return
    strategies = ["random", *[s for s in args.strategies.split(",") if s and s != "random"]]
    plan = Plan(strategies=strategies, seeds=args.seeds)
    if args.quick:
        plan = dataclasses.replace(plan, seeds=1, rounds=2, pool_limit=400, min_steps=10, max_steps=10,
                                   full_pool=False, seed_fraction=0.1, batch_fraction=0.1)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="cellclass-al-")) if args.quick else Path("bench-runs/active_learning")
    started = time.perf_counter()
    data = load(manifest, plan)
    print(f"MitoCheck: {data.split['pool_images']} pool images on {data.split['pool_plates']} plates, "
          f"{data.split['test_images']} test images on {data.split['test_plates']} plates", flush=True)
    curves = simulate(data, plan, lambda line: print(line, flush=True))
    summary = summarise(curves, plan)
    args.out.mkdir(parents=True, exist_ok=True)
    curves.to_csv(args.out / "curves.csv", index=False)
    title = (f"MitoCheck, LeNet-5 64 px, {plan.seeds} seed(s): seed set {plan.seed_fraction:.0%} of the pool, "
             f"{plan.batch_fraction:.0%} per round")
    png = plot(curves, summary, args.out / "learning_curve.png", title)
    result = {"benchmark": "active_learning", "quick": args.quick, "plan": dataclasses.asdict(plan),
              "split": data.split, "seconds": round(time.perf_counter() - started, 1), "machine": machine(),
              **summary, "plot": str(png)}
    (args.out / "summary.json").write_text(json.dumps(result, indent=2))
    print_table(summary)
    print(f"curves.csv, summary.json and learning_curve.png in {args.out}")
    print(json.dumps({k: result[k] for k in ("benchmark", "quick", "best_strategy", "ratio",
                                             "random_full_budget_labels", "random_full_budget_macro_f1", "seconds")}))


def print_table(summary: dict[str, Any]) -> None:
    """Mean macro F1 per strategy and round, and the labels each needs to reach random's full budget."""
    print(f"\nrandom sampling at its full budget ({summary['random_full_budget_labels']} labels): "
          f"macro F1 {summary['random_full_budget_macro_f1']:.3f}")
    for strategy, block in summary["strategies"].items():
        curve = " ".join(f"{p['n_labels']}:{p['mean']:.3f}" for p in block["curve"])
        need = block["labels_to_reach_random_full"]
        print(f"  {strategy:>8}: {curve}  -> "
              + (f"reaches it at {need:.0f} labels ({block['fraction_of_random_budget']:.0%})" if need else
                 "does not reach it"))
    print(f"best strategy: {summary['best_strategy']}, fraction of random's labels: {summary['ratio']}")


if __name__ == "__main__":
    sys.exit(main())
