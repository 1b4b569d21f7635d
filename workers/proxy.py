"""Proxy mode: each call FreeSWITCH places is relayed to an outbound ESL listener of any
language (a backend), which keeps its code and its port and loses only the refusals.

The backend sees exactly what it would see from FreeSWITCH: it sends ``connect`` first and gets
the real CHANNEL_DATA, every byte both ways is relayed verbatim (workers.relay), a half-close is
passed on. What the gateway adds is around the relay, never in it:

* a backend that refuses or cannot be reached (crashed, restarting, deploying) is retried, with
  a short backoff, across the listed backends for up to --backend-wait seconds while
  FreeSWITCH's side stays connected and waits for its ``connect`` (FreeSWITCH waits 25 s); only
  then is the call handed back to the dialplan;
* the choice is round robin among backends that answer; one that refused is skipped for
  REFUSED_SKIP seconds, so calls do not pay for a dead backend again and again;
* a backend that dies mid-call: FreeSWITCH's side is closed at once (the dialplan goes on), or,
  with --backend-reconnect, another backend takes the call over as if new: when it sends
  ``connect``, FreeSWITCH's side is realigned (gateway.session.Session.reattach) and the fresh
  CHANNEL_DATA is relayed. The same serves a call whose worker died (call survival).
"""

from __future__ import annotations

import _socket
import logging
import socket
import time
from collections import deque
from dataclasses import dataclass, field

import gevent
from gevent import socket as gsocket
from gevent.event import Event as Flag

from gateway.ipc import BACKEND_COUNTERS
from gateway.session import CLOSE_DRAIN_SECONDS, CommandError, ESLError, Session
from workers.relay import Relay

log = logging.getLogger("esl_gateway.proxy")

REFUSED_SKIP = 1.0         # a backend that refused is not tried again for this long
RETRY_MIN, RETRY_MAX = 0.05, 0.5
CONNECT_TIMEOUT = 2.0      # an unreachable host (dropped SYNs) is given up on after this
RECENT = 50                # relays remembered for /stats (and `esl-gateway probe`)


@dataclass
class Backend:
    address: str
    skip_until: float = 0.0
    last_answer: float | None = None    # monotonic, the last time it accepted a call
    last_failure: float | None = None   # monotonic, the last time it refused or failed
    counts: dict = field(default_factory=lambda: dict.fromkeys(BACKEND_COUNTERS, 0))

    def dial(self, timeout: float) -> _socket.socket:
        """Connect (cooperatively); a plain non-blocking socket for the relay."""
        if self.address.startswith("unix:"):
            sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = self.address[len("unix:"):]
        else:
            host, _, port = self.address.rpartition(":")
            host = host.strip("[]")
            sock = gsocket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                                  socket.SOCK_STREAM)
            target = (host, int(port))
        sock.settimeout(timeout)
        try:
            sock.connect(target)
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            sock.close()
            raise
        raw = _socket.socket(fileno=sock.detach())
        raw.setblocking(False)
        return raw


class Backends:
    """The backends of this worker, chosen round robin among those that answer."""

    def __init__(self, addresses: list[str]):
        self.backends = [Backend(address) for address in addresses]
        self._next = 0
        self.waiting = 0   # calls waiting for a backend now
        self.gave_up = 0   # calls handed back to the dialplan: no backend answered in time
        self.recent: deque = deque(maxlen=RECENT)   # (FreeSWITCH peer, backend address)

    def connect(self, deadline: float) -> tuple[Backend, _socket.socket] | None:
        """A connected backend, trying each in turn (those that refused lately last) and
        backing off between rounds until ``deadline``; None if none answered."""
        started, delay, attempts = time.monotonic(), RETRY_MIN, 0
        self.waiting += 1
        try:
            while True:
                now = time.monotonic()
                order = self.backends[self._next:] + self.backends[:self._next]
                order.sort(key=lambda b: b.skip_until > now)   # stable: round robin kept
                for backend in order:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return None
                    attempts += 1
                    if attempts > 1:
                        backend.counts["retries"] += 1
                    try:
                        sock = backend.dial(min(CONNECT_TIMEOUT, left))
                    except OSError:
                        backend.counts["refused"] += 1
                        backend.skip_until = time.monotonic() + REFUSED_SKIP
                        backend.last_failure = time.monotonic()
                        continue
                    backend.counts["connects"] += 1
                    backend.counts["waited_ms"] += int((time.monotonic() - started) * 1000)
                    backend.last_answer = time.monotonic()
                    self._next = (self.backends.index(backend) + 1) % len(self.backends)
                    return backend, sock
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                gevent.sleep(min(delay, left))
                delay = min(delay * 2, RETRY_MAX)
        finally:
            self.waiting -= 1

    def report(self) -> dict:
        """For the heartbeat: each backend's counters and ages, and the recent relays."""
        now = time.monotonic()
        return {"waiting": self.waiting, "gave_up": self.gave_up, "recent": list(self.recent),
                "backends": {
            b.address: dict(b.counts,
                            answered_ago=None if b.last_answer is None else now - b.last_answer,
                            failed_ago=None if b.last_failure is None else now - b.last_failure)
            for b in self.backends}}


