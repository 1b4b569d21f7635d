"""The listening sockets: bound once by the master, inherited by every worker.

One shared socket (not per-worker SO_REUSEPORT) is what keeps queued calls alive while workers
die and restart: the accept queue belongs to the socket, and the master's reference keeps it
open (docs/process-managers.md §1). It is non-blocking, because a blocking socket shared by gevent
workers freezes the losers of each accept race inside accept().
"""

from __future__ import annotations

import socket
import struct

# struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, sacked. On a
# listening socket unacked is the accept queue's length and sacked its limit.
TCP_INFO = struct.Struct("8xIIIIII")


def parse_address(text: str) -> tuple[int, tuple[str, int]]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` → (family, (host, port))."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"bind address must be HOST:PORT, not {text!r}")
    if host.startswith("[") and host.endswith("]"):
        return socket.AF_INET6, (host[1:-1], int(port))
    if ":" in host:
        raise ValueError(f"put IPv6 addresses in brackets: [{host}]:{port}")
    return socket.AF_INET, (host or "0.0.0.0", int(port))


# Inherited by every accepted connection (Linux copies these from the listening socket), so no
# call pays a syscall for them: commands go out at once, and a FreeSWITCH that vanished without
# a FIN is noticed within about a minute instead of never.
CALL_SOCKET_OPTIONS = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),
                       (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
                       (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
                       (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
                       (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3))


def tune(sock: socket.socket) -> None:
    """Set the options calls inherit; also for sockets systemd or an upgrade handed us."""
    for level, option, value in CALL_SOCKET_OPTIONS:
        sock.setsockopt(level, option, value)


def bind(text: str, backlog: int) -> socket.socket:
    family, address = parse_address(text)
    if address[1] == 0:
        # The kernel chooses the port; then we bind that port by number. A port the kernel
        # chose is given back when a drain shuts the listener down (gateway.drain), and listen()
        # would pick another; a port bound by number stays ours.
        with _bound(family, address) as chooser:
            return bind(describe(chooser), backlog)
    sock = _bound(family, address)
    try:
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def _bound(family: int, address: tuple[str, int]) -> socket.socket:
    """A TCP socket bound to ``address`` (SO_REUSEADDR: two bound, not listening, may share a
    port), with the options calls inherit."""
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # [::] serves IPv4 too (dual stack), whatever the sysctl default says.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        tune(sock)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def accept_queue(sock: socket.socket) -> tuple[int, int]:
    """(connections waiting to be accepted, the queue's limit) for a listening TCP socket."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO.size)
    _, _, _, _, queued, limit = TCP_INFO.unpack_from(info)
    return queued, limit


def is_listening(sock: socket.socket) -> bool:
    """False once a drain shut the socket down (gateway.drain)."""
    return bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN))


def describe(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
