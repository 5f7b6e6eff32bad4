"""The web page end to end in a real headless Chromium (Debian's) against a real server.

Screenshots go to ``test-artifacts/`` at the repository root (git-ignored).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import Server

pytestmark = pytest.mark.slow  # a real `cellclass serve` and a real browser

CHROMIUM = Path("/usr/bin/chromium")
# The flags this machine's Chromium needs: no sandbox as root, no GPU, and no background
# connections (refused on a closed network).
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]


def test_web_page_predicts_shows_saliency_and_contributes(server: Server, keys: dict[str, str], bps_images,
                                                          tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (`apt-get install chromium`; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the Python package) is not installed")
    artifacts = request.config.rootpath / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    name, tif, particle = bps_images[30]
    image = tmp_path / name
    image.write_bytes(tif)

    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 1000})
            page.goto(server.url + "/")
            page.wait_for_selector("#labels select", timeout=30_000)  # the model description arrived
            assert "lenet5" in page.text_content("#model-summary")

            page.set_input_files("#image-input", str(image))
            page.click("#predict-button")  # no key yet: the server asks for one
            page.wait_for_selector("#predict-status.error", timeout=30_000)
            assert "error 401" in page.text_content("#predict-status")

            page.fill("#api-key", keys["contribute"])
            page.click("#predict-button")
            page.wait_for_selector("#overlay[data-loaded='true']", timeout=30_000)
            label = page.text_content("#predictions .label")
            assert label in ("Fe", "X-ray")
            assert "predicted by lenet5" in page.text_content("#predict-status")
            assert "Grad-CAM (features.4)" in page.text_content("#overlay-caption")
            width = page.evaluate("document.getElementById('overlay').naturalWidth")
            assert width > 256
            page.screenshot(path=str(artifacts / "serving-web-predict.png"), full_page=True)

            page.select_option("#label-particle_type", particle)
            page.click("#contribute-button")
            page.wait_for_selector("#contribute-status.ok", timeout=30_000)
            status = page.text_content("#contribute-status")
            assert "is pending" in status
            page.screenshot(path=str(artifacts / "serving-web-contribute.png"), full_page=True)
        finally:
            browser.close()

    contribution_id = status.split("contribution ")[1].split(" ")[0]
    with server.client(keys["curate"]) as c:
        record = c.get(f"/v1/contributions/{contribution_id}").json()
    assert record["labels"] == {"particle_type": particle} and record["filename"] == name
    assert (artifacts / "serving-web-predict.png").stat().st_size > 10_000


def test_field_mode_outlines_the_cells_of_a_field(field_run: dict[str, Path], field_tiff: tuple[str, bytes, object],
                                                  tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is absent: install Debian's chromium (`apt-get install chromium`; .ci/run does)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (the Python package) is not installed")
    import pandas as pd

    artifacts = request.config.rootpath / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    field_id, data, _ = field_tiff
    image = tmp_path / "field.tif"
    image.write_bytes(data)
    masks = pd.read_csv(field_run["seg"] / "masks.csv", dtype={"Id": str})
    n_cells = int(masks.n_objects[masks.Id == field_id].iloc[0])  # the objects `segment` found, as the server does
    server = Server(field_run["run"], tmp_path / "state", tmp_path / "server.log").start()
    try:
        key = server.key("predict")
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1100, "height": 1200})
                page.goto(server.url + "/")
                page.wait_for_selector("#labels .checks", timeout=30_000)  # the model description arrived
                assert page.is_visible("#predict-card") and not page.is_visible("#field-card")
                page.click("#mode-field")
                assert page.is_visible("#field-card") and not page.is_visible("#predict-card")
                assert page.is_visible("#key-card")

                page.fill("#api-key", key)
                page.set_input_files("#field-input", str(image))
                page.click("#field-button")
                page.wait_for_selector("#field-status.ok", timeout=60_000)
                page.wait_for_selector("#field-image[data-loaded='true']", timeout=30_000)
                status = page.text_content("#field-status")
                assert f"{n_cells} cell(s) classified of {n_cells} object(s) found by lenet5" in status
                assert page.locator("#field-overlay polygon.cell-outline").count() == n_cells
                assert page.locator("#field-cells tbody tr").count() == n_cells
                points = page.get_attribute("#field-overlay polygon.cell-outline >> nth=0", "points")
                assert len(points.split()) >= 3
                colours = page.eval_on_selector_all("#field-overlay .cell-outline", "els => els.map(e => e.getAttribute('stroke'))")
                assert all(c.startswith("#") for c in colours)
                box = page.locator("#field-overlay").bounding_box()
                assert box["width"] > 200 and box["height"] > 200  # drawn over the field's image
                assert page.text_content("#field-answer .label").strip()
                assert "mean; thresholds: per class, tuned on the validation fields" in page.text_content("#field-answer")

                page.hover("#field-cells tbody tr >> nth=0")
                assert "Cell 1" in page.text_content("#field-cell-detail")
                page.click("#field-overlay .cell-outline >> nth=1", force=True)
                detail = page.text_content("#field-cell-detail")
                assert "pinned" in detail and "area" in detail
                assert page.locator("#field-cell-detail .bar").count() >= 1
                assert page.locator("#field-overlay .cell-outline.selected").count() == 1
                page.screenshot(path=str(artifacts / "serving-web-field.png"), full_page=True)

                # Back: the Image switch, or the Predict tab where the page has view tabs.
                page.click("#mode-image" if page.locator("#mode-image").count() else "#views [data-view='predict']")
                assert page.is_visible("#predict-card") and not page.is_visible("#field-card")
            finally:
                browser.close()
    finally:
        server.stop()
    assert (artifacts / "serving-web-field.png").stat().st_size > 10_000
