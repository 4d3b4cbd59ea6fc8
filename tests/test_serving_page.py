"""The service's web page in a real headless browser: Debian's Chromium driven by Selenium.

Skips (with the reason) where chromium / chromedriver or selenium are absent; CI installs them
(apt-get install chromium chromium-driver).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi")
selenium = pytest.importorskip("selenium", reason="selenium is not installed (pip install -e '.[dev]')")

from PIL import Image  # noqa: E402

from _serving import ServerThread  # noqa: E402
from ram_edge.runtime import Tagger  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
    reason="chromium / chromedriver not found (apt-get install -y chromium chromium-driver)",
)

#: Flags that keep Chromium from calling home: on a closed network its background requests are refused
#: and can stall start-up.
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1200,860")


def start_browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def tag_texts(driver) -> list:
    """The tag names shown, read in one script call (the list is redrawn as answers arrive)."""
    return driver.execute_script("return [...document.querySelectorAll('#tags li .name')].map(e => e.textContent);")


def test_upload_see_tags_switch_language(test_bundle, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(7).integers(0, 256, size=(120, 160, 3), dtype=np.uint8)).save(image)
    with Tagger(test_bundle) as tagger:
        en = tagger.tag(str(image), threshold=0, top_k=4)
        zh = tagger.tag(str(image), threshold=0, top_k=4, lang="zh")

    with ServerThread(test_bundle) as server:
        driver = start_browser(tmp_path / "profile")
        try:
            wait = WebDriverWait(driver, 30)
            driver.get(server.url + "/")
            wait.until(lambda d: "6 tags" in d.find_element(By.ID, "model").text)
            # Ask for the top 4 whatever their probability, then pick the file: one request.
            driver.execute_script("document.getElementById('top-k').value = '4';")
            driver.find_element(By.ID, "own-threshold").click()
            driver.execute_script("const r = document.getElementById('threshold'); r.value = '0';"
                                  "r.dispatchEvent(new Event('input'));")
            driver.find_element(By.ID, "file").send_keys(str(image))

            wait.until(lambda d: len(tag_texts(d)) == 4)
            assert tag_texts(driver) == list(en.tags)
            items = driver.find_elements(By.CSS_SELECTOR, "#tags li")
            for li, p in zip(items, en.probabilities):
                assert float(li.get_attribute("data-probability")) == pytest.approx(p, abs=1e-6)
                assert li.find_element(By.CLASS_NAME, "fill").get_attribute("style") == f"width: {p * 100:.1f}%;"
                assert li.find_element(By.CLASS_NAME, "value").text == f"{p:.3f}"
            assert "4 tags in" in driver.find_element(By.ID, "status").text
            assert driver.find_element(By.ID, "preview").get_attribute("src").startswith("blob:")

            driver.find_element(By.CSS_SELECTOR, '#lang [data-lang="zh"]').click()
            wait.until(lambda d: tag_texts(d) and tag_texts(d)[0].startswith("标签"))
            assert tag_texts(driver) == list(zh.tags)
            assert driver.find_element(By.CSS_SELECTOR, '#lang [data-lang="zh"]').get_attribute("aria-pressed") == "true"
            assert driver.find_element(By.CSS_SELECTOR, '#lang [data-lang="en"]').get_attribute("aria-pressed") == "false"

            # The page's own assets load under its Content-Security-Policy: no error in the console.
            severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not severe, severe
            assert driver.save_screenshot(str(tmp_path / "page.png"))
            assert (tmp_path / "page.png").stat().st_size > 10_000

            # A file that is not an image: the service's reason is shown, the old tags are cleared.
            bad = tmp_path / "not-an-image.png"
            bad.write_text("plain text")
            driver.find_element(By.ID, "file").send_keys(str(bad))
            wait.until(lambda d: "error" in d.find_element(By.ID, "status").get_attribute("class"))
            assert "400: images[0]: not an image" in driver.find_element(By.ID, "status").text
            assert tag_texts(driver) == []
        finally:
            driver.quit()


def test_type_your_own_tags_and_classes(openset_demo_bundle, tmp_path):
    """The demo bundle has a text encoder and no Chinese names: your own tags are tagged, in either
    language under their own names; classes are classified; clearing the tags returns to the model's."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from ram_edge.runtime import Vocabulary

    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(8).integers(0, 256, size=(120, 160, 3), dtype=np.uint8)).save(image)
    mine = ["otter", "kayak", "paddle board"]
    with Tagger(openset_demo_bundle) as tagger:
        default = tagger.tag(str(image), threshold=0, top_k=10)
        classes = tagger.classify(str(image), ["indoor", "outdoor", "underwater"])
        tagger.set_vocabulary(Vocabulary.from_names(mine, tagger.text_encoder))
        own = tagger.tag(str(image), threshold=0, top_k=10)

    def zh_button(d):
        return d.find_element(By.CSS_SELECTOR, '#lang [data-lang="zh"]')

    with ServerThread(openset_demo_bundle) as server:
        driver = start_browser(tmp_path / "profile")
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(server.url + "/")
            wait.until(lambda d: "open-set" in d.find_element(By.ID, "model").text)
            assert zh_button(driver).get_attribute("disabled")  # no Chinese names in this vocabulary
            driver.find_element(By.ID, "own-threshold").click()
            driver.execute_script("const r = document.getElementById('threshold'); r.value = '0';"
                                  "r.dispatchEvent(new Event('input'));")
            driver.find_element(By.ID, "custom-tags").send_keys("otter, kayak,  paddle board", Keys.ENTER)
            driver.find_element(By.ID, "file").send_keys(str(image))

            wait.until(lambda d: len(tag_texts(d)) == 3)
            assert tag_texts(driver) == list(own.tags)
            for li, p in zip(driver.find_elements(By.CSS_SELECTOR, "#tags li"), own.probabilities):
                assert float(li.get_attribute("data-probability")) == pytest.approx(p, abs=1e-5)
            assert driver.find_element(By.ID, "scope").text == "against your 3 tags"

            # Your own tags keep their names in Chinese.
            wait.until(lambda d: not zh_button(d).get_attribute("disabled"))
            zh_button(driver).click()
            wait.until(lambda d: zh_button(d).get_attribute("aria-pressed") == "true" and
                       "3 tags in" in d.find_element(By.ID, "status").text)
            assert tag_texts(driver) == list(own.tags)

            driver.find_element(By.ID, "classes").send_keys("indoor, outdoor, underwater", Keys.ENTER)
            wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#class-list li")) == 3)
            shown = driver.execute_script(
                "return [...document.querySelectorAll('#class-list li')].map(e => [e.querySelector('.name')"
                ".textContent, Number(e.dataset.probability)]);")
            assert [name for name, _ in shown] == list(classes.labels)
            assert [p for _, p in shown] == pytest.approx(classes.probabilities, abs=1e-5)
            assert driver.find_element(By.ID, "classes-status").text == f"most likely: {classes.labels[0]}"

            # Back to the model's own tags: English again, as there are no Chinese names.
            box = driver.find_element(By.ID, "custom-tags")
            box.clear()
            box.send_keys(Keys.ENTER)
            wait.until(lambda d: tag_texts(d) == list(default.tags))
            assert zh_button(driver).get_attribute("disabled")
            english = driver.find_element(By.CSS_SELECTOR, '#lang [data-lang="en"]')
            assert english.get_attribute("aria-pressed") == "true"
            assert driver.find_element(By.ID, "caption-box").get_attribute("hidden")  # no captioning here
            severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert not severe, severe
        finally:
            driver.quit()


def test_page_shows_the_caption_where_the_bundle_captions(reference, tag2text_bundle, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    bundle = tag2text_bundle[0]
    image = reference / "images" / "demo4.jpg"
    with Tagger(bundle) as tagger:
        expected = tagger.caption(str(image)).text
    with ServerThread(bundle) as server:
        driver = start_browser(tmp_path / "profile")
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(server.url + "/")
            wait.until(lambda d: "tags" in d.find_element(By.ID, "model").text)
            driver.find_element(By.ID, "file").send_keys(str(image))
            wait.until(lambda d: d.find_element(By.ID, "caption").text.strip() != "")
            assert driver.find_element(By.ID, "caption-box").is_displayed()
            assert driver.find_element(By.ID, "caption").text == expected
        finally:
            driver.quit()
