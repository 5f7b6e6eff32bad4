"""Tests of cellclass.models: registry, LeNet-5, timm backbones, weights, baselines."""

from __future__ import annotations

import logging
import pickle
import time

import joblib
import numpy as np
import pytest
import torch
import yaml
from sklearn.base import clone
from sklearn.exceptions import NotFittedError

from cellclass.errors import LabelError, ModelError
from cellclass.models import (
    LeNet5,
    ModelInfo,
    PixelBaseline,
    TimmNetwork,
    count_parameters,
    create_model,
    is_baseline,
    is_model,
    list_models,
    model_info,
)
from cellclass.models import timm_backbone
from cellclass.models.baselines import area_downsample

HEADS = {"particle": 3, "dose": 4}


def _outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    model.eval()
    with torch.no_grad():
        return model(x)


# --- registry ---------------------------------------------------------------------------


def test_list_models_holds_cellclass_and_timm_names() -> None:
    names = list_models()
    assert names[:4] == ["lenet5", "logreg", "mlp", "svm"]
    for name in ("resnet18", "densenet121", "inception_resnet_v2", "efficientnet_b0"):
        assert name in names
    assert len(names) == len(set(names)) > 500


def test_list_models_pattern() -> None:
    assert list_models("lenet*") == ["lenet5"]
    resnets = list_models("resnet1*")
    assert "resnet18" in resnets
    assert all(n.startswith("resnet1") for n in resnets)
    assert list_models("no_such_model*") == []


def test_list_models_pretrained_lists_tags_only() -> None:
    tagged = list_models("resnet18.*", pretrained=True)
    assert "resnet18.tv_in1k" in tagged
    assert "lenet5" not in list_models(pretrained=True)


def test_unknown_name_lists_close_matches() -> None:
    with pytest.raises(ModelError, match=r"unknown model name 'resnt18' \(did you mean 'resnet18'.*\?\); valid.*cellclass models"):
        create_model("resnt18", 1, HEADS)


def test_unknown_name_without_close_match() -> None:
    with pytest.raises(ModelError, match=r"unknown model name 'zzzzqqq'; valid names are"):
        is_baseline("zzzzqqq")


@pytest.mark.parametrize("name", ["", None, 3])
def test_name_must_be_a_string(name: object) -> None:
    with pytest.raises(ModelError, match="model name must be a non-empty string"):
        create_model(name, 1, HEADS)  # type: ignore[arg-type]


def test_is_baseline_and_is_model() -> None:
    assert is_baseline("mlp") and is_baseline("svm") and is_baseline("logreg")
    assert not is_baseline("lenet5") and not is_baseline("resnet18")
    assert is_model("resnet18.tv_in1k") and is_model("lenet5")
    assert not is_model("resnt18")


