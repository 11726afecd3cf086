"""The HTTP server of `imgrec serve`: uvicorn, with a lame-duck shutdown and connection limits.

uvicorn's own shutdown closes every connection whose request it has not read yet, and the kernel
resets the connections still waiting in the listen backlog when the listener closes: a burst of
uploads followed by SIGTERM lost up to all of them. Here, instead:

* SIGTERM: readiness answers 503 at once (``Service.begin_drain()``) while the listener stays
  open and requests are served normally for ``drain_delay_s`` (the lame duck), every response
  with ``Connection: close``, so that load balancers move away and requests already on the wire
  are read. SIGINT skips the lame duck.
* Then the listener closes. Connections still in the kernel's accept queue are accepted first
  and served like the others; connections that have not sent (all of) their request yet get the
  header timeout to do so; idle keep-alive connections are closed.
* Everything in flight is answered within ``graceful_shutdown_s``; what is still unanswered then
  gets 503 + Retry-After + ``Connection: close``. Only then does the lifespan stop the Service.

A start-up that fails inside the lifespan (the engine does not load, a port is taken...) is not
logged as uvicorn's traceback: ``DrainingServer.startup_failure`` holds it as one line for
``serve_main`` to print, and the traceback goes to the debug log.

Against slow and abusive clients, per connection: the request line and headers must arrive within
``header_timeout_s`` and the body within ``body_timeout_s`` of the headers (else 408, or a silent
close for a connection that never sent a byte).

At ``max_connections`` open connections, a new one first makes room: the connection that has
waited longest for a request is closed. That is one still sending its request line and headers
(answered 408, like the header timeout), one that connected and said nothing, or an idle
keep-alive one between requests (closed, like the keep-alive timeout), whichever entered that
phase first. A connection whose request is being read (its body, bounded by the body timeout) or
served is never closed for room. Only when every connection carries a request is the new one
answered 503 + Retry-After. So clients trickling their headers, however many, cost the others
nothing but the cap's turnover: each new connection displaces the oldest of them. The waiting
connections are kept in an ``OrderedDict`` in the order they began waiting, so finding the
oldest is O(1) (a plain dict's first item is not: its deleted slots are scanned).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import sys
import time
from asyncio import TimerHandle
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, cast

import uvicorn
from uvicorn.lifespan.on import LifespanOn, LifespanSendMessage
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from app.serve.refusals import describe_failure
from app.serving.request_context import request_id

log = logging.getLogger("imgrec.server")

# How long a refused connection is read (and discarded) after its 503, so that the kernel does
# not reset it before the client has read the answer.
LINGER_S = 2.0
# At the cap, connections closed for room and refused ones are logged together, at most this
# often: under a flood, one line per connection would be the flood's echo in the log.
CAP_LOG_EVERY_S = 10.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int
    retry_after_s: int


class CapLog:
    """Counts what the connection cap did, and logs it at most every ``CAP_LOG_EVERY_S``."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.closed = 0  # connections closed for room since the last line
        self.refused = 0  # connections answered 503 since the last line
        self.quiet_until = 0.0

    def record(self, now: float, closed: int = 0, refused: int = 0) -> None:
        self.closed += closed
        self.refused += refused
        if now >= self.quiet_until:
            self.flush(now)

    def flush(self, now: float) -> None:
        if self.closed or self.refused:
            log.warning("at the connection cap (%d): closed %d connection(s) that waited "
                        "longest for a request, refused %d with 503", self.max_connections,
                        self.closed, self.refused)
            self.closed = self.refused = 0
            self.quiet_until = now + CAP_LOG_EVERY_S


