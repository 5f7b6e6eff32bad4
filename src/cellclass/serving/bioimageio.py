"""bioimage.io model packages (model spec 0.5) of trained networks.

A package is a folder, and a zip of it, that ilastik, deepImageJ, QuPath and the
``bioimageio.core`` library can read. It holds:

* ``rdf.yaml``: the description (spec 0.5): input and outputs, preprocessing, weights,
  licence, authors, citations, the run's test metrics and how its split was made;
* ``weights.torchscript.pt`` (the original weights entry) and ``weights.onnx`` (converted
  from it): one graph from the normalized image to probabilities;
* ``test_input.npy`` and ``test_output_<task>.npy``: a real image of the run's test split,
  fitted to the model size, and what the weights give for it;
* ``README.md`` (documentation, with a *Validation* section) and ``cover.png``.

**Input** ``image``: ``(batch, channel, y, x)`` float32, one cell image already brought to
the model's square size (as ``fit`` did at training: pad, resize or crop), in the image's
own intensity units.

**Preprocessing**: cellclass's per-channel percentile normalization maps the training
set's low percentile to 0 and its high percentile to 1, then clips to ``clip_range``. The
spec's ``scale_linear`` along the channel axis (gain ``1 / (high - low)``, offset
``-low / (high - low)``, the recorded statistics) followed by ``clip`` is that same map, so
the package declares them instead of hiding the normalization in the graph. Runs normalized
``per image`` declare ``scale_range`` over ``(y, x)`` with the same percentiles, and ``clip``;
runs normalized ``per group`` (plate) declare the global statistics, as ``cellclass
predict`` uses for images given without a group; runs without normalization declare none.

**Outputs**: one tensor per task, ``(batch, channel)`` with the class names as channel
names, holding probabilities: the softmax (the sigmoid per class for multi-label tasks) is
part of the graph, and so is the average over the 8 D4 flips and rotations when the run
predicts with test-time augmentation. The test outputs are what the weights give, so
``bioimageio.core``'s model test checks the whole chain.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import string
import tempfile
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tifffile
import torch

from cellclass import __version__
from cellclass.errors import CellclassError, MissingDependencyError, ModelPackageError
from cellclass.evaluation.evaluate import run_spec
from cellclass.inference.checkpoint import file_sha256, find_checkpoint
from cellclass.inference.predictor import Predictor

log = logging.getLogger(__name__)

INPUT_ID = "image"
RDF_NAME = "rdf.yaml"
TORCHSCRIPT_NAME = "weights.torchscript.pt"
ONNX_NAME = "weights.onnx"
EXPORTERS = ("auto", "legacy", "dynamo")
"""ONNX exporters (``auto``: the TorchScript-based one, then dynamo)."""
NAME_CHARACTERS = set(string.ascii_letters + string.digits + "_+- ()")
"""Characters the spec allows in a model name (5 to 128 of them)."""
_DOI = re.compile(r"^(?:https?://(?:dx\.)?doi\.org/|doi:)?(10\.\d{4,9}/\S+)$", re.IGNORECASE)
_URL = re.compile(r"^https?://\S+$", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class PackageInfo:
    """Who made a model and under what terms, as the package states it.

    Attributes:
        license: SPDX licence identifier (``CC-BY-4.0``, ``MIT``, ``BSD-3-Clause`` ...).
        authors: Names of the people who trained the model.
        cite: Citations: each a DOI or an http(s) URL, optionally after the citation text
            (``"Walter et al. 2010 10.1038/nature08869"``).
        name: Model name (default ``cellclass MODEL DATASET``).
        description: One-paragraph description (default: made from the run).
        tags: Tags added to the defaults (``cellclass``, ``image-classification`` ...).
    """

    license: str | None
    authors: Sequence[str]
    cite: Sequence[str] = ()
    name: str | None = None
    description: str | None = None
    tags: Sequence[str] = ()


@dataclasses.dataclass(frozen=True)
class BioimageioPackage:
    """A written package.

    Attributes:
        folder: Package folder (holds ``rdf.yaml``).
        zip: The zipped package, or None when not asked.
        preprocessing: The preprocessing steps declared, by spec name.
        outputs: Output tensor id to task name.
        test_image: Identifier of the real image the test tensors were made from.
        weights: The weights formats, by spec name.
    """

    folder: Path
    zip: Path | None
    preprocessing: list[str]
    outputs: dict[str, str]
    test_image: str
    weights: tuple[str, ...] = ("torchscript", "onnx")

    @property
    def rdf(self) -> Path:
        """The description file."""
        return self.folder / RDF_NAME


def export_bioimageio(run: str | Path, out: str | Path | None, info: PackageInfo, *,
                      test_image: str | Path | None = None, tta: bool | None = None, opset: int = 18,
                      exporter: str = "auto", zip_package: bool = True) -> BioimageioPackage:
    """Write a run's network as a bioimage.io model package (folder, and a zip beside it).

    Args:
        run: Run folder (or its ``.ckpt`` file).
        out: Package folder (default ``RUN/bioimageio``); the zip is ``OUT.zip``. A folder
            holding an earlier package is replaced; any other non-empty folder is refused.
        info: Licence, authors, citations, name, description and tags.
        test_image: Image file for the test tensors (default: the first readable image of
            the run's test split).
        tta: Average the 8 D4 views in the graph (default: as the run predicts).
        opset: ONNX opset.
        exporter: ONNX exporter: ``auto``, ``dynamo`` or ``legacy``.
        zip_package: Also write ``OUT.zip``.

    Raises:
        ModelPackageError: For a baseline, metadata the spec refuses (no licence or author,
            a citation without DOI or URL, a name with other characters), no readable test
            image, an output folder in use, or a description the spec does not accept.
        MissingDependencyError: When ``bioimageio.spec`` is not installed.
    """
    spec_v05 = _require_spec()
    if exporter not in EXPORTERS:
        raise ModelPackageError(f"unknown ONNX exporter {exporter!r}; valid: {', '.join(EXPORTERS)}")
    check_info(info)
    checkpoint = find_checkpoint(run)
    run_dir = Path(run) if Path(run).is_dir() else checkpoint.parent.parent
    predictor = Predictor.from_checkpoint(checkpoint, tta=tta)
    if predictor.kind != "network":
        raise ModelPackageError(f"{str(run)!r} holds a {predictor.identity.get('model')} baseline, not a network; "
                                "valid: a run of lenet5 or a timm backbone (only networks make bioimage.io packages)")
    out = Path(out) if out is not None else run_dir / "bioimageio"
    _check_out(out)
    result = _read_json(run_dir / "metrics.json")
    image, image_id = _test_image(run_dir, predictor, test_image)
    outputs = tensor_ids(list(predictor.encoders))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staging.chmod(0o777 & ~_umask())  # mkdtemp makes it private; the package is for sharing
        files = _write_files(staging, predictor, image, outputs, opset, exporter)
        descr = _describe(spec_v05, predictor, files, outputs, info, result, run_dir, checkpoint, image_id)
        _save_folder(descr, staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    zipped = _save_zip(out) if zip_package else None
    log.debug("bioimage.io package of %s written to %s%s", checkpoint, out, f" and {zipped}" if zipped else "")
    return BioimageioPackage(folder=out, zip=zipped, preprocessing=[p["id"] for p in _preprocessing(predictor)],
                             outputs={t: task for task, t in outputs.items()}, test_image=image_id)


def check_package(source: str | Path) -> Any:
    """Run ``bioimageio.core``'s model test on a package (folder, ``rdf.yaml`` or zip).

    The test runs the test input through every weights format, with the declared
    preprocessing, and compares the results with the test outputs.

    Returns:
        ``bioimageio.spec``'s validation summary (``status`` is ``"passed"`` or ``"failed"``).

    Raises:
        MissingDependencyError: When ``bioimageio.core`` is not installed.
    """
    try:
        from bioimageio.core import test_model
    except ImportError as exc:
        raise MissingDependencyError(f"testing a bioimage.io package needs bioimageio.core ({exc}); "
                                     "install it with: pip install 'cellclass[bioimageio]'") from None
    source = Path(source)
    if source.is_dir():
        source = source / RDF_NAME
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit's deprecation, raised as the test loads weights
        return test_model(source)


def failed_checks(summary: Any) -> list[str]:
    """The failed checks of a ``bioimageio.spec`` validation summary, one line each."""
    return [f"{d.name}: {'; '.join(e.msg for e in d.errors) or d.status}" for d in summary.details
            if d.status == "failed"]


# -- checks ----------------------------------------------------------------------------
def _require_spec() -> Any:
    try:
        from bioimageio.spec.model import v0_5
    except ImportError as exc:
        raise MissingDependencyError(f"bioimage.io packages need bioimageio.spec ({exc}); "
                                     "install it with: pip install 'cellclass[bioimageio]'") from None
    return v0_5


def check_info(info: PackageInfo) -> None:
    """Refuse metadata the spec (or the bioimage.io collection) cannot take.

    Raises:
        ModelPackageError: Without a licence or an author, for a licence that is not an SPDX
            identifier, an author name with a slash, a citation without DOI or URL, a name
            the spec refuses, or a description over 1,024 characters.
    """
    from bioimageio.spec.model.v0_5 import LicenseId

    if not info.license:
        raise ModelPackageError("a bioimage.io package needs a licence; valid: --license SPDX_ID, "
                                "e.g. CC-BY-4.0, MIT, BSD-3-Clause (see https://spdx.org/licenses/)")
    try:
        LicenseId(info.license)
    except ValueError:
        raise ModelPackageError(f"licence {info.license!r} is not an SPDX licence identifier; valid: e.g. "
                                "CC-BY-4.0, CC0-1.0, MIT, BSD-3-Clause (see https://spdx.org/licenses/)") from None
    if not info.authors:
        raise ModelPackageError("a bioimage.io package needs at least one author; valid: --author 'NAME' "
                                "(repeatable)")
    for author in info.authors:
        if not author.strip() or "/" in author or "\\" in author:
            raise ModelPackageError(f"author {author!r} is not a name; valid: a non-empty name without '/' or '\\'")
    for entry in info.cite:
        parse_citation(entry)
    if info.name is not None:
        check_name(info.name)
    if info.description is not None and len(info.description) > 1024:
        raise ModelPackageError(f"the description has {len(info.description)} characters; valid: at most 1024 "
                                "(the spec's limit; 512 or fewer recommended)")


def parse_citation(text: str) -> dict[str, str]:
    """A citation entry of the spec from ``"[TEXT] DOI_OR_URL"``.

    Returns:
        ``{"text": ..., "doi": ...}`` or ``{"text": ..., "url": ...}``; the text is the DOI or
        URL itself when none is given.

    Raises:
        ModelPackageError: When the last word is neither a DOI (``10.NNNN/...``, also as a
            doi.org URL) nor an http(s) URL: the spec needs one of them.
    """
    words = text.strip().split()
    ref = words[-1] if words else ""
    body = " ".join(words[:-1]) or ref
    doi = _DOI.match(ref)
    if doi:
        return {"text": body, "doi": doi.group(1)}
    if _URL.match(ref):
        return {"text": body, "url": ref}
    raise ModelPackageError(f"citation {text!r} ends in no DOI or URL; the spec needs one; valid: "
                            "--cite 'TEXT 10.NNNN/SUFFIX' or --cite 'TEXT https://...'")


def check_name(name: str) -> str:
    """``name`` when the spec accepts it as a model name.

    Raises:
        ModelPackageError: When it is shorter than 5 or longer than 128 characters, or holds
            characters other than letters, digits, spaces and ``_ + - ( )``.
    """
    bad = sorted(set(name) - NAME_CHARACTERS)
    if bad or not 5 <= len(name) <= 128:
        raise ModelPackageError(f"model name {name!r} is invalid{f' (characters {bad})' if bad else ''}; valid: 5 to "
                                "128 letters, digits, spaces and _ + - ( )")
    return name


def _check_out(out: Path) -> None:
    if out.is_file():
        raise ModelPackageError(f"--out {str(out)!r} is a file; valid: a folder for the package (its zip goes "
                                "beside it)")
    if out.is_dir() and any(out.iterdir()) and not (out / RDF_NAME).is_file():
        raise ModelPackageError(f"--out {str(out)!r} is a folder that holds other files; valid: a new or empty "
                                "folder, or one holding an earlier package (it is replaced)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        log.warning("%s is missing or unreadable: the package states no test metrics", path)
        return {}


def tensor_ids(tasks: list[str]) -> dict[str, str]:
    """Task name to output tensor id (the spec wants lower-case identifiers of up to 32 characters)."""
    ids: dict[str, str] = {}
    for task in tasks:
        base = re.sub(r"\W+", "_", task.lower()).strip("_") or "task"
        if base[0].isdigit():
            base = f"task_{base}"
        base = base[:32]
        tid, n = base, 1
        while tid in ids.values() or tid == INPUT_ID:
            n += 1
            tid = f"{base[:28]}_{n}"
        ids[task] = tid
    return ids


# -- the test image --------------------------------------------------------------------
def _test_image(run_dir: Path, predictor: Predictor, given: str | Path | None) -> tuple[np.ndarray, str]:
    """A real image, fitted to the model size: ``(1, C, S, S)`` float32 in its own units, and its id."""
    if given is not None:
        try:
            return predictor.prepare([predictor.read_image(given)], names=[f"image {str(given)!r}"]), str(given)
        except CellclassError as exc:
            raise ModelPackageError(f"--test-image {str(given)!r} cannot be used: {exc}") from None
    try:
        split = json.loads((run_dir / "split.json").read_text())
        spec = run_spec(run_dir)
        frame = spec.load_manifest()
    except (OSError, ValueError, CellclassError) as exc:
        raise ModelPackageError(f"cannot read the test split of {str(run_dir)!r} ({exc}); valid: export where the "
                                "run's dataset is reachable, or give --test-image FILE") from None
    wanted = split["ids"].get("test") or split["ids"].get("val") or []
    rows = {spec.image_id(row): row for row in frame.to_dict("records")}
    reasons = []
    for image_id in wanted[:20]:
        if image_id not in rows:
            continue
        try:
            image = spec.read_image(rows[image_id])
            return predictor.prepare([image], names=[f"image {image_id!r}"]), image_id
        except CellclassError as exc:
            reasons.append(str(exc))
    raise ModelPackageError(f"no image of the test split of {str(run_dir)!r} could be read"
                            + (f" ({reasons[0]})" if reasons else "") + "; valid: export where the run's dataset "
                            "is reachable, or give --test-image FILE")


# -- files -----------------------------------------------------------------------------
class ProbabilityGraph(torch.nn.Module):
    """A network with its activation (and test-time augmentation) in the graph.

    Maps the normalized ``(N, C, S, S)`` float32 batch to a tuple of probabilities per task,
    in task order, computed as :meth:`Predictor.predict_normalized` computes them: softmax
    (sigmoid for multi-label tasks) of every view's logits, averaged over the views.

    Args:
        model: The network (returns a dict of logits per task).
        tasks: Task names, in output order.
        multilabel: Per task, whether it is multi-label.
        views: 1, or 8 for the D4 flips and rotations.
    """

    def __init__(self, model: torch.nn.Module, tasks: Sequence[str], multilabel: Sequence[bool],
                 views: int = 1) -> None:
        super().__init__()
        self.model = model
        self.tasks = list(tasks)
        self.multilabel = list(multilabel)
        self.views = views

    @classmethod
    def of(cls, predictor: Predictor, tta: bool | None = None) -> ProbabilityGraph:
        """The graph of a predictor's network (``tta``: default the predictor's setting)."""
        tasks = list(predictor.encoders)
        views = 8 if (predictor.tta if tta is None else tta) else 1
        return cls(predictor.model, tasks, [predictor.encoders[t].type == "multilabel" for t in tasks], views).eval()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sums: list[Any] = [None] * len(self.tasks)
        for k in range(self.views):
            logits = self.model(d4_view(x, k) if k else x)
            for i, task in enumerate(self.tasks):
                value = logits[task].float()
                p = torch.sigmoid(value) if self.multilabel[i] else torch.softmax(value, dim=1)
                sums[i] = p if sums[i] is None else sums[i] + p
        return tuple(s / self.views for s in sums)


def d4_view(x: torch.Tensor, k: int) -> torch.Tensor:
    """:func:`cellclass.data.augment.dihedral` written with flips and transposes only.

    The same permutation of pixels (so the same values), in operations every ONNX exporter
    knows (the TorchScript-based one has no ``rot90``).
    """
    if k >= 4:
        x = torch.flip(x, dims=(-1,))
    turns = k % 4
    if turns == 1:
        return torch.flip(x, dims=(-1,)).transpose(-2, -1)
    if turns == 2:
        return torch.flip(x, dims=(-2, -1))
    if turns == 3:
        return torch.flip(x.transpose(-2, -1), dims=(-1,))
    return x


@dataclasses.dataclass
class _Files:
    """The files of a package, in its staging folder."""

    torchscript: Path
    onnx: Path
    test_input: Path
    sample_input: Path
    test_outputs: dict[str, Path]
    sample_outputs: dict[str, Path]
    cover: Path


def _write_files(folder: Path, predictor: Predictor, image: np.ndarray, outputs: dict[str, str], opset: int,
                 exporter: str) -> _Files:
    """Weights, test and sample tensors, cover; the test outputs are what the TorchScript weights give."""
    graph = ProbabilityGraph.of(predictor)
    x = torch.from_numpy(np.ascontiguousarray(predictor.normalize(image), dtype=np.float32))
    torchscript = folder / TORCHSCRIPT_NAME
    with warnings.catch_warnings(), torch.inference_mode():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated, yet what the spec names
        torch.jit.trace(graph, (x,), check_trace=False).save(str(torchscript))
        weights = torch.jit.load(str(torchscript))
        given = dict(zip(outputs, (p.numpy().astype(np.float32) for p in weights(x)), strict=True))
    onnx = folder / ONNX_NAME
    _export_onnx(graph, x, onnx, list(outputs.values()), opset, exporter)
    files = _Files(torchscript, onnx, folder / "test_input.npy", folder / "sample_input.tif", {}, {},
                   folder / "cover.png")
    np.save(files.test_input, image.astype(np.float32))
    tifffile.imwrite(files.sample_input, image[0].astype(np.float32), photometric="minisblack")
    for task, tid in outputs.items():
        files.test_outputs[task] = folder / f"test_output_{tid}.npy"
        files.sample_outputs[task] = folder / f"sample_output_{tid}.tif"
        np.save(files.test_outputs[task], given[task])
        tifffile.imwrite(files.sample_outputs[task], given[task], photometric="minisblack")
    _write_cover(files.cover, x.numpy()[0])
    return files


def _export_onnx(graph: torch.nn.Module, sample: torch.Tensor, path: Path, names: list[str], opset: int,
                 exporter: str) -> None:
    """ONNX of the probability graph with a dynamic batch axis.

    ``auto`` tries the TorchScript-based (legacy) exporter first: on a ResNet18 with the 8
    TTA views it took 5 s where the dynamo exporter took 32 s (2-core CPU); dynamo is the
    fallback.
    """
    sample = torch.cat([sample, sample])  # a batch of two: the batch axis stays symbolic
    errors = []
    for method in (["legacy", "dynamo"] if exporter == "auto" else [exporter]):
        try:
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                warnings.simplefilter("ignore")
                if method == "dynamo":
                    batch = torch.export.Dim("batch", min=1, max=65536)
                    torch.onnx.export(graph, (sample,), str(path), input_names=[INPUT_ID], output_names=names,
                                      dynamic_shapes=({0: batch},), opset_version=opset, dynamo=True,
                                      external_data=False, verbose=False)
                else:
                    axes = {INPUT_ID: {0: "batch"}, **{n: {0: "batch"} for n in names}}
                    torch.onnx.export(graph, (sample,), str(path), input_names=[INPUT_ID], output_names=names,
                                      dynamic_axes=axes, opset_version=opset, dynamo=False)
            return
        except Exception as exc:  # noqa: BLE001 (exporters raise many types; the next one may succeed)
            errors.append(f"{method}: {type(exc).__name__}: {str(exc)[:300]}")
            log.warning("ONNX export with the %s exporter failed: %s", method, exc)
    raise ModelPackageError("cannot export the network to ONNX: " + "; ".join(errors))


def _write_cover(path: Path, normalized: np.ndarray) -> None:
    """A cover image of the test input: up to three channels as RGB (one as grey), 256 px or more."""
    from PIL import Image

    rgb = np.clip(normalized[:3], 0.0, 1.0)
    if len(rgb) == 1:
        rgb = np.repeat(rgb, 3, axis=0)
    elif len(rgb) == 2:
        rgb = np.concatenate([rgb, np.zeros_like(rgb[:1])])
    picture = Image.fromarray((rgb.transpose(1, 2, 0) * 255).round().astype(np.uint8))
    scale = max(1, -(-256 // max(picture.size)))
    picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST).save(path)


# -- the description -------------------------------------------------------------------
def _preprocessing(predictor: Predictor) -> list[dict[str, Any]]:
    """The spec's preprocessing steps that do what the run's normalizer does."""
    norm = predictor.normalizer
    steps: list[dict[str, Any]] = []
    if norm.mode == "none":
        return steps
    if norm.mode == "image":
        steps.append({"id": "scale_range", "kwargs": {"axes": ["y", "x"], "min_percentile": float(norm.low),
                                                      "max_percentile": float(norm.high), "eps": 1e-6}})
    else:  # percentile, and group with the global statistics (as for an image given without its group)
        low = np.asarray(norm.low_values_, dtype=np.float64)
        high = np.asarray(norm.high_values_, dtype=np.float64)
        span = np.where(high > low, high - low, 1.0)
        gain, offset = 1.0 / span, -low / span
        if np.any(gain != 1.0) or np.any(offset != 0.0):
            steps.append({"id": "scale_linear", "kwargs": {"axis": "channel", "gain": [float(g) for g in gain],
                                                           "offset": [float(o) for o in offset]}})
    if norm.clip:
        steps.append({"id": "clip", "kwargs": {"min": float(norm.clip_range[0]), "max": float(norm.clip_range[1])}})
    return steps


def _channel_names(predictor: Predictor) -> list[str]:
    names = [str(c) for c in predictor.channels][: predictor.in_chans]
    if len(names) != predictor.in_chans or len(set(names)) != len(names):
        names = [f"channel{i}" for i in range(predictor.in_chans)]
    return names


def _describe(v05: Any, predictor: Predictor, files: _Files, outputs: dict[str, str], info: PackageInfo,
              result: dict[str, Any], run_dir: Path, checkpoint: Path, image_id: str) -> Any:
    """The model description, validated by ``bioimageio.spec``."""
    from pydantic import ValidationError

    size = predictor.image_size
    summary = _summary(predictor, result)
    name = info.name or _default_name(predictor, result)
    readme = files.cover.with_name("README.md")
    readme.write_text(_readme(name, summary, predictor, outputs, result, image_id))
    try:
        inputs = [v05.InputTensorDescr(
            id=v05.TensorId(INPUT_ID),
            description=f"one image fitted to {size} x {size} ({predictor.fit}), in its own intensity units",
            axes=[v05.BatchAxis(), v05.ChannelAxis(channel_names=_channel_names(predictor)),
                  v05.SpaceInputAxis(id=v05.AxisId("y"), size=size), v05.SpaceInputAxis(id=v05.AxisId("x"), size=size)],
            test_tensor=v05.FileDescr(source=files.test_input), sample_tensor=v05.FileDescr(source=files.sample_input),
            data=v05.IntervalOrRatioDataDescr(type="float32"),
            preprocessing=_preprocessing(predictor))]
        outs = [v05.OutputTensorDescr(
            id=v05.TensorId(tid), description=_output_text(predictor, task)[:128],
            axes=[v05.BatchAxis(), v05.ChannelAxis(channel_names=list(predictor.encoders[task].classes))],
            test_tensor=v05.FileDescr(source=files.test_outputs[task]),
            sample_tensor=v05.FileDescr(source=files.sample_outputs[task]),
            data=v05.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)))
            for task, tid in outputs.items()]
        weights = v05.WeightsDescr(
            torchscript=v05.TorchscriptWeightsDescr(source=files.torchscript,
                                                    pytorch_version=v05.Version(torch.__version__.split("+")[0])),
            onnx=v05.OnnxWeightsDescr(source=files.onnx, opset_version=_opset(files.onnx), parent="torchscript"))
        return v05.ModelDescr(
            name=name, description=info.description or summary, authors=[v05.Author(name=a) for a in info.authors],
            cite=[v05.CiteEntry(**parse_citation(c)) for c in info.cite], license=v05.LicenseId(info.license),
            documentation=v05.FileDescr(source=readme), covers=[v05.FileDescr(source=files.cover)], tags=_tags(predictor, info), inputs=inputs, outputs=outs,
            weights=weights, version="0.1.0",
            config={"bioimageio": {"architecture_type": str(predictor.identity.get("model"))[:32],
                                   "task": "image classification", "modality": "fluorescence microscopy"},
                    "cellclass": _cellclass_config(predictor, outputs, result, run_dir, checkpoint, image_id)})
    except ValidationError as exc:
        raise ModelPackageError(f"bioimageio.spec refused the description: {_first_error(exc)}") from None


def _output_text(predictor: Predictor, task: str) -> str:
    encoder = predictor.encoders[task]
    activation = "sigmoid per class" if encoder.type == "multilabel" else "softmax over classes"
    return f"task {task}: {encoder.type}, probabilities ({activation}" + (", D4 TTA averaged)" if predictor.tta else ")")


def _default_name(predictor: Predictor, result: dict[str, Any]) -> str:
    dataset = str(result.get("dataset") or "")
    raw = f"cellclass {predictor.identity.get('model')} {dataset}".strip()
    name = "".join(c if c in NAME_CHARACTERS else "-" for c in raw)[:128]
    return name if len(name) >= 5 else f"cellclass {name}"


def _metric_line(metrics: dict[str, Any]) -> str:
    parts = [f"{label} {metrics[key]:.3f}" for key, label in (("macro_f1", "macro-F1"), ("accuracy", "accuracy"),
                                                               ("balanced_accuracy", "balanced accuracy"))
             if isinstance(metrics.get(key), (int, float))]
    return ", ".join(parts) + (f" on {metrics['n']} images" if metrics.get("n") is not None else "")


def _split_line(split: dict[str, Any]) -> str:
    """How the split was made, in words: ``group split by plate (no plate on two sides; ...)``."""
    if not split:
        return "split not recorded"
    group = split.get("group_column")
    text = f"{split.get('method')} split" + (f" by {group}" if group else "")
    details = []
    if group and split.get("groups_overlap") is False:
        details.append(f"no {group} on two sides")
    sizes = split.get("sizes") or {}
    if sizes:
        details.append(", ".join(f"{side} {n}" for side, n in sizes.items()) + " images")
    return text + (f" ({'; '.join(details)})" if details else "")


def _summary(predictor: Predictor, result: dict[str, Any]) -> str:
    """The default description: what the model classifies and how well it did on its test split."""
    tasks = "; ".join(f"{t} ({len(e.classes)} classes)" for t, e in predictor.encoders.items())
    channels = ", ".join(predictor.channels) or f"{predictor.in_chans} channel(s)"
    text = (f"{predictor.identity.get('model')} trained with cellclass on {result.get('dataset', 'a dataset')} "
            f"({channels}; {predictor.image_size} x {predictor.image_size} px). Classifies: {tasks}.")
    for task, metrics in (result.get("tasks") or {}).items():
        text += f" Test {task}: {_metric_line(metrics)}."
    text += f" Test split: {_split_line(result.get('split') or {})}."
    return text[:1024]


def _tags(predictor: Predictor, info: PackageInfo) -> list[str]:
    model = str(predictor.identity.get("model") or "")
    tags = ["cellclass", "image-classification", "fluorescence-light-microscopy", "2d", "cells", "pytorch", "onnx",
            model, *(["resnet"] if model.startswith("resnet") else []), *info.tags]
    return list(dict.fromkeys(t for t in tags if t))


def _opset(path: Path) -> int:
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return int(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")))


def _first_error(exc: Any) -> str:
    errors = exc.errors()
    if not errors:
        return str(exc).splitlines()[0]
    first = errors[0]
    where = ".".join(str(p) for p in first.get("loc", ()))
    return f"{where}: {first.get('msg')}" + (f" (and {len(errors) - 1} more)" if len(errors) > 1 else "")


def _cellclass_config(predictor: Predictor, outputs: dict[str, str], result: dict[str, Any], run_dir: Path,
                      checkpoint: Path, image_id: str) -> dict[str, Any]:
    """What cellclass knows about the model: tasks, preparation, normalization, metrics, split."""
    norm = predictor.normalizer.to_dict()
    norm["groups"] = sorted(norm.get("groups") or {})  # per-group statistics are not used by the package
    scalar = ("n", "accuracy", "balanced_accuracy", "macro_f1", "micro_f1", "roc_auc", "map", "log_loss", "ece")
    return {
        "version": __version__,
        "run": str(run_dir),
        "checkpoint_sha256": file_sha256(checkpoint),
        "model": predictor.identity.get("model"),
        "epoch": predictor.identity.get("epoch"),
        "outputs": {tid: {"task": task, "type": predictor.encoders[task].type,
                          "classes": list(predictor.encoders[task].classes)} for task, tid in outputs.items()},
        "image_size": predictor.image_size,
        "fit": predictor.fit,
        "channels": list(predictor.channels),
        "channel_indices": list(predictor.channel_indices),
        "tta": bool(predictor.tta),
        "normalization": norm,
        "thresholds": {t: [float(v) for v in values] for t, values in predictor.thresholds.items()},
        "split": result.get("split"),
        "test_metrics": {task: {k: m[k] for k in scalar if isinstance(m.get(k), (int, float))}
                         for task, m in (result.get("tasks") or {}).items()},
        "evaluation": result.get("evaluation"),
        "test_image": image_id,
    }


def _readme(name: str, summary: str, predictor: Predictor, outputs: dict[str, str], result: dict[str, Any],
            image_id: str) -> str:
    """The package's documentation: input, preprocessing, outputs, training and validation."""
    norm = predictor.normalizer
    steps = ", then ".join(f"`{s['id']}`" for s in _preprocessing(predictor)) or "none"
    clip = f", clipped to {list(norm.clip_range)}" if norm.clip and norm.mode != "none" else ""
    size = predictor.image_size
    channels = ", ".join(_channel_names(predictor))
    image = (f"`{INPUT_ID}`: (batch, channel, y, x) float32, channels {channels}: one cell image brought to "
             f"{size} x {size} px as at training (`{predictor.fit}`), in its own intensity units.")
    preprocessing = (f"Preprocessing (declared in rdf.yaml): {steps}. This is cellclass's `{norm.mode}` "
                     f"normalization (percentiles {norm.low} and {norm.high} mapped to 0 and 1{clip})"
                     + (" with the training set's global statistics, as `cellclass predict` normalizes an image "
                        "given without its group" if norm.mode == "group" else "") + ".")
    lines = [f"# {name}", "", summary, "", "## Input", "", image, "", preprocessing, "", "## Outputs", ""]
    for task, tid in outputs.items():
        classes = ", ".join(predictor.encoders[task].classes)
        lines.append(f"- `{tid}`: {_output_text(predictor, task)}; classes {classes}")
    best = result.get("best_epoch", predictor.identity.get("epoch"))
    training = (f"{predictor.identity.get('model')} trained with cellclass {__version__} on "
                f"{result.get('dataset', 'a dataset')}: {result.get('epochs_run', '?')} epoch(s), best epoch {best} "
                "chosen on the validation split.")
    lines += ["", "## Training", "", training, ""]
    split = result.get("split") or {}
    lines += ["## Validation", "", f"Evaluated on the run's test split: {_split_line(split)}.", ""]
    if split.get("warning"):
        lines += [f"Warning: {split['warning']}", ""]
    if result.get("tasks"):
        lines += ["| task | n | accuracy | balanced accuracy | macro-F1 | ROC-AUC |", "|---|---|---|---|---|---|"]
        for task, m in result["tasks"].items():
            cells = [m.get(k) for k in ("accuracy", "balanced_accuracy", "macro_f1", "roc_auc")]
            values = " | ".join(f"{v:.3f}" if isinstance(v, (int, float)) else "" for v in cells)
            lines.append(f"| {task} | {m.get('n', '')} | {values} |")
    else:
        lines.append("The run recorded no test metrics.")
    lines += ["", f"The test tensors are made from the test image `{image_id}`.", ""]
    return "\n".join(lines)


def _save_folder(descr: Any, folder: Path) -> None:
    from bioimageio.spec import save_bioimageio_package_as_folder

    save_bioimageio_package_as_folder(descr, output_path=folder)


def _save_zip(folder: Path) -> Path:
    """``FOLDER.zip`` beside the folder, written whole or not at all (and validated on reading back)."""
    from bioimageio.spec import save_bioimageio_package

    target = folder.with_name(folder.name + ".zip")
    partial = folder.with_name(f".{folder.name}.partial.zip")
    try:
        save_bioimageio_package(folder / RDF_NAME, output_path=partial)
        os.replace(partial, target)
    except ValueError as exc:
        raise ModelPackageError(f"the zipped package is invalid: {str(exc).splitlines()[0]}") from None
    finally:
        partial.unlink(missing_ok=True)
    return target


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