def test_model_info() -> None:
    info = model_info("lenet5")
    assert info == ModelInfo("lenet5", "network", "cellclass", info.description)
    assert "LeNet-5" in info.description
    assert model_info("logreg").kind == "baseline"
    timm_info = model_info("resnet18")
    assert (timm_info.kind, timm_info.source) == ("network", "timm")
    assert "resnet18.tv_in1k" in timm_info.pretrained_tags
    assert model_info("resnet18.tv_in1k").pretrained_tags == ("resnet18.tv_in1k",)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"in_chans": 0}, r"in_chans must be a positive integer, got 0"),
        ({"in_chans": True}, r"in_chans must be a positive integer, got True"),
        ({"heads": {}}, r"heads must be a non-empty mapping.*got \{\}"),
        ({"heads": ["a"]}, r"heads must be a non-empty mapping.*got \['a'\]"),
        ({"heads": {"a": 0}}, r"outputs of task 'a' must be a positive integer, got 0"),
        ({"heads": {"a.b": 2}}, r"task name must be a non-empty string without '\.', got 'a\.b'"),
        ({"heads": {"items": 2}}, r"task name 'items' clashes"),
        ({"image_size": 0}, r"image_size must be a positive int.*got 0"),
        ({"image_size": (32, 32, 3)}, r"image_size must be.*got \(32, 32, 3\)"),
        ({"pretrained": 1.5}, r"pretrained must be False, True or a path.*got 1\.5"),
        ({"task_types": {"nope": "single"}}, r"task_types names task\(s\) \['nope'\].*\['a'\]"),
        ({"task_types": {"a": "soft"}}, r"type of task 'a' must be one of .*got 'soft'"),
        ({"heads": {"a": 1}}, r"single-label task 'a' needs at least 2 outputs.*got 1"),
        ({"task_types": {"a": "binary"}, "heads": {"a": 3}}, r"binary task 'a' needs 1.*got 3"),
        ({"drop_rate": 1.5}, r"drop_rate must be a number in \[0, 1\), got 1\.5"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    args = {"name": "lenet5", "in_chans": 1, "heads": {"a": 2}, "image_size": 32} | kwargs
    with pytest.raises(ModelError, match=match):
        create_model(**args)


# --- LeNet-5 ------------------------------------------------------------------------------


@pytest.mark.parametrize("in_chans", [1, 3, 6])
@pytest.mark.parametrize("size", [32, 64, 100])
def test_lenet5_output_shapes(in_chans: int, size: int) -> None:
    model = create_model("lenet5", in_chans, HEADS, image_size=size)
    assert isinstance(model, LeNet5)
    out = _outputs(model, torch.randn(2, in_chans, size, size))
    assert list(out) == ["particle", "dose"]
    assert out["particle"].shape == (2, 3) and out["dose"].shape == (2, 4)


def test_lenet5_rectangular_images() -> None:
    model = create_model("lenet5", 2, HEADS, image_size=(40, 72))
    assert _outputs(model, torch.randn(3, 2, 40, 72))["dose"].shape == (3, 4)
    assert model.config["image_size"] == [40, 72]


def test_lenet5_has_the_classic_parameter_count() -> None:
    # LeNet-5 on 1x32x32 with 10 classes: 61,706 parameters (C3 fully connected).
    model = create_model("lenet5", 1, {"digit": 10}, image_size=32)
    assert count_parameters(model) == 61706
    model.heads["digit"].weight.requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == 61706 - 840


def test_lenet5_errors() -> None:
    with pytest.raises(ModelError, match=r"at least 16x16 pixels, got image_size \(12, 12\)"):
        create_model("lenet5", 1, HEADS, image_size=12)
    with pytest.raises(ModelError, match=r"unknown argument\(s\) \['width'\]; valid.*drop_rate"):
        create_model("lenet5", 1, HEADS, width=2)
    with pytest.raises(ModelError, match="lenet5 has no published pretrained weights"):
        create_model("lenet5", 1, HEADS, pretrained=True)


def test_lenet5_pretrained_path_loads_body_not_heads(tmp_path) -> None:
    source = create_model("lenet5", 2, {"old": 5}, image_size=32)
    path = tmp_path / "lenet.pth"
    torch.save(source.state_dict(), path)
    model = create_model("lenet5", 2, HEADS, image_size=32, pretrained=path)
    for key, value in source.state_dict().items():
        if not key.startswith("heads."):
            assert torch.equal(model.state_dict()[key], value), key
    assert "pretrained" not in model.config


# --- timm backbones -------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0"])
@pytest.mark.parametrize("in_chans", [1, 6])
def test_timm_output_shapes(name: str, in_chans: int) -> None:
    model = create_model(name, in_chans, HEADS, image_size=32)
    assert isinstance(model, TimmNetwork) and model.name == name
    out = _outputs(model, torch.randn(2, in_chans, 32, 32))
    assert out["particle"].shape == (2, 3) and out["dose"].shape == (2, 4)
    assert model.backbone.pretrained_cfg["architecture"] == name


def test_mlp_head_pools_average_and_max_then_a_hidden_layer() -> None:
    model = create_model("resnet18", 2, HEADS, image_size=32, head="mlp")
    assert model.num_features == 1024  # ResNet18's 512 channels, average and max concatenated
    assert [type(m).__name__ for m in model.neck] == ["BatchNorm1d", "Dropout", "Linear", "ReLU", "BatchNorm1d",
                                                      "Dropout"]
    assert model.heads["dose"].in_features == 512
    assert model.config["head"] == "mlp" and "global_pool" not in model.config
    model.eval()
    out = _outputs(model, torch.randn(3, 2, 32, 32))
    assert out["particle"].shape == (3, 3) and out["dose"].shape == (3, 4)
    assert "head" not in create_model("resnet18", 2, HEADS, image_size=32).config
    with pytest.raises(ModelError, match=r"head = 'deep' is invalid; valid: linear, mlp"):
        create_model("resnet18", 2, HEADS, image_size=32, head="deep")


def test_timm_transformer_gets_image_size() -> None:
    model = create_model("vit_tiny_patch16_224", 1, {"a": 2}, image_size=32)
    assert _outputs(model, torch.randn(1, 1, 32, 32))["a"].shape == (1, 2)


def test_timm_errors() -> None:
    with pytest.raises(ModelError, match=r"does not accept the argument\(s\) \['bogus'\]"):
        create_model("resnet18", 1, HEADS, image_size=32, bogus=1)
    with pytest.raises(ModelError, match=r"\['num_classes'\] are set by cellclass"):
        create_model("resnet18", 1, HEADS, image_size=32, num_classes=3)
    with pytest.raises(ModelError, match=r"cannot process images of image_size \(8, 8\)"):
        create_model("vit_tiny_patch16_224", 1, HEADS, image_size=8, img_size=32)


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("lenet5", {"drop_rate": 0.2, "task_types": {"particle": "single", "dose": "multilabel"}}),
        ("resnet18", {"drop_rate": 0.1, "drop_path_rate": 0.05}),
        ("resnet18", {"head": "mlp", "stem_pool": False}),
        ("resnet18", {"zero_init_last": False}),
    ],
)
def test_config_round_trip(name: str, kwargs: dict) -> None:
    model = create_model(name, 3, HEADS, image_size=(32, 48), **kwargs)
    config = model.config
    assert yaml.safe_load(yaml.safe_dump(config)) == config
    assert {"name", "in_chans", "heads", "image_size"} <= set(config)
    rebuilt = create_model(**yaml.safe_load(yaml.safe_dump(config)))
    assert rebuilt.config == config
    assert type(rebuilt) is type(model)
    rebuilt.load_state_dict(model.state_dict())  # strict: same architecture
    x = torch.randn(2, 3, 32, 48)
    a, b = _outputs(model, x), _outputs(rebuilt, x)
    assert all(torch.equal(a[t], b[t]) for t in HEADS)
    model.config["heads"]["particle"] = 99  # a copy: the model's own config is untouched
    assert model.config["heads"]["particle"] == 3


