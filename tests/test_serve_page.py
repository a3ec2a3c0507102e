"""The chat page in a real headless browser (Debian's chromium + chromedriver), against a real server."""
import shutil

import pytest

from test_serve import Server

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("starlette")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER), reason="chromium and chromedriver not installed")


@pytest.fixture
def browser():
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--window-size=1000,700"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_chat_page_streams_a_reply_and_keeps_the_conversation(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    server = Server("-m", "demo", "--model-name", "demo-model")
    try:
        browser.get(server.url + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda d: d.find_element(By.ID, "model").text == "demo-model")
        # the page sends no seed: without one the demo model sometimes answered with nothing
        # but an end of text, and an empty reply has no first-token time to show
        browser.execute_script("""
            const fetch0 = window.fetch;
            window.fetch = (url, options) => {
              if (options && options.body) options.body = JSON.stringify({...JSON.parse(options.body), seed: 7});
              return fetch0(url, options);
            };""")
        box = browser.find_element(By.ID, "input")
        for turn, text in enumerate(["What is a list?", "And a tuple?"], start=1):
            box.send_keys(text, Keys.ENTER)
            # the reply is done when its statistics line appears
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant .meta")) == turn)
        users = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")]
        replies = browser.find_elements(By.CSS_SELECTOR, ".assistant")
        assert users == ["What is a list?", "And a tuple?"]
        assert all(r.text.strip() for r in replies)
        meta = replies[1].find_element(By.CSS_SELECTOR, ".meta").text
        assert "first token" in meta and "cached" in meta
        # the second turn resumed from the first turn's state
        cached = int(meta.split("cached ")[1].rstrip(")"))
        assert cached > 0
        assert not browser.find_elements(By.CSS_SELECTOR, ".error")
        # a new chat starts empty, and its first reply is not mixed with the old conversation
        browser.find_element(By.ID, "reset").click()
        box.send_keys("Hello again", Keys.ENTER)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".assistant .meta")) == 1)
        assert [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".user")] == ["Hello again"]
        prompt = int(browser.find_element(By.CSS_SELECTOR, ".assistant .meta").text.split("prompt ")[1].split()[0])
        assert prompt < int(meta.split("prompt ")[1].split()[0])
        browser.save_screenshot(str(tmp_path / "chat.png"))
    finally:
        server.stop()
