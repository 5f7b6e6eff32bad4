"""A user's mistake is one clear line and a non-zero exit, never a traceback; nothing is overwritten.

The walk enumerates the commands from the typer app, so a new command is covered without
editing this file: every command is called with an unknown option, and with bad files (a
0-byte file, a non-UTF-8 file, random bytes) in every path parameter at once. The
specific cases below each failed (traceback, overwritten source or a silent wrong result)
before the checks they exercise existed.
"""

from __future__ import annotations

import sys
import typing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import typer

from cellclass.cli import app, main
from cellclass.data.presets import bps
from cellclass.training.config import TrainConfig
from cellclass.training.loop import train


def leaf_commands() -> list[tuple[list[str], typer.core.TyperCommand]]:
    """``(words, command)`` of every command of the app, sub-commands included."""
    out = []

    def walk(command: object, words: list[str]) -> None:
        if hasattr(command, "commands"):
            for name, sub in command.commands.items():
                walk(sub, [*words, name])
        else:
            out.append((words, command))

    walk(typer.main.get_command(app), [])
    return out


COMMANDS = leaf_commands()
COMMAND_IDS = [" ".join(words) for words, _ in COMMANDS]


def takes_path(param: object) -> bool:
    """Whether a parameter's annotation is a path (``Path``, ``Path | None``, ``list[Path]``)."""
    annotation = param.type_descriptor.annotation
    return Path in {annotation, *typing.get_args(annotation),
                    *(a for arg in typing.get_args(annotation) for a in typing.get_args(arg))}


def bad_arguments(command: object, bad: Path) -> list[str]:
    """Arguments filling every path parameter with ``bad`` and other required ones with ``nope``;
    a command reading a dataset also gets ``--image-col`` and ``--task``, so the manifest is read."""
    args: list[str] = []
    names = {param.name for param in command.params}
    for param in command.params:
        if param.param_type_name == "argument":
            value = str(bad) if takes_path(param) else "nope"
            args += [value] * (2 if param.nargs == -1 else 1)  # compare wants two runs
        elif takes_path(param):
            args += [param.opts[0], str(bad)]
        elif param.required:
            args += [param.opts[0], "nope"]
    if "image_col" in names:
        args += ["--image-col", "filename", "--task", "label"]
    return args


