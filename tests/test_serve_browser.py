"""The web page at / in a real headless browser (Debian's chromium + chromedriver; nothing is downloaded):
type a prompt, generate, watch the progress bar move and the image appear. The screenshot is kept under
the test's tmp dir and, when SDEXPORT_TEST_ARTIFACTS names a folder, copied there."""

from __future__ import annotations

import base64
import io
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from serve_helpers import start_server

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
STEPS = 60  # long enough to see several progress polls (the page polls every 200 ms)

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(),
                                reason="needs Debian's chromium at /usr/bin/chromium (apt-get install chromium "
                                       "chromium-driver); browsers cannot be downloaded here")


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Any]:
    os.environ["SE_OFFLINE"] = "true"  # selenium-manager must not fetch anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert CHROMEDRIVER.exists(), "chromium is installed but not its driver: apt-get install chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1280,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _wait(what: str, check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _set(driver: Any, element_id: str, value: str) -> None:
    el = driver.find_element("id", element_id)
    el.clear()
    el.send_keys(value)


def test_page_generates_an_image_with_a_moving_progress_bar(browser: Any, demo_artifact: Path, tmp_path: Path) -> None:
    from selenium.webdriver.support.ui import Select

    srv = start_server([demo_artifact])
    try:
        browser.get(srv.url + "/")
        assert browser.title == "sdexport"
        # The page filled its choices from /sd-models and /samplers.
        _wait("the model list", lambda: browser.execute_script("return document.getElementById('model').length"))
        samplers = browser.execute_script("return [...document.getElementById('sampler').options].map(o => o.value)")
        assert "Euler a" in samplers and "DPM++ 2M" in samplers, samplers
        models = [m["title"] for m in httpx.get(srv.url + "/sdapi/v1/sd-models", timeout=30).json()]
        assert browser.execute_script("return [...document.getElementById('model').options].map(o => o.value)") \
            == models
        assert browser.find_element("id", "model").get_attribute("value") == models[0]

        prompt = "a lighthouse on a cliff at dusk"
        _set(browser, "prompt", prompt)
        _set(browser, "negative_prompt", "fog")
        _set(browser, "width", "64")
        _set(browser, "height", "64")
        _set(browser, "steps", str(STEPS))
        _set(browser, "seed", "1234")
        Select(browser.find_element("id", "sampler")).select_by_value("Euler")
        sampler = "Euler"
        browser.find_element("id", "generate").click()

        seen: list[int] = []
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            seen.append(int(browser.find_element("id", "progress").get_attribute("data-progress")))
            if browser.execute_script("return document.querySelectorAll('#images img').length"):
                break
            error = browser.find_element("id", "error").text
            assert not error, error
            time.sleep(0.05)
        else:
            raise AssertionError(f"no image after 300 s; progress seen: {sorted(set(seen))}")

        shot = tmp_path / "serve_browser.png"
        browser.save_screenshot(str(shot))
        if os.environ.get("SDEXPORT_TEST_ARTIFACTS"):
            out = Path(os.environ["SDEXPORT_TEST_ARTIFACTS"])
            out.mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, out / shot.name)

        moving = sorted({p for p in seen if 0 < p < 100})
        assert len(moving) >= 2, f"the progress bar did not move: {sorted(set(seen))}"
        firsts = [p for i, p in enumerate(seen) if 0 < p < 100 and (i == 0 or p != seen[i - 1])]
        assert firsts == sorted(firsts), f"progress went backwards: {firsts}"
        assert browser.find_element("id", "progress").get_attribute("data-progress") == "100"

        # The image is the server's PNG: 64x64, decodable, with its infotext shown beside it.
        src = browser.find_element("css selector", "#images img").get_attribute("src")
        assert src.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert image.size == (64, 64)
        assert browser.execute_script("return document.querySelector('#images img').naturalWidth") == 64
        infotext = browser.find_element("id", "infotext").text
        assert infotext.startswith(prompt), infotext
        for part in ("Negative prompt: fog", f"Steps: {STEPS}", f"Sampler: {sampler}", "Seed: 1234", "Size: 64x64"):
            assert part in infotext, (part, infotext)
        assert image.info.get("parameters", "").replace("\n", " ") == infotext.replace("\n", " ")

        # Everything the page loaded came from the server itself: no external resources.
        origins = browser.execute_script(
            "return performance.getEntriesByType('resource').map(e => new URL(e.name).origin)")
        assert origins and set(origins) == {srv.url}, origins
        assert shot.stat().st_size > 0
    finally:
        srv.stop()
