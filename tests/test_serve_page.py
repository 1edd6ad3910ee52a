"""The chat page in a real browser (Debian's chromium + chromium-driver through selenium): load it,
send a message, wait for the persona's and the unsteered answer, save a screenshot."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (the serve extra)")

from serve_helpers import PERSONAS, TRAITS, Server, serve_config, write_persona  # noqa: E402
from tests_helpers import write_fake_vectors  # noqa: E402

from persona_steering.runtime import identify, load_runtime  # noqa: E402

SCREENSHOT_ENV = "SERVE_PAGE_SCREENSHOT"
"""Where to copy the screenshot as well (it is always written under the test's tmp_path)."""


def _browser():
    """A headless chromium driver, or a skip that says what is missing."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip(
            "no browser: install Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)"
        )
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1200,800",
    ):
        options.add_argument(arg)
    try:
        return webdriver.Chrome(service=Service(driver), options=options)
    except Exception as exc:  # noqa: BLE001 - any failure to start the browser is a reason to skip
        pytest.skip(f"chromium could not start: {str(exc).splitlines()[0]}")


def test_page_streams_persona_and_base_answers(tmp_path, tiny_model_dir):
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    cfg = serve_config(tmp_path, tiny_model_dir, "serve.max_tokens=24")
    ident = identify(cfg.model)
    write_fake_vectors(tmp_path / "vectors" / ident.slug, ident.fingerprint, ident.model_id, TRAITS)
    for pid, weights in PERSONAS.items():
        write_persona(tmp_path / "runs", pid, weights)
    browser = _browser()
    try:
        with Server(cfg, load_runtime(cfg.model, cfg.cache_dir), None) as server:
            browser.get(server.url)
            wait = WebDriverWait(
                browser, 30, ignored_exceptions=[NoSuchElementException, StaleElementReferenceException]
            )
            wait.until(lambda b: len(Select(b.find_element(By.ID, "persona")).options) == 1 + len(PERSONAS))
            Select(browser.find_element(By.ID, "persona")).select_by_value("grandpa")
            weights = wait.until(
                lambda b: (
                    "T1" in b.find_element(By.ID, "weights").text and b.find_element(By.ID, "weights").text
                )
            )
            assert "1.000" in weights and "-0.500" in weights
            message = browser.find_element(By.ID, "message")
            message.clear()
            message.send_keys("how was your weekend ?")
            browser.find_element(By.ID, "send").click()
            done = ("done", "error")
            wait.until(
                lambda b: all(
                    b.find_element(By.ID, i).get_attribute("data-state") in done for i in ("steered", "base")
                )
            )
            steered = browser.find_element(By.ID, "steered")
            base = browser.find_element(By.ID, "base")
            assert (
                steered.get_attribute("data-state") == "done" and base.get_attribute("data-state") == "done"
            )
            assert steered.text and base.text and steered.text != base.text
            shot = tmp_path / "serve_page.png"
            assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 0
            if os.environ.get(SCREENSHOT_ENV):
                shutil.copyfile(shot, os.environ[SCREENSHOT_ENV])
    finally:
        browser.quit()
