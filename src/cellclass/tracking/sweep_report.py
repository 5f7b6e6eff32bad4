"""The sweep report: trials table, best configuration, history and importance plots, HTML.

Written to the sweep folder after every sweep command (a re-run refreshes it):

- ``trials.csv``: one row per trial (retired originals of re-run trials left out), with
  state, value, parameters, best epoch, duration, worker and tracked run;
- ``best_config.yaml``: the base configuration with the best trial's parameters, ready
  for ``cellclass train --config``; ``best.json``: the best trial in short;
- ``plots/history.png`` (value per trial and best so far) and ``plots/importance.png``
  (Optuna's parameter importances, drawn with matplotlib; they need two completed trials);
- ``report.html`` and ``sweep.json`` (the summary, with each failed trial's error).
"""

from __future__ import annotations

import html
import io
import json
import logging
import math
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from optuna.trial import TrialState

from cellclass.atomic import atomic_path, atomic_write_bytes, atomic_write_text
from cellclass.tracking.space import SweepSpace
from cellclass.tracking.study import live_trials
from cellclass.training.config import TrainConfig

log = logging.getLogger(__name__)


def write_sweep_report(study: Any, out: str | Path, space: SweepSpace, base: Mapping[str, Any], *,
                       n_trials: int, storage: str, folds: int | None = None) -> dict[str, Any]:
    """Write the sweep's report files into ``out``; return the summary.

    Args:
        study: The Optuna study.
        out: Sweep folder.
        space: The sweep file, parsed.
        base: Base configuration (a ``TrainConfig`` dict with the sweep's constants applied).
        n_trials: The sweep's target number of trials.
        storage: Study storage URL, as shown (password hidden).
        folds: Folds of a cross-validation objective, if any.
    """
    out = Path(out)
    trials = sorted(live_trials(study.get_trials(deepcopy=False)), key=_root)
    rows = [_row(t, space) for t in trials]
    table = pd.DataFrame(rows)
    with atomic_path(out / "trials.csv") as tmp:
        table.to_csv(tmp, index=False)

    counts = {s.name: 0 for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING,
                                  TrialState.WAITING)}
    for t in trials:
        counts[t.state.name] = counts.get(t.state.name, 0) + 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE and _finite(t.value)]
    sign = 1 if space.goal == "maximize" else -1
    best_trial = max(complete, key=lambda t: sign * t.value) if complete else None

    best = None
    files = {"trials": "trials.csv", "report": "report.html", "summary": "sweep.json"}
    if best_trial is not None:
        params = space.decode(best_trial.params)
        config = TrainConfig.from_dict(base).override(params)
        config.to_yaml(out / "best_config.yaml")
        run_dir = best_trial.user_attrs.get("run_dir")
        best = {"trial": _root(best_trial), "value": float(best_trial.value), "params": params,
                "metric": space.metric, "goal": space.goal, "run": run_dir,
                "best_epoch": best_trial.user_attrs.get("best_epoch"), "config": "best_config.yaml",
                "test": _test_metrics(out / run_dir) if run_dir and not folds else None}
        atomic_write_text(out / "best.json", json.dumps(best, indent=2, default=str))
        files.update(best_config="best_config.yaml", best="best.json")

    plots = {}
    history = _plot_history(trials, space, out / "plots" / "history.png")
    if history is not None:
        plots["history"] = "plots/history.png"
    importances, note = _importances(study, space)
    if importances:
        _plot_importance(importances, out / "plots" / "importance.png")
        plots["importance"] = "plots/importance.png"
    files.update(plots)

    finished = counts["COMPLETE"] + counts["PRUNED"] + counts["FAIL"]
    summary = {
        "study": study.study_name, "storage": storage, "method": space.method, "metric": space.metric,
        "goal": space.goal, "folds": folds, "n_trials": n_trials, "finished": finished,
        "remaining": max(0, n_trials - finished), "counts": counts, "best": best,
        "importances": importances, "importance_note": note, "files": files,
        "retired": sum(len(t.system_attrs.get("retry_history", [])) for t in trials),
        "failures": [{"trial": _root(t), "error": t.user_attrs.get("error") or "no error recorded"}
                     for t in trials if t.state == TrialState.FAIL],
    }
    atomic_write_text(out / "sweep.json", json.dumps(summary, indent=2, default=str))
    atomic_write_text(out / "report.html", _html(summary, table, space, base, out))
    return summary


