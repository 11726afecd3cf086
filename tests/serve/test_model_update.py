"""A model update of a real `imgrec serve` under load: clients post all along, the model
directory's symlink is switched to a second model and SIGHUP sent, then to a broken one. Every
request is answered 200, /readyz never says otherwise, the answers' model changes once from A to
B, and every answer's vector is the one its named model computes. Everything waits on
conditions with deadlines; nothing is timed."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import make_model_dir, png_bytes
from helpers.apps import metric
from helpers.daemons import LOOPBACK, start_replica, wait_until

from app.model.directory import read_card
from app.serving.predictor import Predictor
from app.serving.upload_checks import prepare
from app.settings import Settings

IMAGES = [png_bytes(seed) for seed in range(4)]
CLIENTS = 3
ENOUGH = 25  # answers of a phase before the next step


@dataclass(frozen=True, slots=True)
class Answer:
    client: int
    status: int
    version: str | None
    image: int
    embedding: np.ndarray | None


class Load:
    """CLIENTS threads posting /predict?embedding=true back to back, and one polling /readyz,
    until stop(); every answer and readiness status is kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.answers: list[Answer] = []
        self.ready: list[int] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._post, args=(c,), daemon=True)
                        for c in range(CLIENTS)]
        self.threads.append(threading.Thread(target=self._readiness, daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self) -> None:
        self.done.set()
        for t in self.threads:
            t.join(60)

    def count(self, version: str) -> int:
        with self.lock:
            return sum(a.version == version for a in self.answers)

    def _post(self, client: int) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            n = 0
            while not self.done.is_set():
                image = (client + n) % len(IMAGES)
                n += 1
                try:
                    r = http.post("/predict", params={"embedding": "true", "top_k": 1},
                                  files=[("file", (f"{image}.png", IMAGES[image]))])
                    body = r.json() if r.status_code == 200 else None
                    answer = Answer(client, r.status_code,
                                    body["model"]["version"] if body else None, image,
                                    np.asarray(body["results"][0]["embedding"], np.float32)
                                    if body else None)
                except httpx.HTTPError:
                    answer = Answer(client, 0, None, image, None)
                with self.lock:
                    self.answers.append(answer)

    def _readiness(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30) as http:
            while not self.done.is_set():
                try:
                    status = http.get("/readyz").status_code
                except httpx.HTTPError:
                    status = 0
                with self.lock:
                    self.ready.append(status)


def point(link: Path, target: Path) -> None:
    """Switch the symlink atomically (ln -s new tmp && mv -T tmp link)."""
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def exported(path: Path, seed: int, version: str) -> Path:
    from app.nn.export import export_model_dir

    make_model_dir(path, seed=seed, version=version)
    export_model_dir(path)  # model.onnx: the server and its reloads run without PyTorch
    return path


def reference(model_dir: Path) -> list[np.ndarray]:
    """The vectors this model computes for IMAGES (the same engine as the server's)."""
    s = Settings()
    p = Predictor(model_dir, device="cpu", engine="onnxruntime")
    pixels = [prepare(data, p.card.input, s.max_image_pixels, s.max_image_header_pixels)
              for data in IMAGES]
    return [pred.embedding for pred in p.forward(pixels)]


def served_sha(url: str) -> str | None:
    try:
        return str(httpx.get(url + "/model", timeout=10).json()["weights_sha256"])
    except (httpx.HTTPError, KeyError, ValueError):
        return None


def reloads(url: str, outcome: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return metric(text, f'imgrec_model_reloads_total{{outcome="{outcome}"}}')


@pytest.mark.slow
def test_a_model_update_under_load_loses_no_request(tmp_path: Path) -> None:
    models = tmp_path / "models"
    a, b = exported(models / "a", 0, "a"), exported(models / "b", 1, "b")
    bad = shutil.copytree(b, models / "bad")
    (bad / "model.onnx").write_bytes(b"not the graph the card records")
    link = models / "current"
    link.symlink_to(a)
    expected = {"a": reference(a), "b": reference(b)}
    assert not np.allclose(expected["a"][0], expected["b"][0], atol=1e-3)
    sha_a, sha_b = read_card(a).weights_sha256, read_card(b).weights_sha256

    daemon, port = start_replica("imgrec", tmp_path, link, {
        "IMGREC_EMBED_STORE": "memory", "IMGREC_WARMUP_BATCHES": "1",
        "IMGREC_MODEL_WATCH_INTERVAL_S": "0",  # SIGHUP only: the test says when
        "IMGREC_MAX_QUEUE": "1024"})
    url = f"http://{LOOPBACK}:{port}"
    load = Load(url)
    try:
        assert served_sha(url) == sha_a
        load.start()
        wait_until(lambda: load.count("a") >= ENOUGH, 120, "answers from model a", daemon)

        point(link, b)
        os.kill(daemon.pid, signal.SIGHUP)
        wait_until(lambda: served_sha(url) == sha_b, 120, "GET /model to name model b", daemon)
        wait_until(lambda: load.count("b") >= ENOUGH, 120, "answers from model b", daemon)

        point(link, bad)
        os.kill(daemon.pid, signal.SIGHUP)
        wait_until(lambda: reloads(url, "failed") == 1, 120, "the refusal of the bad directory",
                   daemon)
        after_refusal = load.count("b")
        wait_until(lambda: load.count("b") >= after_refusal + ENOUGH, 120,
                   "answers from model b after the refusal", daemon)
    finally:
        load.stop()
    try:
        statuses = [x.status for x in load.answers]
        assert statuses and set(statuses) == {200}, {s: statuses.count(s) for s in statuses}
        assert load.ready and set(load.ready) == {200}, set(load.ready)
        for client in range(CLIENTS):  # each client's answers: model a, then model b for good
            versions = [x.version for x in load.answers if x.client == client]
            switch = versions.index("b")
            assert set(versions[:switch]) == {"a"} and set(versions[switch:]) == {"b"}, client
        for x in load.answers:  # each answer names the model that computed its vector
            assert x.version is not None and x.embedding is not None
            np.testing.assert_allclose(x.embedding, expected[x.version][x.image], rtol=1e-4,
                                       atol=1e-5)
        assert served_sha(url) == sha_b and reloads(url, "switched") == 1
        # no endpoint loads a model on a client's word: not ours, not the protocol's repository
        # extension (Triton's load/unload), whatever the body names
        point(link, a)
        for path in ("/model", "/v2/repository/models/test-fashion-small/load",
                     "/v2/repository/index"):
            r = httpx.post(url + path, json={"parameters": {"model_dir": str(a)}}, timeout=10)
            assert r.status_code in (404, 405), (path, r.status_code)
        assert served_sha(url) == sha_b and reloads(url, "switched") == 1
        log = daemon.tail(20_000)
        (refusal,) = [line for line in log.splitlines() if "refused, still serving" in line]
        assert "model.onnx: sha256 mismatch" in refusal and "test-fashion-small b" in refusal
        # the store answers in the served model's space: b's vector for an image both saw
        image_id = hashlib.sha256(IMAGES[0]).hexdigest()
        r = httpx.get(url + "/embed", params={"id": image_id}, timeout=10)
        assert r.status_code == 200 and r.json()["model"]["version"] == "b"
        np.testing.assert_allclose(r.json()["results"][0]["embedding"], expected["b"][0],
                                   rtol=1e-4, atol=1e-5)
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0
