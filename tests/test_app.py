"""The Gradio demo end to end: start `app.py` on 127.0.0.1, upload a photo in headless Chromium, read the result."""

import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import pytest
from conftest import ROOT, export_tiny_model, require_module, require_program
from test_inference import fundus_photos


# Skipped locally when missing, a failure under CI=true (.ci/run installs all four).
require_module("gradio", "pip install '.[demo]'")
webdriver = require_module("selenium.webdriver", "pip install '.[test]'")
CHROMIUM = require_program("chromium", "apt-get install chromium")
CHROMEDRIVER = require_program("chromedriver", "apt-get install chromium-driver")

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-dev-shm-usage",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1280,1600",
]
TEXT = "Night blindness since childhood."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_serving(url: str, process: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}: {process.stdout.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"app.py did not serve {url} within {timeout} s")


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    folder = export_tiny_model(tmp_path_factory.mktemp("demo") / "model")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "MDF_MLLM_MODEL": folder}
    # The model folder comes from MDF_MLLM_MODEL, as on a Space.
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "app.py"), "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process)
        yield url, folder
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="chromium-profile-")
    for flag in [*CHROMIUM_FLAGS, f"--user-data-dir={profile}"]:
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def test_upload_a_photo_and_read_the_prediction_and_map(demo_url, browser, tmp_path):
    from transformers import pipeline

    url, folder = demo_url
    photo = tmp_path / "fundus.png"
    fundus_photos()[0].save(photo)
    browser.get(url)
    wait = WebDriverWait(browser, 60)
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#photo input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#photo input[type=file]").send_keys(str(photo))
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#photo img"))  # the upload is shown
    browser.find_element(By.CSS_SELECTOR, "#history textarea").send_keys(TEXT)
    browser.find_element(By.CSS_SELECTOR, "#classify").click()

    def prediction(driver):
        boxes = driver.find_elements(By.CSS_SELECTOR, "#prediction textarea, #prediction input")
        return boxes and boxes[0].get_property("value")

    shown = wait.until(prediction)
    wait.until(lambda driver: driver.find_elements(By.CSS_SELECTOR, "#map img"))

    expected = pipeline("fundus-classification", model=folder, trust_remote_code=True)(str(photo), clinical_text=TEXT)
    match = re.fullmatch(r"(\S+) \((\w+)\): ([0-9.]+)", shown)
    assert match, shown
    assert (match[1], match[2]) == (expected[0]["label"], expected[0]["disease_type"])
    # The browser sends the PNG's exact pixels: the score matches to the digits shown.
    assert match[3] == f"{expected[0]['score']:.3f}"
    labels = browser.find_element(By.CSS_SELECTOR, "body").text
    for entry in expected:
        assert entry["label"] in labels


def listening_addresses(port: int) -> set[str]:
    """The IPv4 addresses (as /proc/net/tcp writes them, hex) with a socket listening on `port`."""
    with open("/proc/net/tcp") as table:
        rows = [line.split() for line in table.readlines()[1:]]
    return {local.split(":")[0] for local, state in ((row[1], row[3]) for row in rows)
            if state == "0A" and int(local.split(":")[1], 16) == port}


def test_issue32_the_demo_listens_where_gradio_server_name_says(demo_url, tmp_path):
    port = int(demo_url[0].rsplit(":", 1)[1].strip("/"))
    assert listening_addresses(port) == {"0100007F"}  # unset: 127.0.0.1 only
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "MDF_MLLM_MODEL": demo_url[1],
           "GRADIO_SERVER_NAME": "0.0.0.0"}
    process = subprocess.Popen([sys.executable, str(ROOT / "app.py"), "--port", str(port)], cwd=ROOT, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/", process)
        assert listening_addresses(port) == {"00000000"}  # every interface
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.mark.parametrize("env, argv, expected", [
    ({}, [], ("127.0.0.1", 7860)),
    ({"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7999"}, [], ("0.0.0.0", 7999)),
    ({"GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7999"}, ["--host", "127.0.0.1", "--port", "7001"],
     ("127.0.0.1", 7001)),
])
def test_issue32_demo_address_options_default_to_gradios_variables(monkeypatch, env, argv, expected):
    from types import SimpleNamespace

    from mdf_mllm import demo

    launched = {}
    monkeypatch.setattr(demo, "build_demo", lambda folder: SimpleNamespace(launch=lambda **kw: launched.update(kw)))
    for name in ("GRADIO_SERVER_NAME", "GRADIO_SERVER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    demo.main(["folder", *argv])
    assert (launched["server_name"], launched["server_port"]) == expected
