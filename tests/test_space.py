"""The Gradio Space, started for real on localhost and driven in headless Chromium.

The app (``spaces/app.py``) runs in a subprocess on a tiny offline model at 32 px with 2
denoising steps; Debian's ``chromium`` is driven by Playwright's Python client (no browser
download). Each tab runs one generation end to end and its result image is fetched from
the page and checked: the right size, not blank. Screenshots go to the test's temporary
folder, and also to ``$DIFFUSEG_SCREENSHOTS`` when it is set.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import PIL.Image
import pytest

from diffuseg.data import DatasetWriter
from diffuseg.shapesworld import DEFAULT_SHAPES, make_sample
from diffuseg.testing import save_tiny_stable_diffusion

pytest.importorskip("gradio")
sync_api = pytest.importorskip("playwright.sync_api")

REPO = Path(__file__).resolve().parents[1]
SPACE = REPO / "spaces"
SIZE = 32
DATASET_ROWS = 4
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
STARTUP_TIMEOUT_S = 240
RUN_TIMEOUT_MS = 180_000


# --------------------------------------------------------------------------- the server
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("space")


@pytest.fixture(scope="module")
def dataset_folder(workdir) -> Path:
    """A real dataset folder in the Hub layout: ShapesWorld renders written by the package's writer."""
    folder = workdir / "shapes-set"
    with DatasetWriter(folder, class_names=list(DEFAULT_SHAPES), samples_per_shard=2) as writer:
        for index in range(DATASET_ROWS):
            writer.add(make_sample("train", index, size=SIZE))
    return folder


