"""The options several commands share: defined once (cli/options.py), the same in every
command that takes them, listed in --help, and resolved into a spec and a config in order."""

import dataclasses
from pathlib import Path

import pandas as pd
import pytest
import torch
import typer
import yaml
from test_cli_errors import COMMANDS, TINY_CONFIG, assert_one_error_line, call

from cellclass.cli.options import (
    DatasetOptions,
    OptionGroup,
    TrackerOptions,
    TrainOptions,
    option_name,
    takes_options,
)
from cellclass.models import create_model
from cellclass.training.config import TrainConfig
from cellclass.training.loop import train

TAKERS = {
    DatasetOptions: {"validate", "inspect", "prepare", "segment", "crops", "train", "evaluate", "predict", "cv",
                     "sweep", "embed", "rank"},
    TrainOptions: {"train", "cv", "sweep"},
    TrackerOptions: {"train", "cv", "sweep"},
}
"""The commands that take each group."""


def group_params(group: type[OptionGroup]) -> dict[str, object]:
    """The click parameters a command taking only ``group`` has, by name."""
    probe = typer.Typer(add_completion=False)

    @probe.command()
    @takes_options
    def only(options: group) -> None:  # type: ignore[valid-type]
        """A command taking ``group`` alone."""

    return {param.name: param for param in typer.main.get_command(probe).params if param.name != "help"}


def describe(param: object) -> tuple:
    """What a user sees of an option: its names, help, default, type, bounds, flag, repetition, panel."""
    return (param.opts, param.help, param.default, param.type_descriptor.annotation, param.min, param.max,
            param.is_flag, param.multiple, param.rich_help_panel)


@pytest.mark.parametrize("group", list(TAKERS), ids=lambda g: g.__name__)
def test_every_command_taking_a_group_has_all_its_options_unchanged(group: type[OptionGroup]) -> None:
    expected = {name: describe(param) for name, param in group_params(group).items()}
    assert list(expected) == [f.name for f in dataclasses.fields(group)]
    takers = set()
    for words, command in COMMANDS:
        same = {p.name for p in command.params if p.name in expected and describe(p) == expected[p.name]}
        # a command has the whole group or none of it: a partial copy is drift
        assert same in (set(), set(expected)), (words, sorted(set(expected) - same))
        if same:
            takers.add(" ".join(words))
    assert takers == TAKERS[group]


@pytest.mark.parametrize("group", list(TAKERS), ids=lambda g: g.__name__)
def test_each_field_is_named_as_its_option(group: type[OptionGroup]) -> None:
    for name, param in group_params(group).items():
        assert param.opts == [option_name(name)]


