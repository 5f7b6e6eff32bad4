"""TrainConfig refuses a value of the wrong type or out of range with one clear message."""

from __future__ import annotations

from pathlib import Path

import pytest

from cellclass.errors import CellclassError
from cellclass.training.config import ConfigError, TrainConfig


@pytest.mark.parametrize(("values", "match"), [
    ({"norm_low": 99.9, "norm_high": 1}, r"norm_low = 99.9 and norm_high = 1.0 are invalid; valid: percentiles "
                                         r"with 0 <= norm_low < norm_high <= 100"),
    ({"norm_high": 100.5}, "norm_high = 100.5 are invalid"),
    ({"epochs": [1]}, r"epochs = \[1\] is invalid; valid: an integer"),
    ({"epochs": True}, "epochs = True is invalid; valid: an integer"),
    ({"lr": 0}, "lr = 0.0 is invalid; valid: a number > 0"),
    ({"lr": "fast"}, "lr = 'fast' is invalid; valid: a number"),
    ({"label_smoothing": 1.0}, r"label_smoothing = 1.0 is invalid; valid: a number >= 0 and < 1"),
    ({"weight_decay": -0.1}, "weight_decay = -0.1 is invalid; valid: a number >= 0"),
    ({"crop_scale": [0.9, 0.5]}, r"crop_scale = \[0.9, 0.5\] is invalid; valid: \[low, high\] with 0 < low <= high"),
    ({"channels": [0, -1]}, r"channels = \[0, -1\] is invalid; valid: channel indices >= 0"),
    ({"channels": ["dapi"]}, r"channels = \['dapi'\] is invalid; valid: a list of integers"),
    ({"task_weights": {"a": "x"}}, "task_weights = {'a': 'x'} is invalid; valid: a mapping of names to numbers"),
    ({"tta": "yes"}, "tta = 'yes' is invalid; valid: true or false"),
    ({"val_fraction": 0.5, "test_fraction": 0.5}, r"val_fraction \+ test_fraction = 0.5 \+ 0.5 is invalid"),
    ({"patience": -1}, "patience = -1 is invalid; valid: an integer >= 0"),
    ({"workers": 0}, "workers = 0 is invalid; valid: an integer >= 1"),
    ({"cache_dir": 3}, "cache_dir = 3 is invalid; valid: a string or null"),
])
def test_invalid_values_are_config_errors(values: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        TrainConfig(**values)
    assert isinstance(info.value, CellclassError) and isinstance(info.value, ValueError)


def test_numbers_are_normalised_not_refused() -> None:
    cfg = TrainConfig(lr=1, epochs=3.0, crop_scale=(0.5, 1.0))
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.epochs == 3 and isinstance(cfg.epochs, int)
    assert cfg.crop_scale == [0.5, 1.0]
    assert TrainConfig.from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_config_file_not_utf8_or_not_yaml(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_bytes("model: lenet5\nexperiment: caf\u00e9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match=r"config file '.*c\.yaml' is not UTF-8 text: line 2, column 16"):
        TrainConfig.from_yaml(path)
    path.write_text("model: [lenet5\n")
    with pytest.raises(ConfigError, match=r"config file '.*c\.yaml' is not valid YAML at line 2, column 1"):
        TrainConfig.from_yaml(path)
