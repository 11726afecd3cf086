"""`imgrec serve` as a real process over a socket: serving, and SIGTERM answering accepted work."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import png_bytes
from helpers.daemons import (
    LOOPBACK,
    Daemon,
    free_port,
    http_status,
    start_replica,
    venv_binary,
    wait_until,
)


@pytest.fixture()
def server(tiny_model_dir: Path, tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    env = {**os.environ, "IMGREC_MODEL_DIR": str(tiny_model_dir), "IMGREC_DEVICE": "cpu",
           "IMGREC_PORT": str(port), "IMGREC_EMBED_STORE": str(tmp_path / "e.sqlite3"),
           "IMGREC_MAX_BATCH_SIZE": "1", "IMGREC_LOG_LEVEL": "warning"}
    d = Daemon("imgrec", [venv_binary("imgrec"), "serve"], tmp_path, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: http_status(url + "/readyz") == 200, 90, "imgrec serve /readyz", d)
        yield url, d.proc
    finally:
        d.kill()
        d.stop()


def test_serves_over_a_socket(server: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = server
    r = httpx.post(url + "/predict", files=[("file", ("a.png", png_bytes(1)))], timeout=30)
    assert r.status_code == 200 and len(r.json()["results"][0]["labels"]) == 5
    assert httpx.get(url + "/model").json()["instance"].endswith(f":{server[1].pid}")


def test_sigterm_answers_every_accepted_request(server: tuple[str, subprocess.Popen[bytes]]
                                                ) -> None:
    url, proc = server
    files = [("file", (f"{i}.png", png_bytes(1000 + i))) for i in range(24)]

    def post(_: int) -> httpx.Response:
        return httpx.post(url + "/predict", files=files, timeout=60)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(post, i) for i in range(8)]
        time.sleep(0.4)  # all eight are accepted and in the queue (batch size 1: slow drain)
        proc.send_signal(signal.SIGTERM)
        responses = [f.result() for f in futures]
    assert [r.status_code for r in responses] == [200] * 8
    assert all(len(r.json()["results"]) == 24 for r in responses)
    assert proc.wait(30) == 0  # a completed graceful shutdown exits with status 0
    with pytest.raises(httpx.TransportError):
        httpx.get(url + "/healthz", timeout=2)


@pytest.mark.slow
def test_sighup_without_api_keys_leaves_the_server_serving(tiny_model_dir: Path,
                                                          tmp_path: Path) -> None:
    """SIGHUP is the operators' reload signal: with no keys file it reloads the model only (here
    the same directory: nothing to switch), and its default action (ending the process) must
    not happen either."""
    daemon, port = start_replica("imgrec", tmp_path, tiny_model_dir,
                                 {"IMGREC_EMBED_STORE": "memory", "IMGREC_WARMUP_BATCHES": "1",
                                  "IMGREC_GRPC_PORT": "0"})
    url = f"http://{LOOPBACK}:{port}"
    try:
        for _ in range(2):
            os.kill(daemon.pid, signal.SIGHUP)
            time.sleep(0.5)
        wait_until(lambda: daemon.tail().count("is already served from") == 2, 20,
                   "the SIGHUP log lines", daemon)
        assert daemon.tail().count("SIGHUP: reloading the model") == 2
        assert daemon.alive()
        r = httpx.post(url + "/predict", files=[("file", ("a.png", png_bytes(1)))], timeout=30)
        assert r.status_code == 200
        assert http_status(url + "/readyz") == 200
    finally:
        daemon.stop()
    assert daemon.proc.returncode == 0  # and SIGTERM still stops it cleanly
