"""Test apps that misbehave on purpose, to prove one call's failure stays that call's.

Most tell the simulator their worker's pid (a ``set`` variable), so the test can attribute every
failed call to the worker that served it; what a call drew shows in how it ended (a raising
call is hung up with the --on-handler-error cause).
"""

import os
import random
import sys
import time

from gevent import monkey

from reporting_ivr import ivr, subscribe_and_report


# The exit code of the deliberate os._exit: any code, 3 included, must be classified as a crash.
EXIT_CODE = int(os.environ.get("FAULTY_EXIT_CODE", "1"))
EXIT_RATE = float(os.environ.get("FAULTY_EXIT_RATE", "0.01"))
RAISE_RATE = float(os.environ.get("FAULTY_RAISE_RATE", "0.10"))


def handle(session):
    """1 % of calls kill their worker (os._exit), 10 % raise; the rest are ordinary IVR calls.
    (It reports no pid: at 500 calls/s on 2 cores the generator and the gateway share the CPU,
    and the gateway's own count of calls lost with a worker is exact.)"""
    draw = random.random()
    fate = "exit" if draw < EXIT_RATE else "raise" if draw < EXIT_RATE + RAISE_RATE else "ok"
    session.myevents()
    if fate == "exit":
        os._exit(EXIT_CODE)
    if fate == "raise":
        raise RuntimeError(f"deliberate failure in call {session.uuid}")
    ivr(session)


def handle_crash_always(session):
    """A true crash loop: every call kills its worker before any call can complete."""
    subscribe_and_report(session)
    os._exit(EXIT_CODE)


def handle_sys_exit(session):
    """Calls sys.exit(7) in the call that finds ./exit-once (the test creates it)."""
    subscribe_and_report(session)
    if os.path.exists("exit-once"):
        os.remove("exit-once")
        sys.exit(7)
    ivr(session)


def spin_without_yielding(seconds):
    """A handler bug that blocks the whole event loop: the real time.sleep, not gevent's."""
    monkey.get_original("time", "sleep")(seconds)


def handle_blocking(session):
    """Blocks the worker's loop when ./block-once exists (the test creates it): for as many
    seconds as the file says, 60 if it is empty."""
    subscribe_and_report(session)
    if os.path.exists("block-once"):
        with open("block-once") as file:
            seconds = float(file.read() or 60)
        os.remove("block-once")
        spin_without_yielding(seconds)
    ivr(session)


def handle_slow_io(session):
    """Waits on I/O (cooperatively) for 4 s: slow, but the worker's loop keeps ticking."""
    subscribe_and_report(session)
    started = time.monotonic()
    session.api("status")                        # one round trip, then a long cooperative wait
    while time.monotonic() - started < 4:
        session.next_event(timeout=0.5)
    ivr(session)


def handle_hog(session):
    """Allocates memory without bound in the call that finds ./hog-once: a leak the kernel's OOM
    killer ends (the test confines the worker to a small memory cgroup first)."""
    subscribe_and_report(session)
    if os.path.exists("hog-once"):
        os.remove("hog-once")
        hoard = []
        while True:
            hoard.append(bytearray(16 * 1024 * 1024))
    ivr(session)
