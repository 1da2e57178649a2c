"""The web demo (`python -m odise_pl.app`): its request handling, and the page in a real headless
browser (Debian's chromium + chromium-driver, installed by `make test` through `make browser`)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from odise_pl.app import Segmenter, legend_html
from odise_pl.errors import OdiseError
from odise_pl.inference.limits import InputLimits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def image(synthetic_root):
    return str(next((Path(synthetic_root[0]) / "val2017").glob("*.jpg")))


@pytest.fixture(scope="module")
def segmenter(tmp_path_factory):
    limits = InputLimits(max_pixels=30_000)
    return Segmenter({"random": None}, limits=limits, out_root=tmp_path_factory.mktemp("app"))


def test_a_request_gives_overlay_legend_and_files(segmenter, image):
    overlay, legend, files = segmenter(image, "circle; square, box; sky", ["COCO (133)"], "random")
    assert Image.open(overlay).size == Image.open(image).size
    assert [Path(f).suffix for f in files] == [".png", ".json"] and all(Path(f).is_file() for f in files)
    import json

    segments = json.loads(Path(files[1]).read_text())["segments_info"]
    assert legend.count("<tr class='segment'>") == len(segments)
    from odise_pl.inference.segment import build_vocabulary

    categories = json.loads(Path(files[1]).read_text())["categories"]
    assert len(categories) == len(build_vocabulary("circle; square, box; sky", None, "coco")) > 133


@pytest.mark.parametrize(
    "args, message",
    [
        ((None, "cat", [], "random"), "Upload an image first"),
        (("IMAGE", "  ", [], "random"), "The vocabulary is empty"),
        (("HUGE", "cat", [], "random"), "200x200 = 0.0 MPixels, over the limit"),
        (("IMAGE", "cat", [], "nope"), "unknown checkpoint"),
    ],
)
def test_bad_input_is_a_message(segmenter, image, tmp_path, args, message):
    huge = tmp_path / "huge.png"
    Image.fromarray(np.zeros((200, 200, 3), np.uint8)).save(huge)
    args = tuple({"IMAGE": image, "HUGE": str(huge)}.get(a, a) if isinstance(a, str) else a for a in args)
    with pytest.raises(OdiseError, match=message):
        segmenter(*args)


def test_legend_escapes_category_names():
    html = legend_html([{"id": 1, "category": "<b>cat</b>", "score": 0.5, "area": 10}])
    assert "&lt;b&gt;cat&lt;/b&gt;" in html and "<b>" not in html


def _browser():
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        chromium = None
    if not (chromium and driver):
        pytest.skip("needs Debian's chromium + chromium-driver and selenium: `make browser` installs them")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,900"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(driver), options=opts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    outputs = tmp_path_factory.mktemp("outputs")
    cmd = [sys.executable, "-m", "odise_pl.app", "--port", str(port), "--max-pixels", "30000"]
    cmd += ["--outputs", str(outputs)]
    if os.environ.get("ODISE_APP_CHECKPOINT"):  # e.g. a `make train` checkpoint for the README's screenshot
        cmd += ["--checkpoint", os.environ["ODISE_APP_CHECKPOINT"]]
    log = open(tmp_path_factory.mktemp("log") / "app.log", "w+")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 180
    while time.time() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert proc.poll() is None, open(log.name).read()[-3000:]
            time.sleep(0.5)
    yield url
    proc.terminate()
    proc.wait(timeout=30)


def test_the_page_in_a_headless_browser(server, image, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    d = _browser()
    try:
        d.get(server)
        wait = WebDriverWait(d, 120)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))

        def toast():  # in one script: toasts come and go while Python looks
            return d.execute_script(
                "return Array.from(document.querySelectorAll('[data-testid=toast-text]'))"
                ".map(e => e.textContent).join(' ')"
            )

        def close_toasts():
            d.execute_script("document.querySelectorAll('[data-testid=toast-close]').forEach(e => e.click())")

        segment = d.find_element(By.CSS_SELECTOR, "#segment")
        # no image: a message, not a stack trace
        segment.click()
        wait.until(lambda d: "Upload an image first" in toast())
        close_toasts()
        # an image but an empty vocabulary
        d.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(image)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        segment.click()
        wait.until(lambda d: "The vocabulary is empty" in toast())
        close_toasts()
        # the real thing: vocabulary typed, segment, overlay + legend + downloads
        d.find_element(By.CSS_SELECTOR, "#vocabulary textarea").send_keys(
            "circle; square, box; triangle; sky; grass; water"
        )
        segment.click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#legend-table tr"))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#overlay img"))
        rows = d.find_elements(By.CSS_SELECTOR, "#legend-table tr.segment")
        assert rows, "the legend lists no segment"
        names = {"circle", "square", "triangle", "sky", "grass", "water"}
        assert all(r.find_element(By.CSS_SELECTOR, ".category").text in names for r in rows)
        assert len(d.find_elements(By.CSS_SELECTOR, "#files a")) == 2  # panoptic PNG + JSON to download
        shot = os.environ.get("ODISE_SCREENSHOT") or str(tmp_path / "web_demo.png")
        d.save_screenshot(shot)
        # a huge image: a message
        huge = tmp_path / "huge.png"
        Image.fromarray(np.full((300, 300, 3), 128, np.uint8)).save(huge)
        d.find_element(
            By.CSS_SELECTOR, "#image button[aria-label*='Remove'], #image button[aria-label*='Clear']"
        ).click()
        wait.until(lambda d: not d.find_elements(By.CSS_SELECTOR, "#image img"))
        d.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(huge))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
        segment.click()
        wait.until(lambda d: "MPixels, over the limit" in toast())
        assert "Traceback" not in d.page_source
    finally:
        d.quit()