def _root(trial: Any) -> int:
    return int(trial.system_attrs.get("failed_trial", trial.number))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _row(trial: Any, space: SweepSpace) -> dict[str, Any]:
    attrs = trial.user_attrs
    duration = None
    if trial.datetime_start and trial.datetime_complete:
        duration = round((trial.datetime_complete - trial.datetime_start).total_seconds(), 2)
    row: dict[str, Any] = {"trial": _root(trial), "number": trial.number, "state": trial.state.name,
                           "value": trial.value}
    row.update(space.decode(trial.params))
    for key, value in row.items():
        if isinstance(value, (list, dict)):
            row[key] = json.dumps(value)
    steps = trial.intermediate_values
    row.update({
        "best_epoch": attrs.get("best_epoch"), "epochs_run": attrs.get("epochs_run"),
        "last_step": max(steps) if steps else None, "duration_s": duration,
        "retries": len(trial.system_attrs.get("retry_history", [])),
        "worker_pid": (attrs.get("worker") or {}).get("pid"), "worker_host": (attrs.get("worker") or {}).get("host"),
        "run_dir": attrs.get("run_dir"), "tracked_run": attrs.get("tracked_run"), "error": attrs.get("error"),
    })
    return row


def _test_metrics(run: Path) -> dict[str, Any] | None:
    try:
        result = json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return None
    keep = ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")
    return {task: {k: m.get(k) for k in keep if k in m} for task, m in result.get("tasks", {}).items()}


def _importances(study: Any, space: SweepSpace) -> tuple[dict[str, float], str | None]:
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if _finite(t.value)]
    if len(complete) < 2:
        return {}, f"parameter importances need at least 2 completed trials; this sweep has {len(complete)}"
    varying = [p.name for p in space.parameters if len({json.dumps(t.params.get(p.name)) for t in complete}) > 1]
    if not varying:
        return {}, "no parameter took two values among the completed trials"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "importances will be equal" on a flat objective
            values = optuna.importance.get_param_importances(study, params=varying)
    except (ValueError, RuntimeError) as exc:
        return {}, f"parameter importances could not be computed: {exc}"
    return {k: float(v) for k, v in values.items()}, None


def _figure(width: float, height: float) -> Any:
    fig = Figure(figsize=(width, height), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: Path) -> Path:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", bbox_inches="tight")
    return atomic_write_bytes(path, buffer.getvalue())


def _plot_history(trials: list[Any], space: SweepSpace, path: Path) -> Path | None:
    done = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    if not done:
        return None
    fig = _figure(6.4, 3.6)
    ax = fig.add_subplot(1, 1, 1)
    xs = [_root(t) for t in trials if t.state == TrialState.COMPLETE and _finite(t.value)]
    ys = [t.value for t in trials if t.state == TrialState.COMPLETE and _finite(t.value)]
    ax.scatter(xs, ys, color="tab:blue", label="completed", zorder=3)
    pruned = [(_root(t), t.intermediate_values[max(t.intermediate_values)]) for t in trials
              if t.state == TrialState.PRUNED and t.intermediate_values]
    if pruned:
        ax.scatter(*zip(*pruned, strict=True), color="tab:gray", marker="x", label="pruned (last value)", zorder=3)
    if ys:
        best, line = None, []
        for y in ys:
            best = y if best is None else (max(best, y) if space.goal == "maximize" else min(best, y))
            line.append(best)
        ax.step(xs, line, where="post", color="tab:orange", label="best so far")
    ax.set_xlabel("trial")
    ax.set_ylabel(space.metric)
    ax.set_title(f"optimization history ({space.goal} {space.metric})")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save(fig, path)


