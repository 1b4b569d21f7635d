"""The smallest complete IVR: answer, play a prompt, hang up, and see the call's last event.

Run it with ``esl-gateway run gateway.examples.ivr:handle`` and point a FreeSWITCH extension at it
with ``<action application="socket" data="127.0.0.1:9090 async full"/>``.
"""

import logging

log = logging.getLogger("esl_gateway.examples.ivr")

PROMPT = "ivr/ivr-welcome_to_freeswitch.wav"


def handle(session):
    # Subscribe first: execute() waits for CHANNEL_EXECUTE_COMPLETE, an event.
    session.myevents()
    # Keep the socket after hangup (finite time) so CHANNEL_HANGUP_COMPLETE reaches us.
    session.linger()
    session.answer()
    session.playback(PROMPT)
    session.hangup()
    # The last event of every call, with its billing variables; returning then closes the socket
    # so FreeSWITCH frees the channel without waiting out the linger time.
    final = session.wait_for("CHANNEL_HANGUP_COMPLETE", timeout=30)
    log.info("[%s] call from %s ended: %s, billed %ss", session.uuid,
             session.channel.get("Caller-Caller-ID-Number"), final.get("Hangup-Cause"),
             final.get("variable_billsec"))