class ImgrecServerState(ServerState):
    """uvicorn's state shared by all connections, plus the limits, the drain flag and the
    connections waiting for a request (the ones the cap may close for room)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        super().__init__()
        self.limits = limits
        self.draining = False  # every response from now on says Connection: close
        # connection -> when it began waiting (loop time), oldest first; see ImgrecHttpProtocol
        self.waiting: OrderedDict[ImgrecHttpProtocol, float] = OrderedDict()
        self.closing_for_room = 0  # closed for room, connection_lost not seen yet
        self.cap_log = CapLog(limits.max_connections)

    def open_connections(self) -> int:
        """Open connections, less those already closed for room: they are on their way out,
        and counted, a newcomer before their connection_lost would close one too many."""
        return len(self.connections) - self.closing_for_room

    def oldest_waiting(self) -> ImgrecHttpProtocol | None:
        while self.waiting:
            connection = next(iter(self.waiting))
            if not connection.transport.is_closing():
                return connection
            del self.waiting[connection]  # closing anyway (a deadline, the client)
        return None


def error_response(status: int, code: str, message: str, retry_after: int | None) -> bytes:
    """A complete HTTP/1.1 response in the service's JSON error shape, closing the connection;
    with a request id of its own, as every response has (the request, if any, was not read)."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    reason = {408: "Request Timeout", 503: "Service Unavailable"}[status]
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json",
            f"content-length: {len(body)}", "connection: close",
            f"x-request-id: {request_id(None)}"]
    if retry_after is not None:
        head.append(f"retry-after: {retry_after}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class ImgrecHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with read deadlines, a connection cap and a drain that
    never drops a connection the client has started to use."""

    def __init__(self, config: uvicorn.Config, server_state: ServerState,
                 app_state: dict[str, Any], _loop: asyncio.AbstractEventLoop | None = None
                 ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        self.state = cast(ImgrecServerState, server_state)
        self.limits = self.state.limits
        self.requests_begun = 0
        self.in_headers = False  # bytes of a request arrived, its headers are not complete
        self.deadline: TimerHandle | None = None
        self.refused = False  # over the connection cap: answered 503, input discarded
        self.closed_for_room = False

    # -- connection ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if self.state.open_connections() > self.limits.max_connections and \
                not self._make_room():
            self._refuse_over_capacity()
            return
        self._wait()  # for its first request: the header deadline runs from the connect
        self._arm(self.limits.header_timeout_s, self._header_timeout)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._stop_waiting()
        if self.closed_for_room:
            self.state.closing_for_room -= 1
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # lingering after the 503: read and discard
        super().data_received(data)

    # -- parser callbacks ------------------------------------------------------------------
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self.requests_begun += 1
        self.in_headers = True
        if self.requests_begun > 1:  # the first request's deadline runs from the connect
            self._arm(self.limits.header_timeout_s, self._header_timeout)
            if self._between_requests():  # idle until now: it waits from its first byte
                self._wait()

    def on_headers_complete(self) -> None:
        self.in_headers = False
        self._stop_waiting()  # it carries a request now: never closed for room
        super().on_headers_complete()
        if self.state.draining:
            self.cycle.keep_alive = False
        self._arm(self.limits.body_timeout_s, self._body_timeout)

    def on_message_complete(self) -> None:
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # starts a pipelined request, or the keep-alive timer
        if not self.transport.is_closing() and self._between_requests():
            self._wait()  # idle keep-alive (or the next request's headers are on the way)

    # -- waiting for a request: what the cap may close for room ---------------------------
    def _between_requests(self) -> bool:
        """No request of this connection is being read or served."""
        return self.cycle is None or self.cycle.response_complete

    def _wait(self) -> None:
        waiting = self.state.waiting
        waiting[self] = self.loop.time()
        waiting.move_to_end(self)

    def _stop_waiting(self) -> None:
        self.state.waiting.pop(self, None)

    def _make_room(self) -> bool:
        """Close the connection that has waited longest for a request; False if none waits."""
        victim = self.state.oldest_waiting()
        if victim is None:
            self.state.cap_log.record(self.loop.time(), refused=1)
            return False
        victim.close_for_room()
        self.state.cap_log.record(self.loop.time(), closed=1)
        return True

    def close_for_room(self) -> None:
        """The cap needs this connection's descriptor: 408 if its request has begun, else (it
        said nothing yet, or is idle between requests) just close, as the timeouts do."""
        waited_s = self.loop.time() - self.state.waiting.pop(self, self.loop.time())
        self._disarm()
        self.closed_for_room = True
        self.state.closing_for_room += 1
        if self.in_headers:
            self._answer_and_close(
                408, "header_timeout", f"request headers not complete after {waited_s:.1f} s, "
                "and the server is at its connection limit", None)
        else:
            self.transport.close()

    # -- deadlines -------------------------------------------------------------------------
    def _arm(self, seconds: float, callback: Callable[[], None]) -> None:
        self._disarm()
        self.deadline = self.loop.call_later(seconds, callback)

    def _disarm(self) -> None:
        if self.deadline is not None:
            self.deadline.cancel()
            self.deadline = None

    def _header_timeout(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        if self.in_headers:
            self._answer_and_close(408, "header_timeout", "request headers not received within "
                                   f"{self.limits.header_timeout_s:g} s", None)
        elif self.cycle is None or self.cycle.response_complete:
            self.transport.close()  # connected and sent nothing: there is nothing to answer

    def _body_timeout(self) -> None:
        self.deadline = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and self.cycle.response_started:
            self.transport.close()  # answered early (413...) and the body still trickles in
            return
        self._answer_and_close(408, "body_timeout", "request body not received within "
                                   f"{self.limits.body_timeout_s:g} s", None)

    # -- answers the app does not give ---------------------------------------------------
    def _answer_and_close(self, status: int, code: str, message: str,
                          retry_after: int | None) -> None:
        """Answer the request in progress (if its response has not started) and close."""
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if cycle.response_started:  # half a response went out: all we can do is close
                self.transport.close()
                return
            cycle.disconnected = True  # the app's own answer, should it come, is dropped
            cycle.message_event.set()  # and its receive() returns http.disconnect
        self.transport.write(error_response(status, code, message, retry_after))
        self.transport.close()

    def _refuse_over_capacity(self) -> None:
        self.refused = True
        self.transport.write(error_response(
            503, "overloaded", f"{self.limits.max_connections} open connections, each carrying "
            "a request; retry later", self.limits.retry_after_s))
        try:
            self.transport.write_eof()  # the answer, then FIN; the request is read and dropped
        except (NotImplementedError, RuntimeError, OSError):
            self.transport.close()
            return
        self.deadline = self.loop.call_later(LINGER_S, self.transport.close)

    # -- shutdown ------------------------------------------------------------------------
    def shutdown(self) -> None:
        """The listener closed: finish what this connection started, close it if idle."""
        if self.refused or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False  # in flight: answered, then closed
        elif self.requests_begun == 0 or self.in_headers:
            pass  # its request is on the way: read it (within the header timeout) and serve it
        else:
            self.transport.close()  # idle keep-alive between requests

    def abandon(self, retry_after_s: int) -> None:
        """The grace period is over: 503 for whatever this connection still waits for."""
        if self.transport.is_closing():
            return
        if self.refused or (self.requests_begun == 0 and self.cycle is None):
            self.transport.close()
            return
        self._answer_and_close(503, "shutting_down", "the server is shutting down; retry",
                               retry_after_s)


class _Demoted(logging.LoggerAdapter[logging.Logger]):
    """A logger whose records all go out at debug level."""

    def log(self, level: int, msg: object, *args: Any, **kwargs: Any) -> None:
        super().log(logging.DEBUG, msg, *args, **kwargs)


class OneLineLifespan(LifespanOn):
    """uvicorn's lifespan, except that a start-up failure is kept as one line (``failure``)
    instead of logged as a traceback and "Application startup failed": those go to the debug
    log, for whoever wants the traceback (IMGREC_LOG_LEVEL=debug)."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.failure: str | None = None

    async def send(self, message: LifespanSendMessage) -> None:
        if message["type"] == "lifespan.startup.failed":
            # Starlette sends this from the except block that caught the app's exception
            error = sys.exc_info()[1]
            text = message.get("message") or ""
            log.debug("application start-up failed:\n%s", text)
            lines = text.strip().splitlines()
            self.failure = (describe_failure(error) if error is not None
                            else lines[-1] if lines else "application start-up failed")
            self.logger = _Demoted(self.logger, {})  # type: ignore[assignment]
            message = {"type": "lifespan.startup.failed", "message": ""}
        await super().send(message)