class ProxiedCall:
    """One call relayed to a backend (and, with --backend-reconnect, to the next one)."""

    def __init__(self, conn: _socket.socket, backends: Backends, config, settings, counters):
        self.conn, self.backends, self.config = conn, backends, config
        self.settings, self.counters = settings, counters
        peer = conn.getpeername()
        self.peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer)

    def run(self, resumed: bool = False) -> bool:
        """Relay until the call ends; True if it ended as FreeSWITCH and the backend ended it.
        ``resumed``: taken over from a dead worker, so FreeSWITCH's side is mid-conversation
        and is realigned first."""
        must_realign = resumed
        while True:
            found = self.backends.connect(time.monotonic() + self.config.backend_wait)
            if found is None:
                log.warning("call from %s: no backend answered within %.0fs (%s); handing it "
                            "back to the dialplan", self.peer, self.config.backend_wait,
                            ", ".join(self.config.proxy))
                self.backends.gave_up += 1
                self._close_freeswitch()
                return False
            backend, sock = found
            from_freeswitch = b""
            if must_realign:
                from_freeswitch = self._realign()
                if from_freeswitch is None:
                    sock.close()
                    return False
            self.backends.recent.append((self.peer, backend.address))
            relay = self._relay(backend, sock, from_freeswitch)
            if relay.failed is not None and relay.failed[0] == "FreeSWITCH":
                return False
            if relay.failed is None and not relay.left_mid_call:
                return True
            backend.counts["died_mid_call"] += 1
            backend.last_failure = time.monotonic()
            why = relay.failed[1] if relay.failed else "it closed while the call was up"
            if not self.config.backend_reconnect:
                log.warning("call from %s: backend %s failed mid-call (%s); closing "
                            "FreeSWITCH's side, the dialplan goes on", self.peer,
                            backend.address, why)
                self._close_freeswitch()
                return False
            log.warning("call from %s: backend %s failed mid-call (%s); another takes it over",
                        self.peer, backend.address, why)
            backend.counts["reconnected"] += 1
            must_realign = True

    def _relay(self, backend: Backend, sock, from_freeswitch: bytes) -> Relay:
        done = Flag()
        relay = Relay(self.conn, sock, lambda _relay: done.set(), self.config.backend_reconnect)
        relay.start(from_freeswitch)
        try:
            done.wait()
        finally:
            backend.counts["relayed"] += 1
            backend.counts["bytes_to_backend"] += relay.upstream.bytes + len(from_freeswitch)
            backend.counts["bytes_to_freeswitch"] += relay.downstream.bytes
            sock.close()
        return relay

    def _realign(self) -> bytes | None:
        """FreeSWITCH's side is mid-conversation (its worker or its backend died): realign
        it and stop the events the last controller had asked for, so the new backend starts
        as on a new call (its ``connect`` gets a fresh CHANNEL_DATA). Returns what FreeSWITCH
        sent after that for the backend (normally nothing), None if the call is gone."""
        session = Session(self.conn, self.settings, self.counters)
        try:
            session.reattach()
            if session.full:
                try:
                    session.noevents()
                except CommandError:
                    pass   # -ERR not listening for events: none to stop
            return session.release()
        except ESLError as exc:
            log.warning("call from %s could not be taken over: %s", self.peer, exc)
            return None

    def _close_freeswitch(self) -> None:
        """End FreeSWITCH's side now (its dialplan goes on), whoever else holds the socket
        (the master does): FIN, then read until FreeSWITCH closes too, so that what it still
        sends is not answered with a reset. The worker closes the socket after the call."""
        try:
            self.conn.shutdown(socket.SHUT_WR)
            with gevent.Timeout(CLOSE_DRAIN_SECONDS, False):
                while True:
                    gsocket.wait_read(self.conn.fileno())
                    if not self.conn.recv(65536):
                        break
        except OSError:
            pass
