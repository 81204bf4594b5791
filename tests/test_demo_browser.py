"""The real demo in a real browser: `hemcap demo` started as a command on a free port of
127.0.0.1, driven by headless Chromium (Debian's `chromium` package) through Playwright: a smear
upload, then issue 15's hostile uploads one after another, the server going on (one server start;
its private folder must be 0700 while it runs and gone after SIGTERM).

Needs: apt-get install chromium; pip install playwright (never `playwright install`: the system
browser is used). Skipped with the reason when either is missing.

The tests run a tiny random model. To picture a trained one, as docs/demo_screenshot.png does:

    HEMCAP_DEMO_MODEL=runs/quickstart-<time>/model/model HEMCAP_SCREENSHOT=docs/demo_screenshot.png \
        pytest tests/test_demo_browser.py -k smear
"""

import json
import os
import re
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hostile import write_hostile_files

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
REPO = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 90  # imports, model load and warm-up; ~15 s on 2 busy CPU cores
RESULT_TIMEOUT_MS = 60_000

# CI installs chromium (make test), so there a missing browser is a failure, not a skip.
if os.environ.get("CI") and not CHROMIUM.is_file():
    raise RuntimeError(f"CI needs {CHROMIUM} for the browser test; `make browser` installs it")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} not found: apt-get install chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api", reason="playwright not installed: pip install playwright")
