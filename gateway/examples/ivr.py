"""The smallest complete IVR: answer, play a prompt, hang up, and see the call's last event.

Run it with ``esl-gateway run gateway.examples.ivr:handle`` and point a FreeSWITCH extension at it
with ``<action application="socket" data="127.0.0.1:9090 async full"/>``. It also finishes calls
correctly on ``async`` (single-channel) and static sockets, which see less of the hangup.
"""

import logging

from gateway.logsafe import loggable

log = logging.getLogger("esl_gateway.examples.ivr")

PROMPT = "ivr/ivr-welcome_to_freeswitch.wav"


def handle(session):
    # Subscribe first: execute() waits for CHANNEL_EXECUTE_COMPLETE, an event. (On `full`
    # sockets the worker has already sent a finite `linger`, so the final events reach us.)
    session.myevents()
    session.answer()
    session.playback(PROMPT)
    session.hangup()
    # The call's last event: CHANNEL_HANGUP_COMPLETE, with its billing variables, on async
    # sockets; None if FreeSWITCH disconnected first. Returning then closes the socket, so
    # FreeSWITCH frees the channel without waiting out the linger time.
    final = session.wait_end(timeout=30)
    # Each argument is a header search: a line the log level drops should not cost them.
    if log.isEnabledFor(logging.INFO):
        # The caller chose its caller ID: loggable() keeps a newline in it from forging a line.
        log.info("[%s] call from %s ended: %s", session.uuid,
                 loggable(session.channel.get("Caller-Caller-ID-Number")),
                 loggable(final.get("Hangup-Cause")) if final else "disconnected")
