"""The example IVR in a worker whose session framer is timed, for tests/benchmark.py: how much of
a worker's CPU the framer takes, measured where it runs. (A worker serving calls one by one reads
on caches the other processes have used: on 2026-12-04 its framer took 240-250 µs per call
there, while the same bytes parsed again in a loop, warm, took 80.)

The worker imports this app after it forked, so only this worker's sessions get the timed
``SessionParser`` (the C framer where it was built, else the reference): each feed adds the CPU time the thread spent in it (CLOCK_THREAD_CPUTIME_ID, read on
each side) to the worker's total. At each call's end the total is written over
``$TIMED_FRAMER_DIR/<pid>``: seconds, as text, in a fixed width.
"""

import os
import time

from gateway import protocol
from gateway.examples import ivr

_spent = 0.0
_record = os.open(os.path.join(os.environ["TIMED_FRAMER_DIR"], str(os.getpid())),
                  os.O_WRONLY | os.O_CREAT, 0o644)


class TimedSessionParser(protocol.SessionParser):
    __slots__ = ()

    def feed(self, data):
        global _spent
        start = time.thread_time()
        try:
            return super().feed(data)
        finally:
            _spent += time.thread_time() - start


protocol.SessionParser = TimedSessionParser


def handle(session):
    try:
        ivr.handle(session)
    finally:
        os.pwrite(_record, b"%20.9f\n" % _spent, 0)