pytest.importorskip("gradio", reason="the demo needs gradio (pip install -e '.[demo]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_served(url: str, server: subprocess.Popen, log: Path) -> None:
    import httpx

    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"the demo exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    pytest.fail(f"the demo did not serve {url} within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def model_dir(tiny_blip_dir, tmp_path_factory) -> Path:
    """The tiny random model with the training record `hemcap train` leaves in its info, or
    the model HEMCAP_DEMO_MODEL names."""
    import shutil

    from hemcap.models import read_model_info, write_model_info

    if os.environ.get("HEMCAP_DEMO_MODEL"):
        return Path(os.environ["HEMCAP_DEMO_MODEL"]).resolve()
    model = tmp_path_factory.mktemp("run") / "model"
    shutil.copytree(tiny_blip_dir, model)
    training = {"metrics": {"attribute_accuracy": 0.52, "cell_type_accuracy": 0.19, "cider": 0.71},
                "data": {"recipe": "synthetic", "train_images": 96, "val_images": 16, "schema": "wbcatt"},
                "init": "scratch"}
    info = read_model_info(model)
    info.training = training
    write_model_info(model, info)
    return model


def private_folder(log: Path) -> Path:
    """The folder the demo keeps its uploads and reports in, as its start-up line names it (printed
    just after the page starts answering)."""
    deadline = time.monotonic() + 10
    while not (found := re.search(r"its uploads and reports are in (\S+)", log.read_text())):
        if time.monotonic() > deadline:
            pytest.fail(f"the demo did not name its private folder:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)
    return Path(found.group(1))


@pytest.fixture(scope="module")
def demo_url(model_dir, tmp_path_factory):
    """`hemcap demo --model <tiny model> --port <free>` running as a separate process; stopped with
    SIGTERM, it must remove its private folder."""
    port = free_port()
    log = tmp_path_factory.mktemp("demo_log") / "demo.log"
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "hemcap.cli", "demo", "--model", str(model_dir), "--port", str(port)]
    with log.open("w") as out:
        server = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_served(url, server, log)
        folder = private_folder(log)
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
    assert not folder.exists(), f"SIGTERM left the demo's private folder {folder}:\n{log.read_text()[-3000:]}"


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, demo_url):
    """A fresh tab on the demo, recording every request that leaves 127.0.0.1."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    tab = context.new_page()
    tab.outside = []
    tab.on("request", lambda request: request.url.startswith(("http://127.0.0.1", "data:", "blob:"))
           or tab.outside.append(request.url))
    tab.goto(demo_url)
    tab.wait_for_selector("#upload input[type=file]", state="attached")
    yield tab
    context.close()


@pytest.fixture(scope="module")
def smear(tmp_path_factory) -> Path:
    from hemcap.synthetic import draw_smear

    image, cells = draw_smear(25, n_wbc=4)  # a neutrophil, a monocyte, a basophil and an eosinophil
    path = tmp_path_factory.mktemp("upload") / "synthetic_smear.jpg"
    image.save(path, quality=90)
    return path


def save_small_png(path: Path) -> None:
    """256 colours, no dithering: a page screenshot drops from ~700 to ~350 KB and looks the same."""
    from PIL import Image

    with Image.open(path) as shot:
        small = shot.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    small.save(path, optimize=True)


def test_uploaded_smear_shows_overlay_captions_and_count(page, smear, model_dir, tmp_path):
    from hemcap.review import summarize_model

    assert "Research use only, not for diagnosis" in page.inner_text("#research-note")
    model = summarize_model(model_dir)
    card = page.inner_text("#model-card")
    assert model.name in card and f"{model.figures[0][0]} {model.figures[0][1]}" in card
    page.set_input_files("#upload input[type=file]", str(smear))  # the upload runs the analysis
    page.wait_for_selector("#overlay img", timeout=RESULT_TIMEOUT_MS)
    assert "4 white cells found" in page.inner_text("#status")
    assert page.locator("#overlay img").is_visible()
    assert page.locator("#gallery img").count() == 4
    captions = page.locator("#captions li")
    assert captions.count() == 4 and captions.first.inner_text().strip()  # one caption per cell, in order
    counts = page.inner_text("#differential")
    assert "Cell type" in counts and "Total" in counts and "4" in counts
    assert "Cell 1" in page.inner_text("#cells-table")
    assert page.get_by_role("button", name="Report (CSV)").is_visible()
    assert page.outside == []  # the page renders offline: fonts, scripts and analytics all local
    page.wait_for_timeout(800)  # let the gallery and tables finish their layout for the picture
    shot = Path(os.environ.get("HEMCAP_SCREENSHOT") or tmp_path / "demo.png")
    page.screenshot(path=str(shot), full_page=True)
    save_small_png(shot)
    assert shot.stat().st_size > 10_000
    with page.expect_download() as download:
        page.get_by_role("button", name="Report (JSON)").click()
    report = json.loads(Path(download.value.path()).read_text())
    assert report["image"] == smear.name and len(report["cells"]) == 4 and "not for diagnosis" in report["note"]


def test_hostile_uploads_each_get_one_sentence_and_the_page_goes_on(page, tmp_path):
    """Issue 15's uploads, one after another in one tab: each gets one plain sentence naming the file
    and no server path; then a bundled example is analysed as usual."""
    hostile = write_hostile_files(tmp_path)
    sentences = {name: f"{name} cannot be analysed: {reason}." for name, reason in hostile.items()}
    (tmp_path / "notes.txt").write_text("not a picture")  # refused in the browser by the upload box's file types
    sentences["notes.txt"] = "Invalid file type: notes.txt. Only .bmp, .jpeg, .jpg, .png, .tif, .tiff, .webp allowed."
    for name, sentence in sentences.items():
        page.set_input_files("#upload input[type=file]", str(tmp_path / name))
        page.get_by_text(sentence, exact=True).wait_for(timeout=RESULT_TIMEOUT_MS)
        page.click("#upload button[aria-label=Clear]")  # the box holds one file: clear it for the next
    toasts = page.inner_text("body")
    assert "Traceback" not in toasts and "Errno" not in toasts and "/tmp/" not in toasts
    page.get_by_text("Synthetic smear, 4 white cells").first.click()
    page.wait_for_selector("#overlay img", timeout=RESULT_TIMEOUT_MS)
    assert "4 white cells found" in page.inner_text("#status")
