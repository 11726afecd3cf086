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


@pytest.mark.slow
def test_sighup_during_start_up_neither_ends_nor_confuses_it(served_model_dir: Path,
                                                             tmp_path: Path) -> None:
    """SIGHUPs from the moment `imgrec serve` has started its own code (its first log line) until
    it is ready: each one before the app's lifespan is ignored, each one while the model loads
    is logged as ignored, and the process becomes ready and serves."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update({"IMGREC_MODEL_DIR": str(served_model_dir), "IMGREC_DEVICE": "cpu",
                "IMGREC_HOST": LOOPBACK, "IMGREC_PORT": str(port), "IMGREC_LOG_LEVEL": "info",
                "IMGREC_EMBED_STORE": "memory", "IMGREC_GRPC_PORT": "0",
                "IMGREC_WARMUP_BATCHES": "3"})
    d = Daemon("imgrec", [venv_binary("imgrec"), "serve"], tmp_path, env=env, cwd=tmp_path)
    url = f"http://{LOOPBACK}:{port}"
    try:
        # serve_main's first line (the malloc tip), logged before the app is even created
        wait_until(lambda: "tip: MALLOC_MMAP_THRESHOLD_" in d.tail(), 60, "the first line", d)
        sent = 0
        while http_status(url + "/readyz") != 200:
            assert d.alive(), d.tail()
            os.kill(d.pid, signal.SIGHUP)
            sent += 1
            time.sleep(0.02)  # a signal every 20 ms, not a synchronisation
        assert sent > 0  # each before the app's lifespan ignored, each in it logged as ignored
        r = httpx.post(url + "/predict", files=[("file", ("a.png", png_bytes(1)))], timeout=30)
        assert r.status_code == 200 and d.alive()
    finally:
        d.stop()
    assert d.proc.returncode == 0


async def test_the_lifespan_hands_sighup_back_as_it_found_it() -> None:
    """Outside the app's lifespan SIGHUP keeps what serve_main set (ignored), not the default
    action that ends the process, which asyncio's remove_signal_handler would leave."""
    from app.main import _sighup_reloads

    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with _sighup_reloads([]):
            assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_IGN, signal.SIG_DFL)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, before)
