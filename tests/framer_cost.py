"""What parsing costs per call: the bound on any faster framer (run by tests/benchmark.py).

    .venv/bin/python -m tests.framer_cost     # prints one JSON line

Serves simulated `ivr` calls in this process (the session and the example app, as a worker runs
them) and records every chunk each session read from its socket. Then it feeds each call's
chunks, as they were read, to a fresh SessionParser, the session's framer: framing, the checks
on every header block, the plain events made. The least time of several passes over all the
calls is the figure.

If the framer cost nothing, a call would cost that much less CPU: a C framer, say, could win no
more. (Measured warm, in one process; in a worker serving calls one by one, caches are colder.)
"""

from __future__ import annotations

from gevent import monkey

monkey.patch_all()

import _socket   # noqa: E402
import json   # noqa: E402
import logging   # noqa: E402
import random   # noqa: E402
import socket   # noqa: E402
import time   # noqa: E402

import gevent   # noqa: E402

from gateway.examples import ivr   # noqa: E402
from gateway.protocol import SessionParser   # noqa: E402
from gateway.session import Session   # noqa: E402
from gateway.simulator import CallOptions, SimulatedCall   # noqa: E402

CALLS = 300
PASSES = 20


class RecordingSocket(_socket.socket):
    """A call's socket that keeps what was read from it."""

    def __init__(self, *args):
        super().__init__(*args)
        self.chunks: list[bytes] = []

    def recv(self, size: int) -> bytes:
        data = super().recv(size)
        if data:
            self.chunks.append(data)
        return data


def serve(listener, recorded: list) -> None:
    while True:
        conn, _ = listener.accept()
        sock = RecordingSocket(conn.family, conn.type, conn.proto, conn.detach())
        recorded.append(sock.chunks)
        gevent.spawn(serve_call, sock)


def serve_call(sock) -> None:
    session = Session(sock)
    try:
        session.start()
        session.linger()
        ivr.handle(session)
    finally:
        session.close("done")


def record_calls(count: int) -> list[list[bytes]]:
    """The chunks read by each of ``count`` sessions, one call after another."""
    listener = socket.create_server(("127.0.0.1", 0))
    recorded: list[list[bytes]] = []
    server = gevent.spawn(serve, listener, recorded)
    rng = random.Random(1)
    for _ in range(count):
        result = SimulatedCall(listener.getsockname(), CallOptions(), rng).run()
        if result.outcome != "completed":
            raise RuntimeError(f"a simulated call did not complete: {result}")
    server.kill()
    listener.close()
    return recorded


def parse_seconds(calls: list[list[bytes]]) -> float:
    start = time.perf_counter()
    for chunks in calls:
        parser = SessionParser()
        for chunk in chunks:
            parser.feed(chunk)
    return time.perf_counter() - start


def main() -> None:
    logging.disable(logging.INFO)   # the example app logs every call
    calls = record_calls(CALLS)
    best = min(parse_seconds(calls) for _ in range(PASSES))
    print(json.dumps({"framer_us_per_call": 1e6 * best / len(calls),
                      "reads_per_call": sum(map(len, calls)) / len(calls),
                      "bytes_per_call": sum(len(c) for chunks in calls for c in chunks)
                      / len(calls)}))


if __name__ == "__main__":
    main()
