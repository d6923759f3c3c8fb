"""The caregiver page shows what the watch records: the current expression, per-minute valence, alert marks."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flask")

from edge_helpers import open_device

from infantino.edge_runtime.annotate import create_app
from infantino.edge_runtime.watch.distress import DistressEvent
from infantino.edge_runtime.watch.events import EventLog
from infantino.edge_runtime.watch.live import watch_folder
from infantino.edge_runtime.watch.timeline import Timeline


def _probs(classes, label: str) -> np.ndarray:
    p = np.full(len(classes), 0.02)
    p[classes.index(label)] = 0.88
    return p


def test_the_page_reads_the_live_expression_minutes_and_alerts_of_a_running_watch(tiny_package_dir, tmp_path):
    # Prepare: 3 minutes of a timeline ending now, an alert that started a minute ago and has not ended
    device = open_device(tiny_package_dir, tmp_path / "state")
    folder, classes = watch_folder(device.state_dir), device.classes
    tl = Timeline(folder, classes)
    now = time.time()
    for i in range(3 * 60 * 2, 0, -1):
        label = "sad" if i < 150 else "happy"
        tl.record(now - i / 2, True, classes.index(label), _probs(classes, label), 0.3)
    tl.record(now, True, classes.index("sad"), _probs(classes, "sad"), 0.3)
    start = DistressEvent("distress", now - 60, now - 120, 0.9)
    EventLog(folder).append(start.to_dict())
    tl.mark_alert(now - 60)
    client = create_app(device).test_client()
    # Execute
    data = client.get("/api/watch").get_json()
    # Assert
    assert data["running"] and data["current"]["label"] == "sad" and data["current"]["age_s"] < 5
    assert data["alert_active"] and [e["type"] for e in data["events"]] == ["distress"]
    minutes = data["minutes"]
    assert 2 <= len(minutes) <= 4 and minutes[0]["valence"]["positive"] == 1.0 and minutes[-1]["valence"]["negative"] > 0.5
    # the alert ends: the page stops showing it as active
    EventLog(folder).append(DistressEvent("distress_end", now, now - 120, 0.1).to_dict())
    assert client.get("/api/watch").get_json()["alert_active"] is False
    page = client.get("/").get_data(as_text=True)
    assert 'id="watch-strip"' in page and "watch.js" in page
    assert b"alert-mark" in client.get("/static/watch.js").data


def test_without_a_watch_the_page_says_the_camera_is_not_running(tiny_package_dir, tmp_path):
    client = create_app(open_device(tiny_package_dir, tmp_path / "state")).test_client()
    data = client.get("/api/watch").get_json()
    assert data["running"] is False and data["current"] is None and data["minutes"] == [] and data["events"] == []


CHROMEDRIVER, CHROMIUM = Path("/usr/bin/chromedriver"), Path("/usr/bin/chromium")


@pytest.mark.skipif(not CHROMEDRIVER.exists() or not CHROMIUM.exists(), reason="needs Debian's chromium and chromium-driver: run .ci/browser.sh")
def test_the_camera_section_draws_in_a_real_browser(tiny_package_dir, tmp_path):
    pytest.importorskip("selenium")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    from werkzeug.serving import make_server

    # Prepare: a watch's files (10 minutes, the last 5 crying, an alert still on), the page served
    device = open_device(tiny_package_dir, tmp_path / "state")
    folder, classes = watch_folder(device.state_dir), device.classes
    tl = Timeline(folder, classes)
    now = time.time()
    for i in range(10 * 60, -1, -2):
        label = "sad" if i < 300 else "happy"
        tl.record(now - i, True, classes.index(label), _probs(classes, label), 0.3)
    EventLog(folder).append(DistressEvent("distress", now - 200, now - 290, 0.9).to_dict())
    server = make_server("127.0.0.1", 0, create_app(device), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1200,1100"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(options=opts, service=Service(str(CHROMEDRIVER)))
    try:
        # Execute
        driver.get(f"http://127.0.0.1:{server.server_port}/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "watch-now").text.startswith("Now:"))
        # Assert: the expression now, the banner, one alert mark, red and green minutes
        assert "sad" in driver.find_element(By.ID, "watch-now").text
        assert driver.find_element(By.ID, "watch-alert").is_displayed()
        assert len(driver.find_elements(By.CSS_SELECTOR, "#watch-strip line.alert-mark")) == 1
        assert driver.find_elements(By.CSS_SELECTOR, "#watch-strip rect.negative")
        assert driver.find_elements(By.CSS_SELECTOR, "#watch-strip rect.positive")
        assert "Distress alerts:" in driver.find_element(By.ID, "watch-alerts").text
        errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE" and "favicon.ico" not in e["message"]]
        assert not errors, errors  # no script error, nothing refused by the page's CSP
    finally:
        driver.quit()
        server.shutdown()
