"""Pixel baselines: scikit-learn classifiers on downsampled, standardised pixels.

Each baseline area-averages the images to a small size (``pixels``), flattens them,
standardises every feature (``StandardScaler``) and fits one scikit-learn classifier per
task (one per label for multi-label tasks). They follow the scikit-learn estimator
contract, with the multi-task twist that labels and predictions are dicts keyed by task:

>>> model = create_model("logreg", 1, {"particle": 3}, task_types={"particle": "single"})
>>> model.fit(X, {"particle": y}).predict_proba(X)["particle"].shape  # doctest: +SKIP
(N, 3)
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.base import BaseEstimator, clone
from sklearn.calibration import CalibratedClassifierCV
from sklearn.linear_model import LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.svm import SVC
from sklearn.utils.validation import check_is_fitted

from cellclass.errors import LabelError, ModelError
from cellclass.models.arguments import check_heads, check_image_size, check_task_types
from cellclass.models.registry import register_model


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """``(n_out, n_in)`` weights averaging each output bin's share of the input pixels."""
    edges = np.arange(n_out + 1) * (n_in / n_out)
    lo, hi = edges[:-1, None], edges[1:, None]
    pix = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, pix + 1) - np.maximum(lo, pix), 0.0, None)
    return (overlap / overlap.sum(axis=1, keepdims=True)).astype(np.float32)


