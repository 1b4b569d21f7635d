"""Notices a worker's event loop that stopped turning, and writes where it is stuck to stderr.

gevent's monitor thread does the same by tracing every greenlet switch; that trace cost about
0.17 ms of CPU per call on the example IVR (a tenth of a worker's CPU in tests/benchmark.py).
Here nothing runs per switch: a loop timer stamps the time a few times per threshold, and a
native thread reads the stamp. A stale stamp means no greenlet has yielded to the loop since, so
whatever the main thread is running is what blocks it, and its stack says where.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import gevent
from gevent import monkey

CHECKS_PER_THRESHOLD = 4


class LoopWatchdog:
    """Start once per worker, after monkey-patching, from the thread that runs the loop."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.longest_block = 0.0   # seconds: the longest stall seen that reached the threshold
        self._stamp = time.monotonic()

    def start(self) -> None:
        period = self.threshold / CHECKS_PER_THRESHOLD
        self._timer = gevent.get_hub().loop.timer(period, period)
        self._timer.ref = False   # never what keeps a loop running
        self._timer.start(self._tick)
        # Native thread and sleep: patched ones would be greenlets of the very loop watched.
        self._loop_thread = monkey.get_original("_thread", "get_ident")()
        self._sleep = monkey.get_original("time", "sleep")
        monkey.get_original("_thread", "start_new_thread")(self._watch, ())

    def _tick(self) -> None:
        self._stamp = time.monotonic()

    def _watch(self) -> None:
        reported = False
        while True:
            self._sleep(self.threshold / CHECKS_PER_THRESHOLD)
            stalled = time.monotonic() - self._stamp
            if stalled < self.threshold:
                reported = False
                continue
            self.longest_block = max(self.longest_block, stalled)
            if not reported:   # one report per stall, however long it lasts
                reported = True
                self._report(stalled)

    def _report(self, stalled: float) -> None:
        frame = sys._current_frames().get(self._loop_thread)
        stack = "".join(traceback.format_stack(frame)) if frame else "  (no stack)\n"
        # A raw write: logging's locks are gevent locks now, not usable from this thread.
        os.write(2, (f"worker pid {os.getpid()}: event loop blocked for {stalled:.1f}s (no "
                     f"greenlet yielded to it); the code running now:\n{stack}").encode())