# --- pretrained weights ---------------------------------------------------------------------


@pytest.fixture
def offline_caches(tmp_path, monkeypatch):
    """Empty Hugging Face and torch hub caches, so no test sees real cached weights."""
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "hf"


def test_pretrained_true_offline_fails_fast(offline_caches, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(
        ModelError,
        match=r"pretrained weights for 'resnet18' must be downloaded from the Hugging Face "
        r"hub \(timm/resnet18\..*\), which is unreachable \(HF_HUB_OFFLINE is set\).*"
        r"pretrained=PATH",
    ):
        create_model("resnet18", 1, HEADS, image_size=32, pretrained=True)
    assert time.monotonic() - start < 10


def test_pretrained_true_unreachable_hub_fails_fast(offline_caches, monkeypatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(timm_backbone, "_host_reachable", lambda host, port: False)
    start = time.monotonic()
    with pytest.raises(ModelError, match=r"unreachable \(cannot connect to huggingface\.co:443\)"):
        create_model("resnet18", 1, HEADS, image_size=32, pretrained=True)
    assert time.monotonic() - start < 10


def test_host_probe_is_bounded() -> None:
    start = time.monotonic()
    # A reserved TEST-NET address: unroutable, so only the timeout can end the probe.
    assert timm_backbone._host_reachable("192.0.2.1", 443, timeout=0.5) is False
    assert time.monotonic() - start < 3


def test_pretrained_true_uses_local_hub_cache(offline_caches, monkeypatch) -> None:
    from safetensors.torch import save_file
    from timm import create_model as timm_create

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = timm_create("resnet18", num_classes=1000)
    snapshot = offline_caches / "models--timm--resnet18.a1_in1k" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    save_file(source.state_dict(), str(snapshot / "model.safetensors"))
    model = create_model("resnet18", 3, HEADS, image_size=32, pretrained=True)
    assert torch.equal(model.backbone.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_pretrained_true_without_hub_weights() -> None:
    with pytest.raises(ModelError, match=r"timm has no pretrained weights for 'nf_resnet26'"):
        create_model("nf_resnet26", 1, HEADS, image_size=32, pretrained=True)


@pytest.fixture(scope="module")
def rgb_resnet18():
    """A 3-channel resnet18 with its 1000-class classifier, as hub weights come."""
    from timm import create_model as timm_create

    torch.manual_seed(0)
    return timm_create("resnet18", num_classes=1000, in_chans=3)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
@pytest.mark.parametrize("in_chans", [1, 5])
def test_pretrained_path_adapts_rgb_stem(rgb_resnet18, tmp_path, suffix, in_chans) -> None:
    from timm.models import adapt_input_conv

    state = rgb_resnet18.state_dict()
    path = tmp_path / f"resnet18{suffix}"
    if suffix == ".pth":
        torch.save(state, path)
    else:
        from safetensors.torch import save_file

        save_file(state, str(path))
    model = create_model("resnet18", in_chans, HEADS, image_size=32, pretrained=path)
    stem = model.backbone.conv1.weight
    assert stem.shape == (64, in_chans, 7, 7)
    assert torch.allclose(stem, adapt_input_conv(in_chans, state["conv1.weight"]))
    if in_chans == 1:
        assert torch.allclose(stem, state["conv1.weight"].sum(dim=1, keepdim=True))
    loaded = model.backbone.state_dict()
    for key, value in state.items():
        if key != "conv1.weight" and not key.startswith("fc."):
            assert torch.equal(loaded[key], value), key
    assert _outputs(model, torch.randn(2, in_chans, 32, 32))["dose"].shape == (2, 4)


def test_pretrained_path_from_cellclass_network(tmp_path) -> None:
    source = create_model("resnet18", 2, {"old": 7}, image_size=32)
    path = tmp_path / "net.pt"
    torch.save({"state_dict": source.state_dict(), "epoch": 3}, path)
    model = create_model("resnet18", 2, HEADS, image_size=32, pretrained=path)
    assert torch.equal(model.backbone.conv1.weight, source.backbone.conv1.weight)


def test_pretrained_path_logs_unused_and_missing_keys(rgb_resnet18, tmp_path, caplog) -> None:
    state = dict(rgb_resnet18.state_dict())
    state["extra.weight"] = torch.zeros(3)
    del state["layer4.1.bn2.bias"]
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with caplog.at_level(logging.WARNING, logger="cellclass.models.network"):
        create_model("resnet18", 1, HEADS, image_size=32, pretrained=path)
    assert "1 tensor(s) in" in caplog.text and "extra.weight" in caplog.text
    assert "layer4.1.bn2.bias" in caplog.text and "random initialisation" in caplog.text
    assert "fc.weight" not in caplog.text  # the original classifier is ignored quietly


def test_pretrained_path_errors(rgb_resnet18, tmp_path) -> None:
    with pytest.raises(ModelError, match=r"weight file '.*missing\.pth' does not exist"):
        create_model("resnet18", 1, HEADS, image_size=32, pretrained=tmp_path / "missing.pth")

    bad_shape = dict(rgb_resnet18.state_dict())
    bad_shape["layer1.0.conv1.weight"] = torch.zeros(32, 64, 3, 3)
    torch.save(bad_shape, tmp_path / "bad.pth")
    with pytest.raises(
        ModelError,
        match=r"weight 'layer1\.0\.conv1\.weight' in .* has shape \(32, 64, 3, 3\) but "
        r"resnet18 as built here expects \(64, 64, 3, 3\)",
    ):
        create_model("resnet18", 1, HEADS, image_size=32, pretrained=tmp_path / "bad.pth")

    torch.save({"foo.weight": torch.zeros(2)}, tmp_path / "other.pth")
    with pytest.raises(ModelError, match=r"none of the 1 tensors in .* matches a weight"):
        create_model("resnet18", 1, HEADS, image_size=32, pretrained=tmp_path / "other.pth")

    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ModelError, match=r"cannot read weights from .*junk\.pth"):
        create_model("resnet18", 1, HEADS, image_size=32, pretrained=tmp_path / "junk.pth")

    torch.save([1, 2, 3], tmp_path / "list.pth")
    with pytest.raises(ModelError, match=r"holds no state dict .* got list"):
        create_model("resnet18", 1, HEADS, image_size=32, pretrained=tmp_path / "list.pth")


def test_pretrained_path_non_rgb_stem_is_not_adapted(tmp_path) -> None:
    source = create_model("resnet18", 2, {"a": 2}, image_size=32)
    torch.save(source.state_dict(), tmp_path / "two.pth")
    with pytest.raises(ModelError, match=r"'conv1\.weight' .* shape \(64, 2, 7, 7\) .* \(64, 4, 7, 7\)"):
        create_model("resnet18", 4, HEADS, image_size=32, pretrained=tmp_path / "two.pth")


# --- baselines ------------------------------------------------------------------------------


def _synthetic(n: int, seed: int, in_chans: int = 2, size: int = 16):
    """Images whose bright quadrant gives the class and channel-1 offset a binary flag."""
    rng = np.random.default_rng(seed)
    X = rng.normal(0.0, 1.0, (n, in_chans, size, size)).astype(np.float32)
    shape = rng.integers(0, 3, n)
    flag = rng.integers(0, 2, n)
    half = size // 2
    corners = [(slice(0, half), slice(0, half)), (slice(0, half), slice(half, None)),
               (slice(half, None), slice(0, half))]
    for i in range(n):
        rows, cols = corners[shape[i]]
        X[i, :, rows, cols] += 2.0
        X[i, -1] += 1.5 * flag[i]
    return X, {"shape": shape, "flag": flag}


BASE_HEADS = {"shape": 3, "flag": 1}
BASE_TYPES = {"shape": "single", "flag": "binary"}


@pytest.mark.parametrize("name", ["mlp", "svm", "logreg"])
def test_baseline_learns_separable_data(name: str) -> None:
    X, y = _synthetic(120, seed=0)
    X_test, y_test = _synthetic(60, seed=1)
    model = create_model(name, 2, BASE_HEADS, image_size=16, task_types=BASE_TYPES)
    assert isinstance(model, PixelBaseline) and model.name == name
    assert model.fit(X, y) is model
    proba = model.predict_proba(X_test)
    assert proba["shape"].shape == (60, 3) and proba["flag"].shape == (60, 1)
    np.testing.assert_allclose(proba["shape"].sum(axis=1), 1.0, rtol=1e-6)
    pred = model.predict(X_test)
    assert (pred["shape"] == y_test["shape"]).mean() > 0.9
    assert (pred["flag"] == y_test["flag"]).mean() > 0.9
    assert model.feature_size_ == (16, 16)
    assert count_parameters(model) > 0


def test_baseline_downsamples_to_pixels() -> None:
    X, y = _synthetic(90, seed=2, size=40)
    model = create_model("logreg", 2, BASE_HEADS, image_size=40, task_types=BASE_TYPES, pixels=8)
    model.fit(X, y)
    assert model.feature_size_ == (8, 8)
    assert model.scaler_.mean_.shape == (2 * 8 * 8,)
    X_test, y_test = _synthetic(40, seed=3, size=40)
    assert (model.predict(X_test)["shape"] == y_test["shape"]).mean() > 0.9


def test_binary_task_with_two_outputs() -> None:
    X, y = _synthetic(60, seed=4)
    model = create_model("logreg", 2, {"shape": 3, "flag": 2}, task_types=BASE_TYPES)
    proba = model.fit(X, y).predict_proba(X)
    assert proba["flag"].shape == (60, 2)
    np.testing.assert_allclose(proba["flag"].sum(axis=1), 1.0)


@pytest.mark.parametrize("name", ["logreg", "svm"])
def test_multilabel_baseline(name: str) -> None:
    rng = np.random.default_rng(5)
    n, size = 100, 16
    X = rng.normal(0.0, 1.0, (n, 1, size, size)).astype(np.float32)
    Y = rng.integers(0, 2, (n, 5))
    Y[:, 3] = 0  # a label never seen positive
    Y[:, 4] = 1  # a label always positive
    for j in range(3):
        X[Y[:, j] == 1, 0, j * 5 : j * 5 + 5, :] += 2.0
    model = create_model(
        name, 1, {"organelles": 5}, image_size=size, task_types={"organelles": "multilabel"}
    )
    model.fit(X[:70], {"organelles": Y[:70]})
    proba = model.predict_proba(X[70:])["organelles"]
    assert proba.shape == (30, 5)
    assert np.all(proba[:, 3] == 0.0) and np.all(proba[:, 4] == 1.0)
    pred = model.predict(X[70:])["organelles"]
    assert pred.shape == (30, 5) and set(np.unique(pred)) <= {0, 1}
    assert (pred[:, :3] == Y[70:, :3]).mean() > 0.9


def test_svm_handles_classes_seen_once_or_twice() -> None:
    X, y = _synthetic(40, seed=11)
    shape = np.zeros(40, dtype=int)
    shape[:2] = 1  # two images: 2-fold calibration
    shape[2] = 2  # one image: calibrated on the training decisions
    model = create_model("svm", 2, {"shape": 3}).fit(X, {"shape": shape})
    proba = model.predict_proba(X)["shape"]
    assert proba.shape == (40, 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert count_parameters(model) > 2 * 16 * 16 * 2  # scaler + support vectors
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.predict_proba(X)["shape"], proba)
    two = model.fit(X, {"shape": np.where(shape == 2, 1, shape)})
    assert two.predict_proba(X)["shape"].shape == (40, 3)


def test_missing_labels_and_single_class_tasks() -> None:
    X, y = _synthetic(60, seed=6)
    shape = y["shape"].copy()
    shape[:10] = -1  # unknown for these images
    only_one = np.full(60, 2)  # training saw only class 2 of 3
    model = create_model("logreg", 2, {"shape": 3, "stage": 3})
    proba = model.fit(X, {"shape": shape, "stage": only_one}).predict_proba(X)
    np.testing.assert_array_equal(proba["stage"], np.tile([0.0, 0.0, 1.0], (60, 1)))
    assert (proba["shape"].argmax(1) == y["shape"]).mean() > 0.9


def test_single_task_accepts_bare_label_array() -> None:
    X, y = _synthetic(40, seed=7)
    model = create_model("logreg", 2, {"shape": 3}).fit(X, y["shape"])
    assert model.predict(X)["shape"].shape == (40,)


@pytest.mark.parametrize("name", ["mlp", "svm", "logreg"])
def test_baseline_pickle_round_trip(name: str, tmp_path) -> None:
    X, y = _synthetic(45, seed=8)
    model = create_model(name, 2, BASE_HEADS, task_types=BASE_TYPES).fit(X, y)
    joblib.dump(model, tmp_path / "model.joblib")
    for restored in (joblib.load(tmp_path / "model.joblib"), pickle.loads(pickle.dumps(model))):
        a, b = model.predict_proba(X), restored.predict_proba(X)
        for task in BASE_HEADS:
            np.testing.assert_array_equal(a[task], b[task])


def test_baseline_config_and_clone() -> None:
    model = create_model(
        "mlp", 2, BASE_HEADS, image_size=(16, 24), task_types=BASE_TYPES,
        hidden_layer_sizes=[32], max_iter=50,
    )
    config = model.config
    assert config["name"] == "mlp" and config["image_size"] == [16, 24]
    assert yaml.safe_load(yaml.safe_dump(config)) == config
    rebuilt = create_model(**config)
    assert rebuilt.get_params() == model.get_params()
    assert clone(model).get_params() == model.get_params()
    assert count_parameters(rebuilt) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"C": 2.0, "depth": 3}, r"baseline 'logreg' got unknown argument\(s\) \['depth'\]; valid"),
        ({"pretrained": True}, r"baseline 'logreg' has no pretrained weights, got pretrained=True"),
        ({"pixels": 0}, r"pixels must be a positive int or \(height, width\), got 0"),
    ],
)
def test_baseline_creation_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ModelError, match=match):
        create_model("logreg", 2, BASE_HEADS, task_types=BASE_TYPES, **kwargs)


