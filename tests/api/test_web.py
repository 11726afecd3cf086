"""The page at /, tested in a real browser (Debian's chromium through its chromedriver, driven by
Selenium) against a real `imgrec serve` of the shipped model; and the page's routes over HTTP.

Every state the browser reaches is saved as a screenshot under pytest's temporary directory
(printed at the end of the module) so that a person can look at what the tests saw.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from helpers.apps import running
from helpers.daemons import (
    LOOPBACK,
    Daemon,
    free_port,
    http_status,
    require_binary,
    venv_binary,
    wait_until,
)
from helpers.settings import make_settings
from PIL import Image

from app.api.web import CARD_FILES
from app.main import create_app
from app.settings import DEFAULT_MODEL_DIR
from app.training.data import load_fashion_mnist

pytestmark = pytest.mark.slow  # one server start-up and one browser for the module

SHIPPED = DEFAULT_MODEL_DIR
WAIT_S = 60.0  # bound on any one wait for the page (the CI machine is small and shared)
CHROMIUM_FLAGS = (
    # as root in a container: no sandbox; and nothing of the browser's own reaches the network
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
    "--no-first-run", "--no-default-browser-check", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-extensions",
    "--disable-default-apps", "--metrics-recording-only", "--window-size=1200,1400",
)


# ---- the server, the browser, the images -------------------------------------------------------

# With API keys configured, /predict and /search answer 401 without one: the module's server
# has them, so the page is tested as it works behind keys (the page fixture gives it the key).
KEY = "page-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`imgrec serve` of the shipped model on a free loopback port, API keys on; its base URL."""
    tmp = tmp_path_factory.mktemp("web-server")
    port = free_port()
    keys = tmp / "keys"
    keys.write_text(f"{KEY}  # the page tests\n")
    env = {**os.environ, "IMGREC_MODEL_DIR": str(SHIPPED), "IMGREC_DEVICE": "cpu",
           "IMGREC_HOST": LOOPBACK, "IMGREC_PORT": str(port), "IMGREC_EMBED_STORE": "memory",
           "IMGREC_TORCH_THREADS": "1", "IMGREC_DECODE_THREADS": "1",
           "IMGREC_GRACEFUL_SHUTDOWN_S": "5", "IMGREC_LOG_LEVEL": "warning",
           "IMGREC_API_KEYS_FILE": str(keys)}
    d = Daemon("imgrec", [venv_binary("imgrec"), "serve"], tmp, env=env, cwd=tmp)
    url = f"http://{LOOPBACK}:{port}"
    try:
        wait_until(lambda: http_status(url + "/readyz") == 200, 240, "imgrec serve /readyz", d)
        yield url
    finally:
        d.stop()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    folder = tmp_path_factory.mktemp("web-screenshots")
    yield folder
    print(f"\nscreenshots of the page: {folder}")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = require_binary("chromium")
    chromedriver = require_binary("chromedriver", ("/usr/lib/chromium",))
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as DriverService

    # the driver and browser are named explicitly, so Selenium Manager has nothing to look up;
    # SE_OFFLINE keeps it from the network should it run at all
    mp = pytest.MonkeyPatch()
    mp.setenv("SE_OFFLINE", "true")
    mp.setenv("SE_AVOID_STATS", "true")
    profile = tempfile.TemporaryDirectory(prefix="imgrec-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile.name}"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=DriverService(executable_path=chromedriver), options=opts)
    try:
        yield driver
    finally:
        driver.quit()
        profile.cleanup()
        mp.undo()


@pytest.fixture()
def page(browser: Any, server: str) -> Any:
    """The browser on a fresh load of the page at desktop size, its logs emptied."""
    browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    browser.get("about:blank")
    browser.get_log("browser")
    browser.get_log("performance")
    browser.get(server + "/")
    browser.execute_script("sessionStorage.setItem('imgrec.apiKey', arguments[0])", KEY)
    wait_for(browser, lambda d: d.execute_script(
        "return document.querySelector('#state-text').textContent") == "ready", "ready state")
    wait_for(browser, lambda d: d.find_elements("css selector", "#card-facts dt"), "model card")
    return browser


