"""The labelling loop in a real headless Chromium against a real `cellclass serve --queue`: a
contributor labels ranked images with the keyboard, a curator accepts one in the page; and the
batch view predicts several files into a table and a CSV.

Screenshots go to ``test-artifacts/`` at the repository root (git-ignored).
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
from serve_helpers import Server, write_ranking
from test_serve_web import CHROMIUM, CHROMIUM_ARGS

from cellclass.serving.contributions import ContributionStore
from cellclass.serving.database import Database
from cellclass.serving.files import open_file_store

pytestmark = pytest.mark.slow  # a real `cellclass serve` and a real browser


@pytest.fixture(scope="module")
def queue_server(served_run: Path, bps_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of the trained run with a ranking of eight pool images as its queue."""
    folder = tmp_path_factory.mktemp("queue-web")
    names = pd.read_csv(bps_dir / "meta.csv", dtype=str)["filename"].tolist()[:8]
    ranking = write_ranking(served_run, bps_dir, names, folder / "rank.csv")
    server = Server(served_run, folder / "state", folder / "server.log", "--queue", str(ranking),
                    "--pool", str(bps_dir)).start()
    yield server
    server.stop()


@pytest.fixture
def browser_page(request: pytest.FixtureRequest) -> Iterator:
    """A Chromium page (skips where Debian's chromium or playwright is absent)."""
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (`apt-get install chromium`; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the Python package) is not installed")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser.new_page(viewport={"width": 1200, "height": 1100}, accept_downloads=True)
        finally:
            browser.close()


def artifacts(request: pytest.FixtureRequest) -> Path:
    """The screenshots' folder."""
    folder = request.config.rootpath / "test-artifacts"
    folder.mkdir(exist_ok=True)
    return folder


@contextlib.contextmanager
def store_of(server: Server) -> Iterator[ContributionStore]:
    """The server's contribution store, opened beside it as `cellclass contributions` would."""
    db = Database(f"sqlite:///{(server.state_dir / 'cellclass.db').as_posix()}")
    try:
        yield ContributionStore(db, open_file_store(str(server.state_dir / "files")))
    finally:
        db.close()


def use_key(page, key: str, tab: str) -> None:
    """Enter ``key`` and open the view ``tab``, which shows once the server has told the page the key's role."""
    page.fill("#api-key", key)
    page.wait_for_selector(f'#views [data-view="{tab}"]:not([hidden])', timeout=30_000)
    page.click(f'#views [data-view="{tab}"]')


def canvas_mean(page) -> float:
    """Mean brightness of the label view's canvas as drawn."""
    return page.evaluate("""() => {
        const c = document.getElementById('label-canvas');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let s = 0; for (let i = 0; i < d.length; i += 4) s += d[i] + d[i + 1] + d[i + 2];
        return s / (3 * d.length / 4);
    }""")


def test_label_three_images_with_keys_then_a_curator_accepts_one(queue_server: Server, browser_page,
                                                                request: pytest.FixtureRequest) -> None:
    page, server = browser_page, queue_server
    contributor, curator = server.key("contribute", "labeller"), server.key("curate", "curator")
    page.goto(server.url + "/")
    page.wait_for_selector("#labels select", timeout=30_000)  # the model description arrived
    assert page.is_hidden('#views [data-view="label"]') and page.is_hidden('#views [data-view="review"]')

    use_key(page, contributor, "label")
    assert page.is_hidden('#views [data-view="review"]')  # a contributor does not review
    page.wait_for_selector("#label-canvas[data-rank='1']", timeout=30_000)
    assert page.evaluate("document.getElementById('label-canvas').width") == 96  # the image's own pixels
    assert "16-bit" in page.text_content("#label-caption")
    assert page.text_content("#label-guess .label") in ("Fe", "X-ray")
    assert page.locator("#channel-controls .channel").count() == 1

    # Contrast is set in the page: a lower maximum brightens the picture.
    before = canvas_mean(page)
    page.eval_on_selector("#channel-controls .channel input[type=range][title=max]", """slider => {
        slider.value = String(Number(slider.min) + (Number(slider.value) - Number(slider.min)) / 4);
        slider.dispatchEvent(new Event('input'));
    }""")
    assert canvas_mean(page) > before + 5
    page.screenshot(path=str(artifacts(request) / "serving-web-label.png"), full_page=True)

    # Keys: 1 = Fe (rank 1), → skips rank 2, 2 = X-ray (rank 3), 1 = Fe (rank 4).
    expected = {}
    for key, rank, label in (("1", 1, "Fe"), ("ArrowRight", 2, None), ("2", 3, "X-ray"), ("1", 4, "Fe")):
        page.wait_for_selector(f"#label-canvas[data-rank='{rank}']", timeout=30_000)
        page.keyboard.press(key)
        if label is not None:
            expected[rank] = label
            page.wait_for_function(f"document.getElementById('label-count').textContent === '{len(expected)}'",
                                   timeout=30_000)
    page.wait_for_selector("#label-canvas[data-rank='5']", timeout=30_000)
    logged = page.eval_on_selector_all("#label-log li", "items => items.map(li => li.dataset.contribution)")
    assert len(logged) == 3

    with store_of(server) as store:
        pending, total = store.list(status="pending")
    assert total == 3 and {r["id"] for r in pending} == set(logged)
    assert {r["metadata"]["queue"]["rank"]: r["labels"]["particle_type"] for r in pending} == expected

    # The curator reviews in the page: three pending cards with thumbnails; accept one.
    use_key(page, curator, "review")
    page.wait_for_function("document.querySelectorAll('#review-list canvas[data-loaded=true]').length === 3",
                           timeout=30_000)
    assert page.locator(".review-item").count() == 3
    assert set(page.eval_on_selector_all(".review-item", "cards => cards.map(c => c.dataset.id)")) == set(logged)
    chosen = pending[0]["id"]
    page.click(f".review-item[data-id='{chosen}'] button.accept")
    page.wait_for_selector(f".review-item[data-id='{chosen}'][data-status='accepted']", timeout=30_000)
    assert "accepted by" in page.text_content(f".review-item[data-id='{chosen}'] .state")
    page.screenshot(path=str(artifacts(request) / "serving-web-review.png"), full_page=True)

    with store_of(server) as store:
        record = store.get(chosen)
        still_pending = store.list(status="pending")[1]
    assert record["status"] == "accepted" and record["reviewed_by"] == curator.split("_")[1]
    assert still_pending == 2