def _plot_importance(importances: Mapping[str, float], path: Path) -> Path:
    names = list(importances)[::-1]
    fig = _figure(6.0, 0.5 + 0.45 * len(names))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(names, [importances[n] for n in names], color="tab:blue")
    ax.set_xlabel("importance (share of the objective's variation)")
    ax.set_title("parameter importance")
    ax.set_xlim(0, max(1e-9, max(importances.values())) * 1.15)
    for y, name in enumerate(names):
        ax.text(importances[name], y, f" {importances[name]:.2f}", va="center", fontsize="small")
    return _save(fig, path)


def _html(summary: Mapping[str, Any], table: pd.DataFrame, space: SweepSpace, base: Mapping[str, Any],
          out: Path) -> str:
    e = html.escape
    best = summary.get("best")
    counts = ", ".join(f"{v} {k.lower()}" for k, v in summary["counts"].items() if v)
    parts = [
        "<!doctype html><html><head><meta charset='utf-8'>",
        f"<title>sweep {e(str(summary['study']))}</title>",
        ("<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:72em}"
         "table{border-collapse:collapse;font-size:.9em}td,th{border:1px solid #ccc;padding:.25em .5em;"
         "text-align:right}th{background:#f3f3f3}pre{background:#f6f6f6;padding:1em}"
         ".note{color:#555}</style></head><body>"),
        f"<h1>Sweep {e(str(summary['study']))}</h1>",
        f"<p>{e(space.method)} search, {e(space.goal)} <b>{e(space.metric)}</b>"
        + (f" (mean over {summary['folds']} cross-validation folds)" if summary.get("folds") else
           " (validation metric of each trial's best epoch)")
        + f"; {summary['finished']} of {summary['n_trials']} trial(s) finished ({e(counts)}). "
        f"Study: <code>{e(str(summary['storage']))}</code>.</p>",
    ]
    if summary.get("remaining"):
        parts.append(f"<p><b>{summary['remaining']} trial(s) remain</b>: re-run the same command to continue.</p>")
    parts.append("<h2>Search space</h2><pre>" + e(space.describe()) + "</pre>")
    if best is not None:
        parts.append(f"<h2>Best trial: {best['trial']}</h2><p>{e(space.metric)} = <b>{best['value']:.4f}</b>"
                     + (f" at epoch {best['best_epoch']}" if best.get("best_epoch") else "")
                     + f"; run folder <a href='{e(str(best['run']))}/report.html'>{e(str(best['run']))}</a>.</p>")
        parts.append("<pre>" + e(json.dumps(best["params"], indent=2, default=str)) + "</pre>")
        parts.append("<p class='note'>The best of several trials is an optimistic estimate: it was selected on "
                     "the validation data it is measured on. Judge the chosen configuration on held-out data: "
                     "the best run's own test split below, or retrain with <code>cellclass train --config "
                     "best_config.yaml</code> and evaluate.</p>")
        if best.get("test"):
            parts.append("<h3>Test split of the best run (not used for selection)</h3>"
                         + pd.DataFrame(best["test"]).T.to_html(float_format=lambda v: f"{v:.4f}"))
        parts.append("<h3>best_config.yaml</h3><pre>" + e((out / "best_config.yaml").read_text()) + "</pre>")
    else:
        parts.append("<p>No trial has completed yet.</p>")
    parts.append("<h2>Plots</h2>")
    for key, title in (("history", "Optimization history"), ("importance", "Parameter importance")):
        if key in summary["files"]:
            parts.append(f"<h3>{title}</h3><img src='{summary['files'][key]}' alt='{title}'>")
    if summary.get("importance_note"):
        parts.append(f"<p class='note'>{e(summary['importance_note'])}</p>")
    parts.append("<h2>Trials</h2>")
    if len(table):
        shown = table.drop(columns=[c for c in ("worker_host", "tracked_run") if c in table.columns])
        shown = shown.map(lambda v: "" if v is None or (isinstance(v, float) and math.isnan(v))
                          else f"{v:.4g}" if isinstance(v, float) else v)
        parts.append(shown.to_html(index=False))
    parts.append("<p class='note'>Base configuration (before each trial's parameters):</p><pre>"
                 + e(json.dumps(dict(base), indent=1, default=str)) + "</pre></body></html>")
    return "\n".join(parts)
