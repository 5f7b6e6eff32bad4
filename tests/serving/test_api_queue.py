"""The labelling queue in this process (FastAPI's TestClient): a ranking of the served run's own
predictions, listed, shown, labelled as pending contributions, and remembered across restarts.

The browser side (labelling with keys, the curator's review in the page) is in
``test_serve_queue_web.py``.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fastapi.testclient import TestClient
from serve_helpers import api_settings, auth, contribute, run_cellclass, write_ranking

from cellclass.data.io import read_image
from cellclass.errors import ConflictError, QueueError, ServiceError
from cellclass.serving.app import create_app
from cellclass.serving.display import display_array
from cellclass.serving.labelling import read_ranking
from cellclass.serving.settings import ServeSettings

TASKS = [{"name": "particle_type", "type": "single", "classes": ["Fe", "X-ray"]}]
N_ITEMS = 12


def one_line_detail(response) -> str:
    """The ``detail`` of an error answer, checked to be the whole body and one line."""
    body = response.json()
    assert set(body) == {"detail"} and isinstance(body["detail"], str) and "\n" not in body["detail"], body
    return body["detail"]


@pytest.fixture(scope="module")
def pool_names(bps_dir: Path) -> list[str]:
    """The first images of the simulated BPS set: the pool the queue ranks."""
    return pd.read_csv(bps_dir / "meta.csv", dtype=str)["filename"].tolist()[:N_ITEMS]


@pytest.fixture(scope="module")
def ranking(api_run: Path, bps_dir: Path, pool_names: list[str], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ranking of the pool by the served run's least confidence, paths relative to the pool."""
    return write_ranking(api_run, bps_dir, pool_names, tmp_path_factory.mktemp("ranking") / "rank.csv")


def start(api_run: Path, state: Path, ranking: Path, pool: Path) -> TestClient:
    """A started app serving ``ranking`` with its state in ``state`` (leave with ``__exit__``)."""
    return TestClient(create_app(api_settings(api_run, state, queue=ranking, pool=pool))).__enter__()