def wait_for(driver: Any, check: Any, what: str) -> Any:
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT_S, poll_frequency=0.1).until(check)
    except TimeoutException:
        raise AssertionError(f"the page never showed {what} within {WAIT_S:.0f} s") from None


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Real Fashion-MNIST test images as PNG files, one per label, named after it."""
    folder = tmp_path_factory.mktemp("web-images")
    data = load_fashion_mnist("fashion-mnist")
    pixels, labels = data.test.images[:, 0].numpy(), data.test.labels.numpy()
    out = {}
    for index, name in enumerate(data.labels):
        first = int(np.flatnonzero(labels == index)[0])
        path = folder / (re.sub(r"[^a-z]+", "-", name.lower()).strip("-") + ".png")
        Image.fromarray(pixels[first], mode="L").save(path, format="PNG")
        out[name] = path
    return out


def predict(server: str, path: Path) -> httpx.Response:
    return httpx.post(server + "/predict?top_k=5", headers=AUTH,
                      files=[("file", (path.name, path.read_bytes()))], timeout=WAIT_S)


def upload(driver: Any, *paths: Path) -> None:
    driver.find_element("id", "files").send_keys("\n".join(str(p) for p in paths))


def results(driver: Any) -> list[dict[str, Any]]:
    """What the page shows for each upload, oldest first."""
    return list(reversed(driver.execute_script("""
        return [...document.querySelectorAll('#results > li')].map(li => ({
          status: li.dataset.status,
          name: li.querySelector('.name').textContent,
          time: li.querySelector('.time').textContent,
          error: li.querySelector('.error').hidden ? null : li.querySelector('.error').textContent,
          labels: [...li.querySelectorAll('.labels li')].map(x => [
            x.querySelector('.label').textContent, x.querySelector('.pct').textContent]),
          preview: li.querySelector('.preview').naturalWidth,
        }));""")))


def settled(driver: Any, n: int) -> list[dict[str, Any]] | None:
    shown = results(driver)
    done = [r for r in shown if r["status"] in ("done", "failed")]
    return shown if len(shown) == n and len(done) == n else None


def shown_pct(score: float) -> str:
    """A score as the page writes it: one decimal, and "<0.1 %" for what would read 0.0."""
    p = score * 100
    return "<0.1 %" if 0 < p < 0.1 else f"{p:.1f} %"


def console_errors(driver: Any) -> list[dict[str, Any]]:
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def requested_urls(driver: Any) -> list[str]:
    urls = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            urls.append(message["params"]["request"]["url"])
    return urls


# ---- in the browser ---------------------------------------------------------------------------

def test_page_loads_without_console_errors_and_only_same_origin_requests(
        page: Any, server: str, shots: Path) -> None:
    wait_for(page, lambda d: d.execute_script(
        "const imgs = [...document.querySelectorAll('#plots img')];"
        "return imgs.length === 3 && imgs.every(i => i.complete && i.naturalWidth > 0)"),
        "the three model plots")
    page.save_screenshot(str(shots / "01-loaded.png"))
    assert console_errors(page) == []
    urls = requested_urls(page)
    foreign = [u for u in urls if not (u.startswith(server + "/") or u.startswith("blob:"))]
    assert foreign == [], foreign
    paths = {u.removeprefix(server) for u in urls}
    assert {"/", "/static/app.js", "/static/app.css", "/model", "/readyz", "/metrics",
            "/model/files", "/model/files/curves.png", "/model/files/confusion.png",
            "/model/files/calibration.png"} <= paths

    card = json.loads(httpx.get(server + "/model").text)
    facts = page.execute_script("""return Object.fromEntries([...document.querySelectorAll(
        '#card-facts dt')].map(dt => [dt.textContent, dt.nextElementSibling.textContent]))""")
    assert facts["name"] == card["name"] and facts["version"] == card["version"]
    assert facts["test top-1"].startswith(f"{card['metrics']['test_top1']:.2f} %")
    assert facts["labels"] == ", ".join(card["labels"])
    rows = page.execute_script("""return [...document.querySelectorAll('#per-class tbody tr')]
        .map(tr => [tr.querySelector('th').textContent, tr.querySelector('.pct').textContent])""")
    assert rows == [[k, f"{v:.1f} %"] for k, v in card["metrics"]["per_class_accuracy"].items()]
    assert "queue 0 images" in page.find_element("id", "queue").text

    # by keyboard: the first Tab stop is the file picker, and it shows where the focus is
    page.find_element("tag name", "body").send_keys("\ue004")  # Tab
    focused = page.switch_to.active_element
    assert focused.get_attribute("id") == "files"
    outline = page.execute_script("return getComputedStyle(arguments[0].nextElementSibling)"
                                  ".outlineStyle", focused)
    assert outline == "solid"


def test_an_upload_shows_the_label_predict_gives_for_the_same_bytes(
        page: Any, server: str, images: dict[str, Path], shots: Path) -> None:
    path = images["Ankle boot"]
    upload(page, path)
    shown = wait_for(page, lambda d: settled(d, 1), "the answer")[0]
    page.save_screenshot(str(shots / "02-one-upload.png"))
    expected = predict(server, path).json()["results"][0]["labels"]
    assert shown["status"] == "done" and shown["error"] is None
    assert shown["name"] == path.name and re.fullmatch(r"\d+ ms", shown["time"])
    assert shown["preview"] == 28  # the preview is the uploaded image itself
    assert shown["labels"] == [[x["label"], shown_pct(x["score"])] for x in expected[:3]]
    assert shown["labels"][0][0] == "Ankle boot"  # the shipped model knows this one

    # the select shows more (or fewer) of the labels the service already gave
    from selenium.webdriver.support.ui import Select
    Select(page.find_element("id", "top-k")).select_by_visible_text("5")
    assert results(page)[0]["labels"] == [[x["label"], shown_pct(x["score"])] for x in expected]


def test_the_class_map_is_drawn_over_the_preview_and_unknown_is_flagged(
        page: Any, server: str, images: dict[str, Path], shots: Path, tmp_path: Path) -> None:
    noise = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
                    ).save(noise)
    upload(page, images["Trouser"], noise)
    wait_for(page, lambda d: settled(d, 2), "both answers")
    page.save_screenshot(str(shots / "02b-class-map-and-unknown.png"))
    shown = list(reversed(page.execute_script("""
        return [...document.querySelectorAll('#results > li')].map(li => {
          const c = li.querySelector('canvas.cam'), img = li.querySelector('.preview');
          const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
          let white = 0, red = 0;
          for (let i = 0; i < px.length; i += 4) {
            if (px[i + 1] > 250) white++; if (px[i + 1] < 5) red++; }
          const cb = c.getBoundingClientRect(), ib = img.getBoundingClientRect();
          return {hidden: c.hidden, w: c.width, h: c.height, white, red,
                  over: cb.width > 0 && cb.left >= ib.left - 1 && cb.right <= ib.right + 1
                        && cb.top >= ib.top - 1 && cb.bottom <= ib.bottom + 1,
                  unknown: li.querySelector('.unknown').hidden ? null
                           : li.querySelector('.unknown').textContent};
        });""")))
    answers = [httpx.post(server + "/predict?explain=true", headers=AUTH, timeout=WAIT_S,
                          files=[("file", (p.name, p.read_bytes()))]).json()["results"][0]
               for p in (images["Trouser"], noise)]
    for got, want in zip(shown, answers, strict=True):
        # the map as the service gave it: 28 x 28, its minimum white, its maximum full red
        assert not got["hidden"] and (got["w"], got["h"]) == (28, 28) and got["over"]
        assert got["white"] >= 1 and got["red"] >= 1
        assert (got["unknown"] is not None) is want["unknown"]
    assert answers[0]["unknown"] is False and answers[1]["unknown"] is True
    assert "Unknown" in shown[1]["unknown"]


def test_three_files_at_once_show_three_results(
        page: Any, server: str, images: dict[str, Path], shots: Path) -> None:
    paths = [images["Trouser"], images["Bag"], images["Sneaker"]]
    upload(page, *paths)
    shown = wait_for(page, lambda d: settled(d, 3), "three answers")
    page.save_screenshot(str(shots / "03-three-uploads.png"))
    assert [r["name"] for r in shown] == [p.name for p in paths]
    for r, p in zip(shown, paths, strict=True):
        top = predict(server, p).json()["results"][0]["labels"][0]
        assert r["status"] == "done" and r["labels"][0] == [top["label"], shown_pct(top["score"])]
    assert [r["labels"][0][0] for r in shown] == ["Trouser", "Bag", "Sneaker"]


def test_a_bad_file_shows_the_services_error_and_the_page_keeps_working(
        page: Any, server: str, images: dict[str, Path], shots: Path,
        tmp_path: Path) -> None:
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image at all\n")
    upload(page, bad)
    shown = wait_for(page, lambda d: settled(d, 1), "the error")[0]
    page.save_screenshot(str(shots / "04-bad-file.png"))
    service = httpx.post(server + "/predict", headers=AUTH,
                         files=[("file", (bad.name, bad.read_bytes()))])
    assert service.status_code == 415
    assert shown["status"] == "failed" and shown["labels"] == []
    assert shown["error"].startswith(service.json()["error"]["message"])
    assert "415" in shown["error"]

    good = images["Dress"]
    upload(page, good)
    shown = wait_for(page, lambda d: settled(d, 2), "the next answer")
    page.save_screenshot(str(shots / "05-good-after-bad.png"))
    assert [r["status"] for r in shown] == ["failed", "done"]
    top = predict(server, good).json()["results"][0]["labels"][0]
    assert shown[1]["labels"][0] == [top["label"], shown_pct(top["score"])]


def test_a_401_asks_for_the_key_and_the_upload_is_sent_again_with_it(
        page: Any, server: str, images: dict[str, Path], shots: Path) -> None:
    page.execute_script("sessionStorage.clear()")
    upload(page, images["Shirt"])
    shown = wait_for(page, lambda d: settled(d, 1), "the refusal")[0]
    refused = httpx.post(server + "/predict", files=[("file", ("x.png", b"x"))])
    assert refused.status_code == 401
    assert shown["status"] == "failed" and shown["error"].startswith(
        refused.json()["error"]["message"])
    key_field = page.find_element("id", "key")
    assert key_field.is_displayed() and page.switch_to.active_element == key_field
    page.save_screenshot(str(shots / "07-key-asked.png"))

    key_field.send_keys("not-the-right-key-at-all", "\ue007")  # Enter submits the form
    shown = wait_for(page, lambda d: (r := settled(d, 1)) and "not valid" in (r[0]["error"] or "")
                     and r, "the wrong key refused")[0]
    assert shown["status"] == "failed" and page.find_element("id", "key").is_displayed()

    page.find_element("id", "key").send_keys(KEY, "\ue007")
    shown = wait_for(page, lambda d: (r := settled(d, 1)) and r[0]["status"] == "done" and r,
                     "the answer with the key")[0]
    page.save_screenshot(str(shots / "08-key-given.png"))
    top = predict(server, images["Shirt"]).json()["results"][0]["labels"][0]
    assert shown["labels"][0] == [top["label"], shown_pct(top["score"])]
    assert page.execute_script("return sessionStorage.getItem('imgrec.apiKey')") == KEY
    assert not page.find_element("id", "key-form").is_displayed()


def test_phone_width_has_no_horizontal_scroll(
        page: Any, images: dict[str, Path], shots: Path) -> None:
    page.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                         {"width": 390, "height": 844, "deviceScaleFactor": 1, "mobile": True})
    page.refresh()
    wait_for(page, lambda d: d.find_elements("css selector", "#card-facts dt"), "model card")
    upload(page, images["Coat"], images["Pullover"])
    wait_for(page, lambda d: settled(d, 2), "two answers")
    page.save_screenshot(str(shots / "06-phone.png"))
    width, scroll = page.execute_script(
        "return [innerWidth, document.scrollingElement.scrollWidth]")
    assert width == 390
    assert scroll <= width


def neighbors_shown(driver: Any) -> list[list[dict[str, Any]]]:
    """Each upload's nearest stored images as the page lists them, oldest upload first."""
    return list(reversed(driver.execute_script("""
        return [...document.querySelectorAll('#results > li')].map(li =>
          li.querySelector('.neighbors').hidden ? null :
          [...li.querySelectorAll('.neighbors li[title]')].map(n => ({
            id: n.title,
            thumb: n.querySelector('img.thumb') ? n.querySelector('img.thumb').src : null,
            text: n.querySelector('.score').textContent,
          })));""")))


