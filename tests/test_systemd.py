"""The systemd notify protocol and socket passing, against real sockets."""

import array
import os
import socket

import pytest

from gateway import systemd


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    yield sock
    sock.close()


def test_notify_sends_one_datagram_of_fields(notify_socket):
    """READY=1 and STATUS= travel as newline-separated fields in one datagram."""
    assert systemd.notify("READY=1", "STATUS=gen 1: 2/2 workers ready")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=gen 1: 2/2 workers ready"


def test_notify_outside_systemd_does_nothing(monkeypatch):
    """No NOTIFY_SOCKET: nothing is sent and nothing fails."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_notify_to_a_gone_systemd_warns_and_carries_on(notify_socket, caplog, monkeypatch):
    """systemd gone (its socket closed): notify fails softly, says so once, and the caller (a
    master in the middle of stopping, say) goes on."""
    monkeypatch.setattr(systemd, "_warned_at", -systemd.NOTIFY_WARN_EVERY)
    notify_socket.close()
    os.unlink(os.environ["NOTIFY_SOCKET"])
    assert systemd.notify("STOPPING=1") is False
    assert systemd.notify("STATUS=gen 1") is False
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1


def test_abstract_namespace_socket(monkeypatch):
    """An address starting with @ is in the abstract namespace, as systemd passes it."""
    name = f"esl-gateway-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        systemd.notify("WATCHDOG=1")
        assert sock.recv(64) == b"WATCHDOG=1"


def test_fd_store_passes_the_socket_itself(notify_socket):
    """FDSTORE=1 carries the listening socket with SCM_RIGHTS: systemd gets a working copy."""
    listener = socket.create_server(("127.0.0.1", 0))
    assert systemd.store_fds([listener], "esl-gateway")
    data, ancillary, _, _ = notify_socket.recvmsg(4096, socket.CMSG_SPACE(4))
    assert data == b"FDSTORE=1\nFDNAME=esl-gateway"
    fds = array.array("i", ancillary[0][2])
    with socket.socket(fileno=fds[0]) as copy:
        assert copy.getsockname() == listener.getsockname()
    listener.close()


def test_listen_fds_only_for_our_pid(monkeypatch):
    """LISTEN_PID of another process (a parent we were forked from) is not for us."""
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert systemd.listen_fds() == []


def test_monotonic_usec_and_watchdog(monkeypatch):
    """RELOADING=1 comes with CLOCK_MONOTONIC in µs; the watchdog is pinged at half its period."""
    assert int(systemd.monotonic_usec().split("=")[1]) > 0
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert systemd.watchdog_interval() == 15.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd.watchdog_interval() is None
