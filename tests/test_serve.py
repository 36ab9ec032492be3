"""`pixellm serve` in a real browser: a tiny checkpoint served as a subprocess, driven by headless
Chromium (Debian's chromium + chromium-driver, driven by selenium with the driver's path given, so
selenium-manager never downloads anything): upload, ask, read the answer, see the overlay, find the
mask download; a missing image, an unreadable one and an over-long question are reported in the page;
Ctrl-C stops the server with exit status 0."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytestmark = pytest.mark.slow

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
if not (os.access(CHROMIUM, os.X_OK) and os.access(CHROMEDRIVER, os.X_OK)):
    pytest.skip(f"needs Debian's chromium and chromium-driver ({CHROMIUM}, {CHROMEDRIVER}): "
                "apt-get install chromium chromium-driver", allow_module_level=True)
pytest.importorskip("gradio", reason="pixellm serve needs gradio (pip install -e '.[serve]')")
pytest.importorskip("selenium", reason="the browser test needs selenium (pip install -e '.[dev]')")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import TimeoutException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

OVERRIDES = ["data.token_buckets=[257]"]
STARTUP_S = 240  # import, load and compile on a busy CPU


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_checkpoint(tmp: Path) -> None:
    """A tiny checkpoint that always answers "Sure, [SEG]." (as tests/test_predictor.py builds it)."""
    from tests.eval.tiny import sure_seg_checkpoint

    sure_seg_checkpoint(tmp)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The running server: its URL, process and files; stopped (if a test has not) at the end."""
    tmp = tmp_path_factory.mktemp("serve")
    _make_checkpoint(tmp)
    rng = np.random.default_rng(0)
    (tmp / "examples").mkdir()
    Image.fromarray(rng.integers(0, 256, (37, 52, 3), dtype=np.uint8)).save(tmp / "photo.png")
    Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp / "examples" / "example.png")
    (tmp / "broken.png").write_bytes(b"not an image")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, not conftest's eight
    env.update(JAX_PLATFORMS="cpu", GRADIO_ANALYTICS_ENABLED="False", GRADIO_TEMP_DIR=str(tmp / "gradio"))
    out, err = open(tmp / "stdout.txt", "w"), open(tmp / "stderr.txt", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "pixellm_jax.cli", "serve", "--checkpoint", str(tmp / "ckpt"), *OVERRIDES,
         "--port", str(port), "--examples", str(tmp / "examples"), "--max-new-tokens", "12"],
        stdout=out, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"pixellm serve exited with {proc.returncode}:\n{(tmp / 'stderr.txt').read_text()}")
            if time.monotonic() > deadline:
                pytest.fail(f"pixellm serve did not answer in {STARTUP_S} s:\n{(tmp / 'stderr.txt').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                time.sleep(0.5)
        yield dict(url=url, proc=proc, tmp=tmp)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out.close()
        err.close()


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1600"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _open(browser, url):
    browser.get(url)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))


def _value(browser, selector: str) -> str:
    return browser.find_element(By.CSS_SELECTOR, selector).get_attribute("value") or ""


def _ask(browser, question: str) -> None:
    box = browser.find_element(By.CSS_SELECTOR, "#question textarea")
    box.clear()
    box.send_keys(question)
    browser.find_element(By.CSS_SELECTOR, "#submit").click()


def _upload(browser, path: Path) -> None:
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(path))
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))


def test_missing_image_is_reported(server, browser):
    _open(browser, server["url"])
    _ask(browser, "Where is it?")
    WebDriverWait(browser, 30).until(lambda d: _value(d, "#status textarea"))
    assert "No image" in _value(browser, "#status textarea")
    assert _value(browser, "#answer textarea") == ""


def test_upload_answer_overlay_and_masks(server, browser):
    _open(browser, server["url"])
    _upload(browser, server["tmp"] / "photo.png")
    _ask(browser, "Where is it?")
    WebDriverWait(browser, 60).until(lambda d: _value(d, "#answer textarea"))
    assert _value(browser, "#answer textarea") == "Sure, [1]."
    assert _value(browser, "#status textarea").startswith("1 target")
    size = WebDriverWait(browser, 30).until(lambda d: d.execute_script(
        "const i = document.querySelector('#overlay img');"
        "return i && i.complete && i.naturalWidth > 0 ? [i.naturalWidth, i.naturalHeight] : null;"))
    assert size == [52, 37]  # the overlay is at the image's own size
    links = browser.find_elements(By.CSS_SELECTOR, "#masks a[download]")
    assert [a.get_attribute("download") for a in links] == ["photo_mask_1.png"]
    with urllib.request.urlopen(links[0].get_attribute("href"), timeout=10) as response:
        mask = Image.open(response)
        mask.load()
    assert mask.size == (52, 37) and set(np.unique(np.asarray(mask))) <= {0, 255}


def test_example_and_overlong_question(server, browser):
    _open(browser, server["url"])
    browser.find_element(By.CSS_SELECTOR, ".gallery-item").click()  # the --examples folder's image
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#image img"))
    _ask(browser, " ".join(["word"] * 100))
    WebDriverWait(browser, 30).until(lambda d: _value(d, "#status textarea"))
    assert "too long" in _value(browser, "#status textarea")
    _ask(browser, "Where is it?")
    WebDriverWait(browser, 60).until(lambda d: _value(d, "#answer textarea"))
    assert _value(browser, "#answer textarea") == "Sure, [1]."
    links = browser.find_elements(By.CSS_SELECTOR, "#masks a[download]")
    assert [a.get_attribute("download") for a in links] == ["example_mask_1.png"]


def test_unreadable_image_is_reported(server, browser):
    _open(browser, server["url"])
    browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(server["tmp"] / "broken.png"))
    _ask(browser, "Where is it?")
    # textContent, not .text: a toast still fading in is "not displayed" and its .text is empty.
    def toasts(d):
        return " | ".join(e.get_attribute("textContent") or "" for e in d.find_elements(By.CSS_SELECTOR, ".toast-body"))

    def unreadable_toast(d):
        text = toasts(d)
        return text if "Unreadable image" in text else None

    try:
        shown = WebDriverWait(browser, 30).until(unreadable_toast)
    except TimeoutException:
        pytest.fail(f"no 'Unreadable image' message; toasts shown: {toasts(browser)!r}")
    assert "Unreadable image: broken.png" in shown


def test_ctrl_c_stops_the_server(server):
    """Last: SIGINT (Ctrl-C) ends the server with status 0, after it printed its URL."""
    proc = server["proc"]
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 0
    assert f"running on {server['url']}" in (server["tmp"] / "stdout.txt").read_text()
    assert "stopped" in (server["tmp"] / "stderr.txt").read_text()