def test_baseline_fit_errors() -> None:
    X, y = _synthetic(20, seed=9)
    model = create_model("logreg", 2, BASE_HEADS, task_types=BASE_TYPES)
    with pytest.raises(NotFittedError):
        model.predict_proba(X)
    with pytest.raises(ModelError, match=r"expects numeric images of shape \(N, 2, H, W\), got .*\(20, 16, 16\)"):
        model.fit(X[:, 0], y)
    with pytest.raises(ModelError, match=r"expects numeric images of shape \(N, 2, H, W\), got .*\(20, 3, 16, 16\)"):
        model.fit(np.concatenate([X, X[:, :1]], axis=1), y)
    with pytest.raises(LabelError, match=r"no labels for task\(s\) \['flag'\]"):
        model.fit(X, {"shape": y["shape"]})
    with pytest.raises(LabelError, match=r"y must be a dict task → labels .* got ndarray"):
        model.fit(X, y["shape"])
    with pytest.raises(LabelError, match=r"single task 'shape' must be integers .* \[0, 3\).*values \[0, 1, 2, 5\]"):
        model.fit(X, {"shape": np.r_[y["shape"][:-1], 5], "flag": y["flag"]})
    with pytest.raises(LabelError, match=r"binary task 'flag' must be integers .* \[0, 2\)"):
        model.fit(X, {"shape": y["shape"], "flag": y["flag"] + 1})
    with pytest.raises(LabelError, match=r"task 'flag' has no known label"):
        model.fit(X, {"shape": y["shape"], "flag": np.full(20, -1)})
    multi = create_model("logreg", 2, {"m": 3}, task_types={"m": "multilabel"})
    with pytest.raises(LabelError, match=r"multi-label task 'm' must be a 0/1 array of shape \(20, 3\), got shape \(20,\)"):
        multi.fit(X, {"m": y["shape"]})
    with pytest.raises(ModelError, match=r"count_parameters needs a network or a baseline .* got object"):
        count_parameters(object())