def test_batch_view_predicts_two_files_into_a_table_and_a_csv(queue_server: Server, browser_page, bps_images,
                                                              tmp_path: Path, request: pytest.FixtureRequest) -> None:
    page, server = browser_page, queue_server
    key = server.key("predict")
    files = []
    for name, tif, _ in bps_images[40:42]:
        (tmp_path / name).write_bytes(tif)
        files.append(tmp_path / name)
    page.goto(server.url + "/")
    page.wait_for_selector("#labels select", timeout=30_000)
    use_key(page, key, "batch")
    page.set_input_files("#batch-input", [str(f) for f in files])
    page.click("#batch-button")
    page.wait_for_selector("#batch-status.ok", timeout=30_000)
    assert page.locator("#batch-table tbody tr").count() == 2
    assert page.eval_on_selector_all("#batch-table tbody tr", "rows => rows.map(r => r.dataset.file)") == \
        [f.name for f in files]
    assert "2 of 2 image(s) predicted" in page.text_content("#batch-status")
    page.screenshot(path=str(artifacts(request) / "serving-web-batch.png"), full_page=True)

    with page.expect_download() as info:
        page.click("#batch-download")
    download = info.value
    assert download.suggested_filename == "predictions.csv"
    table = pd.read_csv(io.StringIO(Path(download.path()).read_text()), dtype={"filename": str})
    assert list(table["filename"]) == [f.name for f in files]
    assert list(table.columns[:4]) == ["filename", "pred_particle_type", "p_particle_type_Fe", "p_particle_type_X-ray"]
    with server.client(key) as client:
        answer = client.post("/v1/predict", files=[("image", (f.name, f.read_bytes())) for f in files]).json()
    for row, prediction in zip(table.to_dict("records"), answer["predictions"], strict=True):
        task = prediction["tasks"]["particle_type"]
        assert row["pred_particle_type"] == task["label"]
        assert row["p_particle_type_Fe"] == pytest.approx(task["probabilities"]["Fe"], abs=1e-12)


@pytest.fixture(scope="module")
def two_task_server(bps_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server of a two-task run (particle type and dose) with a ranking of four pool images as its queue."""
    from cellclass.data.presets import bps
    from cellclass.training.config import TrainConfig
    from cellclass.training.loop import train

    folder = tmp_path_factory.mktemp("queue-web-two-tasks")
    train(bps(bps_dir), TrainConfig(model="lenet5", tasks=["particle_type", "dose"], image_size=32, epochs=1),
          folder / "run")
    names = pd.read_csv(bps_dir / "meta.csv", dtype=str)["filename"].tolist()[8:12]
    ranking = write_ranking(folder / "run", bps_dir, names, folder / "rank.csv")
    server = Server(folder / "run", folder / "state", folder / "server.log", "--queue", str(ranking),
                    "--pool", str(bps_dir)).start()
    yield server
    server.stop()


def test_a_two_task_run_takes_one_choice_per_task(two_task_server: Server, browser_page) -> None:
    page, server = browser_page, two_task_server
    with server.client() as client:
        tasks = {t["name"]: t["classes"] for t in client.get("/v1/model").json()["tasks"]}
    page.goto(server.url + "/")
    page.wait_for_selector("#labels select", timeout=30_000)
    use_key(page, server.key("contribute"), "label")
    page.wait_for_selector("#label-canvas[data-rank='1']", timeout=30_000)
    assert page.locator("#label-choices .choice-task").count() == 2
    assert page.locator("#label-guess .task").count() == 2

    # Keys: the first picks the particle type, the second (on the dose task, now highlighted) the dose.
    page.keyboard.press("2")
    assert page.get_attribute("#label-choices .choice-task.active", "data-task") == "dose"
    assert page.locator("#label-count").text_content() == "0"  # not sent before every task has a label
    page.keyboard.press("1")
    page.wait_for_function("document.getElementById('label-count').textContent === '1'", timeout=30_000)

    # Clicks, in any order: the dose first, then the particle type.
    page.wait_for_selector("#label-canvas[data-rank='2']", timeout=30_000)
    page.click(f"#label-choices [data-task='dose'] button[data-class='{tasks['dose'][-1]}']")
    page.click("#label-choices [data-task='particle_type'] button[data-class='Fe']")
    page.wait_for_function("document.getElementById('label-count').textContent === '2'", timeout=30_000)

    with store_of(server) as store:
        labels = {r["metadata"]["queue"]["rank"]: r["labels"] for r in store.list(status="pending")[0]}
    assert labels == {1: {"particle_type": "X-ray", "dose": tasks["dose"][0]},
                      2: {"particle_type": "Fe", "dose": tasks["dose"][-1]}}
