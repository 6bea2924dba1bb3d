"""The playground page in a real headless browser: type a prompt with a blank, generate, see it filled."""
from __future__ import annotations

import shutil

import pytest

from glm_tp.dev.demo_corpus import held_out
from tests.support.server import demo_engine, start

BROWSER, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (BROWSER and DRIVER), reason="no chromium + chromedriver installed "
                                "(apt-get install -y chromium chromium-driver; .ci/run does it)")


def _browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = BROWSER
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1000,800"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(DRIVER), options=options)


def test_a_blank_typed_in_the_playground_is_filled():
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    case = held_out("cycle", 1)[0]
    before, after = case.prompt.split("[MASK]")
    live = start(demo_engine())
    browser = _browser()
    try:
        browser.get(live.url + "/")
        box = browser.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(before)
        browser.find_element(By.CSS_SELECTOR, "[data-insert='[MASK]']").click()  # the button puts it at the cursor
        box.send_keys(after)
        assert box.get_attribute("value") == case.prompt
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(lambda b: "tokens in" in b.find_element(By.ID, "stats").text)
        blanks = [m.text.strip() for m in browser.find_elements(By.CSS_SELECTOR, "#output mark.blank")]
        assert blanks == case.answers
        assert browser.find_element(By.ID, "output").text.replace("\n", "") == case.prompt.replace("[MASK]", case.answers[0])
    finally:
        browser.quit()
        live.close()