def test_area_downsample() -> None:
    rng = np.random.default_rng(10)
    X = rng.normal(size=(2, 3, 8, 12)).astype(np.float32)
    blocks = X.reshape(2, 3, 4, 2, 4, 3).mean(axis=(3, 5))
    np.testing.assert_allclose(area_downsample(X, (4, 4)), blocks, rtol=1e-5, atol=1e-6)
    odd = area_downsample(X, (3, 5))  # fractional bins
    assert odd.shape == (2, 3, 3, 5) and odd.dtype == np.float32
    np.testing.assert_allclose(odd.mean(axis=(2, 3)), X.mean(axis=(2, 3)), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(area_downsample(np.ones((1, 1, 7, 9)), (3, 4)), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(area_downsample(X, (8, 12)), X)


def test_zero_init_last_starts_residual_blocks_as_identity_or_not() -> None:
    """timm zero-initialises each block's last BatchNorm; ``zero_init_last=False`` does not."""
    def last_bn(model) -> torch.Tensor:
        return next(p for n, p in model.named_parameters() if n.endswith("layer1.0.bn2.weight"))

    assert torch.count_nonzero(last_bn(create_model("resnet18", 1, HEADS, image_size=32))) == 0
    assert torch.all(last_bn(create_model("resnet18", 1, HEADS, image_size=32, zero_init_last=False)) == 1)


@pytest.mark.parametrize("name", ["efficientnet_b0", "convnext_atto"])
def test_zero_init_last_false_builds_models_that_never_zero_a_block(name: str) -> None:
    model = create_model(name, 2, HEADS, image_size=32, zero_init_last=False)
    assert model.config["zero_init_last"] is False
    assert create_model(**model.config).config == model.config
