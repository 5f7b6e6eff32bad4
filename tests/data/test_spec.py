"""DatasetSpec: YAML round trip, command-line specs, task parsing and every error path."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from cellclass.data.presets import load_spec
from cellclass.data.spec import (
    ControlSpec,
    DatasetSpec,
    DerivedColumn,
    ImageSpec,
    TaskSpec,
    parse_task_option,
    spec_from_manifest,
)
from cellclass.errors import LabelError, SpecError


def _manifest(tmp_path: Path, rows: list[dict], name: str = "labels.csv") -> Path:
    path = tmp_path / name
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


def test_labels_are_read_as_written_text(tmp_path: Path) -> None:
    path = _manifest(tmp_path, [{"f": "a.tif", "dose": "0.82"}, {"f": "b.tif", "dose": "1.0"}])
    spec = spec_from_manifest(path, image_col="f", tasks=["dose"])
    frame = spec.load_manifest()
    assert spec.labels(frame, "dose") == ["0.82", "1.0"]
    assert frame["_row"].tolist() == [1, 2]


def test_yaml_round_trip_keeps_paths_relative_to_the_yaml(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    _manifest(data, [{"file": "x.tif", "y": "a", "plate": "P1"}])
    spec = DatasetSpec(
        name="demo", manifest="labels.csv", image=ImageSpec(column="file", channels=["dna"]),
        tasks=[TaskSpec("y", ["y"], classes=["a", "b"])], groups=["plate"],
        derive={"p": DerivedColumn("file", r"^(\w)")}, controls=[ControlSpec("y", "a", "ctl")],
        base_dir=data,
    )
    yaml_path = spec.to_yaml(tmp_path / "specs" / "demo.yaml")
    back = DatasetSpec.from_yaml(yaml_path)
    assert back.manifest_path == (data / "labels.csv").resolve()
    assert back.image_root == data.resolve()
    assert back.tasks[0].classes == ["a", "b"]
    assert back.derive["p"].regex == r"^(\w)"
    assert back.load_manifest()["p"].tolist() == ["x"]
    assert back.controls[0].description == "ctl"


def test_multilabel_delimited_indices_and_indicator_columns() -> None:
    t = TaskSpec("loc", ["Target"], type="multilabel", classes=["a", "b", "c"], values="indices")
    assert t.parse({"Target": "0 2"}) == ["a", "c"]
    t2 = TaskSpec("loc", ["a", "b", "c"], type="multilabel")
    assert t2.parse({"a": "1", "b": "0", "c": "true"}) == ["a", "c"]
    t3 = TaskSpec("loc", ["tags"], type="multilabel", delimiter="|")
    assert t3.parse({"tags": "x|y"}) == ["x", "y"]


def test_single_task_joins_several_columns() -> None:
    t = TaskSpec("particle_dose", ["particle_type", "dose_Gy"])
    assert t.parse({"particle_type": "Fe", "dose_Gy": "0.82"}) == "Fe+0.82"
    assert t.parse({"particle_type": "Fe", "dose_Gy": ""}) is None


def test_binary_task_accepts_common_spellings() -> None:
    t = TaskSpec("has_focus", ["has_focus"], type="binary")
    assert [t.parse({"has_focus": v}) for v in ("1", "0", "yes", "False")] == ["1", "0", "1", "0"]
    with pytest.raises(LabelError, match=r"binary\) got 'maybe'; valid: 0/1"):
        t.parse({"has_focus": "maybe"})


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"type": "ordinal"}, r"invalid type 'ordinal'; valid: single, multilabel, binary"),
        ({"values": "codes"}, r"invalid values 'codes'; valid: names, indices"),
        ({"values": "indices"}, r"uses values: indices but declares no classes"),
    ],
)
def test_task_spec_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        TaskSpec("t", ["c"], **kwargs)


def test_index_out_of_range_is_a_label_error() -> None:
    t = TaskSpec("loc", ["Target"], type="multilabel", classes=["a", "b"], values="indices")
    with pytest.raises(LabelError, match=r"class index 5; valid: 0..1"):
        t.parse({"Target": "0 5"})
    with pytest.raises(LabelError, match=r"expects class indices, got 'x'"):
        t.parse({"Target": "x"})


def test_indicator_column_rejects_non_binary_values() -> None:
    t = TaskSpec("loc", ["a", "b"], type="multilabel")
    with pytest.raises(LabelError, match=r"column 'b' of task 'loc' holds '7'; valid: 0 or 1"):
        t.parse({"a": "1", "b": "7"})


def test_image_spec_errors() -> None:
    with pytest.raises(SpecError, match="exactly one of 'column'"):
        ImageSpec()
    with pytest.raises(SpecError, match="has no '{channel}' field"):
        ImageSpec(pattern="{Id}.png", channels=["a"])
    with pytest.raises(SpecError, match="needs a list of channels"):
        ImageSpec(pattern="{Id}_{channel}.png")
    with pytest.raises(SpecError, match="1 channel_keys for 2 channels"):
        ImageSpec(pattern="{Id}_{channel}.png", channels=["a", "b"], channel_keys=["1"])


def test_derived_column_errors() -> None:
    with pytest.raises(SpecError, match="is invalid"):
        DerivedColumn("f", "(")
    with pytest.raises(SpecError, match="needs a capture group"):
        DerivedColumn("f", "P\\d+")


def test_dataset_spec_errors(tmp_path: Path) -> None:
    img = ImageSpec(column="f")
    with pytest.raises(SpecError, match="declares no label task"):
        DatasetSpec(name="d", manifest="m.csv", image=img, tasks=[])
    with pytest.raises(SpecError, match=r"task\(s\) \['y'\] more than once"):
        DatasetSpec(name="d", manifest="m.csv", image=img, tasks=[TaskSpec("y", ["y"]), TaskSpec("y", ["z"])])
    with pytest.raises(SpecError, match="needs 'manifest'"):
        DatasetSpec(name="d", image=img, tasks=[TaskSpec("y", ["y"])])
    with pytest.raises(SpecError, match="layout 'zip' is invalid; valid: csv, folder"):
        DatasetSpec(name="d", manifest="m", layout="zip", image=img, tasks=[TaskSpec("y", ["y"])])
    spec = DatasetSpec(name="d", manifest="m.csv", image=img, tasks=[TaskSpec("y", ["y"])], base_dir=tmp_path)
    with pytest.raises(SpecError, match="has no task 'z'; valid: y"):
        spec.task("z")
    with pytest.raises(SpecError, match=r"manifest '.*m.csv' of dataset 'd' does not exist"):
        spec.load_manifest()


def test_missing_manifest_column_lists_available_ones(tmp_path: Path) -> None:
    path = _manifest(tmp_path, [{"f": "a.tif", "label": "x"}])
    spec = spec_from_manifest(path, image_col="filename", tasks=["label"])
    with pytest.raises(SpecError, match=r"lacks column\(s\) \['filename'\]; it has: f, label"):
        spec.load_manifest()


def test_yaml_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(SpecError, match="is not valid YAML"):
        DatasetSpec.from_yaml(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(SpecError, match="must hold a mapping, got list"):
        DatasetSpec.from_yaml(bad)
    bad.write_text("name: d\nmanifest: m.csv\nimage: {column: f}\ntasks: [{name: y, columns: [y]}]\ncolour: red\n")
    with pytest.raises(SpecError, match=r"unknown key\(s\) \['colour'\]"):
        DatasetSpec.from_yaml(bad)
    bad.write_text("name: d\nmanifest: m.csv\nimage: {column: f}\ntasks: [{name: y, columns: [y], kind: x}]\n")
    with pytest.raises(SpecError, match=r"task 0 has unknown key\(s\) \['kind'\]"):
        DatasetSpec.from_yaml(bad)
    with pytest.raises(SpecError, match="does not exist"):
        DatasetSpec.from_yaml(tmp_path / "nope.yaml")


def test_parse_task_option() -> None:
    assert parse_task_option("phenotype") == ("phenotype", "phenotype", "single")
    assert parse_task_option("Target:multilabel") == ("Target", "Target", "multilabel")
    assert parse_task_option("focus=has_focus:binary") == ("focus", "has_focus", "binary")
    with pytest.raises(SpecError, match="invalid type 'multi'"):
        parse_task_option("x:multi")


def test_load_spec_resolves_every_source(tmp_path: Path) -> None:
    path = _manifest(tmp_path, [{"Image": "a.png", "Label": "x"}])
    from_csv = load_spec(path, image_col="Image", tasks=["Label"], groups=["Label"])
    assert from_csv.task_names == ["Label"] and from_csv.groups == ["Label"]
    yaml_path = from_csv.to_yaml(tmp_path / "cellclass.yaml")
    assert load_spec(yaml_path).task_names == ["Label"]
    assert load_spec(tmp_path).task_names == ["Label"]  # folder holding cellclass.yaml
    assert load_spec(tmp_path, preset_name="csv").task_names == ["label"]
    with pytest.raises(SpecError, match="without --image-col"):
        load_spec(path, tasks=["Label"])
    with pytest.raises(SpecError, match="given without --task"):
        load_spec(path, image_col="Image")
    with pytest.raises(SpecError, match="does not exist"):
        load_spec(tmp_path / "missing.csv")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SpecError, match="pass --preset"):
        load_spec(empty)
    with pytest.raises(SpecError, match="unknown preset 'cellpainting'; valid: bps, hpa"):
        load_spec(empty, preset_name="cellpainting")


def test_where_filters_rows_and_keeps_row_numbers(tmp_path: Path) -> None:
    path = _manifest(tmp_path, [{"f": f"{i}.tif", "dose": d, "kind": k}
                                for i, (d, k) in enumerate([("0", "Fe"), ("0.82", "Fe"), ("1.0", "X-ray")])])
    spec = spec_from_manifest(path, image_col="f", tasks=["kind"])
    spec.where = ["dose > 0"]
    frame = spec.load_manifest()
    assert frame["_row"].tolist() == [2, 3]
    spec.where = ["kind == X-ray", "dose >= 1"]
    assert spec.load_manifest()["_row"].tolist() == [3]
    spec.where = ["kind != 'Fe'"]
    assert spec.load_manifest()["_row"].tolist() == [3]


@pytest.mark.parametrize(
    ("expression", "match"),
    [
        ("dose 0", r"row filter 'dose 0' is invalid; valid: 'COLUMN OP VALUE'"),
        ("colour == red", r"names no column 'colour'"),
        ("kind > Fe", r"compares column 'kind', which is not numeric, with >"),
    ],
)
def test_where_errors(tmp_path: Path, expression: str, match: str) -> None:
    path = _manifest(tmp_path, [{"f": "a.tif", "dose": "0", "kind": "Fe"}])
    spec = spec_from_manifest(path, image_col="f", tasks=["kind"])
    spec.where = [expression]
    with pytest.raises(SpecError, match=match):
        spec.load_manifest()


@pytest.mark.parametrize(("content", "match"), [
    (b"", r"manifest '.*m\.csv' is empty \(0 bytes\); valid: a CSV with a header row"),
    (b"\n  \n", r"is empty \(4 bytes\)"),
    ("f,y\na.tif,x\nb.tif,caf\u00e9\n".encode("latin-1"),
     r"is not UTF-8 text: data row 2 \(line 3, column 10\) holds the byte 0xe9; valid: UTF-8 text"),
    ("f,\u00e9\na.tif,x\n".encode("latin-1"), r"the header \(line 1, column 3\) holds the byte 0xe9"),
    (b"f,y\n\na.tif,x\n\nb\xff.tif,y\n", r"data row 2 \(line 5, column 2\)"),  # blank lines are no rows
    (b"f,y\na.tif,x,surplus\n", r"data row 1 \(line 2\) has 3 fields, the header 2; valid: one field per header"),
    (b"f,y\na.tif,x\nb.tif,y,z,w\n", r"is not valid CSV: Expected 2 fields in line 3, saw 4"),
])
def test_manifest_read_errors_name_the_row_and_line(tmp_path: Path, content: bytes, match: str) -> None:
    (tmp_path / "m.csv").write_bytes(content)
    spec = spec_from_manifest(tmp_path / "m.csv", image_col="f", tasks=["y"])
    with pytest.raises(SpecError, match=match):
        spec.load_manifest()


def test_manifest_trailing_empty_fields_and_bom_are_read(tmp_path: Path) -> None:
    (tmp_path / "m.csv").write_bytes("\ufefff,y\na.tif,x,\nb.tif,y,\n".encode())
    frame = spec_from_manifest(tmp_path / "m.csv", image_col="f", tasks=["y"]).load_manifest()
    assert frame["f"].tolist() == ["a.tif", "b.tif"] and frame["y"].tolist() == ["x", "y"]


def test_yaml_spec_that_is_not_utf8_names_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_bytes("name: d\nmanifest: caf\u00e9.csv\n".encode("latin-1"))
    with pytest.raises(SpecError, match=r"dataset spec '.*bad\.yaml' is not UTF-8 text: line 2, column 14"):
        DatasetSpec.from_yaml(bad)
    bad.write_text("name: d\n  manifest: [x\n")
    with pytest.raises(SpecError, match=r"is not valid YAML at line 2, column 11: "):
        DatasetSpec.from_yaml(bad)