def test_search_shows_the_nearest_stored_images(
        page: Any, server: str, images: dict[str, Path], shots: Path) -> None:
    # stored by another client: the page knows only its filename
    elsewhere = images["Sneaker"]
    httpx.post(server + "/embed", headers=AUTH, timeout=WAIT_S, files=[
        ("file", ("stored-elsewhere.png", elsewhere.read_bytes()))]).raise_for_status()
    first, second = images["Sandal"], images["Ankle boot"]
    upload(page, first)
    wait_for(page, lambda d: (n := neighbors_shown(d)) and n[0] is not None, "first neighbours")
    upload(page, second)
    wait_for(page, lambda d: len(n := neighbors_shown(d)) == 2 and n[1] is not None,
             "second neighbours")
    page.save_screenshot(str(shots / "09-neighbours.png"))
    shown = neighbors_shown(page)[1]
    expected = httpx.post(server + "/search?k=5", headers=AUTH, timeout=WAIT_S, files=[
        ("file", (second.name, second.read_bytes()))]).json()["results"][0]["neighbors"]
    assert [n["id"] for n in shown] == [n["id"] for n in expected]
    by_id = {n["id"]: n for n in shown}
    first_id = hashlib.sha256(first.read_bytes()).hexdigest()
    first_preview = page.execute_script(
        "return [...document.querySelectorAll('#results > li .preview')].at(-1).src")
    assert by_id[first_id]["thumb"] == first_preview  # this tab's upload: its own thumbnail
    elsewhere_id = hashlib.sha256(elsewhere.read_bytes()).hexdigest()
    assert by_id[elsewhere_id]["thumb"] is None
    assert by_id[elsewhere_id]["text"].startswith("stored-elsewhere.png · ")
    for n, e in zip(shown, expected, strict=True):
        assert n["text"].endswith(f" · {e['score']:.3f}")


