"""A tiny HTTP server inside the master's select loop, for /stats, /metrics and /healthz.

It must never block the master (heartbeats, reaping and signals go through the same loop) and
must survive slow or hostile clients: every socket is non-blocking, a request has a size cap
(431) and a deadline (408), carries no body (413), the number of connections is capped, and a
response is written as the socket accepts it. Requests are GET or HEAD only (405), answered with
``Connection: close``. With a token set, every path needs ``Authorization: Bearer TOKEN`` (401),
compared in constant time so the answer's timing says nothing about the token.
"""

from __future__ import annotations

import hmac
import logging
import selectors
import socket
import time
from typing import Callable

log = logging.getLogger("esl_gateway.stats")

MAX_CONNECTIONS = 256
MAX_REQUEST = 8192
DEADLINE = 5.0      # seconds a client has to send its request and read the answer
REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
           405: "Method Not Allowed", 408: "Request Timeout", 413: "Payload Too Large",
           431: "Request Header Fields Too Large", 503: "Service Unavailable"}
# Extra response headers some answers must carry (RFC 9110).
EXTRA_HEADERS = {401: "WWW-Authenticate: Bearer\r\n", 405: "Allow: GET, HEAD\r\n"}

# A route returns (status, content type, body).
Route = Callable[[], "tuple[int, str, bytes]"]


class _Connection:
    __slots__ = ("sock", "request", "response", "deadline", "on_event")

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.request, self.response, self.deadline = sock, bytearray(), b"", deadline
        self.on_event = None   # this connection's selector callback


class HTTPServer:
    def __init__(self, sock: socket.socket, selector: selectors.BaseSelector,
                 routes: dict[str, Route], token: str | None = None):
        self.sock, self.selector, self.routes = sock, selector, routes
        self.token = token   # the master sets it afresh on reload
        self.connections: dict[int, _Connection] = {}
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ, self._on_accept)

    def _on_accept(self, _mask: int) -> None:
        for _ in range(64):   # bounded: a flood must not starve the rest of the loop
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("stats endpoint: accept failed: %s", exc)
                return
            if len(self.connections) >= MAX_CONNECTIONS:
                sock.close()   # over the cap: refuse this client, keep serving the others
                continue
            sock.setblocking(False)
            conn = _Connection(sock, time.monotonic() + DEADLINE)
            conn.on_event = lambda mask, conn=conn: self._on_event(conn, mask)
            self.connections[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, conn.on_event)

    def _on_event(self, conn: _Connection, mask: int) -> None:
        try:
            if mask & selectors.EVENT_READ and not conn.response:
                data = conn.sock.recv(4096)
                if not data:
                    self._close(conn)
                    return
                conn.request += data
                if b"\r\n\r\n" in conn.request or b"\n\n" in conn.request:
                    self._respond(conn, *self._answer(bytes(conn.request)))
                elif len(conn.request) > MAX_REQUEST:
                    self._respond(conn, 431, "text/plain", b"request head too large\n")
            if mask & selectors.EVENT_WRITE and conn.response:
                sent = conn.sock.send(conn.response)
                conn.response = conn.response[sent:]
                if not conn.response:
                    self._close(conn)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)   # the client went away: nothing to tell anyone

    def _answer(self, request: bytes) -> tuple[int, str, bytes]:
        head = request.replace(b"\r\n", b"\n").split(b"\n\n", 1)[0].decode("latin-1")
        line, *header_lines = head.split("\n")
        line = line.split()
        if len(line) < 2:
            return 400, "text/plain", b"bad request\n"
        method, path = line[0], line[1].split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"GET or HEAD only\n"
        headers = {}
        for header in header_lines:
            name, _, value = header.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("content-length", "0") != "0" or "transfer-encoding" in headers:
            return 413, "text/plain", b"a request here has no body\n"
        if self.token is not None and not _bearer_matches(headers.get("authorization", ""),
                                                           self.token):
            return 401, "text/plain", b"a bearer token is required\n"
        route = self.routes.get(path)
        if route is None:
            return 404, "text/plain", f"no {path}; try {', '.join(self.routes)}\n".encode()
        try:
            status, content_type, body = route()
        except Exception:
            log.exception("stats endpoint: %s failed", path)
            return 503, "text/plain", b"internal error, see the master's log\n"
        return status, content_type, b"" if method == "HEAD" else body

    def _respond(self, conn: _Connection, status: int, content_type: str, body: bytes) -> None:
        head = (f"HTTP/1.0 {status} {REASONS.get(status, '')}\r\nContent-Type: {content_type}\r\n"
                f"{EXTRA_HEADERS.get(status, '')}"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
        conn.response = head.encode("latin-1") + body
        self.selector.modify(conn.sock, selectors.EVENT_WRITE, conn.on_event)
        self._on_event(conn, selectors.EVENT_WRITE)

    def expire(self, now: float) -> None:
        """Drop clients past their deadline (slowloris, or never reading the answer); one that
        never finished its request is told so (408), as far as one send() takes it."""
        for conn in [c for c in self.connections.values() if now > c.deadline]:
            if not conn.response:
                try:
                    conn.sock.send(b"HTTP/1.0 408 Request Timeout\r\nContent-Length: 0\r\n"
                                   b"Connection: close\r\n\r\n")
                except OSError:
                    pass   # gone, or not reading: it is closed below either way
            self._close(conn)

    def _close(self, conn: _Connection) -> None:
        if self.connections.pop(conn.sock.fileno(), None) is not None:
            self.selector.unregister(conn.sock)
        conn.sock.close()

    def close(self) -> None:
        """Close everything: the master is stopping."""
        for conn in list(self.connections.values()):
            self._close(conn)
        self.selector.unregister(self.sock)
        self.sock.close()

    def drop_in_child(self) -> None:
        """A forked worker closes its copies; it must not touch the epoll set it shares with the
        master, so nothing is unregistered."""
        for conn in self.connections.values():
            conn.sock.close()
        self.sock.close()


def _bearer_matches(authorization: str, token: str) -> bool:
    scheme, _, given = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(),
                                                              token.encode())
