"""The parts of systemd that esl-gateway talks to, played by the test: the notify socket (with the
fd store) and the listening socket it would hold for a .socket unit."""

from __future__ import annotations

import array
import socket
from pathlib import Path

import gevent
from gevent import socket as gsocket


class FakeSystemd:
    def __init__(self, directory: Path):
        self.path = str(directory / "notify.sock")
        self.sock = gsocket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.messages: list[dict[str, str]] = []   # every datagram, parsed, in arrival order
        self.stored: dict[str, list[socket.socket]] = {}   # the fd store, by FDNAME
        self.receiver = gevent.spawn(self._receive)

    @property
    def env(self) -> dict[str, str]:
        return {"NOTIFY_SOCKET": self.path}

    def _receive(self) -> None:
        fd_space = socket.CMSG_SPACE(16 * array.array("i").itemsize)
        while True:
            data, ancillary, _, _ = self.sock.recvmsg(65536, fd_space)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            for level, kind, payload in ancillary:
                if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                    fds = array.array("i")
                    fds.frombytes(payload[:len(payload) - len(payload) % fds.itemsize])
                    self.stored.setdefault(fields.get("FDNAME", ""), []).extend(
                        socket.socket(fileno=fd) for fd in fds)

    def keys(self) -> list[str]:
        """The state changes announced, in order (READY, RELOADING, STOPPING, FDSTORE)."""
        order = ("FDSTORE", "RELOADING", "READY", "STOPPING")
        return [key for message in self.messages for key in order if message.get(key) == "1"]

    def wait_for(self, key: str, count: int = 1, timeout: float = 20.0) -> None:
        with gevent.Timeout(timeout, AssertionError(f"{key}=1 x{count} not notified: "
                                                    f"{self.keys()}")):
            while self.keys().count(key) < count:
                gevent.sleep(0.02)

    def close(self) -> None:
        self.receiver.kill()
        self.sock.close()
        for socks in self.stored.values():
            for sock in socks:
                sock.close()