# ---- over plain HTTP ------------------------------------------------------------------------

def raw_get(server: str, path: str) -> tuple[int, str, bytes]:
    """GET with the path sent exactly as written (no client-side normalisation of ../)."""
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        r = conn.getresponse()
        return r.status, r.getheader("content-type") or "", r.read()
    finally:
        conn.close()


REFUSED = [
    # other files of the model directory
    "/model/files/card.json", "/model/files/weights.safetensors", "/model/files/MODEL_CARD.md",
    "/model/files/train_log.jsonl", "/model/files/curves-phase1.png", "/model/files/CURVES.PNG",
    # ways out of it
    "/model/files/../card.json", "/model/files/..%2fcard.json", "/model/files/%2e%2e%2fcard.json",
    "/model/files/..%2F..%2F..%2Fapp%2Fsettings.py", "/model/files/%2Fetc%2Fpasswd",
    "/model/files/curves.png%00", "/model/files/curves.png/../card.json",
    "/model/files/.%2fcurves.png",
    # the page's own folder holds only the listed assets
    "/static/index.html", "/static/../api/web.py", "/static/..%2fapi%2fweb.py",
    "/static/%2e%2e%2fmain.py", "/static/app.js%00", "/static/", "/static/.%2fapp.js",
]


@pytest.mark.parametrize("path", REFUSED)
def test_the_file_routes_refuse_anything_outside_their_allow_lists(server: str,
                                                                    path: str) -> None:
    status, ctype, body = raw_get(server, path)
    assert status == 404, (path, status, body[:200])
    assert ctype.startswith("application/json")
    assert set(json.loads(body)["error"]) == {"code", "message"}


