"""Listening sockets: address forms, IPv6 and dual stack, non-blocking, the backlog."""

import socket

import pytest

from gateway import listeners


@pytest.mark.parametrize("text, family, address", [
    ("127.0.0.1:9090", socket.AF_INET, ("127.0.0.1", 9090)),
    (":9090", socket.AF_INET, ("0.0.0.0", 9090)),
    ("[::1]:9090", socket.AF_INET6, ("::1", 9090)),
    ("[::]:0", socket.AF_INET6, ("::", 0)),
])
def test_parse_address(text, family, address):
    """HOST:PORT, :PORT (all IPv4) and [V6]:PORT, as gunicorn and HAProxy write them."""
    assert listeners.parse_address(text) == (family, address)


@pytest.mark.parametrize("text", ["9090", "::1:9090", "host:port"])
def test_bad_addresses_are_refused(text):
    """An ambiguous or malformed address is an error, never a guess."""
    with pytest.raises(ValueError):
        listeners.parse_address(text)


def test_dual_stack_accepts_ipv4_and_ipv6():
    """[::]:PORT serves IPv4 clients too, whatever net.ipv6.bindv6only says."""
    sock = listeners.bind("[::]:0", backlog=16)
    try:
        port = sock.getsockname()[1]
        assert sock.getblocking() is False
        for client_address in (("127.0.0.1", port), ("::1", port)):
            with socket.create_connection(client_address, timeout=2):
                sock.setblocking(True)
                conn, _ = sock.accept()
                conn.close()
                sock.setblocking(False)
        assert listeners.describe(sock) == f"[::]:{port}"
    finally:
        sock.close()


def test_ipv6_only_address():
    """[::1]:PORT binds the IPv6 loopback."""
    sock = listeners.bind("[::1]:0", backlog=16)
    try:
        assert sock.family == socket.AF_INET6
        with socket.create_connection(("::1", sock.getsockname()[1]), timeout=2):
            pass
    finally:
        sock.close()


def test_accepted_calls_inherit_nodelay_and_keepalive():
    """Options set once on the listener reach every call without a syscall per call."""
    sock = listeners.bind("127.0.0.1:0", backlog=16)
    sock.setblocking(True)
    try:
        with socket.create_connection(sock.getsockname(), timeout=2):
            conn, _ = sock.accept()
            with conn:
                for level, option, value in listeners.CALL_SOCKET_OPTIONS:
                    assert conn.getsockopt(level, option) == value, option
    finally:
        sock.close()
