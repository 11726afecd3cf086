"""`imgrec serve` against slow and abusive clients: read deadlines and the connection cap.

A real server with short deadlines (headers 1 s, body 1.5 s); clients trickle a byte every 0.2 s,
or connect and say nothing, while a normal request is still served. Then a server with a small
cap (50 connections) and long deadlines, so that only the cap acts: more clients trickling their
headers than the cap holds never lock out a normal upload (issue 20), and only connections that
all carry a request make the server refuse one. Which connection makes room, in every phase, is
tested in process in tests/serve/test_connection_cap.py.
"""

from __future__ import annotations

import re
import select
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

HEADER_S, BODY_S = 1.0, 1.5
CAP = 50
BOUNDARY = "slowclientsboundary"


@pytest.fixture(scope="module")
def server(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, int]]:
    d: Daemon
    d, port = start_replica(
        "imgrec", tmp_path_factory.mktemp("slow"), tiny_model_dir,
        {"IMGREC_EMBED_STORE": "memory", "IMGREC_HEADER_TIMEOUT_S": str(HEADER_S),
         "IMGREC_BODY_TIMEOUT_S": str(BODY_S), "IMGREC_LOG_LEVEL": "warning"}, timeout_s=180)
    try:
        yield f"http://{LOOPBACK}:{port}", port
    finally:
        d.stop()


def trickle(port: int, head: bytes, chunk: bytes, every_s: float, limit_s: float,
            head_sent: threading.Event | None = None) -> tuple[float, bytes]:
    """Send head, then chunk every every_s until the server closes (or limit_s passes); returns
    (seconds until the server closed, what it answered). head_sent is set once head is out."""
    # the clock starts before connecting: the server's deadline starts when it accepts, which
    # can come before this thread runs again after connect() returns
    started = time.monotonic()
    s = socket.create_connection((LOOPBACK, port), timeout=limit_s)
    answer = b""
    try:
        s.sendall(head)
        if head_sent is not None:
            head_sent.set()
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
    assert re.search(rb"\r\nx-request-id: [0-9a-f]{32}\r\n", answer), answer  # an id of its own
    assert HEADER_S <= held < HEADER_S + 3
    assert predict(url).status_code == 200


def test_trickled_body_is_cut_with_408_while_others_are_served(server: tuple[str, int]) -> None:
    url, port = server
    head = (b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n"
            b"Content-Type: multipart/form-data; boundary=b\r\n\r\n--b\r\n")
    results: list[tuple[float, bytes]] = []
    started = [threading.Event() for _ in range(4)]

    def one(head_sent: threading.Event) -> None:
        results.append(trickle(port, head, b"x", 0.2, 10, head_sent))

    tricklers = [threading.Thread(target=one, args=(e,)) for e in started]
    for t in tricklers:
        t.start()
    assert all(e.wait(10) for e in started)
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


@pytest.fixture(scope="module")
def capped(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[tuple[str, int]]:
    """A server whose cap, not its deadlines, is what the clients below run into."""
    d: Daemon
    d, port = start_replica(
        "imgrec", tmp_path_factory.mktemp("capped"), tiny_model_dir,
        {"IMGREC_EMBED_STORE": "memory", "IMGREC_MAX_CONNECTIONS": str(CAP),
         "IMGREC_HEADER_TIMEOUT_S": "300", "IMGREC_BODY_TIMEOUT_S": "300",
         "IMGREC_REQUEST_TIMEOUT_MS": "300000", "IMGREC_LOG_LEVEL": "warning"}, timeout_s=180)
    try:
        yield f"http://{LOOPBACK}:{port}", port
    finally:
        d.stop()


def answered(sock: socket.socket) -> bool:
    """The server has sent something on this connection (or closed it)."""
    return bool(select.select([sock], [], [], 0)[0])


def read_all(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def upload(image: bytes) -> tuple[bytes, bytes]:
    """A /predict request announcing ``Expect: 100-continue``: (its head, its body)."""
    body = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; "
            f"filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").encode() + image + \
        f"\r\n--{BOUNDARY}--\r\n".encode()
    head = (f"POST /predict HTTP/1.1\r\nHost: {LOOPBACK}\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary={BOUNDARY}\r\n"
            f"Content-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n").encode()
    return head, body


def test_header_tricklers_beyond_the_cap_never_lock_out_an_upload(capped: tuple[str, int]
                                                                   ) -> None:
    """Issue 20's slow-loris: more connections than the cap, each stalled in its request line
    and headers. Each newcomer closes the one that has been at it longest, so a normal upload
    is served (on the old server it was 503 for as long as the tricklers stayed)."""
    url, port = capped
    extra = 30
    tricklers = []
    try:
        for i in range(CAP + extra):
            s = socket.create_connection((LOOPBACK, port), timeout=30)
            s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Le" if i % 2 else b"PO")
            tricklers.append(s)
        # every connection beyond the cap has had its turn once `extra` tricklers are answered
        deadline = time.monotonic() + 60
        while sum(map(answered, tricklers)) < extra:
            assert time.monotonic() < deadline, f"{sum(map(answered, tricklers))} answered"
            time.sleep(0.05)
        response = predict(url)
        assert response.status_code == 200, response.text
        # the upload's connection took the place of one more: the 31 oldest, in connect order
        deadline = time.monotonic() + 60
        while sum(map(answered, tricklers)) < extra + 1:
            assert time.monotonic() < deadline, f"{sum(map(answered, tricklers))} answered"
            time.sleep(0.05)
        closed = [answered(s) for s in tricklers]
        assert closed == [True] * (extra + 1) + [False] * (CAP - 1), closed
        for s in tricklers[:extra + 1]:
            answer = read_all(s)
            assert answer.startswith(b"HTTP/1.1 408 ") and b'"header_timeout"' in answer, answer
    finally:
        for s in tricklers:
            s.close()


def test_beyond_the_cap_503_only_when_every_connection_carries_a_request(
        capped: tuple[str, int]) -> None:
    """Uploads whose headers the server has read (it asked for their bodies: 100 Continue) and
    whose bodies are half sent are never closed for room: a newcomer is refused 503 at once,
    and every one of them is served once its body arrives."""
    url, port = capped
    uploads = []
    try:
        for i in range(CAP):
            head, body = upload(png_bytes(100 + i))
            s = socket.create_connection((LOOPBACK, port), timeout=60)
            s.sendall(head)
            assert s.recv(100).startswith(b"HTTP/1.1 100 "), "no 100 Continue"
            s.sendall(body[:len(body) // 2])
            uploads.append((s, body[len(body) // 2:]))
        refused = predict(url)
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "overloaded"
        assert refused.headers["retry-after"] == "1" and refused.headers["connection"] == "close"
        for s, rest in uploads:
            assert not answered(s)
            s.sendall(rest)
        for s, _ in uploads:
            assert read_all(s).startswith(b"HTTP/1.1 200 ")
    finally:
        for s, _ in uploads:
            s.close()
    assert predict(url).status_code == 200  # the cap counts open connections, not a budget
