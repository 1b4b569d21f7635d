"""Notices a worker's event loop that stopped turning, and writes where it is stuck to stderr.

gevent's monitor thread does the same by tracing every greenlet switch; that trace cost about
0.17 ms of CPU per call on the example IVR (a tenth of a worker's CPU in tests/benchmark.py).
Here nothing runs per switch: a loop timer stamps the time twice per threshold, and a native
thread reads the stamp. A stale stamp means no greenlet has yielded to the loop since, so
whatever the main thread is running is what blocks it, and its stack says where.

A stamp is up to one period old when the loop stops, so a stall is taken as the stamp's age less
half a period: right within a quarter of the threshold either way. The thread sleeps until the
last stamp it read would show a stall of the threshold, so an idle worker wakes three times per
threshold (twice to stamp, once to look; four stamps and four looks a threshold took eight),
and what is reported stays as it was: every stall of 1.25 thresholds, at most 1.25 thresholds
after it began, and no stall shorter than 0.75 thresholds.
"""

from __future__ import annotations

import os
import sys
import time
import traceback

import gevent
from gevent import monkey

STAMPS_PER_THRESHOLD = 2
LOOKS_PER_THRESHOLD_WHILE_STALLED = 4   # how finely the length of a stall is followed


class LoopWatchdog:
    """Start once per worker, after monkey-patching, from the thread that runs the loop."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.period = threshold / STAMPS_PER_THRESHOLD   # of the loop's stamps
        self.longest_block = 0.0   # seconds: the longest stall seen that reached the threshold
        self._stamp = time.monotonic()
        self._reported = False   # the stall going on now, if any, was reported

    def start(self) -> None:
        self._tick()   # the app's import, however long, was before the watch
        self._timer = gevent.get_hub().loop.timer(self.period, self.period)
        self._timer.ref = False   # never what keeps a loop running
        self._timer.start(self._tick)
        # Native thread and sleep: patched ones would be greenlets of the very loop watched.
        self._loop_thread = monkey.get_original("_thread", "get_ident")()
        self._sleep = monkey.get_original("time", "sleep")
        monkey.get_original("_thread", "start_new_thread")(self._watch, ())

    def _tick(self) -> None:
        self._stamp = time.monotonic()

    def _watch(self) -> None:
        while True:
            self._sleep(self.look())

    def look(self) -> float:
        """Report a stall as it reaches the threshold (once, however long it lasts), and note
        its length; return how long to sleep until the next look."""
        stalled = time.monotonic() - self._stamp - self.period / 2   # see the module's doc
        if stalled < self.threshold:
            self._reported = False
            return self.threshold - stalled
        self.longest_block = max(self.longest_block, stalled)
        if not self._reported:
            self._reported = True
            self._report(stalled)
        return self.threshold / LOOKS_PER_THRESHOLD_WHILE_STALLED

    def _report(self, stalled: float) -> None:
        frame = sys._current_frames().get(self._loop_thread)
        stack = "".join(traceback.format_stack(frame)) if frame else "  (no stack)\n"
        # A raw write: logging's locks are gevent locks now, not usable from this thread.
        os.write(2, (f"worker pid {os.getpid()}: event loop blocked for {stalled:.1f}s (no "
                     f"greenlet yielded to it); the code running now:\n{stack}").encode())
