"""The inspection page in a real browser (issue 16): Debian's chromium driven by Playwright.

A predict-only key logs in, uploads an image of bottle's test set and sees the verdict, the score
(the page's DOM is compared with offline ``predict``) and the heat-map overlay, scores the newest
image of a camera folder, and cannot correct
the model (403, and the correction panel is not shown); an admin marks a false alarm as normal and
sees the new version's number on the page, and the same image scored by that version, then serves
version 1 again. The
browser is started once for the module; chromium comes from Debian (scripts/setup.sh), not from
``playwright install``. ``PATCHKNN_STATION_SCREENSHOT=FILE`` also saves the page (the README's
docs/station-screenshot.png)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from conftest import REQUIRE_REAL_DATA_ENV

if os.environ.get(REQUIRE_REAL_DATA_ENV) == "1":  # CI: a missing browser stack is a failure, never a skip
    from playwright import sync_api
else:
    pytest.importorskip("fastapi")
    sync_api = pytest.importorskip("playwright.sync_api")

from _live import LiveServer  # noqa: E402
from _station_model import bottle_test_images, served_copy  # noqa: E402

PREDICT_KEY = "page-predict-key-0123456789"
ADMIN_KEY = "page-admin-key-0123456789ab"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 600_000  # a loaded 2-core CI machine scores a bottle image in seconds, a correction in a minute


def chromium_path() -> str:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    pytest.fail("Debian's chromium is not installed: apt-get install -y chromium (scripts/setup.sh does)")


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def site(mvtec_root, caffe_weights, tmp_path_factory):
    from patchknn.server.app import create_app
    from patchknn.server.settings import ServerSettings, load_models

    base = tmp_path_factory.mktemp("page")
    root, model = served_copy(mvtec_root, caffe_weights, tmp_path_factory.mktemp("station-model"), base / "bottle")
    camera = base / "camera"
    camera.mkdir()
    settings = ServerSettings(
        api_keys=(PREDICT_KEY,),
        admin_keys=(ADMIN_KEY,),
        watch_folders=(("line-1", camera),),
        request_timeout_s=600,
    )
    app = create_app(load_models([f"bottle={root}"], warmup=False), settings)
    with LiveServer(app) as live:
        yield live, model, camera


def log_in(page, url: str, key: str) -> None:
    page.goto(url + "/station")
    page.fill("#key", key)
    page.click("#login-btn")
    page.wait_for_selector("#main:not([hidden])")
    page.wait_for_selector("#card .version-number")


def upload(page, path: Path):
    """Upload one image; returns the new result card once it shows a verdict."""
    n = page.locator(".shot[data-score]").count()
    page.set_input_files("#files", str(path))
    # selectors, not wait_for_function: the page's Content-Security-Policy forbids eval, also Playwright's
    page.locator(".shot[data-score]").nth(n).wait_for(state="attached", timeout=TIMEOUT_MS)
    return page.locator(".shot[data-score]").first


def test_page_predict_key_sees_verdict_overlay_and_cannot_correct(browser, site, mvtec_root):
    live, model, camera = site
    page = browser.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    log_in(page, live.url, PREDICT_KEY)
    assert page.inner_text("#who") == "role: predict"
    assert page.locator("#card .version-number").inner_text() == "1"
    assert page.locator("#teach").is_hidden()  # no correction panel for a predict key

    path = bottle_test_images(mvtec_root, "broken_large")[0]
    shot = upload(page, path)
    expected = model.predict([path])[0]
    assert float(shot.get_attribute("data-score")) == pytest.approx(expected.score, rel=1e-4)
    assert float(shot.locator(".score").inner_text()) == pytest.approx(expected.score, rel=1e-4)  # shown, 6 digits
    assert shot.locator(".verdict").inner_text() == expected.verdict == "NG"
    assert shot.locator(".shot-version").inner_text() == "1"
    size = shot.locator("img.overlay").evaluate("img => [img.complete, img.naturalWidth, img.naturalHeight]")
    assert size == [True, model.config.image_size, model.config.image_size]
    assert shot.locator(".mark-normal").is_hidden()
    # the recent-results list shows it, and its NG filter keeps it
    page.check("#ng-only")
    page.wait_for_selector(f"#recent tbody tr.ng >> text={path.name}")

    # a camera folder: the newest image there is fetched by name and scored like an upload
    good = bottle_test_images(mvtec_root)[1]
    shutil.copy(good, camera / "cam_0001.png")
    n = page.locator(".shot[data-score]").count()
    page.fill("#watch-n", "1")
    page.click("#watch-score")
    page.locator(".shot[data-score]").nth(n).wait_for(state="attached")
    cam = page.locator(".shot[data-score]").first
    assert cam.locator(".name").inner_text() == "line-1/cam_0001.png"
    assert float(cam.get_attribute("data-score")) == pytest.approx(model.predict([good])[0].score, rel=1e-4)

    # the API refuses the correction to this key (what the page would send)
    status = page.evaluate(
        """async () => {
            const form = new FormData();
            form.append("file", new Blob([new Uint8Array([137, 80, 78, 71])]), "x.png");
            const r = await fetch("/v1/models/bottle/corrections", {method: "POST", body: form,
                headers: {Authorization: "Bearer " + sessionStorage.getItem("patchknn-api-key")}});
            return [r.status, (await r.json()).error.code];
        }"""
    )
    assert status == [403, "forbidden"]
    page.click("#logout")
    assert page.locator("#login").is_visible()
    assert page.evaluate("sessionStorage.getItem('patchknn-api-key')") is None
    page.close()


def test_page_admin_marks_a_false_alarm_normal_and_sees_the_new_version(browser, site, mvtec_root):
    live, model, _ = site
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(TIMEOUT_MS)
    log_in(page, live.url, ADMIN_KEY)
    assert page.inner_text("#who") == "role: admin"
    assert page.locator("#teach").is_visible()
    goods = bottle_test_images(mvtec_root)[:6]
    scores = [p.score for p in model.predict(goods)]
    alarm = goods[max(range(len(goods)), key=scores.__getitem__)]  # the good image scored highest
    shot = upload(page, alarm)
    assert float(shot.locator(".score").inner_text()) == pytest.approx(max(scores), rel=1e-4)
    shot.locator(".mark-normal").check()
    assert page.inner_text("#correct-btn") == "Mark as normal: 1 selected"
    page.fill("#note", "a good bottle: reflections are normal")
    page.click("#correct-btn")
    page.wait_for_selector("#correct-status.ok", timeout=TIMEOUT_MS)
    assert "version 2 is now served" in page.inner_text("#correct-status")
    sync_api.expect(page.locator("#card .version-number")).to_have_text("2", timeout=TIMEOUT_MS)
    assert "v2 (served)" in page.inner_text("#card .versions")
    again = upload(page, alarm)
    assert again.locator(".shot-version").inner_text() == "2"
    assert float(again.get_attribute("data-score")) < max(scores)
    assert again.locator(".verdict").inner_text() == "OK"
    target = os.environ.get("PATCHKNN_STATION_SCREENSHOT")
    if target:
        upload(page, bottle_test_images(mvtec_root, "broken_large")[0])
        page.screenshot(path=target, full_page=True)
    # and can serve version 1 again from the card
    page.click("#card button.serve-version >> text='serve v1'")
    sync_api.expect(page.locator("#card .version-number")).to_have_text("1", timeout=TIMEOUT_MS)
    assert "version 1 is now served (was 2)" in page.inner_text("#correct-status")
    page.close()
