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


def bind(text: str, backlog: int) -> socket.socket:
    family, address = parse_address(text)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # [::] serves IPv4 too (dual stack), whatever the sysctl default says.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
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