@pytest.fixture(scope="module")
def server(workdir, dataset_folder):
    """``python spaces/app.py`` on a free localhost port, with a tiny model; yields its URL."""
    model = save_tiny_stable_diffusion(workdir / "tiny-sd", seed=0)
    port = free_port()
    log_path = workdir / "server.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               HF_DATASETS_CACHE=str(workdir / "datasets-cache"))
    command = [sys.executable, str(SPACE / "app.py"), "--model", model, "--host", "127.0.0.1", "--port", str(port),
               "--size", str(SIZE), "--steps", "2", "--dataset", str(dataset_folder)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the app exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url, timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the app did not answer within {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            time.sleep(1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# --------------------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def browser_context(workdir):
    if not os.path.exists(CHROMIUM):
        message = "Debian's chromium is not installed (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(workdir / "chromium-profile"), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture
def page(browser_context, server):
    page = browser_context.new_page()
    page.goto(server, wait_until="domcontentloaded")
    page.wait_for_selector("#diffumask-run", timeout=60_000)
    yield page
    page.close()


@pytest.fixture
def screenshot(page, tmp_path, request):
    """``screenshot(name)``: a full-page screenshot in tmp_path (and $DIFFUSEG_SCREENSHOTS if set)."""
    folders = [tmp_path] + ([Path(os.environ["DIFFUSEG_SCREENSHOTS"])] if os.environ.get("DIFFUSEG_SCREENSHOTS") else [])

    def take(name: str) -> Path:
        paths = []
        for folder in folders:
            folder.mkdir(parents=True, exist_ok=True)
            paths.append(folder / f"space-{name}.png")
            page.screenshot(path=str(paths[-1]), full_page=True)
        return paths[0]

    return take


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()


def fetch_image(page, selector: str) -> PIL.Image.Image:
    """The image an ``<img>`` element shows, downloaded from its ``src`` as the browser sees it."""
    element = page.wait_for_selector(selector, state="attached", timeout=RUN_TIMEOUT_MS)
    # under load the gallery attaches the <img> before the browser has decoded it (natural size 0×0)
    page.wait_for_function("e => e.complete && e.naturalWidth > 0", arg=element, timeout=RUN_TIMEOUT_MS)
    src = element.get_attribute("src")
    natural = page.evaluate("e => [e.naturalWidth, e.naturalHeight]", element)
    body = page.request.get(src).body()
    image = PIL.Image.open(io.BytesIO(body))
    image.load()
    assert list(image.size) == natural, "the page decoded another image than the one served"
    return image


def assert_picture(image: PIL.Image.Image, size: tuple[int, int] | None = None) -> None:
    """A real picture: the expected size and more than one colour."""
    if size is not None:
        assert image.size == size
    pixels = np.asarray(image.convert("RGB"))
    assert pixels.size > 0 and pixels.reshape(-1, 3).std(axis=0).max() > 0, "the image is blank"


def run(page, button: str, result: str) -> None:
    """Click ``button`` and wait for ``result`` to appear; an error message instead fails the test."""
    page.click(button)
    page.wait_for_selector(f"{result}, .toast-body", state="attached", timeout=RUN_TIMEOUT_MS)
    if page.locator(".toast-body").count():
        pytest.fail(f"the app showed an error: {page.locator('.toast-body').first.inner_text()}")


# --------------------------------------------------------------------------- one run per tab
pytestmark = pytest.mark.browser


def test_diffumask_tab(page, screenshot):
    """Prompt + class words (pre-filled example) → image with mask, legend overlay, one soft map per word."""
    run(page, "#diffumask-run", "#diffumask-annotated img.base-image")
    assert_picture(fetch_image(page, "#diffumask-annotated img.base-image"), (SIZE, SIZE))
    overlay = fetch_image(page, "#diffumask-overlay img")
    assert_picture(overlay)
    assert overlay.width >= SIZE and overlay.height > overlay.width  # the legend sits under the image
    words = page.input_value("#diffumask-words textarea").split(",")
    assert page.locator("#diffumask-soft img").count() == len(words)
    legend = page.locator("#diffumask-annotated .legend").inner_text()
    assert all(word.strip() in legend for word in words)
    screenshot("diffumask")


def test_freemask_tab(page, screenshot, tmp_path):
    """An uploaded base and one object, consistency check off → the edited image with the instance's mask."""
    base = tmp_path / "base.png"
    make_sample("validation", 1, size=SIZE)["image"].save(base)
    open_tab(page, "Free-Mask")
    page.locator("#freemask-source").get_by_text("upload", exact=True).click()
    page.set_input_files("#freemask-upload input[type=file]", str(base))
    page.wait_for_selector("#freemask-upload img", timeout=30_000)
    page.uncheck("#freemask-check input[type=checkbox]")
    run(page, "#freemask-run", "#freemask-annotated img.base-image")
    assert_picture(fetch_image(page, "#freemask-annotated img.base-image"), (SIZE, SIZE))
    assert_picture(fetch_image(page, "#freemask-annotated img.mask"), (SIZE, SIZE))  # the inserted instance
    assert_picture(fetch_image(page, "#freemask-overlay img"))
    assert "1 inserted, 0 rejected" in page.locator("#freemask-report").inner_text()
    screenshot("freemask")


def test_counterfactual_tab(page, screenshot):
    """Prompt + class word → positive and counterfactual side by side, mask, difference map."""
    open_tab(page, "Counterfactual")
    run(page, "#counterfactual-run", "#counterfactual-difference img")
    positive = fetch_image(page, "#counterfactual-positive img")
    negative = fetch_image(page, "#counterfactual-negative img")
    for image in (positive, negative, fetch_image(page, "#counterfactual-difference img"),
                  fetch_image(page, "#counterfactual-mask img.base-image")):
        assert_picture(image, (SIZE, SIZE))
    assert not np.array_equal(np.asarray(positive), np.asarray(negative))
    assert "Agreement" in page.locator("#counterfactual-agreement").inner_text()
    screenshot("counterfactual")


def test_maskdiffusion_tab(page, screenshot):
    """The pre-filled rendered scene, class names and caption → segmentation overlay and one score row per class."""
    open_tab(page, "MaskDiffusion")
    run(page, "#maskdiffusion-run", "#maskdiffusion-annotated img.base-image")
    assert_picture(fetch_image(page, "#maskdiffusion-annotated img.base-image"), (SIZE, SIZE))
    names = [w.strip() for w in page.input_value("#maskdiffusion-words textarea").split(",")]
    caption = page.input_value("#maskdiffusion-caption textarea")
    assert all(f" {name}" in caption for name in names), "the pre-filled caption names every class"
    table = page.locator("#maskdiffusion-table").inner_text()
    assert all(name in table for name in names)
    assert page.locator("#maskdiffusion-scores img").count() == len(names)
    screenshot("maskdiffusion")


def test_dataset_browser_tab(page, screenshot):
    """The pre-filled dataset folder → a grid of overlays and the class counts of the split."""
    open_tab(page, "Dataset browser")
    run(page, "#dataset-run", "#dataset-gallery img")
    page.wait_for_function(f"() => document.querySelectorAll('#dataset-gallery img').length == {DATASET_ROWS}")
    assert_picture(fetch_image(page, "#dataset-gallery img"))
    assert f"{DATASET_ROWS}" in page.locator("#dataset-summary").inner_text()
    counts = page.locator("#dataset-counts").inner_text()
    assert all(shape in counts for shape in DEFAULT_SHAPES)
    screenshot("dataset")


def test_bad_input_is_a_readable_message(page, screenshot):
    """A class word absent from the prompt: a message that names it, and no traceback on the page."""
    page.fill("#diffumask-words textarea", "giraffe")
    page.click("#diffumask-run")
    toast = page.wait_for_selector(".toast-body", timeout=RUN_TIMEOUT_MS)
    message = toast.inner_text()
    assert "giraffe" in message
    assert "Traceback" not in page.content() and 'File "' not in message
    screenshot("error")


# --------------------------------------------------------------------------- the Space's files
def test_space_metadata():
    """The README front matter a Space needs, and a requirements file that installs this package."""
    import yaml

    text = (SPACE / "README.md").read_text()
    assert text.startswith("---\n")
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["sdk"] == "gradio" and meta["app_file"] == "app.py" and (SPACE / meta["app_file"]).is_file()
    assert {"sdk_version", "title", "emoji", "suggested_hardware", "models"} <= set(meta)
    assert str(meta["sdk_version"]).count(".") == 2
    requirements = [line.split("#")[0].strip() for line in (SPACE / "requirements.txt").read_text().splitlines()]
    assert any(line.startswith("diffuseg[space]") for line in requirements)


# --------------------------------------------------------------------------- over HTTP, as an attacker would
def test_server_files_stay_private_over_http(server, dataset_folder, workdir):
    """Scripted requests to the running server: no path of the server opens, errors name none,
    only the models it was started with load, and every input is bounded."""
    from gradio_client import Client

    client = Client(server, verbose=False)
    # A real dataset on the server that the Space was not started with, and paths around it.
    hidden = workdir / "hidden-set"
    with DatasetWriter(hidden, class_names=list(DEFAULT_SHAPES), samples_per_shard=2) as writer:
        writer.add(make_sample("train", 0, size=SIZE))
    attempts = [str(hidden), "../../../../" + str(hidden).lstrip("/"), str(dataset_folder), "/root", "/etc",
                "~/", "hidden-set", "../shapes-set"]
    for name in attempts:
        with pytest.raises(Exception) as refused:
            client.predict(name, "train", 4, api_name="/browse_dataset")
        message = str(refused.value)
        # Gradio's own check refuses a value outside the list (echoing the request); the app's catalog refuses too.
        assert "is not in the list of choices: ['shapes-set']" in message or "does not offer that dataset" in message
        assert "No such file" not in message and "Error" not in message.split(":")[0]

    gallery, _, summary = client.predict("shapes-set", "train", 4, api_name="/browse_dataset")
    assert len(gallery) == DATASET_ROWS and f"{DATASET_ROWS}" in summary

    with pytest.raises(Exception, match="split names are letters"):
        client.predict("shapes-set", "../../train", 4, api_name="/browse_dataset")
    for model in ("/etc", str(workdir), "stable-diffusion-v1-5/stable-diffusion-v1-5"):
        with pytest.raises(Exception) as refused:
            client.predict(model, "a red circle", "circle", SIZE, 2, 4.0, 0, "otsu", False, api_name="/diffumask_tab")
        assert "not in the list of choices" in str(refused.value) or "does not offer that model" in str(refused.value)
    model = str(workdir / "tiny-sd")
    # Gradio bounds the sliders itself; the app checks again (and what Gradio does not: text length).
    for size, steps, prompt, message in [(SIZE, 10**6, "a circle", "steps must be between 1 and 100|greater than maximum value 100"),
                                         (10**5, 2, "a circle", "size must be between 32 and 1024|greater than maximum value 1024"),
                                         (SIZE, 2, "a circle " * 500, "prompt is 4500 characters long; at most 1000")]:
        with pytest.raises(Exception, match=message):
            client.predict(model, prompt, "circle", size, steps, 4.0, 0, "otsu", False, api_name="/diffumask_tab")


def test_dataset_catalog_opens_only_what_it_was_given(dataset_folder, workdir, monkeypatch):
    """With Hub ids allowed, a typed value passes the page's list: the catalog alone stands between it and the disk."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("space_app", SPACE / "app.py")
    app = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "space_app", app)  # its dataclasses look their module up there
    spec.loader.exec_module(app)
    monkeypatch.chdir(workdir)
    catalog = app.DatasetCatalog([str(dataset_folder)], allow_hub=True)
    assert catalog.names == ["shapes-set"] and catalog.resolve("shapes-set") == str(dataset_folder)
    assert catalog.resolve("owner/some-set") == "owner/some-set"  # a Hub id
    (workdir / "owner").mkdir(exist_ok=True)
    (workdir / "owner" / "local").mkdir(exist_ok=True)
    for name in [str(dataset_folder), "/etc/passwd", "../../etc", "~/x", "owner/local", "./owner/local", "owner/.."]:
        with pytest.raises(ValueError, match="does not offer that dataset; choose one of: shapes-set or a Hub id"):
            catalog.resolve(name)
