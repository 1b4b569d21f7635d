"""Accepting calls from the event loop: one read watcher per listening socket, no greenlet.

A loop callback accepts, so a new call costs no switch into an acceptor greenlet and back; the
call's own greenlet is the first one to run. Accepting is one connection per wakeup, and only
while the worker has room: at capacity the watchers stop, so a busy or full worker leaves calls
in the kernel queue for its siblings instead of hoarding them. A peer outside --allow is closed
right after accept(), before a byte is sent, and never reaches the worker.

A listener that a drain shut down (gateway.drain) is not an error: accept() says EINVAL, the
socket stays readable (EPOLLHUP), so its watcher stops until the master says it listens again.

Accepted connections are plain ``_socket.socket`` objects, not gevent's cooperative socket: the
session makes them non-blocking, reads from a loop callback of its own and writes with ``send()``,
so the wrapper's two watchers and its Python layer around every send and recv would buy nothing.
"""

from __future__ import annotations

import _socket
import errno
import logging
from typing import Callable

from gevent import get_hub

from gateway.allowlist import Allowlist
from gateway.logsafe import RateLimitedLog

log = logging.getLogger("esl_gateway.worker")

# Accept failures such as EMFILE would repeat at once; back off instead of spinning the CPU.
BACKOFF_MIN, BACKOFF_MAX = 0.01, 1.0
# Errors about one connection that died in the queue: skip it and accept the next.
SKIPPABLE = {errno.ECONNABORTED, errno.EPROTO, errno.EPERM, errno.ECONNRESET}
LOG_INTERVAL = 10.0   # at most one accept-error line, and one refused-peer line, per interval


class Acceptor:
    """Hands each accepted connection to ``on_connection``; paused while the worker is full."""

    def __init__(self, listeners, on_connection: Callable[[_socket.socket], None],
                 allowlist: Allowlist | None = None):
        self._on_connection = on_connection
        self._allowlist = allowlist
        loop = get_hub().loop
        self._watchers = []
        for sock in listeners:
            sock.setblocking(False)
            kind = (sock.family, sock.type, sock.proto)   # read once: they are properties
            self._watchers.append((loop.io(sock.fileno(), 1), sock, kind))
        self._backoff_timer = None   # pending while accepting is paused after an error
        self._backoff = BACKOFF_MIN
        self._full = self._closed = self._accepting = False
        self._not_listening: set[int] = set()   # fds of listeners a drain shut down
        self._log_error = RateLimitedLog(log, LOG_INTERVAL)
        self._log_refused = RateLimitedLog(log, LOG_INTERVAL)
        self.errors = 0
        self.refused = 0   # peers outside --allow

    def start(self) -> None:
        self._update()

    def set_full(self, full: bool) -> None:
        """Stop accepting while the worker has no room; resume once it has."""
        if full != self._full:
            self._full = full
            self._update()

    def listening(self) -> None:
        """The master listens again (undrain): resume accepting on every listener."""
        self._not_listening.clear()
        self._apply()

    def close(self) -> None:
        """Stop for good and close our copies of the listening sockets: the master keeps the
        sockets, and the calls in their queues, alive for the other workers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._update()
        if self._backoff_timer is not None:
            self._backoff_timer.close()
        for watcher, sock, _ in self._watchers:
            watcher.close()
            sock.close()

    def _update(self) -> None:
        accepting = not (self._full or self._closed or self._backoff_timer is not None)
        if accepting == self._accepting:
            return
        self._accepting = accepting
        self._apply()

    def _apply(self) -> None:
        """Each watcher on or off: on while accepting, unless its listener does not listen."""
        for watcher, sock, kind in self._watchers:
            if self._accepting and sock.fileno() not in self._not_listening:
                watcher.start(self._accept, sock, kind)
            else:
                watcher.stop()

    def _accept(self, sock, kind) -> None:
        try:
            fd, peer = sock._accept()
        except BlockingIOError:
            return   # a sibling worker won the race for this one
        except OSError as exc:
            if exc.errno == errno.EINVAL:   # drained: not listening until the master says so
                self._not_listening.add(sock.fileno())
                self._apply()
                return
            self.errors += 1
            if exc.errno not in SKIPPABLE:
                self._back_off(exc)
            return
        self._backoff = BACKOFF_MIN
        if self._allowlist is not None and not self._allowlist.allows(peer):
            _socket.close(fd)
            self.refused += 1
            self._log_refused(logging.WARNING, "refused a connection from %s: not in --allow, "
                              "closed before a byte was sent", peer[0])
            return
        self._on_connection(_socket.socket(*kind, fd))

    def _back_off(self, exc: OSError) -> None:
        """Pause accepting for a doubling delay; log once per LOG_INTERVAL at most."""
        self._log_error(logging.WARNING, "accept failed: %s; backing off %.2fs, the listening "
                        "socket stays open and calls wait in its queue", exc, self._backoff)
        if self._backoff_timer is not None:   # a second listener failed in the same turn
            self._backoff_timer.close()
        self._backoff_timer = get_hub().loop.timer(self._backoff)
        self._backoff_timer.start(self._end_backoff)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        self._update()

    def _end_backoff(self) -> None:
        self._backoff_timer.close()
        self._backoff_timer = None
        self._update()
