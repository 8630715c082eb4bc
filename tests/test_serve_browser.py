"""``captioner serve`` in a real browser: Debian's Chromium (headless, through chromedriver)
picks a photo on the page, and the caption and the heat map tiles are read from the DOM."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("multipart")
httpx = pytest.importorskip("httpx")
webdriver = pytest.importorskip("selenium.webdriver")

from serve_fixtures import photo, tiny_engine  # noqa: E402

from captioner.serve.app import Settings, create_app  # noqa: E402
from captioner.serve.auth import ApiKeys  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="Debian chromium and chromium-driver are not installed")
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-dev-shm-usage", "--window-size=1100,900")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


KEY = "browser-test-key-0123456789"


def _serve(tiny_serve_run, settings: Settings):
    """The service on a free localhost port, in a thread of this process."""
    import uvicorn

    run, table, expected = tiny_serve_run
    port = _free_port()
    config = uvicorn.Config(create_app(tiny_engine(run, table), settings), host="127.0.0.1",
                            port=port, log_level="warning")
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", expected
    uv.should_exit = True
    thread.join(10)


@pytest.fixture(scope="module")
def server(tiny_serve_run):
    yield from _serve(tiny_serve_run, Settings())


@pytest.fixture(scope="module")
def keyed_server(tiny_serve_run):
    yield from _serve(tiny_serve_run, Settings(api_keys=ApiKeys([KEY])))


@pytest.fixture(scope="module")
def browser():
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_captions_a_photo_with_heat_maps(server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    url, expected = server
    path = tmp_path / "beach.png"
    path.write_bytes(photo(2, size=(320, 240)))
    bad = tmp_path / "notes.png"
    bad.write_bytes(b"not a picture")
    browser.get(url + "/")
    assert "attention decoder" in browser.find_element(By.CSS_SELECTOR, "header .model").text
    browser.find_element(By.ID, "files").send_keys(f"{path}\n{bad}")
    WebDriverWait(browser, 60).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, ".result[data-ready=true]")) == 2)
    good = browser.find_element(By.CSS_SELECTOR, ".result:not(.failed)")
    assert good.get_attribute("data-image") == "beach.png"
    assert good.find_element(By.CSS_SELECTOR, ".caption").text == expected[2]
    heatmap = good.find_element(By.CSS_SELECTOR, "img.heatmap")
    assert browser.execute_script("return arguments[0].complete && arguments[0].naturalWidth", heatmap)
    # the heat map on the page is the one the API draws for this photo
    answer = httpx.post(url + "/v1/captions", data={"heatmap": "true"},
                        files=[("images", ("beach.png", path.read_bytes(), "image/png"))]).json()
    assert heatmap.get_attribute("src") == answer["results"][0]["heatmap"]
    assert "where the model looked" in heatmap.get_attribute("alt")
    failed = browser.find_element(By.CSS_SELECTOR, ".result.failed")
    assert "notes.png" in failed.text and "not an image" in failed.text
    assert browser.find_element(By.ID, "status").text == "1 captioned, 1 failed"
    shot = os.environ.get("CAPTIONER_SCREENSHOT") or str(tmp_path / "page.png")
    assert browser.save_screenshot(shot)


def test_page_with_a_key_and_photos_at_their_own_aspect_ratio(keyed_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    url, expected = keyed_server
    path = tmp_path / "wide.png"
    path.write_bytes(photo(2, size=(320, 160)))
    browser.get(url + "/")
    browser.execute_script("sessionStorage.clear()")
    browser.get(url + "/")
    browser.find_element(By.ID, "heatmap").click()  # plain photos this time
    browser.find_element(By.ID, "files").send_keys(str(path))
    WebDriverWait(browser, 60).until(lambda d: "API key" in d.find_element(By.ID, "status").text)
    key = browser.find_element(By.ID, "api_key")
    key.send_keys(KEY, Keys.TAB)  # the change event stores it for this tab
    assert browser.execute_script("return sessionStorage.getItem('captioner-api-key')") == KEY
    browser.find_element(By.ID, "files").send_keys(str(path))
    WebDriverWait(browser, 60).until(
        lambda d: d.find_elements(By.CSS_SELECTOR, ".result[data-ready=true]"))
    card = browser.find_element(By.CSS_SELECTOR, ".result:not(.failed)")
    assert card.find_element(By.CSS_SELECTOR, ".caption").text == expected[2]
    img = card.find_element(By.CSS_SELECTOR, "img.photo")
    width, height = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return [r.width, r.height];", img)
    assert abs(width / height - 2.0) < 0.05  # shown 2:1, as the photo is, not squashed
