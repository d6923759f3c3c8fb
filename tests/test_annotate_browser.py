"""End to end in a real headless Chromium: label one frame by click, one by keyboard."""
from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

pytest.importorskip("flask")
pytest.importorskip("selenium")

from edge_helpers import face, open_device

from conftest import REPO
from infantino.edge_runtime.annotate import create_app

CHROMEDRIVER = Path("/usr/bin/chromedriver")
CHROMIUM = Path("/usr/bin/chromium")
pytestmark = pytest.mark.skipif(not CHROMEDRIVER.exists() or not CHROMIUM.exists(),
                                reason="needs Debian's chromium and chromium-driver: run .ci/browser.sh")


@pytest.fixture()
def served(tiny_package_dir, tmp_path):
    from werkzeug.serving import make_server

    device = open_device(tiny_package_dir, tmp_path / "state", uncertainty_threshold=0.0)
    for k in range(4):
        assert device.predict(face(k, seed=10 + k)).queued_id is not None
    server = make_server("127.0.0.1", 0, create_app(device), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield device, f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    thread.join(10)


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1100",
                "--no-first-run", "--disable-extensions", "--disable-background-networking"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    yield driver
    driver.quit()


def test_a_caregiver_labels_by_click_and_by_keyboard(served, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    device, url = served
    wait = WebDriverWait(browser, 20)
    cards = lambda: browser.find_elements(By.CSS_SELECTOR, "#cards .card")  # noqa: E731
    text = lambda css: browser.find_element(By.CSS_SELECTOR, css).text  # noqa: E731

    browser.get(url)
    wait.until(lambda b: len(cards()) == 4 and text("#head-version") == "0")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#timeline svg circle.dot")) == 4
    first = cards()[0]
    assert len(first.find_elements(By.CSS_SELECTOR, ".bar")) == 7
    assert browser.execute_script("return arguments[0].naturalWidth", first.find_element(By.TAG_NAME, "img")) == 64
    clicked_id = first.get_attribute("data-id")

    # Click: "happy" on the most uncertain frame.
    first.find_element(By.CSS_SELECTOR, 'button[data-label="happy"]').click()
    wait.until(lambda b: len(cards()) == 3 and text("#head-version") == "1")
    assert clicked_id not in [c.get_attribute("data-id") for c in cards()]
    assert text("#queue-count") == "3" and text("#labels-count") == "1"

    # Keyboard: "s" skips the current card, "2" labels the next one "disgust".
    skipped_id = cards()[0].get_attribute("data-id")
    browser.find_element(By.TAG_NAME, "body").send_keys("s")
    wait.until(lambda b: cards()[0].get_attribute("data-id") != skipped_id)
    keyed_id = cards()[0].get_attribute("data-id")
    browser.find_element(By.TAG_NAME, "body").send_keys("2")
    wait.until(lambda b: len(cards()) == 2 and text("#head-version") == "2")
    assert keyed_id not in [c.get_attribute("data-id") for c in cards()]
    wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "#timeline circle.labelled")) == 2)
    assert "error" not in browser.find_element(By.ID, "message").get_attribute("class")

    shot = tmp_path / "annotate.png"
    assert browser.save_screenshot(str(shot))
    if os.environ.get("INFANTINO_SAVE_SCREENSHOT"):  # refresh the README's picture on request, never by default
        shutil.copy(shot, REPO / "bench" / "results" / "annotate.png")

    # The labels are on disk: the queue's tombstones and the saved state's counters.
    queue_dir = device.state_dir / "queue"
    labels = {p.stem: json.loads(p.read_text())["label"] for p in queue_dir.glob("*.label")}
    assert labels == {clicked_id: "happy", keyed_id: "disgust"}
    reopened = open_device(device.package.folder, device.state_dir, uncertainty_threshold=0.0)
    assert reopened.head.version == 2 and reopened.counters["from_queue"] == 2
    assert {i.id for i in reopened.queue.items()} == {c for c in [skipped_id] + [i.id for i in device.queue.items()]}
    assert len(reopened.queue) == 2
