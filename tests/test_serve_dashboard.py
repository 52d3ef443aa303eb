"""The live dashboard in a real headless browser (Debian's chromium + chromedriver through
selenium): the page loads, the heatmap has L x E cells, and they change after requests are
served. A screenshot is left outside git (``$SMOE_ARTIFACTS`` or pytest's temporary folder).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("selenium")
httpx = pytest.importorskip("httpx")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                 reason="needs Debian's chromium and chromium-driver "
                                        "(apt-get install chromium chromium-driver)")]

from test_serve import PROMPT, Server, folders  # noqa: E402,F401 - the run-folder fixture


@pytest.fixture()
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1200,900"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _cells(driver) -> list[tuple[str, str]]:
    from selenium.webdriver.common.by import By

    return [(c.get_attribute("data-layer") + "/" + c.get_attribute("data-expert"),
             c.get_attribute("data-count"))
            for c in driver.find_elements(By.CSS_SELECTOR, "#heatmap .cell")]


def _wait(predicate, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.3)
    raise TimeoutError("the dashboard did not update")


def test_dashboard_heatmap_has_cells_and_changes(folders, browser, tmp_path):
    root, run, _ = folders
    server = Server(run, root, "--max-batch", "4", "--monitor-window-tokens", "64").wait_ready()
    try:
        # One request first: the model's layer and expert counts are known from then on.
        httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4},
                   timeout=120).raise_for_status()
        browser.get(server.url + "/dashboard")
        cells = _wait(lambda: _cells(browser))
        assert len(cells) == 4 * 8                   # tiny-moe: 4 MoE layers x 8 experts
        before = dict(cells)
        for _ in range(3):
            httpx.post(server.url + "/v1/completions",
                       json={"prompt": "Another prompt about the river ", "max_tokens": 16},
                       timeout=120).raise_for_status()
        after = _wait(lambda: (c := dict(_cells(browser))) != before and c)
        assert set(after) == set(before)
        assert sum(int(v) for v in after.values()) > 0
        body = browser.find_element("tag name", "body")
        assert body.get_attribute("data-error") is None
        assert int(browser.find_element("id", "generated").text) >= 4
        out = Path(os.environ.get("SMOE_ARTIFACTS", tmp_path))
        out.mkdir(parents=True, exist_ok=True)
        assert browser.save_screenshot(str(out / "dashboard.png"))
    finally:
        server.stop()
