"""Test apps for calls that outlive their worker: long IVR calls, a resume hook, and handlers
that die in the middle of writing a command or of reading a frame."""

import os

from gevent.socket import wait_read

from reporting_ivr import ivr, subscribe_and_report


def handle(session):
    """An IVR whose prompt lasts as long as the simulator's playback (3 s in the tests)."""
    subscribe_and_report(session)
    ivr(session)


def resume(session):
    """A call taken over from a dead worker: whatever it was doing, end it cleanly."""
    assert session.resumed and session.channel.get("Unique-ID") == session.uuid
    session.hangup("NORMAL_CLEARING")
    session.wait_end(timeout=30)


def handle_dies_mid_command(session):
    """Writes the first half of a command, then its worker dies."""
    subscribe_and_report(session)
    session.answer()
    session._sock.send(b"sendmsg\ncall-command: execute\nexecute-app-na")
    os._exit(1)


def handle_dies_mid_frame(session):
    """Reads the first bytes of FreeSWITCH's next frame itself (as a reader cut short would),
    then its worker dies with the rest of the frame unread."""
    subscribe_and_report(session)
    session.answer()
    session._watcher.stop()   # nothing else may read now
    session._sock.send(b"api status\n\n")
    wait_read(session._sock.fileno(), 5)
    session._sock.recv(20)
    os._exit(1)


def handle_hangs_up_and_dies(session):
    """Hangs the call up, then its worker dies before it can read the hangup's events."""
    subscribe_and_report(session)
    session._sock.send(b"sendmsg\ncall-command: hangup\nhangup-cause: NORMAL_CLEARING\n\n")
    os._exit(1)
