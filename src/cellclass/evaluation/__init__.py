"""Evaluation: metrics per task, threshold tuning, plots and paired model comparisons.

Modules:
    metrics: single-label, binary and multi-label metric dictionaries (JSON-ready),
        calibration error and bootstrap confidence intervals.
    thresholds: per-class decision thresholds tuned on validation data, and applying them.
    plots: learning curves, confusion matrix, per-class F1, ROC/PR, reliability diagram and
        model comparison charts, each written atomically to a PNG file.
    compare: paired bootstrap and McNemar tests between two models scored on the same
        test images, and tables of models with confidence intervals.
"""
