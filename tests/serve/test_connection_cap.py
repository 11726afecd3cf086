"""The connection cap of app/serve/http_server.py, in process: which connection makes room.

DrainingServer and ImgrecHttpProtocol serve a tiny ASGI app on a thread, so that the tests can
wait on the server's own state (its connections, and those waiting for a request, in order)
instead of sleeping. Clients are plain sockets. The model plays no part here; the same server
with the real app is tests/serve/test_slow_clients.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Iterator

import pytest
import uvicorn
from helpers.daemons import LOOPBACK, free_port, wait_until

from app.serve.http_server import ConnectionLimits, DrainingServer, ImgrecHttpProtocol

CAP = 6
PARTIAL_HEAD = b"POST /upload HTTP/1.1\r\nHost: x\r\nContent-"  # headers never completed


class TinyApp:
    """Reads the body and answers 200 JSON; ``/hold`` waits until ``release()``."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.gate: asyncio.Event | None = None

    async def __call__(self, scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def]
        self.loop = asyncio.get_running_loop()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            if not message.get("more_body"):
                break
        if scope["path"] == "/hold":
            self.gate = self.gate or asyncio.Event()
            await self.gate.wait()
        body = json.dumps({"path": scope["path"]}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def release(self) -> None:
        assert self.loop is not None and self.gate is not None
        self.loop.call_soon_threadsafe(self.gate.set)


class Server:
    def __init__(self, cap: int) -> None:
        self.app = TinyApp()
        self.port = free_port()
        config = uvicorn.Config(self.app, host=LOOPBACK, port=self.port, lifespan="off",
                                loop="uvloop", http=ImgrecHttpProtocol, ws="none",
                                log_level="warning",
                                timeout_keep_alive=300)  # idle ones stay until closed for room
        limits = ConnectionLimits(header_timeout_s=300, body_timeout_s=300, max_connections=cap,
                                  retry_after_s=1)
        self.server = DrainingServer(config, limits, drain_delay_s=0, graceful_shutdown_s=5,
                                     on_drain=lambda: None)
        self.state = self.server.server_state
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "the in-process server")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)

    def waiting_ports(self) -> list[int]:
        """The client ports of the connections waiting for a request, oldest first."""
        return [c.client[1] for c in list(self.state.waiting) if c.client]

    def open_ports(self) -> set[int]:
        return {c.client[1] for c in list(self.state.connections) if c.client}


@pytest.fixture()
def server() -> Iterator[Server]:
    s = Server(CAP)
    yield s
    s.stop()


def port_of(sock: socket.socket) -> int:
    return int(sock.getsockname()[1])


def connect(server: Server, send: bytes = b"") -> socket.socket:
    """A connection the server has accepted (it is among its connections), with ``send`` sent."""
    sock = socket.create_connection((LOOPBACK, server.port), timeout=30)
    wait_until(lambda: port_of(sock) in server.open_ports(), 30, "the server to accept",
               interval_s=0.01)
    if send:
        sock.sendall(send)
    return sock


