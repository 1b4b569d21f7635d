"""A small outbound ESL listener that is not esl-gateway: the "existing service" proxy mode puts
esl-gateway in front of (the Go or Node service a team cannot rewrite).

    python -m tests.backend_listener HOST:PORT|unix:/PATH [--name NAME]

For each call, the example IVR: connect, linger, myevents, answer, playback, hangup, then it
reads until FreeSWITCH closes. It writes with plain sends and parses with the project's sans-IO
parser only to find its replies and completions; it keeps no state between calls. It tells the
simulator who served the call with ``set backend_name=NAME`` and prints a line per call ended.
"""

from __future__ import annotations

import argparse
import os
import sys

from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402

from gevent.server import StreamServer  # noqa: E402

from gateway import protocol  # noqa: E402
from gateway.session import new_uuid  # noqa: E402


class Call:
    def __init__(self, sock, name: str):
        self.sock, self.name = sock, name
        self.parser = protocol.Parser()
        self.frames = []

    def next_frame(self):
        while not self.frames:
            data = self.sock.recv(65536)
            if not data:
                raise EOFError
            self.frames += self.parser.feed(data)
        return self.frames.pop(0)

    def command(self, data: bytes):
        """Send a command; return its reply, keeping the events met on the way."""
        self.sock.sendall(data)
        while True:
            frame = self.next_frame()
            if frame.is_reply:
                return frame
            self.events.append(protocol.parse_event(frame))

    def wait_event(self, predicate):
        while True:
            for event in self.events:
                if predicate(event):
                    return event
            self.events.clear()
            frame = self.next_frame()
            if not frame.is_reply and frame.content_type in protocol.EVENT_CONTENT_TYPES:
                self.events.append(protocol.parse_event(frame))

    def execute(self, app: str, arg: str | None = None):
        event_uuid = new_uuid()
        self.command(protocol.execute(app, arg, event_uuid=event_uuid))
        self.wait_event(lambda e: e.name == "CHANNEL_EXECUTE_COMPLETE" and
                        e.get("Application-UUID") == event_uuid)

    def run(self) -> None:
        self.events = []
        reply = self.command(protocol.connect())
        uuid = reply.headers.get("Unique-ID")
        self.command(protocol.linger(10))
        self.command(protocol.myevents("plain"))
        self.execute("set", f"backend_name={self.name}")
        self.execute("answer")
        self.execute("playback", "ivr/ivr-welcome.wav")
        self.command(protocol.hangup("NORMAL_CLEARING"))
        self.wait_event(lambda e: e.name == "CHANNEL_HANGUP_COMPLETE")
        print(f"{self.name} {os.getpid()} {uuid} ok", flush=True)


def handle(sock, _address, name: str) -> None:
    try:
        Call(sock, name).run()
    except (EOFError, OSError) as exc:
        print(f"{name} {os.getpid()} call cut: {exc!r}", flush=True)
    finally:
        sock.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("address")
    parser.add_argument("--name", default="backend")
    args = parser.parse_args()
    if args.address.startswith("unix:"):
        path = args.address[len("unix:"):]
        if os.path.exists(path):
            os.unlink(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1024)
    else:
        host, _, port = args.address.rpartition(":")
        listener = socket.create_server((host, int(port)), backlog=1024)
    print(f"{args.name} {os.getpid()} listening", flush=True)
    StreamServer(listener, lambda sock, address: handle(sock, address, args.name)).serve_forever()


if __name__ == "__main__":
    sys.exit(main())
