"""What parsing costs per call: the bound on any faster framer (run by tests/benchmark.py).

    .venv/bin/python -m tests.framer_cost     # prints one JSON line

Serves simulated `ivr` calls in this process (the session and the example app, as a worker runs
them) and records every chunk each session read from its socket. Then it feeds each call's
chunks, as they were read, to a fresh SessionParser, the session's framer: framing, the checks
on every header block, the plain events made. The least time of several passes is the figure.

Measured twice: warm (the calls one after the other, the caches full of the framer), and with
the caches flushed before each read (16 MiB read in between, untimed). A worker serving calls
one by one at 150 calls/s, beside the generator and the other processes, reads on cold caches:
its framer measured 240-250 µs per call by the thread's CPU time, the flushed figure here 241,
the warm one 80. If the framer cost nothing, a call would cost about the flushed figure less.
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
COLD_CALLS, COLD_PASSES = 100, 3
FLUSH_BYTES = 16 << 20   # more than this machine's caches hold


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


def parse_seconds_cold(calls: list[list[bytes]]) -> float:
    """As parse_seconds, but the caches hold other data at each read; only the feeds timed."""
    flush = memoryview(bytearray(FLUSH_BYTES))
    total = 0.0
    for chunks in calls:
        parser = SessionParser()
        for chunk in chunks:
            bytes(flush)   # a copy: reads and writes the whole buffer
            start = time.perf_counter()
            parser.feed(chunk)
            total += time.perf_counter() - start
    return total


def main() -> None:
    logging.disable(logging.INFO)   # the example app logs every call
    calls = record_calls(CALLS)
    warm = min(parse_seconds(calls) for _ in range(PASSES)) / len(calls)
    cold = min(parse_seconds_cold(calls[:COLD_CALLS]) for _ in range(COLD_PASSES)) / COLD_CALLS
    print(json.dumps({"framer_us_per_call": 1e6 * warm, "framer_cold_us_per_call": 1e6 * cold,
                      "reads_per_call": sum(map(len, calls)) / len(calls),
                      "bytes_per_call": sum(len(c) for chunks in calls for c in chunks)
                      / len(calls)}))


if __name__ == "__main__":
    main()
