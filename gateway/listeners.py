"""The listening sockets: bound once by the master, inherited by every worker.

One shared socket (not per-worker SO_REUSEPORT) is what keeps queued calls alive while workers
die and restart: the accept queue belongs to the socket, and the master's reference keeps it
open (docs/process-managers.md §1). It is non-blocking, because a blocking socket shared by gevent
workers freezes the losers of each accept race inside accept().
"""

from __future__ import annotations

import socket


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
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # [::] serves IPv4 too (dual stack), whatever the sysctl default says.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        tune(sock)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


def describe(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if sock.family == socket.AF_INET6 else f"{host}:{port}"
