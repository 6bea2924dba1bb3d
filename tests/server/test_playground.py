"""The playground page in a real headless browser: type a prompt with a blank, generate, see it filled; on a
chat model, chat in its chat view (a system prompt, messages, streamed replies)."""
from __future__ import annotations

import shutil

import httpx
import pytest

from glm_tp.dev.demo_corpus import held_out
from tests.support.server import causal_engine, demo_engine, start

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


def _chat_answer(url: str, messages: list[dict]) -> str:
    """The server's whole (not streamed) reply to `messages` with the page's default settings."""
    body = {"messages": messages, "max_tokens": 32, "seed": 1234, "temperature": 0, "top_p": 1,
            "glm": {"strategy": "greedy"}}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=60).json()["choices"][0]["message"]["content"]


def test_a_chat_model_gets_the_chat_view_and_streamed_replies(tmp_path, tiny_tokenizer_file):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    live = start(causal_engine(tmp_path, tiny_tokenizer_file))
    browser = _browser()
    wait = WebDriverWait(browser, 60)
    try:
        browser.get(live.url + "/")
        wait.until(lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-view") == "chat")
        assert not browser.find_element(By.ID, "mask-buttons").is_displayed()  # no blanks in a causal model
        browser.find_element(By.ID, "system").send_keys("answer in numbers")
        said = []
        for turn, text in enumerate(["one two three", "four five"]):
            browser.find_element(By.ID, "message").send_keys(text)
            browser.find_element(By.ID, "send").click()
            wait.until(lambda b, n=turn: len(b.find_elements(By.CSS_SELECTOR, "#messages .message")) == 2 * n + 2
                       and "tokens in" in b.find_element(By.ID, "stats").text)
            asked = [{"role": "system", "content": "answer in numbers"}] + said + [{"role": "user", "content": text}]
            reply = _chat_answer(live.url, asked)  # the history went with the message
            said += [{"role": "user", "content": text}, {"role": "assistant", "content": reply}]
        shown = [(m.find_element(By.CLASS_NAME, "role").text, m.find_element(By.CLASS_NAME, "content").text)
                 for m in browser.find_elements(By.CSS_SELECTOR, "#messages .message")]
        assert shown == [(m["role"], m["content"].strip()) for m in said]
        assert all(m["content"] for m in said)
        browser.find_element(By.ID, "view-completion").click()  # the completion view stays at hand
        assert browser.find_element(By.ID, "prompt").is_displayed()
        assert not browser.find_element(By.ID, "send").is_displayed()
    finally:
        browser.quit()
        live.close()


def test_a_causal_model_without_a_chat_format_gets_the_completion_view_without_blanks(tmp_path, tiny_tokenizer_file):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    live = start(causal_engine(tmp_path, tiny_tokenizer_file, chat_template=""))
    browser = _browser()
    try:
        browser.get(live.url + "/")
        WebDriverWait(browser, 60).until(
            lambda b: b.find_element(By.TAG_NAME, "body").get_attribute("data-view") == "completion")
        assert not browser.find_element(By.ID, "views").is_displayed()  # no chat view to switch to
        assert not browser.find_element(By.ID, "mask-buttons").is_displayed()
        assert browser.find_element(By.ID, "causal-help").is_displayed()
        box = browser.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys("one two three")
        browser.find_element(By.ID, "generate").click()
        WebDriverWait(browser, 60).until(lambda b: "tokens in" in b.find_element(By.ID, "stats").text)
        body = {"prompt": "one two three", "max_tokens": 32, "seed": 1234, "temperature": 0, "top_p": 1}
        answer = httpx.post(live.url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
        echoed = httpx.post(live.url + "/v1/completions", json={**body, "echo": True}, timeout=60).json()
        assert browser.find_element(By.ID, "output").text == echoed["choices"][0]["text"].strip()
        assert [m.text for m in browser.find_elements(By.CSS_SELECTOR, "#output mark.blank")] == [answer.strip()]
    finally:
        browser.quit()
        live.close()