def test_the_file_routes_serve_their_allow_lists(server: str) -> None:
    for name in CARD_FILES:
        status, ctype, body = raw_get(server, f"/model/files/{name}")
        assert (status, ctype) == (200, "image/png")
        assert body == (SHIPPED / name).read_bytes()
    assert httpx.get(server + "/model/files").json() == {"files": [
        {"name": n, "title": t, "url": f"/model/files/{n}"} for n, t in CARD_FILES.items()]}
    for path, ctype in [("/", "text/html"), ("/static/app.js", "text/javascript"),
                        ("/static/app.css", "text/css"),
                        ("/static/icon.svg", "image/svg+xml")]:
        r = httpx.get(server + path)
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype)
        assert "default-src 'none'" in r.headers["content-security-policy"]
        again = httpx.get(server + path, headers={"If-None-Match": r.headers["etag"]})
        assert again.status_code == 304 and again.content == b""


async def test_a_model_directory_without_plots_lists_none(tiny_model_dir: Path,
                                                          tmp_path: Path) -> None:
    # routes only: the card-file routes need the settings, not a running model
    app = create_app(make_settings(tiny_model_dir, tmp_path, embed_store="memory"))
    async with running(app, lifespan=False) as client:
        assert (await client.get("/model/files")).json() == {"files": []}
        r = await client.get("/model/files/curves.png")
    assert r.status_code == 404 and "has no curves.png" in r.json()["error"]["message"]


def test_only_the_card_files_are_in_the_schema(server: str) -> None:
    paths = httpx.get(server + "/openapi.json").json()["paths"]
    assert "/" not in paths and not any(p.startswith("/static") for p in paths)
    card_file = paths["/model/files/{name}"]["get"]["responses"]
    assert set(card_file) >= {"200", "404"} and "image/png" in card_file["200"]["content"]
