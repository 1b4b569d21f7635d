"""A scripted fake FreeSWITCH for session tests: the far end of a real (gevent) socket pair.

The test drives it step by step: ``expect()`` the next command the session sent (parsed with the
same sans-IO ``protocol.CommandParser`` the simulator uses), then write FreeSWITCH's frames with
the serialisers from ``gateway.protocol``. Nothing here knows about ``Session``; it only speaks
bytes, so whatever the session does on the wire is what the test sees.
"""

from __future__ import annotations

import time
from collections import deque

import gevent
from gevent import socket as gsocket

from gateway import protocol
from gateway.protocol import Command, CommandParser

CALL_UUID = "0d3c5d6e-1b0a-4a8e-9d7e-5c1f2a3b4c5d"
CHANNEL_NAME = "loopback/9090-b"
TIMEOUT = 2.0   # no single step of a scripted conversation may take longer than this


def header_pairs(headers: dict) -> list[tuple[str, str]]:
    """Keyword names to header names: ``Unique_ID`` -> ``Unique-ID``."""
    return [(name.replace("_", "-"), str(value)) for name, value in headers.items()]


class FakeFS:
    """FreeSWITCH's side of one outbound connection."""

    def __init__(self, sock, uuid: str = CALL_UUID, fmt: str = "plain"):
        self.sock = sock
        self.uuid = uuid
        self.fmt = fmt                 # format of the events this fake sends by default
        self.parser = CommandParser()
        self.commands: deque[Command] = deque()
        self.eof = False
        self.sent_connect_reply_at: float | None = None

    # -- reading what the session sends ------------------------------------------------------

    def _recv(self) -> bytes:
        data = self.sock.recv(65536)
        if not data:
            self.eof = True
        return data

    def expect(self, name: str | None = None, timeout: float = TIMEOUT) -> Command:
        """The next command; asserts its (lower-case) command word when ``name`` is given."""
        with gevent.Timeout(timeout, AssertionError(f"no {name or 'command'} within {timeout}s")):
            while not self.commands:
                if self.eof:
                    raise AssertionError(f"EOF while waiting for {name or 'a command'}")
                data = self._recv()
                if data:
                    self.commands.extend(self.parser.feed(data))
        command = self.commands.popleft()
        if name is not None:
            assert command.name == name, f"expected {name!r}, got {command.line!r}"
        return command

    def expect_nothing(self, within: float = 0.1) -> None:
        """Nothing (not even EOF) arrives from the session for ``within`` seconds."""
        assert not self.commands, f"unexpected command {self.commands[0]!r}"
        with gevent.Timeout(within, False):
            data = self.sock.recv(65536)
            raise AssertionError(f"unexpected bytes from the session: {data!r}")

    def recv_raw(self, timeout: float = TIMEOUT) -> bytes:
        with gevent.Timeout(timeout, AssertionError(f"nothing received within {timeout}s")):
            return self._recv()

    def expect_eof(self, timeout: float = TIMEOUT) -> float:
        """Read until the session's FIN; returns when it arrived. Any command read is an error."""
        with gevent.Timeout(timeout, AssertionError(f"no EOF within {timeout}s")):
            while not self.eof:
                data = self._recv()
                if data:
                    self.commands.extend(self.parser.feed(data))
        assert not self.commands, f"commands before EOF: {list(self.commands)!r}"
        return time.monotonic()

    # -- writing FreeSWITCH's frames ---------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def channel_data(self, uuid: str | None = None) -> list[tuple[str, str]]:
        uuid = uuid or self.uuid
        return [
            ("Event-Name", "CHANNEL_DATA"),
            ("Core-UUID", "5a0b6d0e-0000-4000-8000-000000000001"),
            ("Event-Date-Local", "2024-01-01 12:00:00"),
            ("Channel-State", "CS_EXECUTE"),
            ("Channel-Name", CHANNEL_NAME),
            ("Unique-ID", uuid),
            ("Caller-Caller-ID-Name", "Bob & Co: 100% <sip>"),
            ("Caller-Caller-ID-Number", "+15551234567"),
            ("variable_sip_from_display", "Alice Smith"),
            ("variable_custom", "line1\nInjected: yes"),
        ]

    def connect_reply(self, uuid: str | None = None, control: str = "full",
                      socket_mode: str = "async") -> None:
        self.send(protocol.connect_reply_frame(self.channel_data(uuid), socket_mode=socket_mode,
                                               control=control))
        self.sent_connect_reply_at = time.monotonic()

    def reply(self, text: str = "+OK", **extra) -> None:
        self.send(protocol.reply_frame(text, header_pairs(extra)))

    def api_response(self, body: str | bytes) -> None:
        self.send(protocol.api_response_frame(body.encode() if isinstance(body, str) else body))

    def event_bytes(self, name: str, body: bytes = b"", fmt: str | None = None,
                    **headers) -> bytes:
        pairs = [("Event-Name", name)]
        if "Unique_ID" not in headers and name.startswith("CHANNEL_"):
            pairs.append(("Unique-ID", self.uuid))
        pairs += header_pairs(headers)
        return protocol.event_frame(pairs, body, fmt or self.fmt)

    def event(self, name: str, body: bytes = b"", fmt: str | None = None, **headers) -> None:
        self.send(self.event_bytes(name, body, fmt, **headers))

    def linger_notice(self, linger_time: int = 10) -> None:
        self.send(protocol.linger_notice_frame(self.uuid, CHANNEL_NAME, linger_time))

    def disconnect(self) -> None:
        self.send(protocol.disconnect_notice_frame(self.uuid))

    def close(self) -> None:
        self.sock.close()

    # -- small conversations -----------------------------------------------------------------

    def answer_connect(self, **kwargs) -> None:
        command = self.expect("connect")
        assert command.line == "connect"
        self.connect_reply(**kwargs)


def socketpair():
    """(session side, fake FreeSWITCH side): a real connected stream pair, gevent-cooperative."""
    return gsocket.socketpair()


class Background:
    """Run ``fn`` in a greenlet and keep its outcome (value or exception) without hub noise."""

    def __init__(self, fn, *args, **kwargs):
        self.value = self.error = None
        self.finished_at: float | None = None
        self.greenlet = gevent.spawn(self._run, fn, args, kwargs)

    def _run(self, fn, args, kwargs):
        try:
            self.value = fn(*args, **kwargs)
        except Exception as exc:   # noqa: BLE001 - the test inspects it
            self.error = exc
        self.finished_at = time.monotonic()

    def ready(self) -> bool:
        return self.greenlet.ready()

    def join(self, timeout: float = TIMEOUT) -> "Background":
        self.greenlet.join(timeout)
        assert self.greenlet.ready(), f"still blocked after {timeout}s"
        return self

    def result(self, timeout: float = TIMEOUT):
        self.join(timeout)
        if self.error is not None:
            raise self.error
        return self.value

    def exception(self, timeout: float = TIMEOUT) -> BaseException:
        self.join(timeout)
        assert self.error is not None, f"returned {self.value!r} instead of raising"
        return self.error

    def kill(self) -> None:
        self.greenlet.kill(block=False)