@pytest.mark.parametrize("command", sorted(set().union(*TAKERS.values())))
def test_help_lists_every_shared_option_with_its_help(command: str, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("COLUMNS", "400")  # one line per option
    rc, out, err = call([command, "--help"], capsys)
    assert rc == 0, err
    lines = [" ".join(line.split()) for line in out.splitlines()]
    for group, takers in TAKERS.items():
        if command not in takers:
            continue
        assert any(group.panel in line for line in lines)
        for param in group_params(group).values():
            text = " ".join(param.help.replace("\\[", "[").split())
            assert any(param.opts[0] in line and text in line for line in lines), (param.opts[0], text)


def test_a_group_option_named_as_a_command_parameter_is_refused() -> None:
    def clash(seed: int, training: TrainOptions) -> None:
        """A command whose own --seed would hide the training --seed."""

    with pytest.raises(TypeError, match=r"clash: option names \['seed'\] are given twice"):
        takes_options(clash)


# -- the configuration, in order -------------------------------------------------------------
def test_config_applies_defaults_then_file_then_options_then_set(tmp_path: Path) -> None:
    config_file = tmp_path / "config.yaml"
    config_file.write_text(yaml.safe_dump({"lr": 0.01, "epochs": 3, "model": "mlp"}))
    config = TrainOptions(config=config_file, lr=0.02, model="lenet5", set_=["lr=0.03"],
                          pretrained="hub").to_config()
    assert (config.lr, config.epochs, config.model, config.pretrained) == (0.03, 3, "lenet5", True)
    assert config.batch_size == TrainConfig().batch_size  # neither in the file nor given: the default
    only_file = TrainOptions(config=config_file).to_config()
    assert (only_file.lr, only_file.epochs, only_file.model) == (0.01, 3, "mlp")


def test_config_on_a_base_keeps_what_is_not_given() -> None:
    base = TrainConfig(model="lenet5", epochs=2, lr=0.005, image_size=48)
    config = TrainOptions(epochs=4).to_config(base)
    assert (config.model, config.epochs, config.lr, config.image_size) == ("lenet5", 4, 0.005, 48)
    assert TrainOptions().to_config(base) == base


def test_spec_takes_every_dataset_option(tmp_path: Path) -> None:
    manifest = tmp_path / "labels.csv"
    manifest.write_text("filename,tags,plate,dose_Gy\na.tif,x;y,p1,1\nb.tif,y,p2,0\n")
    spec = DatasetOptions(image_col="filename", task=["tags:multilabel"], group=["plate"], delimiter=";",
                          where=["dose_Gy > 0"], drop_unlabeled=True, z="max", t="0", series=1).to_spec(manifest)
    assert [(t.name, t.type, t.delimiter) for t in spec.tasks] == [("tags", "multilabel", ";")]
    assert spec.groups == ["plate"] and spec.where == ["dose_Gy > 0"] and spec.drop_unlabeled
    assert (spec.image.z, spec.image.t, spec.image.series) == ("max", 0, 1)
    assert spec.load_manifest()["filename"].tolist() == ["a.tif"]


# -- options that commands lacked before they were shared ------------------------------------
@pytest.fixture(scope="module")
def lenet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LeNet-5 state dict for one channel at 32 x 32 and one two-class task."""
    path = tmp_path_factory.mktemp("weights") / "lenet5.pt"
    model = create_model("lenet5", in_chans=1, heads={"particle_type": 2}, image_size=32,
                         task_types={"particle_type": "single"})
    torch.save(model.state_dict(), path)
    return path


@pytest.mark.slow
def test_cv_takes_devices_strategy_precision_and_pretrained(bps_dir: Path, lenet_weights: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    common = ["cv", bps_dir, "--preset", "bps", "--task", "particle_type", "--model", "lenet5", "--epochs", "1",
              "--image-size", "32", "--folds", "2", "--tracker", "none", "--set", "tta=false",
              "--devices", "1", "--strategy", "auto", "--precision", "32-true"]
    rc, out, err = call([*common, "--pretrained", tmp_path / "missing.pt", "--out", tmp_path / "missing"], capsys)
    assert_one_error_line(rc, out, err, f"pretrained weight file '{tmp_path / 'missing.pt'}' does not exist")
    rc, out, err = call([*common, "--pretrained", lenet_weights, "--out", tmp_path / "cv"], capsys)
    assert rc == 0, out + err
    for fold in ("fold_0", "fold_1"):
        config = yaml.safe_load((tmp_path / "cv" / fold / "config.yaml").read_text())["train"]
        assert (config["devices"], config["strategy"], config["precision"], config["pretrained"]) == \
            (1, "auto", "32-true", str(lenet_weights))
    assert (tmp_path / "cv" / "cv.json").is_file()


@pytest.fixture(scope="module")
def tagged(bps_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(manifest, run)``: the simulated BPS images with a ';'-delimited multi-label column
    (particle type and dose), and an MLP run trained on it."""
    meta = pd.read_csv(bps_dir / "meta.csv")
    meta["tags"] = meta["particle_type"] + ";" + meta["dose_Gy"].map(lambda d: "dosed" if d > 0 else "sham")
    manifest = tmp_path_factory.mktemp("tagged") / "labels.csv"
    meta["filename"] = [str(bps_dir / name) for name in meta["filename"]]
    meta.to_csv(manifest, index=False)
    run = manifest.parent / "run"
    spec = DatasetOptions(image_col="filename", task=["tags:multilabel"], delimiter=";").to_spec(manifest)
    train(spec, dataclasses.replace(TINY_CONFIG, tasks=[]), run)
    return manifest, run


def test_evaluate_data_takes_where_and_delimiter(tagged: tuple[Path, Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    manifest, run = tagged
    rc, out, err = call(["evaluate", run, "--data", manifest, "--image-col", "filename", "--task", "tags:multilabel",
                         "--delimiter", ";", "--where", "dose_Gy > 0", "--out", tmp_path / "ev"], capsys)
    assert rc == 0, out + err
    metrics = yaml.safe_load((tmp_path / "ev" / "metrics.json").read_text())
    meta = pd.read_csv(manifest)
    assert metrics["evaluation"]["n_images"] == int((meta["dose_Gy"] > 0).sum()) < len(meta)
    predictions = pd.read_csv(tmp_path / "ev" / "predictions.csv")
    assert len(predictions) == metrics["evaluation"]["n_images"]


def test_evaluate_refuses_dataset_options_without_data(tagged: tuple[Path, Path],
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    _, run = tagged
    rc, out, err = call(["evaluate", run, "--where", "dose_Gy > 0", "--delimiter", ";"], capsys)
    assert rc == 2
    assert_one_error_line(rc, out, err, "--delimiter, --where given without --data",
                          "valid: the dataset options with --data SPEC")
    assert not (run / "evaluation").exists()



def test_sweep_takes_devices_and_refuses_more_than_one(bps_dir: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    sweep_file = tmp_path / "sweep.yaml"
    sweep_file.write_text(yaml.safe_dump({"method": "grid", "metric": {"name": "val/macro_f1", "goal": "maximize"},
                                          "parameters": {"lr": {"values": [0.001, 0.01]}}}))
    rc, out, err = call(["sweep", sweep_file, bps_dir, "--preset", "bps", "--task", "particle_type", "--devices", "2",
                         "--strategy", "ddp", "--tracker", "none", "--out", tmp_path / "out"], capsys)
    assert rc == 2
    assert_one_error_line(rc, out, err, "devices = 2 is invalid in a sweep", "valid: devices = 1")