def call(args: list[object], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run ``cellclass ARGS`` in this process as the console script does: ``(rc, stdout, stderr)``.

    An exception other than ``SystemExit`` escaping :func:`main` is what a user sees as a
    traceback; it propagates and fails the test.
    """
    with pytest.MonkeyPatch.context() as patch, pytest.raises(SystemExit) as exit_info:
        patch.setattr(sys, "argv", ["cellclass", *map(str, args)])
        main()
    out, err = capsys.readouterr()
    code = exit_info.value.code
    return (code if isinstance(code, int) else 1), out, err


def assert_one_error_line(rc: int, out: str, err: str, *fragments: str) -> str:
    """rc != 0, no traceback, and stderr ends with its one ``error:`` line (holding
    ``fragments``), the whole message on that line; returns it."""
    assert rc != 0, out + err
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    """A 0-byte file, a non-UTF-8 text file and a file of random bytes."""
    files = {"empty": tmp_path / "empty.csv", "latin1": tmp_path / "latin1.csv", "noise": tmp_path / "noise.tif"}
    files["empty"].write_bytes(b"")
    files["latin1"].write_bytes("filename,label\ncaf\u00e9.tif,a\n".encode("latin-1"))
    files["noise"].write_bytes(np.random.default_rng(0).integers(0, 256, 512, dtype=np.uint8).tobytes())
    return files


def test_the_walk_covers_every_command() -> None:
    assert {"validate", "inspect", "train", "predict", "compare", "simulate bps", "keys create"} <= set(COMMAND_IDS)


@pytest.mark.parametrize("words", [w for w, _ in COMMANDS], ids=COMMAND_IDS)
def test_unknown_option_is_one_error_line(words: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = call([*words, "--no-such-option"], capsys)
    assert rc == 2
    assert_one_error_line(rc, out, err, "No such option: --no-such-option", f"cellclass {' '.join(words)} --help")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["empty", "latin1", "noise"])
@pytest.mark.parametrize(("words", "command"), COMMANDS, ids=COMMAND_IDS)
def test_bad_files_in_every_path_are_one_error_line(words: list[str], command: object, kind: str,
                                                     bad_files: dict[str, Path], monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    if not any(takes_path(p) for p in command.params):
        pytest.skip(f"`cellclass {' '.join(words)}` takes no path")
    bad = bad_files[kind]
    before = {p: p.read_bytes() for p in bad_files.values()}
    monkeypatch.chdir(bad.parent)
    rc, out, err = call([*words, *bad_arguments(command, bad)], capsys)
    assert_one_error_line(rc, out, err)
    assert {p: p.read_bytes() for p in bad_files.values()} == before


# -- the cases of a user's mistake, one by one ----------------------------------------------
TINY_CONFIG = TrainConfig(model="mlp", tasks=["particle_type"], image_size=16, tta=False)
"""The MLP baseline on particle type at 16 x 16: a run in a few seconds."""


@pytest.fixture(scope="module")
def tiny_run(bps_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run of :data:`TINY_CONFIG` on the simulated BPS set."""
    run = tmp_path_factory.mktemp("tiny") / "run"
    train(bps(bps_dir), TINY_CONFIG, run)
    return run


@pytest.mark.parametrize("command", ["validate", "train"])
def test_empty_manifest_is_one_line(command: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "labels.csv"
    manifest.write_bytes(b"")
    extra = ["--out", tmp_path / "run", "--tracker", "none"] if command == "train" else []
    rc, out, err = call([command, manifest, "--image-col", "filename", "--task", "label", *extra], capsys)
    assert rc == 2
    assert_one_error_line(rc, out, err, f"manifest '{manifest}' is empty (0 bytes)", "valid: a CSV with a header row")
    assert not (tmp_path / "run").exists()


def test_non_utf8_manifest_names_the_row_and_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = tmp_path / "labels.csv"
    manifest.write_bytes("filename,label\na.tif,x\nb\u00e9.tif,y\n".encode("latin-1"))
    rc, out, err = call(["validate", manifest, "--image-col", "filename", "--task", "label"], capsys)
    line = assert_one_error_line(rc, out, err, "is not UTF-8 text: data row 2 (line 3, column 2) holds the byte 0xe9",
                                 "valid: UTF-8 text")
    assert "position" not in line


def test_norm_low_above_norm_high_is_refused_before_training(bps_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = call(["train", bps_dir, "--preset", "bps", "--task", "particle_type", "--model", "mlp",
                         "--set", "norm_low=99.9", "--set", "norm_high=1", "--tracker", "none",
                         "--out", tmp_path / "run"], capsys)
    assert rc == 2
    assert_one_error_line(rc, out, err, "norm_low = 99.9 and norm_high = 1.0 are invalid",
                          "valid: percentiles with 0 <= norm_low < norm_high <= 100")
    assert not (tmp_path / "run").exists()


def test_predict_out_folder_is_refused(tiny_run: Path, bps_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    image = sorted(bps_dir.glob("*.tif"))[0]
    rc, out, err = call(["predict", tiny_run, image, "--out", f"{tmp_path}/"], capsys)
    assert rc == 2
    assert_one_error_line(rc, out, err, f"--out '{tmp_path}' is a folder", "valid: a file path")


def test_predict_never_overwrites_an_input(tiny_run: Path, bps_dir: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    image = tmp_path / "s.tif"
    image.write_bytes(sorted(bps_dir.glob("*.tif"))[0].read_bytes())
    before = image.read_bytes()
    rc, out, err = call(["predict", tiny_run, image, "--out", image], capsys)
    assert rc == 2
    assert_one_error_line(rc, out, err, f"--out '{image}' is one of the inputs")
    assert image.read_bytes() == before
    run_predictions = tiny_run / "predictions.csv"
    kept = run_predictions.read_bytes()
    rc, out, err = call(["predict", tiny_run, image, "--out", run_predictions], capsys)
    assert_one_error_line(rc, out, err, "is a file of the input folder")
    assert run_predictions.read_bytes() == kept


@pytest.mark.parametrize(("kind", "fragment"), [
    ("empty", "is empty (shape (1, 0, 8)); valid: an image with at least one pixel"),
    ("nan", "holds 1 NaN and 1 infinite pixel value(s) of 256; valid: finite pixel values"),
    ("channels", "has 3 channel(s); the model expects 1"),
    ("missing", "does not exist"),
])
def test_one_bad_image_is_reported_in_its_row_and_the_others_predicted(
        kind: str, fragment: str, tiny_run: Path, bps_dir: Path, tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    good = sorted(bps_dir.glob("*.tif"))[:2]
    bad = tmp_path / f"{kind}.npy"
    if kind == "empty":
        np.save(bad, np.zeros((0, 8), dtype=np.float32))
    elif kind == "nan":
        pixels = np.ones((1, 16, 16), dtype=np.float32)
        pixels[0, 2, 3], pixels[0, 4, 5] = np.nan, np.inf
        np.save(bad, pixels)
    elif kind == "channels":
        np.save(bad, np.ones((3, 16, 16), dtype=np.uint16))
    out_csv = tmp_path / "predictions.csv"
    rc, out, err = call(["predict", tiny_run, good[0], bad, good[1], "--out", out_csv], capsys)
    assert rc == 1
    assert_one_error_line(rc, out, err, f"image '{bad}'", fragment)
    frame = pd.read_csv(out_csv, dtype=str, keep_default_na=False)
    assert list(frame["image"]) == [str(good[0]), str(bad), str(good[1])]
    assert fragment in frame["error"][1]
    assert frame["particle_type"][1] == "" and frame["particle_type__p__Fe"][1] == ""
    for i in (0, 2):
        assert frame["error"][i] == "" and frame["particle_type"][i] in {"Fe", "X-ray"}
        assert float(frame["particle_type__p__Fe"][i]) + float(frame["particle_type__p__X-ray"][i]) == \
            pytest.approx(1.0, abs=1e-5)
    assert "2 prediction(s) written" in out and "1 image(s) could not be predicted" in out


def test_validate_never_overwrites_its_manifest(bps_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    manifest = bps_dir / "meta.csv"
    before = manifest.read_bytes()
    for option in ("--write-clean", "--report"):
        rc, out, err = call(["validate", bps_dir, "--preset", "bps", "--no-images", option, manifest], capsys)
        assert_one_error_line(rc, out, err, f"{option} '{manifest}' is one of the inputs")
    assert manifest.read_bytes() == before
    same = tmp_path / "x.csv"
    rc, out, err = call(["validate", bps_dir, "--preset", "bps", "--no-images", "--write-clean", same,
                         "--report", same], capsys)
    assert_one_error_line(rc, out, err, "--write-clean and --report are both")


def test_output_folder_that_is_a_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    taken = tmp_path / "taken"
    taken.write_text("mine")
    rc, out, err = call(["simulate", "bps", taken, "--n-images", "17"], capsys)
    assert rc == 2
    assert_one_error_line(rc, out, err, f"'{taken}' exists and is not a folder")
    assert taken.read_text() == "mine"


def test_embed_of_a_baseline_run_is_one_line(tiny_run: Path, bps_dir: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = call(["embed", tiny_run, bps_dir, "--preset", "bps", "--out", tmp_path / "e"], capsys)
    assert rc == 2
    assert_one_error_line(rc, out, err, "is a baseline (mlp), which has no learned features to embed",
                          "valid: a run of a network")
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("budget", ["0", "-3"])
def test_rank_budget_below_one_is_one_line(budget: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = call(["rank", tmp_path / "run", tmp_path, "--budget", budget], capsys)
    assert rc == 2
    assert_one_error_line(rc, out, err, f"budget {budget} is invalid; valid: a whole number of images >= 1")


def test_rank_unknown_strategy_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = call(["rank", tmp_path / "run", tmp_path, "--budget", "5", "--strategy", "bald"], capsys)
    assert rc == 2
    assert_one_error_line(rc, out, err, "strategy 'bald' is unknown; valid: least-confidence, margin, entropy")