@pytest.fixture(scope="module")
def queue_api(api_run: Path, bps_dir: Path, ranking: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator:
    """The app serving :func:`ranking`, and a key per role (two contribute keys)."""
    client = start(api_run, tmp_path_factory.mktemp("queue-state"), ranking, bps_dir)
    store = client.app.state.service.keys
    keys = {"predict": store.create("predict")[0], "contribute": store.create("contribute", "lab A")[0],
            "contribute_b": store.create("contribute", "lab B")[0], "curate": store.create("curate")[0]}
    yield client, keys
    client.__exit__(None, None, None)


def label(client: TestClient, key: str, rank: int, particle: str = "Fe"):
    """POST a label of the item of ``rank``."""
    return client.post(f"/v1/queue/{rank}/label", json={"labels": {"particle_type": particle}}, headers=auth(key))


# -- listing ----------------------------------------------------------------------------------
def test_the_queue_needs_a_contribute_key(queue_api) -> None:
    client, keys = queue_api
    for method, path in [("get", "/v1/queue"), ("get", "/v1/queue/1"), ("get", "/v1/queue/1/image"),
                         ("post", "/v1/queue/1/label")]:
        body = {"json": {"labels": {"particle_type": "Fe"}}} if method == "post" else {}
        response = client.request(method, path, **body)
        assert response.status_code == 401 and "role 'contribute'" in one_line_detail(response), path
        response = client.request(method, path, headers=auth(keys["predict"]), **body)
        assert response.status_code == 403, path
        assert "has role 'predict'" in one_line_detail(response) and "valid roles: contribute, curate" in response.text
    assert client.get("/v1/queue", headers=auth(keys["curate"])).status_code == 200


def test_items_come_in_rank_order_with_the_rankings_guesses(queue_api, ranking: Path) -> None:
    client, keys = queue_api
    body = client.get("/v1/queue", params={"limit": 1000}, headers=auth(keys["contribute_b"])).json()
    assert body["queue"] == {"ranking": "rank.csv", "size": N_ITEMS, "strategies": ["least_confidence"]}
    rows = pd.read_csv(ranking, dtype={"image": str}).to_dict("records")
    listed = {item["rank"]: item for item in body["items"]}
    assert len(listed) >= N_ITEMS - 6  # others may have been labelled by other tests of this module
    for row in rows:
        if row["rank"] not in listed:
            continue
        item = listed[row["rank"]]
        assert item["image"] == row["image"] and item["strategy"] == "least_confidence"
        assert item["score"] == pytest.approx(row["score"])
        guess = item["tasks"]["particle_type"]
        assert guess["label"] == row["pred_particle_type"]
        assert guess["probabilities"] == pytest.approx({"Fe": row["p_particle_type_Fe"],
                                                        "X-ray": row["p_particle_type_X-ray"]})
    ranks = [item["rank"] for item in body["items"]]
    assert ranks == sorted(ranks)
    scores = [item["score"] for item in body["items"]]
    assert scores == sorted(scores, reverse=True)  # least confident first, as ranked


def test_paging_by_offset_and_by_rank(api_run: Path, bps_dir: Path, ranking: Path, tmp_path: Path) -> None:
    client = start(api_run, tmp_path / "state", ranking, bps_dir)
    try:
        key = auth(client.app.state.service.keys.create("contribute")[0])
        first = client.get("/v1/queue", params={"limit": 5}, headers=key).json()
        assert (first["total"], first["labelled"], first["limit"], first["offset"]) == (N_ITEMS, 0, 5, 0)
        assert [i["rank"] for i in first["items"]] == [1, 2, 3, 4, 5]
        second = client.get("/v1/queue", params={"limit": 5, "offset": 5}, headers=key).json()
        assert [i["rank"] for i in second["items"]] == [6, 7, 8, 9, 10]
        after = client.get("/v1/queue", params={"limit": 5, "after": 10}, headers=key).json()
        assert [i["rank"] for i in after["items"]] == [11, 12] and after["total"] == 2 and after["after"] == 10
        assert client.get("/v1/queue", params={"offset": 50}, headers=key).json()["items"] == []
        assert client.get("/v1/queue", headers=key).json()["limit"] == 20
    finally:
        client.__exit__(None, None, None)


@pytest.mark.parametrize(("params", "message"), [
    ({"limit": 0}, "query parameter 'limit': Input should be greater than or equal to 1, got '0'"),
    ({"limit": 1001}, "query parameter 'limit': Input should be less than or equal to 1000, got '1001'"),
    ({"offset": 2**31}, "query parameter 'offset': Input should be less than or equal to 2147483647, got '2147483648'"),
    ({"after": -1}, "query parameter 'after': Input should be greater than or equal to 0, got '-1'"),
    ({"unlabelled_by": "nobody"}, "query parameter 'unlabelled_by': Input should be 'anyone' or 'me', got 'nobody'"),
])
def test_listing_parameters_are_bounded(queue_api, params: dict, message: str) -> None:
    client, keys = queue_api
    response = client.get("/v1/queue", params=params, headers=auth(keys["contribute"]))
    assert response.status_code == 422 and one_line_detail(response) == message


def test_an_item_the_queue_does_not_have_is_404(queue_api) -> None:
    client, keys = queue_api
    key = auth(keys["contribute"])
    for path in ("/v1/queue/99", "/v1/queue/99/image"):
        response = client.get(path, headers=key)
        assert response.status_code == 404
        assert one_line_detail(response) == (f"the labelling queue has no item of rank 99; valid: ranks 1 to "
                                             f"{N_ITEMS} ({N_ITEMS} items)")
    assert label(client, keys["contribute"], 99).status_code == 404
    response = client.get("/v1/queue/0", headers=key)
    assert response.status_code == 422
    assert "path parameter 'rank': Input should be greater than or equal to 1" in one_line_detail(response)
    item = client.get("/v1/queue/3", headers=key).json()
    assert item["rank"] == 3
    assert set(item) == {"rank", "image", "score", "strategy", "tasks", "labels", "labelled_by_me"}


def test_a_server_without_a_queue_says_how_to_start_one(api, api_keys) -> None:
    for path in ("/v1/queue", "/v1/queue/1", "/v1/queue/1/image"):
        response = api.get(path, headers=auth(api_keys["contribute"]))
        assert response.status_code == 404
        assert one_line_detail(response).startswith("this server has no labelling queue; start it with `cellclass "
                                                    "serve RUN --queue RANK.csv`")
    assert label(api, api_keys["contribute"], 1).status_code == 404


# -- the image ------------------------------------------------------------------------------
def test_the_image_comes_as_its_own_16_bit_channels(queue_api, bps_dir: Path, ranking: Path) -> None:
    client, keys = queue_api
    name = pd.read_csv(ranking, dtype=str).set_index("rank").loc["2", "image"]
    original = read_image(bps_dir / name)
    response = client.get("/v1/queue/2/image", headers=auth(keys["contribute"]))
    assert response.status_code == 200 and response.headers["content-type"] == "application/octet-stream"
    array = np.load(io.BytesIO(response.content), allow_pickle=False)
    assert array.dtype == np.uint16 and array.shape == original.shape and np.array_equal(array, original)
    assert array.max() > 255  # really 16-bit data, not a rendering
    assert response.headers["x-cellclass-shape"] == ",".join(map(str, original.shape))
    assert response.headers["x-cellclass-dtype"] == "uint16" and response.headers["x-cellclass-reduced"] == "1"

    side = original.shape[1] // 3
    small = client.get("/v1/queue/2/image", params={"max_side": side}, headers=auth(keys["contribute"]))
    reduced = np.load(io.BytesIO(small.content))
    assert reduced.dtype == np.uint16 and max(reduced.shape[1:]) <= side and small.headers["x-cellclass-reduced"] == "3"
    block = original[:, :3, :3].astype(np.float64).mean()
    assert abs(int(reduced[0, 0, 0]) - block) <= 0.5
    response = client.get("/v1/queue/2/image", params={"max_side": 8}, headers=auth(keys["contribute"]))
    assert response.status_code == 422 and "query parameter 'max_side'" in one_line_detail(response)


@pytest.mark.parametrize(("image", "dtype"), [
    (np.arange(12, dtype=np.uint8).reshape(1, 3, 4), np.uint8),
    (np.arange(12, dtype=np.int32).reshape(1, 3, 4) * 1000, np.uint16),
    (np.arange(12, dtype=np.int16).reshape(1, 3, 4) - 6, np.float32),
    (np.linspace(0, 1, 12).reshape(3, 4), np.float32),
    (np.eye(4, dtype=bool)[None], np.uint8),
])
def test_display_arrays_keep_8_and_16_bits_and_read_other_numbers_faithfully(image: np.ndarray, dtype) -> None:
    array, factor = display_array(image, 64)
    assert array.dtype == dtype and factor == 1 and array.ndim == 3
    assert np.allclose(array.astype(np.float64), np.asarray(image, np.float64).reshape(array.shape))


def test_display_arrays_are_reduced_by_block_means() -> None:
    image = np.arange(2 * 10 * 7, dtype=np.uint16).reshape(2, 10, 7) * 500
    array, factor = display_array(image, 4)
    assert factor == 3 and array.shape == (2, 4, 3) and array.dtype == np.uint16
    assert array[1, 0, 0] == round(image[1, :3, :3].mean())


# -- labelling ------------------------------------------------------------------------------
def test_a_label_is_a_pending_contribution_of_the_items_image(queue_api, bps_dir: Path, ranking: Path) -> None:
    client, keys = queue_api
    a, b, curator = keys["contribute"], keys["contribute_b"], auth(keys["curate"])
    item = client.get("/v1/queue/4", headers=auth(a)).json()
    response = label(client, a, 4, "X-ray")
    assert response.status_code == 201, response.text
    record = response.json()
    assert record["status"] == "pending" and record["labels"] == {"particle_type": "X-ray"}
    assert record["contributor"] == a.split("_")[1] and record["filename"] == item["image"]
    assert record["dtype"] == "uint16" and record["duplicate"] is False
    assert record["metadata"]["queue"] == {"ranking": "rank.csv", "rank": 4, "image": item["image"],
                                           "strategy": "least_confidence", "score": pytest.approx(item["score"]),
                                           "predicted": {"particle_type": item["tasks"]["particle_type"]["label"]}}
    stored = client.get(f"/v1/contributions/{record['id']}/image", headers=curator).content
    assert stored == (bps_dir / item["image"]).read_bytes()
    pending = client.get("/v1/contributions", params={"status": "pending", "limit": 1000}, headers=curator).json()
    assert record["id"] in {c["id"] for c in pending["items"]}

    # Gone for everyone by default; still there for another key that asks for what it has not labelled.
    anyone = client.get("/v1/queue", params={"limit": 1000}, headers=auth(b)).json()
    assert 4 not in {i["rank"] for i in anyone["items"]} and anyone["labelled"] >= 1
    mine = client.get("/v1/queue", params={"limit": 1000, "unlabelled_by": "me"}, headers=auth(b)).json()
    listed = {i["rank"]: i for i in mine["items"]}
    assert listed[4]["labels"] == 1 and listed[4]["labelled_by_me"] is False
    assert label(client, b, 4, "Fe").status_code == 201  # a second opinion, from another key
    again = client.get("/v1/queue/4", headers=auth(a)).json()
    assert again["labels"] == 2 and again["labelled_by_me"] is True
    assert 4 not in {i["rank"] for i in client.get("/v1/queue", params={"unlabelled_by": "me", "limit": 1000},
                                                   headers=auth(b)).json()["items"]}


def test_an_item_labelled_by_the_same_key_again_is_409_and_stores_nothing(queue_api) -> None:
    client, keys = queue_api
    a, curator = keys["contribute"], auth(keys["curate"])
    first = label(client, a, 5, "Fe")
    assert first.status_code == 201
    before = client.get("/v1/contributions", headers=curator).json()["total"]
    for particle in ("Fe", "X-ray"):
        response = label(client, a, 5, particle)
        assert response.status_code == 409
        assert one_line_detail(response) == (
            f"queue item 5 ({first.json()['filename']!r}) was already labelled by key {a.split('_')[1]} (contribution "
            f"{first.json()['id']}); valid: an item this key has not labelled (GET /v1/queue?unlabelled_by=me)")
    assert client.get("/v1/contributions", headers=curator).json()["total"] == before


def test_a_race_past_the_first_check_is_refused_in_the_transaction(queue_api) -> None:
    """Two requests of one key for one item can both pass the early check; the database keeps one."""
    client, keys = queue_api
    service = client.app.state.service
    queue, key_id = service.queue, keys["contribute"].split("_")[1]
    assert label(client, keys["contribute"], 6, "Fe").status_code == 201
    before = service.contributions.list()[1]
    upload, labels = service.check_queue_label(queue.item(6), {"particle_type": "X-ray"})
    with pytest.raises(ConflictError, match="queue item 6 .* was already labelled by key"):
        service.contributions.add(upload, labels, None, contributor=key_id, dataset=service.dataset_id, model={},
                                  also=queue.recorder(queue.item(6), key_id))
    assert service.contributions.list()[1] == before


@pytest.mark.parametrize(("body", "message"), [
    ({"labels": {"particle_type": "Xray"}}, "task 'particle_type' got unknown label 'Xray'; valid: Fe, X-ray"),
    ({"labels": {"particle": "Fe"}}, "labels name unknown task(s) ['particle']; valid tasks: particle_type"),
    ({"labels": {}}, "labels must be a non-empty JSON object"),
    ({"labels": "Fe"}, "JSON body field 'labels': Input should be a valid dictionary, got 'Fe'"),
    ({}, "JSON body field 'labels': Field required, got nothing"),
])
def test_labels_are_checked_against_the_model(queue_api, body: dict, message: str) -> None:
    client, keys = queue_api
    response = client.post("/v1/queue/7/label", json=body, headers=auth(keys["contribute"]))
    assert response.status_code == 422 and message in one_line_detail(response)
    assert client.get("/v1/queue/7", headers=auth(keys["contribute"])).json()["labels"] == 0


def test_the_same_contribution_made_before_is_linked_not_repeated(queue_api, bps_dir: Path) -> None:
    client, keys = queue_api
    b = keys["contribute_b"]
    item = client.get("/v1/queue/8", headers=auth(b)).json()
    before = contribute(client, b, item["image"], (bps_dir / item["image"]).read_bytes(), {"particle_type": "Fe"})
    assert before.status_code == 201
    response = label(client, b, 8, "Fe")
    assert response.status_code == 200 and response.json()["duplicate"] is True
    assert response.json()["id"] == before.json()["id"]
    assert client.get("/v1/queue/8", headers=auth(b)).json()["labelled_by_me"] is True


def test_contributions_come_as_display_channels_for_the_review(queue_api, bps_dir: Path) -> None:
    client, keys = queue_api
    record = label(client, keys["contribute"], 9, "Fe").json()
    response = client.get(f"/v1/contributions/{record['id']}/image", params={"format": "npy", "max_side": 32},
                          headers=auth(keys["curate"]))
    assert response.status_code == 200 and response.headers["x-cellclass-dtype"] == "uint16"
    array = np.load(io.BytesIO(response.content))
    assert array.dtype == np.uint16 and max(array.shape[1:]) <= 32
    original = read_image(bps_dir / record["filename"])
    assert array.shape[0] == original.shape[0] and array.max() <= original.max()
    bad = client.get(f"/v1/contributions/{record['id']}/image", params={"format": "png"}, headers=auth(keys["curate"]))
    assert bad.status_code == 422 and "query parameter 'format': Input should be 'original' or 'npy'" in bad.text


# -- state across restarts and rankings ------------------------------------------------------
def test_what_was_labelled_survives_a_restart_and_a_new_ranking(api_run: Path, bps_dir: Path, ranking: Path,
                                                                  pool_names: list[str], tmp_path: Path) -> None:
    state = tmp_path / "state"
    client = start(api_run, state, ranking, bps_dir)
    key = client.app.state.service.keys.create("contribute")[0]
    labelled = [client.get(f"/v1/queue/{rank}", headers=auth(key)).json()["image"] for rank in (1, 2)]
    assert [label(client, key, rank).status_code for rank in (1, 2)] == [201, 201]
    client.__exit__(None, None, None)

    client = start(api_run, state, ranking, bps_dir)  # the same state folder, a new process's worth of app
    try:
        body = client.get("/v1/queue", params={"limit": 1000}, headers=auth(key)).json()
        assert body["labelled"] == 2 and body["total"] == N_ITEMS - 2
        assert [i["rank"] for i in body["items"]] == list(range(3, N_ITEMS + 1))
        assert label(client, key, 1).status_code == 409
    finally:
        client.__exit__(None, None, None)

    # A new ranking of the same pool, its paths absolute and its order reversed, knows the same images.
    other = write_ranking(api_run, bps_dir, pool_names[::-1], tmp_path / "again.csv", absolute=True)
    client = start(api_run, state, other, bps_dir)
    try:
        body = client.get("/v1/queue", params={"limit": 1000}, headers=auth(key)).json()
        assert body["labelled"] == 2
        assert not {str(bps_dir / name) for name in labelled} & {i["image"] for i in body["items"]}
    finally:
        client.__exit__(None, None, None)


# -- rankings that cannot be served ----------------------------------------------------------
def _ranking(tmp_path: Path, pool: Path, name: str, **changes) -> Path:
    rows = {"rank": ["1", "2"], "image": [name, name.replace("001", "002", 1)], "score": ["0.4", "0.3"],
            "strategy": ["margin", "margin"], "pred_particle_type": ["Fe", "X-ray"],
            "p_particle_type_Fe": ["0.6", "0.3"], "p_particle_type_X-ray": ["0.4", "0.7"]}
    rows.update(changes)
    frame = pd.DataFrame({k: v for k, v in rows.items() if v is not None})
    path = tmp_path / "rank.csv"
    frame.to_csv(path, index=False)
    return path


@pytest.fixture
def two_images(bps_dir: Path, tmp_path: Path) -> tuple[Path, str]:
    """A pool of two images named ``..._001.tif`` and ``..._002.tif``; the first one's name."""
    pool = tmp_path / "pool"
    pool.mkdir()
    names = pd.read_csv(bps_dir / "meta.csv", dtype=str)["filename"].tolist()[:2]
    for name, target in zip(names, ("cell_001.tif", "cell_002.tif"), strict=True):
        (pool / target).write_bytes((bps_dir / name).read_bytes())
    return pool, "cell_001.tif"


@pytest.mark.parametrize(("changes", "message"), [
    ({"strategy": None}, r"lacks column\(s\) \['strategy'\] for the served model's tasks \(particle_type\); valid: "
                         r"the CSV `cellclass rank RUN POOL` writes"),
    ({"p_particle_type_X-ray": None}, r"lacks column\(s\) \['p_particle_type_X-ray'\]"),
    ({"rank": ["1", "1"]}, r"gives rank\(s\) \[1\] to several images; valid: each rank once"),
    ({"rank": ["1", "first"]}, r"row 3 of .* has rank 'first'; valid: an integer from 1 \(ask first\)"),
    ({"rank": ["0", "2"]}, r"row 2 of .* has rank '0'"),
    ({"p_particle_type_Fe": ["1.5", "0.3"]},
     r"row 2 of .* has p_particle_type_Fe '1.5'; valid: a probability from 0 to 1"),
    ({"score": ["nan", "0.3"]}, r"row 2 of .* has score 'nan'; valid: a finite number, or empty"),
    ({"pred_particle_type": ["Fe", "Proton"]}, r"row 3 of .* has pred_particle_type 'Proton', naming class\(es\) "
                                               r"\['Proton'\] the served model does not have; valid: Fe, X-ray"),
    ({"image": ["cell_001.tif", "gone.tif"]}, r"1 image\(s\) of the ranking .* are not files under the pool folder "
                                              r".*, e.g. \['gone.tif'\]; valid: paths relative to the pool folder"),
    ({"image": ["cell_001.tif", " "]}, r"row 3 of .* has an empty 'image'"),
])
def test_rankings_that_do_not_fit_the_model_or_the_pool_are_refused(two_images, tmp_path: Path, changes: dict,
                                                                     message: str) -> None:
    pool, name = two_images
    with pytest.raises(QueueError, match=message):
        read_ranking(_ranking(tmp_path, pool, name, **changes), pool, TASKS)


def test_a_ranking_without_rows_or_unreadable_is_refused(two_images, tmp_path: Path) -> None:
    pool, name = two_images
    path = _ranking(tmp_path, pool, name, rank=[], image=[], score=[], strategy=[], pred_particle_type=[],
                    p_particle_type_Fe=[], **{"p_particle_type_X-ray": []})
    with pytest.raises(QueueError, match="has no rows; valid: at least one ranked image"):
        read_ranking(path, pool, TASKS)
    with pytest.raises(QueueError, match="cannot read the ranking '.*nothing.csv'"):
        read_ranking(tmp_path / "nothing.csv", pool, TASKS)


def test_multilabel_guesses_and_groups_are_read(two_images, tmp_path: Path) -> None:
    pool, name = two_images
    tasks = [{"name": "loc", "type": "multilabel", "classes": ["Nucleoli", "Rods; rings"]}]
    path = tmp_path / "rank.csv"
    pd.DataFrame({"rank": [2, 1], "image": [name, "cell_002.tif"], "score": ["", "0.5"], "strategy": ["entropy"] * 2,
                  "pred_loc": ["Nucleoli|Rods; rings", ""], "p_loc_Nucleoli": [0.9, 0.1],
                  "p_loc_Rods; rings": [0.8, 0.2], "plate": ["P1", "P2"]}).to_csv(path, index=False)
    first, second = read_ranking(path, pool, tasks, groups=["plate", "well"])
    assert (first.rank, first.image, first.score, first.groups) == (1, "cell_002.tif", 0.5, {"plate": "P2"})
    assert first.tasks["loc"] == {"label": [], "probabilities": {"Nucleoli": 0.1, "Rods; rings": 0.2}}
    assert second.score is None and second.tasks["loc"]["label"] == ["Nucleoli", "Rods; rings"]
    assert second.key == name and second.metadata("rank.csv")["plate"] == "P1"


def test_a_pool_without_a_queue_is_refused() -> None:
    with pytest.raises(ServiceError, match=r"a pool folder \(.*\) is given without a queue; valid: --pool together"):
        ServeSettings.from_env({}, run=Path("run"), pool=Path("images"))
    settings = ServeSettings.from_env({"CELLCLASS_QUEUE": "/data/rank.csv"}, run=Path("run"))
    assert settings.queue_pool == Path("/data")


@pytest.mark.slow  # the console script starts a Python with torch
def test_serve_refuses_a_bad_ranking_before_starting(api_run: Path, two_images, tmp_path: Path) -> None:
    pool, name = two_images
    path = _ranking(tmp_path, pool, name, pred_particle_type=["Fe", "Proton"])
    result = run_cellclass("serve", api_run, "--queue", path, "--pool", pool, "--state-dir", tmp_path / "state")
    assert result.returncode != 0
    assert "naming class(es) ['Proton'] the served model does not have" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_an_unreadable_pool_image_is_404_not_500(api_run: Path, two_images, tmp_path: Path) -> None:
    pool, name = two_images
    client = start(api_run, tmp_path / "state", _ranking(tmp_path, pool, name), pool)
    try:
        key = auth(client.app.state.service.keys.create("contribute")[0])
        (pool / name).unlink()
        response = client.get("/v1/queue/1/image", headers=key)
        assert response.status_code == 404
        assert one_line_detail(response).startswith("the image of queue item 1 ('cell_001.tif') cannot be read from "
                                                    "the pool folder")
        (pool / name).write_bytes(b"II*\x00 not really a TIFF")
        response = client.post("/v1/queue/1/label", json={"labels": {"particle_type": "Fe"}}, headers=key)
        assert response.status_code == 422 and "cell_001.tif" in one_line_detail(response)
    finally:
        client.__exit__(None, None, None)


def test_the_openapi_document_lists_the_queue(queue_api) -> None:
    client, _ = queue_api
    spec = client.get("/openapi.json").json()
    assert spec["paths"]["/v1/queue/{rank}/image"]["get"]["responses"]["200"]["content"] == {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    described = spec["paths"]["/v1/queue"]["get"]["responses"]["404"]["description"]
    assert described == "No labelling queue on this server, or no item of that rank."
    label_responses = spec["paths"]["/v1/queue/{rank}/label"]["post"]["responses"]
    assert label_responses["409"]["description"] == "The calling key already labelled this queue item."
    assert spec["components"]["schemas"]["QueueLabel"]["required"] == ["labels"]
