"""Host drain: make FreeSWITCH fail over to the next host at once, without resetting one call.

FreeSWITCH moves on to the next ``|`` host only when a connect is *refused* (gateway.failover),
so a drained gateway must answer SYNs with RST. The listening socket is shared by the master and
every worker (one open file), and on Linux:

* ``shutdown()`` of a listening socket stops it for every holder: it leaves LISTEN, ``accept()``
  then fails with EINVAL, connects are refused, and ``listen()`` on the same descriptor makes it
  listen again, on the same port (HAProxy pauses listeners this way). The port stays reserved
  meanwhile only if it was bound explicitly, which gateway.listeners ensures.
* but ``shutdown()`` resets every connection still in the accept queue, and those are calls.

So a drain goes in two steps. First a classic BPF socket filter on the listener drops pure SYNs
(TCP flags & (SYN|ACK) == SYN; acks of handshakes already under way pass), so no new connection
enters while the workers accept every queued one. Once the accept queue and the half-open
handshakes (SYN_RECV) are both gone, ``shutdown()`` resets nothing, and the filter comes off. A
caller whose SYN was dropped meanwhile retransmits it after about a second and is refused then:
it fails over one second late instead of being lost. Calls in progress are not touched.

Undrain takes the filter off and calls ``listen()`` again; workers learn it from the master (a
``listening`` message) and accept again. A master started on a socket systemd kept (socket
activation, the fd store) listens on it again the same way, so a restart undrains.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import signal
import socket
import struct
import time

from gateway.listeners import accept_queue, describe, is_listening

log = logging.getLogger("esl_gateway.master")

DRAIN_SIGNAL = signal.SIGRTMIN + 1     # `esl-gateway drain`
UNDRAIN_SIGNAL = signal.SIGRTMIN + 2   # `esl-gateway undrain`
POLL = 0.01   # how often the master looks at the queue while it empties
SLOW_WARNING = 5.0   # seconds between two warnings that the queue is still not empty

SO_ATTACH_FILTER, SO_DETACH_FILTER = 26, 27   # <asm-generic/socket.h>; not in Python's socket
# sock_diag (<linux/sock_diag.h>, <linux/inet_diag.h>): a dump of the TCP sockets in one state.
NETLINK_SOCK_DIAG, SOCK_DIAG_BY_FAMILY = 4, 20
NLM_F_REQUEST, NLM_F_DUMP, NLMSG_ERROR, NLMSG_DONE = 0x1, 0x300, 2, 3
TCP_SYN_RECV = 3
NLMSG = struct.Struct("=IHHII")           # struct nlmsghdr
DIAG_REQUEST = struct.Struct("=BBBBI48s")  # struct inet_diag_req_v2, its sockid zeroed
DIAG_MESSAGE = struct.Struct("=4x2s2x16s")   # struct inet_diag_msg: sport (big-endian), src
# ldb [13] (TCP flags: the filter sees the segment from its TCP header on); and #(SYN|ACK);
# jeq #SYN: ret #0 (drop); else ret #-1 (keep the whole packet).
SYN_DROP = ((0x30, 0, 0, 13), (0x54, 0, 0, 0x12), (0x15, 0, 1, 0x02),
            (0x06, 0, 0, 0), (0x06, 0, 0, 0xFFFFFFFF))


def attach_filter(sock: socket.socket, program) -> None:
    """Attach a classic BPF program, (code, jt, jf, k) per instruction, to ``sock``. The
    kernel copies it (struct sock_fprog), so the buffer need not outlive the call."""
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *op) for op in program))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER,
                    struct.pack("HP", len(program), ctypes.addressof(code)))


def hold_syns(sock: socket.socket) -> None:
    """New connections wait (their SYNs are dropped, the client retransmits) from now on."""
    attach_filter(sock, SYN_DROP)


def release_syns(sock: socket.socket) -> None:
    """Take the SYN filter off, if it is on (a master that died mid-drain may have left it)."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
    except OSError as exc:
        if exc.errno != errno.ENOENT:   # ENOENT: there was none
            raise


