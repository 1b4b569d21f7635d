"""Proxy mode's byte relay: FreeSWITCH's side of a call to a backend listener and back, verbatim.

Each direction is a read watcher on its source and, only while the destination does not take
the bytes at once, a write watcher on the destination: no greenlet, no per-byte Python work.
Reads go into one buffer shared by every call of the worker (the bytes are sent on at once, and
only what the destination did not take is kept, per direction), so a held call costs no buffer.
A destination that does not read stops the reading of its source (back-pressure, never an
unbounded queue). End of file is passed on as a half-close (shutdown SHUT_WR), as FreeSWITCH
and its listener would see it with no relay between them; the relay is over once both
directions have ended, or at once if either side fails (a reset, a backend that died).

A backend that closes while the call is still up has left it mid-call: it crashed, or was
killed. "Up" means FreeSWITCH has sent neither a CHANNEL_HANGUP event (in any format) nor a
disconnect notice (the linger notice of a hangup included, or the answer to the backend's
``exit``): told apart by a byte search in what FreeSWITCH sends (C's memmem over each read), not
by parsing, so the relay stays verbatim and cheap. A backend that means to hand a live call back
to the dialplan should send ``exit``.
"""

from __future__ import annotations

import socket
from typing import Callable

from gevent import get_hub

BUFFER_SIZE = 256 * 1024
_buffer = bytearray(BUFFER_SIZE)   # one per worker: reads are sent on before the next read
_view = memoryview(_buffer)
# In what FreeSWITCH sends, the marks of a call that is over for its backend.
CALL_OVER = (b"CHANNEL_HANGUP", b"Content-Type: text/disconnect-notice")


class _Direction:
    __slots__ = ("source", "destination", "reading", "writing", "pending", "relay", "bytes",
                 "ended", "noticed")

    def __init__(self, relay: "Relay", source: socket.socket, destination: socket.socket):
        loop = get_hub().loop
        self.relay, self.source, self.destination = relay, source, destination
        self.reading = loop.io(source.fileno(), 1)
        self.writing = loop.io(destination.fileno(), 2)
        self.pending = b""   # what the destination did not take yet
        self.bytes = 0
        self.ended = False
        self.noticed = False   # FreeSWITCH -> backend only: the call is over (CALL_OVER)

    def start(self) -> None:
        self.reading.start(self._on_readable)

    def _on_readable(self) -> None:
        try:
            count = self.source.recv_into(_buffer)
        except BlockingIOError:
            return
        except OSError as exc:
            self.relay.fail(self.source, exc)
            return
        if not count:
            self._end()
            return
        self.bytes += count
        if not self.noticed and self.source is self.relay.freeswitch:
            self.noticed = any(_buffer.find(mark, 0, count) >= 0 for mark in CALL_OVER)
        try:
            sent = self.destination.send(_view[:count])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.relay.fail(self.destination, exc)
            return
        if sent < count:   # back-pressure: read no more until the destination drains
            self.pending = bytes(_view[sent:count])
            self.reading.stop()
            self.writing.start(self._on_writable)

    def _on_writable(self) -> None:
        try:
            sent = self.destination.send(self.pending)
        except BlockingIOError:
            return
        except OSError as exc:
            self.relay.fail(self.destination, exc)
            return
        self.pending = self.pending[sent:]
        if not self.pending:
            self.writing.stop()
            self.reading.start(self._on_readable)

    def _end(self) -> None:
        """The source has closed its side: pass the half-close on (unless the backend left a
        call that is still up and the relay is to hand it to another)."""
        self.reading.stop()
        self.ended = True
        relay = self.relay
        if self.source is relay.backend and not relay.upstream.noticed:
            relay.left_mid_call = True
            if relay.reconnect:
                relay.fail(relay.backend, ConnectionAbortedError("the backend closed mid-call"))
                return
        try:
            self.destination.shutdown(socket.SHUT_WR)
        except OSError:
            pass   # the destination is gone as well: the other direction says so
        self.relay.direction_ended()

    def close(self) -> None:
        self.reading.close()
        self.writing.close()


class Relay:
    """Relays ``freeswitch`` <-> ``backend`` until both directions end, then calls
    ``on_done(relay)``. ``failed`` says why it ended early: the error and which side had it;
    ``left_mid_call`` that the backend went while the call was up."""

    def __init__(self, freeswitch: socket.socket, backend: socket.socket,
                 on_done: Callable[["Relay"], None], reconnect: bool = False):
        for sock in (freeswitch, backend):
            sock.setblocking(False)
        self.freeswitch, self.backend, self._on_done = freeswitch, backend, on_done
        self.reconnect = reconnect   # a backend leaving mid-call fails the relay, no half-close
        self.left_mid_call = False
        self.upstream = _Direction(self, freeswitch, backend)     # FreeSWITCH -> backend
        self.downstream = _Direction(self, backend, freeswitch)   # backend -> FreeSWITCH
        self.failed: tuple[str, OSError] | None = None
        self.done = False

    def start(self, backend_already_sent: bytes = b"") -> None:
        """Relay from now on; ``backend_already_sent``: what the backend sent before (its
        ``connect``), to go to FreeSWITCH first."""
        if backend_already_sent:
            self.downstream.pending = backend_already_sent
            self.downstream.writing.start(self.downstream._on_writable)
        else:
            self.downstream.start()
        self.upstream.start()

    def direction_ended(self) -> None:
        if self.upstream.ended and self.downstream.ended:
            self._finish()

    def fail(self, sock: socket.socket, exc: OSError) -> None:
        """Reading from or writing to ``sock`` failed: the relay is over. A backend that resets
        a call that is over (it closed with FreeSWITCH's last frames unread, as many do) has
        not failed: FreeSWITCH gets its half-close as after a clean close."""
        if sock is self.backend and self.upstream.noticed:
            try:
                self.freeswitch.shutdown(socket.SHUT_WR)
            except OSError:
                pass
        else:
            self.failed = ("FreeSWITCH" if sock is self.freeswitch else "the backend", exc)
        self._finish()

    def _finish(self) -> None:
        if self.done:
            return
        self.done = True
        self.upstream.close()
        self.downstream.close()
        self._on_done(self)
