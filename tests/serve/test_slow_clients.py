"""`imgrec serve` against slow and abusive clients: read deadlines and the connection cap.

A real server with short limits (headers 1 s, body 1.5 s, 12 connections); clients trickle a byte
every 0.2 s, or connect and say nothing, while a normal request is still served.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from conftest import png_bytes
from helpers.daemons import LOOPBACK, Daemon, start_replica

pytestmark = pytest.mark.slow

HEADER_S, BODY_S, MAX_CONNECTIONS = 1.0, 1.5, 12


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, int]]:
    d: Daemon
    d, port = start_replica(
        "imgrec", tmp_path_factory.mktemp("slow"), tiny_model_dir,
        {"IMGREC_EMBED_STORE": "memory", "IMGREC_HEADER_TIMEOUT_S": str(HEADER_S),
         "IMGREC_BODY_TIMEOUT_S": str(BODY_S), "IMGREC_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
         "IMGREC_LOG_LEVEL": "warning"}, timeout_s=180)
    try:
        yield f"http://{LOOPBACK}:{port}", port
    finally:
        d.stop()


def trickle(port: int, head: bytes, chunk: bytes, every_s: float, limit_s: float
            ) -> tuple[float, bytes]:
    """Send head, then chunk every every_s until the server closes (or limit_s passes); returns
    (seconds until the server closed, what it answered)."""
    # the clock starts before connecting: the server's deadline starts when it accepts, which
    # can come before this thread runs again after connect() returns
    started = time.monotonic()
    s = socket.create_connection((LOOPBACK, port), timeout=limit_s)
    answer = b""
    try:
        s.sendall(head)
        s.settimeout(every_s)
        while time.monotonic() - started < limit_s:
            try:
                data = s.recv(65536)
            except TimeoutError:
                s.sendall(chunk)
                continue
            if not data:
                break
            answer += data
    except (BrokenPipeError, ConnectionResetError):
        pass
    finally:
        s.close()
    return time.monotonic() - started, answer


def predict(url: str) -> httpx.Response:
    return httpx.post(url + "/predict", files=[("file", ("a.png", png_bytes(7)))], timeout=30)


def test_trickled_headers_are_cut_with_408(server: tuple[str, int]) -> None:
    url, port = server
    held, answer = trickle(port, b"POST /predict HTTP/1.1\r\nHost: x\r\n", b"X", 0.2, 10)
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"header_timeout"' in answer
    assert HEADER_S <= held < HEADER_S + 3
    assert predict(url).status_code == 200


def test_trickled_body_is_cut_with_408_while_others_are_served(server: tuple[str, int]) -> None:
    url, port = server
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
    results: list[tuple[float, bytes]] = []
    tricklers = [threading.Thread(target=lambda: results.append(trickle(port, head, b"x", 0.2, 10)))
                 for _ in range(4)]
    for t in tricklers:
        t.start()
    time.sleep(0.3)
    normal = predict(url)  # served while four connections trickle their bodies
    for t in tricklers:
        t.join()
    assert normal.status_code == 200
    assert len(results) == 4
    for held, answer in results:
        assert answer.startswith(b"HTTP/1.1 408 ") and b'"body_timeout"' in answer
        assert BODY_S <= held < HEADER_S + BODY_S + 3


def test_a_silent_connection_is_closed(server: tuple[str, int]) -> None:
    _, port = server
    held, answer = trickle(port, b"", b"", 30, 10)  # connects, never sends a byte
    assert answer == b"" and HEADER_S <= held < HEADER_S + 3


def test_beyond_the_connection_cap_503(server: tuple[str, int]) -> None:
    url, port = server
    idle = [socket.create_connection((LOOPBACK, port)) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.2)
        refused = predict(url)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
    finally:
        for s in idle:
            s.close()
    time.sleep(0.2)
    assert predict(url).status_code == 200  # the cap counts open connections, not a budget
