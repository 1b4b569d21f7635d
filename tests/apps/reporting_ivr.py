"""Test apps: the example IVR flow, plus a record of every handler run.

Each handler run appends two lines to the file named by $ESL_TEST_RECORD (O_APPEND, one small
write each, so lines from several worker processes never interleave): pid, uuid, ``started`` when it
begins, then how it ended and how long it ran. Tests compare these records with what the simulator saw. The handler also reports its
worker's pid to the simulator through a `set` application, so a failed call can be attributed to
the worker that served it.
"""

import os
import time

from gateway.simulator import WORKER_PID_VARIABLE

RECORD = os.environ.get("ESL_TEST_RECORD")


def record(session, status, started):
    if RECORD:
        line = f"{os.getpid()} {session.uuid} {status} {time.monotonic() - started:.4f}\n"
        fd = os.open(RECORD, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)


def subscribe_and_report(session):
    """Events on, and the simulator told which worker serves this call."""
    session.myevents()
    session.execute("set", f"{WORKER_PID_VARIABLE}={os.getpid()}")


def ivr(session):
    session.answer()
    session.playback("ivr/ivr-welcome.wav")
    session.hangup()
    session.wait_end(timeout=30)


def handle(session):
    started = time.monotonic()
    record(session, "started", started)
    try:
        subscribe_and_report(session)
        ivr(session)
    except BaseException as exc:   # SessionClosed/CallHungUp included: the caller hung up
        record(session, type(exc).__name__, started)
        raise
    record(session, "ok", started)


def handle_raising(session):
    """Fails every call after connect, to show one call's exception ends that call only."""
    session.myevents()
    raise RuntimeError(f"deliberate failure in call {session.uuid}")