def half_open(sock: socket.socket) -> int:
    """Handshakes under way on this listener: SYN_RECV request sockets, which TCP_INFO does not
    count; each becomes a queued connection when its ACK arrives. Asked of the kernel with
    sock_diag (as ``ss -tn state syn-recv`` does), which sends only sockets in that state:
    /proc/net/tcp would list every socket of the namespace (tens of milliseconds to read on a
    busy host). A dual-stack listener's IPv4 handshakes are listed as IPv6, v4-mapped."""
    host, port = sock.getsockname()[:2]
    address = socket.inet_pton(sock.family, host)
    wildcard = not any(address)   # its handshakes carry the address they were made to
    request = DIAG_REQUEST.pack(sock.family, socket.IPPROTO_TCP, 0, 0, 1 << TCP_SYN_RECV, b"")
    count = 0
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_SOCK_DIAG) as diag:
        diag.send(NLMSG.pack(NLMSG.size + len(request), SOCK_DIAG_BY_FAMILY,
                             NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + request)
        while True:
            data, offset = diag.recv(65536), 0
            while offset < len(data):
                length, kind, _, _, _ = NLMSG.unpack_from(data, offset)
                if kind == NLMSG_DONE:
                    return count
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", data, offset + NLMSG.size)[0]
                    raise OSError(code, f"sock_diag: {os.strerror(code)}")
                local_port, local = DIAG_MESSAGE.unpack_from(data, offset + NLMSG.size)
                if int.from_bytes(local_port, "big") == port and (
                        wildcard or local[:len(address)] == address):
                    count += 1
                offset += (length + 3) & ~3   # NLMSG_ALIGN


def settled(sock: socket.socket) -> bool:
    """Nothing queued and nothing on its way into the queue (with SYNs held, nothing new can
    start): a shutdown() now resets no connection. Half-open handshakes are looked at first:
    once they are none, the queue can only shrink, so an empty queue after them stays empty."""
    return accept_queue(sock)[0] == 0 and half_open(sock) == 0 and accept_queue(sock)[0] == 0


class Drain:
    """One drain of the master's listeners: SYNs held while the queue empties, then refused."""

    def __init__(self, listeners: list[socket.socket], since: float | None = None,
                 refusing: bool = False, backlogs: list[int] | None = None):
        """A new drain; or, with ``since`` and the rest, one a master image handed over."""
        self.listeners = listeners
        self.refusing = refusing   # the listeners no longer listen: connects are refused
        self.warned_at = time.monotonic()   # the queue empties in milliseconds, normally
        # Each listener's backlog, for listen() on undrain (it may be systemd's Backlog=).
        self.backlogs = backlogs or [accept_queue(sock)[1] for sock in listeners]
        if since is not None:
            self.since = since
        else:
            self.since = time.monotonic()
            for sock in listeners:
                hold_syns(sock)
            queued = sum(accept_queue(sock)[0] for sock in listeners)
            log.info("drain: new connects wait (SYNs dropped) while the workers accept the %d "
                     "call(s) queued; then the port refuses connects, so FreeSWITCH fails over",
                     queued)

    @property
    def state(self) -> str:
        return "refusing" if self.refusing else "emptying the queue"

    def advance(self) -> None:
        """Stop listening once every queued call has been accepted."""
        if self.refusing:
            return
        if not all(settled(sock) for sock in self.listeners):
            now = time.monotonic()
            if now - self.warned_at >= SLOW_WARNING:
                self.warned_at = now
                log.warning("drain: %d call(s) still queued %.0fs after the signal (workers "
                            "full, stopped or gone?); new connects keep waiting until they "
                            "are accepted", sum(accept_queue(sock)[0] for sock in self.listeners),
                            now - self.since)
            return
        for sock in self.listeners:
            sock.shutdown(socket.SHUT_RD)
            release_syns(sock)
        self.refusing = True
        log.info("drain complete %.2fs after the signal: every queued call was accepted; "
                 "connects are refused now, calls in progress go on", time.monotonic() - self.since)

    def export(self) -> list:
        """For an in-place upgrade's state: the arguments that rebuild this drain."""
        return [self.since, self.refusing, self.backlogs]

    def end(self) -> None:
        """Undrain: take new calls again, on the same sockets."""
        for sock, limit in zip(self.listeners, self.backlogs):
            release_syns(sock)
            if not is_listening(sock):
                sock.listen(limit)
        log.info("undrain: listening again after %.1fs drained", time.monotonic() - self.since)


def listen_again(sock: socket.socket, backlog: int) -> None:
    """A socket handed to a new master (by systemd) as a drained one left it: filter off, and
    listening."""
    release_syns(sock)
    if not is_listening(sock):
        log.warning("the listening socket %s was handed over not listening (its gateway was "
                    "drained): listening again", describe(sock))
        sock.listen(backlog)