def area_downsample(X: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize images ``(N, C, H, W)`` to ``(N, C, *size)`` by area averaging.

    Exact for any ratio (fractional pixels are weighted by their overlap), like
    ``cv2.INTER_AREA``; the result is float32.
    """
    h, w = X.shape[-2:]
    out = np.asarray(X, dtype=np.float32)
    if (h, w) == tuple(size):
        return out
    return _area_matrix(h, size[0]) @ out @ _area_matrix(w, size[1]).T


class _Constant:
    """Stand-in for a classifier when training saw a single class."""

    def __init__(self, label: int) -> None:
        self.classes_ = np.array([label])

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return np.ones((len(X), 1))


class PixelBaseline(BaseEstimator):
    """Base of the pixel baselines; subclasses define ``name`` and ``_make_estimator``.

    Args (shared by every baseline):
        in_chans: Number of image channels.
        heads: Task name → number of outputs (classes, labels, or 1/2 for binary).
        image_size: Nominal input size (recorded in ``config``; inputs of another size
            are resized to the same features).
        task_types: Task name → ``"single"`` (default), ``"multilabel"`` or ``"binary"``.
        pixels: Side (or ``(height, width)``) the images are area-averaged to before
            flattening; inputs smaller than that keep their size.

    Attributes:
        scaler_: The fitted ``StandardScaler`` over the flattened pixels.
        estimators_: Task → fitted classifier; for multi-label tasks a list with one
            classifier per label.
        feature_size_: ``(height, width)`` the images are resized to.
        task_types_: Resolved task types.
    """

    name = ""

    def _make_estimator(self) -> Any:
        raise NotImplementedError

    @property
    def config(self) -> dict[str, Any]:
        """Arguments that rebuild this (unfitted) baseline: ``create_model(**config)``."""
        params = self.get_params(deep=False)
        params["heads"] = dict(params["heads"])
        if params.get("task_types") is not None:
            params["task_types"] = dict(params["task_types"])
        return {"name": self.name, **params}

    def _check_params(self) -> tuple[dict[str, int], dict[str, str], tuple[int, int]]:
        heads = check_heads(self.heads)
        types = check_task_types(self.task_types, heads)
        check_image_size(self.image_size)
        try:
            pixels = check_image_size(self.pixels)
        except ModelError as err:
            raise ModelError(
                f"pixels must be a positive int or (height, width), got {self.pixels!r}"
            ) from err
        return heads, types, pixels

    def _check_X(self, X: Any) -> np.ndarray:
        X = np.asarray(X)
        if X.ndim != 4 or X.shape[1] != self.in_chans or not np.issubdtype(X.dtype, np.number):
            raise ModelError(
                f"{self.name} expects numeric images of shape (N, {self.in_chans}, H, W), "
                f"got an array of shape {X.shape} and dtype {X.dtype}"
            )
        if len(X) == 0:
            raise ModelError(f"{self.name} got no images (shape {X.shape}); pass at least one")
        return X

    def _features(self, X: np.ndarray) -> np.ndarray:
        flat = area_downsample(X, self.feature_size_).reshape(len(X), -1)
        return self.scaler_.transform(flat)

    def _check_y(
        self, y: Any, n: int, heads: dict[str, int], types: dict[str, str]
    ) -> dict[str, np.ndarray]:
        if not isinstance(y, Mapping):
            if len(heads) != 1:
                raise LabelError(
                    f"y must be a dict task → labels for the tasks {list(heads)}, got "
                    f"{type(y).__name__}"
                )
            y = {next(iter(heads)): y}
        missing = [t for t in heads if t not in y]
        if missing:
            raise LabelError(
                f"y has no labels for task(s) {missing}; it has {list(y)}, valid tasks "
                f"are {list(heads)}"
            )
        out: dict[str, np.ndarray] = {}
        for task, k in heads.items():
            labels = np.asarray(y[task])
            if types[task] == "multilabel":
                if labels.shape != (n, k) or not np.isin(labels, (0, 1)).all():
                    raise LabelError(
                        f"labels of multi-label task {task!r} must be a 0/1 array of shape "
                        f"({n}, {k}), got shape {labels.shape} with values "
                        f"{np.unique(labels)[:10].tolist()}"
                    )
                out[task] = labels.astype(np.int64)
                continue
            if labels.dtype == bool:
                labels = labels.astype(np.int64)
            n_classes = 2 if types[task] == "binary" else k
            if (
                labels.shape != (n,)
                or not np.issubdtype(labels.dtype, np.integer)
                or labels.max(initial=-1) >= n_classes
                or labels.min(initial=0) < -1
            ):
                raise LabelError(
                    f"labels of {types[task]} task {task!r} must be integers of shape "
                    f"({n},) in [0, {n_classes}) (-1 for missing), got shape "
                    f"{labels.shape}, dtype {labels.dtype}, values "
                    f"{np.unique(labels)[:10].tolist()}"
                )
            out[task] = labels
        return out

    def _fit_one(self, features: np.ndarray, labels: np.ndarray) -> Any:
        if len(np.unique(labels)) < 2:
            return _Constant(int(labels[0]))
        return clone(self._make_estimator()).fit(features, labels)

    def fit(self, X: Any, y: Any) -> PixelBaseline:
        """Fit one classifier per task (per label for multi-label tasks).

        Args:
            X: Images, array of shape ``(N, in_chans, H, W)``, already normalised.
            y: Dict task → labels: ints of shape ``(N,)`` for single-label and binary
                tasks (``-1`` marks a missing label, left out of that task's fit), 0/1
                of shape ``(N, K)`` for multi-label tasks. A bare array is accepted when
                there is one task.

        Returns:
            self

        Raises:
            ModelError: bad parameters or images.
            LabelError: missing tasks or malformed labels.
        """
        heads, types, pixels = self._check_params()
        X = self._check_X(X)
        labels = self._check_y(y, len(X), heads, types)
        self.feature_size_ = (min(pixels[0], X.shape[2]), min(pixels[1], X.shape[3]))
        flat = area_downsample(X, self.feature_size_).reshape(len(X), -1)
        self.scaler_ = StandardScaler().fit(flat)
        features = self.scaler_.transform(flat)
        estimators: dict[str, Any] = {}
        for task, task_labels in labels.items():
            if types[task] == "multilabel":
                estimators[task] = [
                    self._fit_one(features, task_labels[:, j]) for j in range(heads[task])
                ]
                continue
            known = task_labels >= 0
            if not known.any():
                raise LabelError(
                    f"task {task!r} has no known label (all {len(task_labels)} are -1); "
                    "give at least one labelled image per task"
                )
            estimators[task] = self._fit_one(features[known], task_labels[known])
        self.task_types_ = types
        self.estimators_ = estimators
        return self

    def predict_proba(self, X: Any) -> dict[str, np.ndarray]:
        """Probabilities per task.

        Returns:
            Dict task → float array ``(N, heads[task])``: class probabilities for
            single-label tasks (0 for classes absent from training), per-label positive
            probabilities for multi-label tasks (0 for labels never positive in
            training), and for binary tasks the positive probability ``(N, 1)`` or both
            ``(N, 2)``, following ``heads``.
        """
        check_is_fitted(self, "estimators_")
        features = self._features(self._check_X(X))
        n = len(features)
        out: dict[str, np.ndarray] = {}
        for task, est in self.estimators_.items():
            k = int(self.heads[task])
            if self.task_types_[task] == "multilabel":
                out[task] = np.stack([_positive(e, features) for e in est], axis=1)
                continue
            n_classes = 2 if self.task_types_[task] == "binary" else k
            proba = np.zeros((n, n_classes))
            proba[:, est.classes_] = est.predict_proba(features)
            out[task] = proba[:, 1:] if n_classes == 2 and k == 1 else proba
        return out

    def predict(self, X: Any) -> dict[str, np.ndarray]:
        """Predicted labels per task.

        Returns:
            Dict task → class indices ``(N,)`` for single-label and binary tasks, 0/1
            arrays ``(N, K)`` for multi-label tasks (threshold 0.5).
        """
        proba = self.predict_proba(X)
        out: dict[str, np.ndarray] = {}
        for task, p in proba.items():
            if self.task_types_[task] == "multilabel":
                out[task] = (p >= 0.5).astype(np.int64)
            elif p.shape[1] == 1:
                out[task] = (p[:, 0] >= 0.5).astype(np.int64)
            else:
                out[task] = p.argmax(axis=1)
        return out

    def count_parameters(self) -> int:
        """Number of fitted numbers (weights, support vectors, scaler); 0 before fit."""
        if not hasattr(self, "estimators_"):
            return 0
        total = self.scaler_.mean_.size + self.scaler_.scale_.size
        for est in self.estimators_.values():
            total += sum(_fitted_size(e) for e in (est if isinstance(est, list) else [est]))
        return int(total)


_FITTED_ARRAYS = ("coef_", "intercept_", "coefs_", "intercepts_", "support_vectors_", "dual_coef_")


def _fitted_size(est: Any) -> int:
    """Numbers a fitted estimator learned, looking inside calibration wrappers."""
    inner = [c.estimator for c in getattr(est, "calibrated_classifiers_", [])]
    inner += [getattr(est, a) for a in ("svc", "calibrator_") if hasattr(est, a)]
    total = sum(_fitted_size(e) for e in inner)
    for attr in _FITTED_ARRAYS:
        value = getattr(est, attr, None)
        arrays = value if isinstance(value, list) else [value]
        total += sum(int(np.size(a)) for a in arrays if a is not None)
    return total


def _positive(est: Any, features: np.ndarray) -> np.ndarray:
    pos = np.flatnonzero(est.classes_ == 1)
    if pos.size == 0:
        return np.zeros(len(features))
    return est.predict_proba(features)[:, pos[0]]


class MLPBaseline(PixelBaseline):
    """Multi-layer perceptron on pixels (scikit-learn ``MLPClassifier``), as in the
    NASA BPS microscopy benchmark's baseline.

    Args:
        hidden_layer_sizes: Width of each hidden layer.
        alpha: L2 penalty.
        max_iter: Maximum epochs of Adam.
        early_stopping: Hold out 10% of the training data to stop early.
        random_state: Seed of the weight initialisation and batches.
        (other arguments: see :class:`PixelBaseline`)
    """

    name = "mlp"

    def __init__(
        self,
        in_chans: int,
        heads: Mapping[str, int],
        image_size: int | tuple[int, int] = 64,
        task_types: Mapping[str, str] | None = None,
        pixels: int | tuple[int, int] = 32,
        hidden_layer_sizes: tuple[int, ...] = (256,),
        alpha: float = 1e-4,
        max_iter: int = 200,
        early_stopping: bool = False,
        random_state: int | None = 0,
    ) -> None:
        self.in_chans = in_chans
        self.heads = heads
        self.image_size = image_size
        self.task_types = task_types
        self.pixels = pixels
        self.hidden_layer_sizes = hidden_layer_sizes
        self.alpha = alpha
        self.max_iter = max_iter
        self.early_stopping = early_stopping
        self.random_state = random_state

    def _make_estimator(self) -> MLPClassifier:
        return MLPClassifier(
            hidden_layer_sizes=tuple(self.hidden_layer_sizes),
            alpha=self.alpha,
            max_iter=self.max_iter,
            early_stopping=self.early_stopping,
            random_state=self.random_state,
        )


class SVMBaseline(PixelBaseline):
    """Support vector machine on pixels (scikit-learn ``SVC``, probabilities by Platt
    scaling on out-of-fold decision values with ``CalibratedClassifierCV``). Training
    time grows with the square of the number of images: fine for a few thousand, slow
    beyond.

    Args:
        C: Inverse regularisation strength.
        kernel: ``"rbf"``, ``"linear"``, ``"poly"`` or ``"sigmoid"``.
        gamma: Kernel coefficient (``"scale"``, ``"auto"`` or a float).
        cache_size: Kernel cache in MB.
        random_state: Seed of the probability calibration.
        (other arguments: see :class:`PixelBaseline`)
    """

    name = "svm"

    def __init__(
        self,
        in_chans: int,
        heads: Mapping[str, int],
        image_size: int | tuple[int, int] = 64,
        task_types: Mapping[str, str] | None = None,
        pixels: int | tuple[int, int] = 32,
        C: float = 1.0,
        kernel: str = "rbf",
        gamma: str | float = "scale",
        cache_size: float = 500.0,
        random_state: int | None = 0,
    ) -> None:
        self.in_chans = in_chans
        self.heads = heads
        self.image_size = image_size
        self.task_types = task_types
        self.pixels = pixels
        self.C = C
        self.kernel = kernel
        self.gamma = gamma
        self.cache_size = cache_size
        self.random_state = random_state

    def _make_estimator(self) -> SVC:
        return SVC(
            C=self.C,
            kernel=self.kernel,
            gamma=self.gamma,
            cache_size=self.cache_size,
            random_state=self.random_state,
        )

    def _fit_one(self, features: np.ndarray, labels: np.ndarray) -> Any:
        _, counts = np.unique(labels, return_counts=True)
        if len(counts) < 2:
            return _Constant(int(labels[0]))
        if counts.min() >= 2:
            # Platt scaling on out-of-fold decision values (what SVC(probability=True)
            # did before scikit-learn 1.9 deprecated it).
            return CalibratedClassifierCV(
                self._make_estimator(), cv=int(min(5, counts.min())), ensemble=False
            ).fit(features, labels)
        # A class seen once cannot be held out: calibrate on the training decisions.
        return _InSampleCalibratedSVC(self._make_estimator()).fit(features, labels)


class _InSampleCalibratedSVC:
    """SVC with a logistic calibration fitted on its own training decision values."""

    def __init__(self, svc: SVC) -> None:
        self.svc = svc

    def _decisions(self, X: np.ndarray) -> np.ndarray:
        d = self.svc.decision_function(X)
        return d[:, None] if d.ndim == 1 else d

    def fit(self, X: np.ndarray, y: np.ndarray) -> _InSampleCalibratedSVC:
        self.svc.fit(X, y)
        self.calibrator_ = LogisticRegression().fit(self._decisions(X), y)
        self.classes_ = self.calibrator_.classes_
        return self

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        return self.calibrator_.predict_proba(self._decisions(X))


class LogRegBaseline(PixelBaseline):
    """Logistic regression on pixels (scikit-learn ``LogisticRegression``, L2, lbfgs).

    Args:
        C: Inverse regularisation strength.
        max_iter: Maximum solver iterations.
        random_state: Seed (used by some solvers only).
        (other arguments: see :class:`PixelBaseline`)
    """

    name = "logreg"

    def __init__(
        self,
        in_chans: int,
        heads: Mapping[str, int],
        image_size: int | tuple[int, int] = 64,
        task_types: Mapping[str, str] | None = None,
        pixels: int | tuple[int, int] = 32,
        C: float = 1.0,
        max_iter: int = 1000,
        random_state: int | None = 0,
    ) -> None:
        self.in_chans = in_chans
        self.heads = heads
        self.image_size = image_size
        self.task_types = task_types
        self.pixels = pixels
        self.C = C
        self.max_iter = max_iter
        self.random_state = random_state

    def _make_estimator(self) -> LogisticRegression:
        return LogisticRegression(
            C=self.C, max_iter=self.max_iter, random_state=self.random_state
        )


def _build(
    cls: type[PixelBaseline],
    in_chans: int,
    heads: Mapping[str, int],
    image_size: tuple[int, int],
    pretrained: bool | str | Path,
    kwargs: dict[str, Any],
) -> PixelBaseline:
    if pretrained is not False:
        raise ModelError(
            f"baseline {cls.name!r} has no pretrained weights, got pretrained={pretrained!r}; "
            "pass pretrained=False and fit it"
        )
    valid = sorted(set(cls._get_param_names()) - {"in_chans", "heads", "image_size"})
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ModelError(
            f"baseline {cls.name!r} got unknown argument(s) {unknown}; valid arguments "
            f"are {valid}"
        )
    size = image_size[0] if image_size[0] == image_size[1] else list(image_size)
    model = cls(in_chans, dict(heads), image_size=size, **kwargs)
    model._check_params()
    return model


@register_model("mlp", kind="baseline")
def mlp(
    in_chans: int,
    heads: Mapping[str, int],
    *,
    image_size: tuple[int, int],
    pretrained: bool | str | Path = False,
    **kwargs: Any,
) -> MLPBaseline:
    """Multi-layer perceptron on downsampled, standardised pixels (scikit-learn)."""
    return _build(MLPBaseline, in_chans, heads, image_size, pretrained, kwargs)


@register_model("svm", kind="baseline")
def svm(
    in_chans: int,
    heads: Mapping[str, int],
    *,
    image_size: tuple[int, int],
    pretrained: bool | str | Path = False,
    **kwargs: Any,
) -> SVMBaseline:
    """RBF support vector machine on downsampled, standardised pixels (scikit-learn)."""
    return _build(SVMBaseline, in_chans, heads, image_size, pretrained, kwargs)


@register_model("logreg", kind="baseline")
def logreg(
    in_chans: int,
    heads: Mapping[str, int],
    *,
    image_size: tuple[int, int],
    pretrained: bool | str | Path = False,
    **kwargs: Any,
) -> LogRegBaseline:
    """Logistic regression on downsampled, standardised pixels (scikit-learn)."""
    return _build(LogRegBaseline, in_chans, heads, image_size, pretrained, kwargs)