class DrainingServer(uvicorn.Server):
    """uvicorn.Server with the lame duck on SIGTERM and a shutdown that answers every connection
    (see the module's docstring). ``on_drain`` is called at the first SIGTERM or SIGINT."""

    def __init__(self, config: uvicorn.Config, limits: ConnectionLimits, drain_delay_s: float,
                 graceful_shutdown_s: float, on_drain: Callable[[], None]) -> None:
        super().__init__(config)
        if not config.loaded:
            config.load()
        if config.lifespan_class is LifespanOn:
            config.lifespan_class = OneLineLifespan
        self.server_state: ImgrecServerState = ImgrecServerState(limits)
        self.startup_failure: str | None = None  # one line, when the lifespan failed to start
        self.drain_delay_s = drain_delay_s
        self.graceful_shutdown_s = graceful_shutdown_s
        self.on_drain = on_drain
        self.lame_duck_ends: float | None = None
        self._swept = False

    # -- signals (run in the main thread between two bytecodes: only set flags) ---------------
    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.should_exit:  # a second signal while shutting down
            if sig == signal.SIGINT:
                self.force_exit = True
            return
        if not self.server_state.draining:
            self.server_state.draining = True
            self.on_drain()
        if sig == signal.SIGTERM and self.started and self.drain_delay_s > 0:
            if self.lame_duck_ends is None:
                self.lame_duck_ends = time.monotonic() + self.drain_delay_s
                log.info("SIGTERM: lame duck for %g s, then shutdown", self.drain_delay_s)
        else:  # SIGINT, no lame duck configured, or still starting up
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.server_state.draining and not self._swept:
            self._swept = True  # responses already in progress say Connection: close too
            for connection in list(self.server_state.connections):
                cycle = getattr(connection, "cycle", None)
                if cycle is not None and not cycle.response_started:
                    cycle.keep_alive = False
        if self.lame_duck_ends is not None and time.monotonic() >= self.lame_duck_ends:
            self.should_exit = True
        cap_log = self.server_state.cap_log
        if cap_log.closed or cap_log.refused:  # what the last quiet period counted
            now = asyncio.get_running_loop().time()
            if now >= cap_log.quiet_until:
                cap_log.flush(now)
        return await super().on_tick(counter)

    # -- start-up --------------------------------------------------------------------------
    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        try:
            await super().startup(sockets)
        except SystemExit:  # uvicorn's exit after a failed lifespan start-up, or a bind error
            failure = getattr(self.lifespan, "failure", None)
            if failure is None:
                raise  # already said in one line by uvicorn (address in use...)
            self.startup_failure = failure
            self.should_exit = True  # run() returns; serve_main prints the line

    # -- shutdown --------------------------------------------------------------------------
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        log.info("shutting down: listener closed, answering %d open connection(s)",
                 len(self.server_state.connections))
        self.server_state.draining = True
        await self._close_listeners()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        deadline = time.monotonic() + self.graceful_shutdown_s
        while (self.server_state.connections and not self.force_exit
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)
        if self.server_state.connections:
            log.error("%d connection(s) unanswered after %g s: 503",
                      len(self.server_state.connections), self.graceful_shutdown_s)
            for connection in list(self.server_state.connections):
                if isinstance(connection, ImgrecHttpProtocol):
                    connection.abandon(self.server_state.limits.retry_after_s)
        for task in list(self.server_state.tasks):  # every connection has been answered
            task.cancel()
        if self.server_state.tasks:
            await asyncio.wait(list(self.server_state.tasks), timeout=5)
        if not self.force_exit:
            await self.lifespan.shutdown()

    async def _close_listeners(self) -> None:
        """Close the listening sockets, but first accept what the kernel already accepted (the
        connections in the listen backlog would be reset by the close); they are served."""
        loop = asyncio.get_running_loop()
        backlog: list[socket.socket] = []
        for server in self.servers:
            # a duplicate descriptor keeps the socket listening while the server closes its own
            listeners = [socket.socket(fileno=os.dup(s.fileno())) for s in server.sockets or ()]
            server.close()
            for listener in listeners:
                listener.setblocking(False)
                while True:
                    try:
                        conn, _ = listener.accept()
                    except OSError:  # BlockingIOError: the backlog is empty
                        break
                    conn.setblocking(False)
                    backlog.append(conn)
                listener.close()
        if backlog:
            log.info("accepted %d connection(s) from the listen backlog", len(backlog))
        await asyncio.gather(*(loop.connect_accepted_socket(self._protocol, conn)
                               for conn in backlog), return_exceptions=True)

    def _protocol(self) -> asyncio.Protocol:
        protocol_class = cast(type[ImgrecHttpProtocol], self.config.http_protocol_class)
        return protocol_class(config=self.config, server_state=self.server_state,
                              app_state=self.lifespan.state)