def request(path: str = "/upload", body: bytes = b"x" * 100, close: bool = True) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def read_response(sock: socket.socket) -> bytes:
    """One response: its head, and its body by Content-Length (the connection may stay open)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def closed_by_server(sock: socket.socket) -> bytes | None:
    """What the server sent before closing, or None while it keeps the connection open."""
    sock.setblocking(False)
    try:
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
    except BlockingIOError:
        return None
    except ConnectionResetError:
        return b""
    finally:
        sock.setblocking(True)


def wait_closed(sock: socket.socket) -> bytes:
    answer: list[bytes] = []

    def closed() -> bool:
        got = closed_by_server(sock)
        if got is not None:
            answer.append(got)
        return got is not None

    wait_until(closed, 30, "the server to close the connection", interval_s=0.01)
    return answer[0]


def idle_keep_alive(server: Server) -> socket.socket:
    """A connection that has had one request answered and stays open between requests."""
    sock = connect(server, request(close=False))
    assert read_response(sock).startswith(b"HTTP/1.1 200 ")
    wait_until(lambda: port_of(sock) in server.waiting_ports(), 30, "the connection to idle",
               interval_s=0.01)
    return sock


def test_at_the_cap_the_oldest_header_trickler_makes_room(server: Server) -> None:
    tricklers = [connect(server, PARTIAL_HEAD) for _ in range(CAP)]
    assert server.waiting_ports() == [port_of(s) for s in tricklers]  # connect order
    with connect(server, request()) as fresh:
        assert read_response(fresh).startswith(b"HTTP/1.1 200 ")
    answer = wait_closed(tricklers[0])
    assert answer.startswith(b"HTTP/1.1 408 ") and b'"header_timeout"' in answer
    assert b"connection limit" in answer
    assert all(closed_by_server(s) is None for s in tricklers[1:])
    wait_until(lambda: server.state.closing_for_room == 0, 30, "the closed one to be gone")
    for s in tricklers:
        s.close()


def test_each_newcomer_closes_exactly_one(server: Server) -> None:
    tricklers = [connect(server, PARTIAL_HEAD) for _ in range(CAP)]
    newcomers = [socket.create_connection((LOOPBACK, server.port)) for _ in range(3)]
    wait_until(lambda: {port_of(s) for s in newcomers} <= set(server.waiting_ports()), 30,
               "the newcomers to be accepted")
    wait_until(lambda: len(server.state.connections) == CAP, 30, "three to be closed for room")
    closed = [s for s in tricklers if closed_by_server(s) is not None]
    assert closed == tricklers[:3]  # the three oldest, no more
    assert server.state.closing_for_room == 0
    for s in tricklers + newcomers:
        s.close()


def test_idle_keep_alive_connections_make_room_before_anyone_is_refused(server: Server) -> None:
    idle = [idle_keep_alive(server) for _ in range(CAP)]
    with connect(server, request()) as fresh:
        assert read_response(fresh).startswith(b"HTTP/1.1 200 ")
    assert wait_closed(idle[0]) == b""  # nothing to answer between requests: just closed
    assert all(closed_by_server(s) is None for s in idle[1:])
    for s in idle:
        s.close()


def test_whatever_its_phase_the_one_waiting_longest_goes_first(server: Server) -> None:
    """Idle and header-phase connections queue in one order: when each began waiting. A reused
    connection waits from its new request's first byte, not from its idle start."""
    reused = idle_keep_alive(server)
    trickler = connect(server, PARTIAL_HEAD)
    reused.sendall(b"POST /upload HTTP/1.1\r\nHo")  # a new request's first bytes
    wait_until(lambda: server.waiting_ports()[-1:] == [port_of(reused)], 30,
               "the reused connection to wait from its first byte")
    others = [connect(server, PARTIAL_HEAD) for _ in range(CAP - 2)]
    newcomer = connect(server)  # the cap is reached: the oldest waiting is the trickler
    assert wait_closed(trickler).startswith(b"HTTP/1.1 408 ")
    assert closed_by_server(reused) is None
    for s in [reused, newcomer, *others]:
        s.close()


def test_a_connection_carrying_a_request_is_never_closed_for_room(server: Server) -> None:
    """Connections whose request is being read (a body on its way) or served never make room:
    when every connection carries one, the newcomer is refused 503 + Retry-After."""
    held = connect(server, request("/hold"))
    wait_until(lambda: server.app.gate is not None, 30, "the held request to be served")
    bodies = [connect(server, request(body=b"x" * 1000)[:-500]) for _ in range(CAP - 1)]
    wait_until(lambda: not server.waiting_ports(), 30, "all headers to be read")
    with connect(server, request()) as refused:
        answer = read_response(refused)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer.lower()
    assert b'"overloaded"' in answer
    server.app.release()
    assert read_response(held).startswith(b"HTTP/1.1 200 ")
    for s in bodies:
        assert closed_by_server(s) is None
        s.sendall(b"x" * 500)
        assert read_response(s).startswith(b"HTTP/1.1 200 ")
        s.close()
    held.close()
