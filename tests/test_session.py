"""Unit tests for gateway.session: one outbound call driven over a real socket pair.

The session gets one end of a gevent ``socketpair()``; the test drives the other end as a scripted
fake FreeSWITCH (tests/fakefs.py) that parses what the session writes with
``protocol.CommandParser`` and answers with the byte-exact frames of ``gateway.protocol``'s
FreeSWITCH-side serialisers. Nothing in the session is mocked and nothing is monkey-patched: the
handler's calls run in greenlets (``Background``) and the fake FreeSWITCH in the test body.
Every blocking step is bounded, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import re
import time

import gevent
import pytest

from gateway import protocol
from gateway.session import (CONNECT_SETTLE_SECONDS, ApiError, CallHungUp, CommandError,
                             CommandTimeout, ESLError, NotFullControl, Session, SessionClosed,
                             SessionSettings, WaitTimeout)
from tests.fakefs import CALL_UUID, Background, FakeFS, socketpair
from tests import gateway_process

# Poll finely: these waits are a few milliseconds, and some tests time them.
wait_until = functools.partial(gateway_process.wait_until, poll=0.002)
OTHER_UUID = "99999999-8888-4777-8666-555555555555"
PROMPT = 0.5        # "promptly": how long a woken waiter may take to notice
TEST_GUARD = 8.0    # no test may take longer than this in total


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def guard():
    """Fail (not hang) a test that blocks in the hub for too long."""
    timeout = gevent.Timeout(TEST_GUARD, AssertionError(f"test still running after {TEST_GUARD}s"))
    timeout.start()
    try:
        yield
    finally:
        timeout.close()


@pytest.fixture
def calls():
    """Factory: a Session on one end of a socket pair, a FakeFS on the other, optionally connected."""
    made = []

    def make(settings: SessionSettings | None = None, uuid: str = CALL_UUID, start: bool = True,
             **connect_kwargs):
        ours, theirs = socketpair()
        session = Session(ours, settings or SessionSettings())
        fs = FakeFS(theirs, uuid)
        made.append((session, fs, ours))
        if start:
            starter = Background(session.start)
            fs.answer_connect(**connect_kwargs)
            starter.result()
        return session, fs

    yield make
    for session, fs, ours in made:
        fs.close()              # EOF makes a started session release its socket
        deadline = time.monotonic() + 2
        while session._watcher is not None and time.monotonic() < deadline:
            gevent.sleep(0.002)
        ours.close()


@pytest.fixture
def call(calls):
    return calls()


def subscribe(session: Session, fs: FakeFS, fmt: str = "plain") -> None:
    """session.myevents(fmt), answered as FreeSWITCH does."""
    job = Background(session.myevents, fmt)
    command = fs.expect("myevents")
    assert command.line == ("myevents" if fmt == "plain" else f"myevents {fmt}")
    fs.reply("+OK Events Enabled")
    assert job.result() == "+OK Events Enabled"


def start_execute(session: Session, fs: FakeFS, app: str = "playback", arg: str | None = "a.wav",
                  **kwargs) -> tuple[Background, str]:
    """An execute(wait=True) that FreeSWITCH has queued; returns it and its Event-UUID."""
    job = Background(session.execute, app, arg, **kwargs)
    command = fs.expect("sendmsg")
    assert command.headers["call-command"] == "execute"
    assert command.headers["execute-app-name"] == app
    event_uuid = command.headers["Event-UUID"]
    fs.reply("+OK")
    gevent.sleep(0.01)
    assert not job.ready(), "execute(wait=True) returned before its completion event"
    return job, event_uuid


def start_bgapi(session: Session, fs: FakeFS, cmd: str = "status", first: bool = True):
    """A bgapi accepted by FreeSWITCH; returns (job, the Job-UUID the session sent)."""
    starter = Background(session.bgapi, cmd)
    if first:
        fs.expect("event")
        fs.reply(f"+OK event listener enabled {session._event_format or 'plain'}")
    command = fs.expect("bgapi")
    assert command.line == f"bgapi {cmd}"
    job_uuid = command.headers["Job-UUID"]
    fs.reply(f"+OK Job-UUID: {job_uuid}", Job_UUID=job_uuid)
    job = starter.result()
    assert job.uuid == job_uuid
    return job, job_uuid



def drain_events(session: Session, timeout: float = 1.0) -> list:
    """Every event next_event() gives until SessionClosed (asserted to come)."""
    events = []
    with gevent.Timeout(timeout, AssertionError("event stream did not end")):
        while True:
            try:
                events.append(session.next_event())
            except SessionClosed:
                return events


# --------------------------------------------------------------------------------------------
# 1. start()
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("socket_mode,control", [("async", "full"), ("static", "single-channel")])
def test_start_sends_connect_first_and_decodes_the_connect_reply(calls, socket_mode, control):
    """Trap: waiting for FreeSWITCH to speak first, or comparing the encoded %2BOK%0A to +OK."""
    session, fs = calls(start=False)
    starter = Background(session.start)
    assert fs.recv_raw() == b"connect\n\n"          # exactly this, first, and nothing else
    fs.expect_nothing(0.05)

    frame = protocol.connect_reply_frame(fs.channel_data(), socket_mode=socket_mode,
                                         control=control)
    assert b"Reply-Text: %2BOK%0A\n" in frame      # what FreeSWITCH really puts on the wire
    assert frame.index(b"Content-Type: command/reply") > 0   # not the first header
    fs.send(frame)
    starter.result()

    assert session.uuid == CALL_UUID
    assert session.socket_mode == socket_mode
    assert session.control == control
    channel = session.channel
    assert channel["Reply-Text"] == "+OK\n"
    assert channel["variable_sip_from_display"] == "Alice Smith"          # decoded
    assert channel["VARIABLE_SIP_FROM_DISPLAY"] == "Alice Smith"          # case-insensitive
    assert channel["unique-id"] == CALL_UUID
    assert channel["Caller-Caller-ID-Name"] == "Bob & Co: 100% <sip>"
    assert channel["Event-Date-Local"] == "2024-01-01 12:00:00"
    assert channel["variable_custom"] == "line1\nInjected: yes"           # %0A cannot forge
    assert "Injected" not in channel
    assert not session.closed
    fs.expect_nothing(0.05)                         # start() sends nothing after connect


def test_start_refused_connect_raises_and_closes(calls):
    """Trap: treating any reply to connect as success."""
    session, fs = calls(start=False)
    starter = Background(session.start)
    fs.expect("connect")
    fs.reply("-ERR go away")
    error = starter.exception()
    assert isinstance(error, CommandError)
    assert session.closed
    fs.expect_eof()


# --------------------------------------------------------------------------------------------
# 2. FIFO reply matching
# --------------------------------------------------------------------------------------------

def test_concurrent_api_calls_get_their_own_replies_in_fifo_order(call):
    """Trap: replies carry no correlation id; a non-FIFO match or interleaved events mix them up."""
    session, fs = call
    subscribe(session, fs)
    jobs = {i: Background(session.api, f"show calls {i}") for i in range(3)}
    # all three are on the wire before FreeSWITCH answers any of them
    commands = [fs.expect("api") for _ in range(3)]
    assert sorted(c.line for c in commands) == [f"api show calls {i}" for i in range(3)]
    seq = 0
    for command in commands:                     # answered strictly in the order received
        for _ in range(2):                       # events between a command and its reply
            seq += 1
            fs.event("CHANNEL_STATE", Event_Sequence=seq)
        fs.api_response(f"answer to {command.line}\n")
    for i, job in jobs.items():
        assert job.result() == f"answer to api show calls {i}\n"
    events = [session.next_event(timeout=1) for _ in range(seq)]
    assert [e["Event-Sequence"] for e in events] == [str(n) for n in range(1, seq + 1)]
    assert session.next_event(timeout=0.05) is None
    assert not session.closed


def test_mixed_command_reply_and_api_response_share_one_fifo(call):
    """Trap: keeping separate queues for command/reply and api/response."""
    session, fs = call
    api = Background(session.api, "uptime")
    fs.expect("api")
    getvar = Background(session.getvar, "foo")
    fs.expect("getvar")
    fs.api_response("42\n")
    fs.event("CHANNEL_PARK")
    fs.reply("bar")
    assert api.result() == "42\n"
    assert getvar.result() == "bar"


# --------------------------------------------------------------------------------------------
# 3. execute
# --------------------------------------------------------------------------------------------

def test_execute_waits_for_the_completion_with_its_own_application_uuid(call):
    """Trap: matching CHANNEL_EXECUTE_COMPLETE by app name instead of Event-UUID/Application-UUID."""
    session, fs = call
    subscribe(session, fs)
    job, event_uuid = start_execute(session, fs, "playback", "/tmp/a.wav")
    fs.event("CHANNEL_EXECUTE_COMPLETE", Application="playback",
             Application_UUID=OTHER_UUID, Application_Response="FILE PLAYED")
    fs.event("CHANNEL_EXECUTE_COMPLETE", Application="playback")    # no Application-UUID at all
    gevent.sleep(0.05)
    assert not job.ready(), "woken by another playback's completion"
    fs.event("CHANNEL_EXECUTE_COMPLETE", Application="playback", Application_UUID=event_uuid,
             Application_Response="FILE PLAYED")
    completion = job.result()
    assert completion.name == "CHANNEL_EXECUTE_COMPLETE"
    assert completion["Application-UUID"] == event_uuid
    assert completion["Application-Response"] == "FILE PLAYED"


def test_a_completion_is_already_queued_when_its_execute_returns(call):
    """Guards the direct wake-up of a waiting execute: the event that woke it is in the event
    queue by then, as it would be for any handler reading events after the execute."""
    session, fs = call
    subscribe(session, fs)

    def execute_then_read():
        completion = session.execute("playback", "a.wav")
        return completion, session.next_event(timeout=0)

    job = Background(execute_then_read)
    event_uuid = fs.expect("sendmsg").headers["Event-UUID"]
    fs.reply("+OK")
    fs.event("CHANNEL_EXECUTE_COMPLETE", Application="playback", Application_UUID=event_uuid)
    completion, queued = job.result()
    assert queued is completion


def test_execute_sends_the_arg_header_and_a_fresh_event_uuid(call):
    """Trap: reusing an Event-UUID makes two queued apps' completions ambiguous."""
    session, fs = call
    subscribe(session, fs)
    first, uuid1 = start_execute(session, fs, "playback", "x.wav")
    second, uuid2 = start_execute(session, fs, "playback", "x.wav")
    assert uuid1 != uuid2
    fs.event("CHANNEL_EXECUTE_COMPLETE", Application="playback", Application_UUID=uuid2)
    assert second.result()["Application-UUID"] == uuid2
    assert not first.ready()
    fs.event("CHANNEL_EXECUTE_COMPLETE", Application="playback", Application_UUID=uuid1)
    assert first.result()["Application-UUID"] == uuid1


def test_execute_wait_without_myevents_raises_at_once(call):
    """Trap: waiting for a completion event that can never arrive because nothing is subscribed."""
    session, fs = call
    started = time.monotonic()
    with pytest.raises(ESLError) as info:
        session.execute("answer")
    assert time.monotonic() - started < 0.05
    assert "myevents" in str(info.value)
    fs.expect_nothing(0.05)                       # nothing was sent
    assert not session.closed


def test_execute_multiline_arg_goes_in_a_text_plain_body(call):
    """Trap: a newline in execute-app-arg ends the header block and injects a command."""
    session, fs = call
    arg = "line one\nline two\nexecute-app-name: hangup"
    job = Background(session.execute, "set_multiline", arg, wait=False)
    command = fs.expect("sendmsg")
    assert command.headers["Content-Type"] == "text/plain"
    assert command.body == arg.encode()
    assert "execute-app-arg" not in command.headers
    assert command.headers["execute-app-name"] == "set_multiline"
    fs.reply("+OK")
    assert job.result() == command.headers["Event-UUID"]
    fs.expect_nothing(0.05)


def test_execute_refused_raises_command_error_and_forgets_the_waiter(call):
    """Trap: leaving a waiter registered for an app FreeSWITCH refused to queue."""
    session, fs = call
    subscribe(session, fs)
    job = Background(session.execute, "playback", "a.wav")
    fs.expect("sendmsg")
    fs.reply("-ERR invalid session id [x]")
    error = job.exception()
    assert isinstance(error, CommandError)
    assert "invalid session id" in str(error)
    assert session._executes == {}
    assert not session.closed


# --------------------------------------------------------------------------------------------
# 4. hangup wakes waiters
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("trigger", ["CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE", "linger"])
def test_hangup_wakes_a_blocked_execute(call, trigger):
    """Trap: FreeSWITCH runs no queued app after hangup, so waiting for its completion hangs."""
    session, fs = call
    subscribe(session, fs)
    job, _ = start_execute(session, fs)
    sent = time.monotonic()
    if trigger == "linger":
        fs.linger_notice()
    else:
        fs.event(trigger, Hangup_Cause="NORMAL_CLEARING")
    error = job.exception(timeout=PROMPT)
    assert isinstance(error, CallHungUp)
    assert job.finished_at - sent < PROMPT
    assert session.hungup
    if trigger != "linger":
        assert session.hangup_cause == "NORMAL_CLEARING"
    # lingering: the connection stays up and the final events still flow
    assert not session.closed
    fs.event("CHANNEL_STATE", Channel_State="CS_REPORTING")
    names = [session.next_event(timeout=1).name for _ in range(2 if trigger != "linger" else 1)]
    assert names[-1] == "CHANNEL_STATE"


def test_hangup_of_another_channel_does_not_wake_the_execute(call):
    """Trap: treating any CHANNEL_HANGUP on the socket (a B-leg, full control) as ours."""
    session, fs = call
    subscribe(session, fs)
    job, event_uuid = start_execute(session, fs)
    fs.event("CHANNEL_HANGUP", Unique_ID=OTHER_UUID, Hangup_Cause="USER_BUSY")
    fs.event("CHANNEL_HANGUP_COMPLETE", Unique_ID=OTHER_UUID, Hangup_Cause="USER_BUSY")
    gevent.sleep(0.05)
    assert not job.ready()
    assert not session.hungup
    assert session.hangup_cause is None
    fs.event("CHANNEL_EXECUTE_COMPLETE", Application="playback", Application_UUID=event_uuid)
    assert job.result()["Application-UUID"] == event_uuid


def test_after_hangup_execute_fails_at_once_and_hangup_is_a_no_op(call):
    """Trap: queueing apps on (or hanging up) a dead channel and waiting for replies for ever."""
    session, fs = call
    subscribe(session, fs)
    fs.event("CHANNEL_HANGUP", Hangup_Cause="ORIGINATOR_CANCEL")
    wait_until(lambda: session.hungup, 1, "hungup")
    assert session.hangup_cause == "ORIGINATOR_CANCEL"
    started = time.monotonic()
    with pytest.raises(CallHungUp):
        session.execute("playback", "a.wav")
    with pytest.raises(CallHungUp):
        session.execute("playback", "a.wav", wait=False)
    assert session.hangup() is None
    assert time.monotonic() - started < 0.05
    fs.expect_nothing(0.1)                        # none of the above reached the wire
    assert not session.closed


def test_hangup_sends_sendmsg_hangup_while_the_call_is_up(call):
    """Trap: hangup() sending nothing (or the wrong call-command) on a live call."""
    session, fs = call
    job = Background(session.hangup, "USER_BUSY")
    command = fs.expect("sendmsg")
    assert command.headers["call-command"] == "hangup"
    assert command.headers["hangup-cause"] == "USER_BUSY"
    fs.reply("+OK")
    assert job.result() is None


# --------------------------------------------------------------------------------------------
# 5. disconnect / EOF wake everything
# --------------------------------------------------------------------------------------------

MID_FRAME = b"Content-Length: 200\nContent-Type: text/event-plain\n\nEvent-Name: CHANNEL_STA"


@pytest.mark.parametrize("how", ["disconnect_notice", "eof", "eof_mid_frame", "eof_mid_header"])
def test_disconnect_or_eof_wakes_every_waiter_at_once(call, how):
    """Trap: a waiter left blocked for ever because only some of them are woken on close."""
    session, fs = call
    subscribe(session, fs)
    job, _ = start_bgapi(session, fs, "originate foo")
    execute, _ = start_execute(session, fs)
    api = Background(session.api, "status")
    fs.expect("api")
    waiters = {
        "api": api,
        "execute": execute,
        "bgapi": Background(job.get),
        "next_event": Background(session.next_event),
        "wait_for": Background(session.wait_for, "CHANNEL_HANGUP_COMPLETE"),
    }
    gevent.sleep(0.02)
    assert not any(w.ready() for w in waiters.values())

    sent = time.monotonic()
    if how == "disconnect_notice":
        fs.disconnect()
    elif how == "eof":
        fs.close()
    elif how == "eof_mid_frame":
        fs.send(MID_FRAME)
        gevent.sleep(0.01)                        # the partial frame is read before the EOF
        fs.close()
    else:
        fs.send(b"Content-Type: api/resp")
        gevent.sleep(0.01)
        fs.close()

    for name, waiter in waiters.items():
        error = waiter.exception(timeout=PROMPT)
        assert isinstance(error, SessionClosed), f"{name} raised {error!r}"
        assert waiter.finished_at - sent < PROMPT, name
        assert error.uuid == CALL_UUID
    assert session.closed
    reason = session.close_reason
    if how == "disconnect_notice":
        assert "disconnect notice" in reason
        fs.expect_eof()                           # we answer with our FIN
    else:
        assert "closed the connection" in reason
        assert ("middle of a frame" in reason) == (how != "eof")
    assert session.counters.protocol_errors == 0
    with pytest.raises(SessionClosed):
        session.api("status")


@pytest.mark.parametrize("how", ["disconnect_notice", "eof", "eof_mid_frame"])
def test_events_received_before_the_close_are_delivered_first(call, how):
    """Trap: dropping queued events (e.g. CHANNEL_HANGUP_COMPLETE) when the connection ends."""
    session, fs = call
    subscribe(session, fs)
    for seq in range(5):
        fs.event("CHANNEL_STATE", Event_Sequence=seq)
    fs.event("CHANNEL_HANGUP_COMPLETE", Hangup_Cause="NORMAL_CLEARING")
    if how == "disconnect_notice":
        fs.disconnect()
    else:
        if how == "eof_mid_frame":
            fs.send(MID_FRAME)
        fs.close()
    wait_until(lambda: session.closed, 1, "closed")
    events = drain_events(session)
    assert [e.name for e in events] == ["CHANNEL_STATE"] * 5 + ["CHANNEL_HANGUP_COMPLETE"]
    assert [e["Event-Sequence"] for e in events[:5]] == [str(n) for n in range(5)]
    for _ in range(3):                            # every later call is told too, at once
        with pytest.raises(SessionClosed):
            session.next_event(timeout=0.1)


def epoll_registrations() -> dict[int, str]:
    """This process's epoll set as /proc shows it: each watched descriptor and libev's data word
    for it (libev bumps the word's high half, a generation, each time it re-adds the
    descriptor, so an unchanged word means the registration was left alone)."""
    registrations = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[eventpoll]":
                continue
            info = open(f"/proc/self/fdinfo/{fd}").read()
        except OSError:
            continue   # the listing's own descriptor, closed by now
        for target, data in re.findall(r"tfd:\s*(\d+)\s+events:\s*\w+\s+data:\s*(\w+)", info):
            registrations[int(target)] = data
    return registrations


def test_a_call_ending_while_the_master_holds_its_socket_leaves_the_epoll_set_alone(calls):
    """Trap: closing the socket at once while another process (the master, for call survival)
    holds a copy. epoll then goes on reporting a descriptor libev cannot remove any more
    (EBADF), and libev rebuilds its whole epoll set, one system call per open call, at every
    call's end."""
    bystander, _ = calls()   # another call, up all along: its registration must not change
    session, fs = calls()
    master_copy = os.dup(session._sock.fileno())
    try:
        before = epoll_registrations()[bystander._sock.fileno()]
        fs.close()
        wait_until(lambda: session._sock.fileno() == -1, what="the session closes its socket")
        for _ in range(3):   # a rebuild would follow within a turn or two of the loop
            gevent.sleep(0.005)
        assert epoll_registrations()[bystander._sock.fileno()] == before
    finally:
        os.close(master_copy)


def test_iterating_the_session_ends_cleanly_at_eof(call):
    """Trap: `for ev in session` raising (or blocking for ever) when the call ends."""
    session, fs = call
    subscribe(session, fs)
    names = ["CHANNEL_ANSWER", "CHANNEL_HANGUP", "CHANNEL_HANGUP_COMPLETE"]
    for name in names:
        fs.event(name)
    fs.linger_notice()
    fs.disconnect()
    fs.close()
    with gevent.Timeout(1, AssertionError("iteration did not end")):
        seen = [event.name for event in session]
    assert seen == names
    with gevent.Timeout(1, AssertionError("second iteration did not end")):
        assert list(session) == []


def test_wait_for_consumes_until_the_named_event(call):
    """Trap: wait_for returning a different event, or not timing out as WaitTimeout."""
    session, fs = call
    subscribe(session, fs)
    fs.event("CHANNEL_STATE")
    fs.event("CHANNEL_HANGUP_COMPLETE", Hangup_Cause="NORMAL_CLEARING")
    fs.event("CHANNEL_STATE", Event_Sequence="after")
    assert session.wait_for("CHANNEL_HANGUP_COMPLETE", timeout=1)["Hangup-Cause"] == \
        "NORMAL_CLEARING"
    assert session.next_event(timeout=1)["Event-Sequence"] == "after"
    with pytest.raises(WaitTimeout):
        session.wait_for("CHANNEL_ANSWER", timeout=0.05)
    assert not session.closed


# --------------------------------------------------------------------------------------------
# 6. command timeout
# --------------------------------------------------------------------------------------------

def test_command_timeout_closes_the_call_so_no_stale_reply_is_read(calls):
    """Trap: after a timed-out command, the next command reads the previous command's reply."""
    session, fs = calls(SessionSettings(command_timeout=0.2))
    started = time.monotonic()
    with pytest.raises(CommandTimeout) as info:
        session.api("slow thing")
    elapsed = time.monotonic() - started
    assert 0.19 <= elapsed < 0.2 + PROMPT
    assert "api slow thing" in str(info.value)
    assert fs.expect("api").line == "api slow thing"
    assert session.closed
    assert "api slow thing" in session.close_reason
    fs.api_response("the stale reply\n")          # FreeSWITCH answers late
    gevent.sleep(0.02)
    with pytest.raises(SessionClosed):
        session.api("next thing")
    with pytest.raises(SessionClosed):
        session.getvar("x")
    fs.expect_eof()                               # the later commands never reached the wire


def test_a_late_reply_after_a_command_timeout_is_not_a_protocol_error(calls):
    """Trap: counting (and logging as FreeSWITCH's fault) a reply that we stopped waiting for."""
    session, fs = calls(SessionSettings(command_timeout=0.1))
    with pytest.raises(CommandTimeout):
        session.api("slow thing")
    fs.expect("api")
    fs.api_response("the late reply\n")
    gevent.sleep(0.05)
    assert session.counters.protocol_errors == 0
    assert "protocol error" not in session.close_reason


def test_per_call_timeout_overrides_the_setting(calls):
    """Trap: api(timeout=...) being ignored, leaving a call blocked for the 30 s default."""
    session, fs = calls(SessionSettings(command_timeout=30))
    job = Background(session.api, "slow", timeout=0.1)
    fs.expect("api")
    assert isinstance(job.exception(timeout=1), CommandTimeout)
    assert session.closed


# --------------------------------------------------------------------------------------------
# 7. event order and formats
# --------------------------------------------------------------------------------------------

EVENT_NAMES = ["CHANNEL_STATE", "CHANNEL_CALLSTATE", "DTMF", "CHANNEL_EXECUTE",
               "CHANNEL_EXECUTE_COMPLETE", "CUSTOM", "HEARTBEAT"]


@pytest.mark.parametrize("fmt", protocol.EVENT_FORMATS)
def test_a_burst_of_events_keeps_its_order_whatever_the_chunking(call, fmt):
    """Trap: dispatching events on separate greenlets (or per chunk) reorders them."""
    session, fs = call
    subscribe(session, fs, fmt)
    rng = random.Random(f"burst-{fmt}")
    stream = b"".join(fs.event_bytes(EVENT_NAMES[i % len(EVENT_NAMES)], fmt=fmt,
                                     Event_Sequence=i, DTMF_Digit=str(i % 10))
                      for i in range(200))
    cuts = sorted(rng.sample(range(1, len(stream)), 150))
    for start, stop in zip([0, *cuts], [*cuts, len(stream)]):
        fs.send(stream[start:stop])
        if rng.random() < 0.2:
            gevent.sleep(0)
    events = [session.next_event(timeout=1) for _ in range(200)]
    assert None not in events
    assert [e["Event-Sequence"] for e in events] == [str(i) for i in range(200)]
    assert [e.name for e in events] == [EVENT_NAMES[i % len(EVENT_NAMES)] for i in range(200)]
    assert session.next_event(timeout=0.05) is None
    assert session.counters.events >= 200
    assert not session.closed


TRICKY_HEADERS = {
    "Caller_Caller_ID_Name": "Mallory & Sons: <100%> \"q\"",
    "variable_greeting": "h\u00e9llo w\u00f6rld \u2603",
    "variable_multi": "one\ntwo\nUnique-ID: forged",
    "Channel_Name": "sofia/internal/+1555@example.com;transport=tcp",
    "Event_Date_Local": "2024-01-01 12:00:00",
}


def test_plain_json_and_xml_events_decode_to_the_same_headers(call):
    """Trap: forgetting to url-decode plain/xml values (or decoding json), or header injection."""
    session, fs = call
    subscribe(session, fs)
    body = b"+OK done <ok> & more\nsecond line"
    for fmt in protocol.EVENT_FORMATS:
        fs.event("CUSTOM", body=body, fmt=fmt, Event_Subclass="test::thing",
                 Unique_ID=CALL_UUID, **TRICKY_HEADERS)
    events = [session.next_event(timeout=1) for _ in protocol.EVENT_FORMATS]
    for fmt, event in zip(protocol.EVENT_FORMATS, events):
        assert event is not None, fmt
        assert event.name == "CUSTOM", fmt
        assert event.subclass == "test::thing", fmt
        assert event.unique_id == CALL_UUID, fmt
        for name, value in TRICKY_HEADERS.items():
            assert event[name.replace("_", "-")] == value, (fmt, name)
            assert event[name.replace("_", "-").upper()] == value, (fmt, name)
        assert event.body == body, fmt


# --------------------------------------------------------------------------------------------
# 8. queue overflow
# --------------------------------------------------------------------------------------------

def test_event_queue_overflow_closes_only_this_call(calls, caplog):
    """Trap: a handler that stops reading makes the reader block (or grow memory) instead of closing."""
    session, fs = calls(SessionSettings(max_queued_events=10))
    subscribe(session, fs)
    for seq in range(10):
        fs.event("CHANNEL_STATE", Event_Sequence=seq)
    gevent.sleep(0.05)
    assert not session.closed                     # exactly the limit is still fine
    fs.event("CHANNEL_STATE", Event_Sequence=10)
    wait_until(lambda: session.closed, 1, "closed on overflow")
    assert "overflow" in session.close_reason
    fs.expect_eof()
    fs.close()
    wait_until(lambda: session._sock.fileno() == -1, 1, "socket released after FreeSWITCH's close")
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]   # nothing raised
    assert session.counters.protocol_errors == 0
    events = drain_events(session)
    assert [e["Event-Sequence"] for e in events] == [str(n) for n in range(10)]


# --------------------------------------------------------------------------------------------
# 9. protocol errors from the peer
# --------------------------------------------------------------------------------------------

def test_oversized_frame_is_a_protocol_error_for_this_call(calls):
    """Trap: buffering an unbounded Content-Length (or crashing the worker) on a hostile peer."""
    session, fs = calls(SessionSettings(max_frame_size=1000))
    subscribe(session, fs)
    api = Background(session.api, "status")
    fs.expect("api")
    events = Background(session.next_event)
    fs.send(b"Content-Type: api/response\nContent-Length: 5000\n\n" + b"x" * 100)
    for waiter in (api, events):
        assert isinstance(waiter.exception(timeout=PROMPT), SessionClosed)
    assert session.closed
    assert "protocol error" in session.close_reason
    assert session.counters.protocol_errors == 1
    fs.expect_eof()


# --------------------------------------------------------------------------------------------
# 10. bgapi
# --------------------------------------------------------------------------------------------

def test_bgapi_subscribes_once_and_resolves_by_job_uuid(call):
    """Trap: never subscribing to BACKGROUND_JOB, resubscribing each time, or matching the wrong
    job (an ARRAY:: Job-UUID holding ours included)."""
    session, fs = call
    starter = Background(session.bgapi, "status")
    assert fs.expect("event").line == "event plain BACKGROUND_JOB"
    fs.reply("+OK event listener enabled plain")
    command = fs.expect("bgapi")
    assert command.line == "bgapi status"
    job_uuid = command.headers["Job-UUID"]
    fs.reply(f"+OK Job-UUID: {job_uuid}", Job_UUID=job_uuid)
    job = starter.result()
    assert job.uuid == job_uuid and not job.ready()

    second, second_uuid = start_bgapi(session, fs, "version", first=False)   # no re-subscribe
    assert second_uuid != job_uuid

    waiter = Background(job.get, 1)
    # A hostile Job-UUID, an array that holds ours (a list on lookup): it matches no job.
    fs.event("BACKGROUND_JOB", body=b"-ERR an array\n", Job_UUID=f"ARRAY::{job_uuid}|:x")
    fs.event("BACKGROUND_JOB", body=b"-ERR not this one\n", Job_UUID=OTHER_UUID,
             Job_Command="status")
    fs.event("BACKGROUND_JOB", body=b"UP 0 years, 0 days\n", Job_UUID=job_uuid,
             Job_Owner_UUID=CALL_UUID, Job_Command="status")
    assert waiter.result() == "UP 0 years, 0 days\n"
    assert not second.ready()
    fs.event("BACKGROUND_JOB", body=b"FreeSWITCH Version 1.11.2\n", Job_UUID=second_uuid)
    assert second.get(1) == "FreeSWITCH Version 1.11.2\n"


def test_bgapi_follows_the_current_event_format(call):
    """Trap: `event plain ...` silently switches a json socket's every event back to plain."""
    session, fs = call
    subscribe(session, fs, "json")
    starter = Background(session.bgapi, "status")
    assert fs.expect("event").line == "event json BACKGROUND_JOB"
    fs.reply("+OK event listener enabled json")
    command = fs.expect("bgapi")
    fs.reply("+OK Job-UUID: x", Job_UUID=command.headers["Job-UUID"])
    job = starter.result()
    fs.event("BACKGROUND_JOB", body=b"+OK json\n", fmt="json", Job_UUID=job.uuid)
    assert job.get(1) == "+OK json\n"


def test_bgapi_err_output_raises_api_error(call):
    """Trap: returning a failed background job's -ERR text as if it were output."""
    session, fs = call
    job, job_uuid = start_bgapi(session, fs, "originate nowhere")
    fs.event("BACKGROUND_JOB", body=b"-ERR NO_ROUTE_DESTINATION\n", Job_UUID=job_uuid)
    with pytest.raises(ApiError) as info:
        job.get(1)
    assert "NO_ROUTE_DESTINATION" in str(info.value)
    assert "bgapi originate nowhere" in str(info.value)


# --------------------------------------------------------------------------------------------
# 11. getvar and api errors
# --------------------------------------------------------------------------------------------

def test_getvar_unset_is_none_and_values_are_raw(call):
    """Trap: treating getvar's -ERR command not found as an error (it means unset or empty)."""
    session, fs = call
    unset = Background(session.getvar, "nothing")
    assert fs.expect("getvar").line == "getvar nothing"
    fs.reply("-ERR command not found")
    assert unset.result() is None
    value = Background(session.getvar, "sip_from_display")
    assert fs.expect("getvar").line == "getvar sip_from_display"
    fs.reply("Alice%20Smith +OK")                  # getvar values are raw, never decoded
    assert value.result() == "Alice%20Smith +OK"
    assert not session.closed


def test_api_err_raises_api_error_naming_call_command_and_reply(call):
    """Trap: an opaque error without the call, the command and FreeSWITCH's own words."""
    session, fs = call
    job = Background(session.api, "uuid_foo bar")
    fs.expect("api")
    fs.api_response("-ERR uuid_foo Command not found!\n")
    error = job.exception()
    assert isinstance(error, ApiError) and isinstance(error, CommandError)
    text = str(error)
    assert CALL_UUID in text
    assert "api uuid_foo bar" in text
    assert "-ERR uuid_foo Command not found!" in text
    assert error.uuid == CALL_UUID and error.command == "api uuid_foo bar"
    assert not session.closed


# --------------------------------------------------------------------------------------------
# 12. closing
# --------------------------------------------------------------------------------------------

def test_close_on_a_live_call_waits_the_settle_time_then_half_closes(calls):
    """Trap: closing within ~1 ms of the connect reply leaves the call parked in FreeSWITCH."""
    session, fs = calls()
    closer = Background(session.close)
    eof_at = fs.expect_eof(timeout=CONNECT_SETTLE_SECONDS + 0.5)
    waited = eof_at - fs.sent_connect_reply_at
    assert waited >= CONNECT_SETTLE_SECONDS, f"FIN only {waited * 1000:.1f} ms after connect reply"
    assert waited < CONNECT_SETTLE_SECONDS + 0.5
    closer.result()
    assert session.closed


def test_close_after_hangup_does_not_wait(calls):
    """Trap: delaying the teardown of a call that is already down."""
    session, fs = calls()
    fs.event("CHANNEL_HANGUP", Hangup_Cause="NORMAL_CLEARING")
    wait_until(lambda: session.hungup, 1, "hungup")
    since_connect = time.monotonic() - fs.sent_connect_reply_at
    assert since_connect < CONNECT_SETTLE_SECONDS / 2, "too slow to tell the difference"
    started = time.monotonic()
    session.close()
    assert time.monotonic() - started < CONNECT_SETTLE_SECONDS / 4
    fs.expect_eof(timeout=0.5)


def test_close_half_closes_and_releases_the_socket_only_after_freeswitch_closes(call):
    """Trap: closing with FreeSWITCH's last bytes unread answers them with a reset."""
    session, fs = call
    ours = session._sock
    session.close("handler is done")
    fs.expect_eof(timeout=0.5)
    assert session.closed and session.close_reason == "handler is done"
    # FreeSWITCH, not yet aware, still writes the final events; they must be read, not reset
    for seq in range(20):
        fs.event("CHANNEL_STATE", body=b"x" * 1000, Event_Sequence=seq)
    gevent.sleep(0.05)
    assert ours.fileno() != -1, "socket closed before FreeSWITCH closed its side"
    try:
        assert fs.sock.recv(100) == b""           # EOF again, never ConnectionResetError
    except ConnectionResetError:                  # pragma: no cover - the failure being guarded
        pytest.fail("FreeSWITCH's side saw a reset")
    fs.close()
    wait_until(lambda: ours.fileno() == -1, 1, "session socket closed after FreeSWITCH's close")
    assert session.close_reason == "handler is done"


def test_close_is_idempotent(call):
    """Trap: a second close() sleeping again, re-running teardown or changing the reason."""
    session, fs = call
    session.close("first")
    started = time.monotonic()
    session.close("second")
    assert time.monotonic() - started < 0.01
    assert session.close_reason == "first"
    fs.expect_eof(timeout=0.5)
    assert session.wait_closed(0) is True
    with pytest.raises(SessionClosed):
        session.api("status")
    assert session.hangup() is None                # hangup on a closed session: a no-op


def test_no_event_is_delivered_after_session_closed(call):
    """Trap: frames read after teardown are queued behind the end-of-stream marker."""
    session, fs = call
    subscribe(session, fs)
    fs.event("CHANNEL_STATE", Event_Sequence="before")
    wait_until(lambda: len(session._events) == 1, 1, "first event queued")
    session.close()
    fs.expect_eof(timeout=0.5)
    fs.event("CHANNEL_STATE", Event_Sequence="after")   # already in flight when we closed
    gevent.sleep(0.05)
    assert session.next_event(timeout=0.1)["Event-Sequence"] == "before"
    for _ in range(2):
        with pytest.raises(SessionClosed):
            result = session.next_event(timeout=0.1)
            pytest.fail(f"next_event returned {result!r} after SessionClosed")


# --------------------------------------------------------------------------------------------
# 13. unexpected replies
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("frame", [protocol.reply_frame("+OK"),
                                   protocol.api_response_frame(b"+OK surprise\n")],
                         ids=["command_reply", "api_response"])
def test_a_reply_with_no_command_pending_is_a_protocol_error(call, frame):
    """Trap: silently accepting an unsolicited reply shifts every later reply by one."""
    session, fs = call
    subscribe(session, fs)
    events = Background(session.next_event)
    fs.send(frame)
    assert isinstance(events.exception(timeout=PROMPT), SessionClosed)
    assert session.closed
    assert "protocol error" in session.close_reason
    assert session.counters.protocol_errors == 1
    fs.expect_eof()
    with pytest.raises(SessionClosed):
        session.api("status")


# --------------------------------------------------------------------------------------------
# socket modes (issue: protocol fidelity)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("method, args", [
    ("linger", ()), ("nolinger", ()), ("api", ("status",)), ("bgapi", ("status",)),
    ("events", ("ALL",)), ("nixevent", ("CHANNEL_ANSWER",)), ("noevents", ()), ("log", (6,)),
    ("nolog", ()),
])
def test_full_only_commands_fail_at_once_without_full(calls, method, args):
    """Trap 4: without `full` FreeSWITCH answers -ERR command not found; we fail at once, naming
    the missing keyword, and send nothing (so nothing waits)."""
    session, fs = calls(control="single-channel")
    assert not session.full
    with pytest.raises(NotFullControl, match="full") as caught:
        getattr(session, method)(*args)
    assert isinstance(caught.value, CommandError) and CALL_UUID in str(caught.value)
    fs.expect_nothing()


def test_single_channel_still_runs_myevents_sendmsg_getvar(calls):
    """Single-channel sockets keep what FreeSWITCH allows: myevents, sendmsg, getvar."""
    session, fs = calls(control="single-channel")
    job = Background(session.myevents)
    fs.expect("myevents")
    fs.reply("+OK Events Enabled")
    job.result()
    job = Background(session.getvar, "x")
    fs.expect("getvar")
    fs.reply("y")
    assert job.result() == "y"


def test_static_execute_reply_waits_for_the_app_not_the_command_timeout(calls):
    """Static sockets answer sendmsg only after the app ran (playback: its whole length), so the
    reply wait is the execute's, and the completion after it is still matched by UUID."""
    session, fs = calls(SessionSettings(command_timeout=0.1), socket_mode="static")
    job = Background(session.myevents)
    fs.expect("myevents")
    fs.reply("+OK Events Enabled")
    job.result()
    job = Background(session.playback, "long.wav", timeout=3)
    command = fs.expect("sendmsg")
    event_uuid = command.headers["Event-UUID"]
    gevent.sleep(0.3)                        # the playback runs inline, longer than 0.1 s
    fs.reply("+OK")
    fs.event("CHANNEL_EXECUTE", **{"Application-UUID": event_uuid})
    fs.event("CHANNEL_EXECUTE_COMPLETE", **{"Application-UUID": event_uuid,
                                            "Application-Response": "FILE PLAYED"})
    assert job.result()["Application-Response"] == "FILE PLAYED"
    assert not session.closed


@pytest.mark.parametrize("socket_mode, final", [("async", "CHANNEL_HANGUP_COMPLETE"),
                                                ("static", "CHANNEL_HANGUP")])
def test_wait_end_returns_the_last_hangup_event_the_mode_delivers(calls, socket_mode, final):
    """Static sockets never get CHANNEL_HANGUP_COMPLETE (captures static_full*): waiting for it
    there would wait out the whole linger."""
    session, fs = calls(socket_mode=socket_mode)
    job = Background(session.myevents)
    fs.expect("myevents")
    fs.reply("+OK Events Enabled")
    job.result()
    waiter = Background(session.wait_end, timeout=2)
    if socket_mode == "static":
        fs.linger_notice()
    fs.event("CHANNEL_HANGUP", **{"Hangup-Cause": "NORMAL_CLEARING"})
    if socket_mode == "async":
        fs.event("CHANNEL_HANGUP_COMPLETE", **{"Hangup-Cause": "NORMAL_CLEARING"})
    assert waiter.result().name == final


def test_wait_end_is_none_when_freeswitch_disconnects_first(call):
    """Without linger FreeSWITCH may close before any hangup event: the call is over all the same."""
    session, fs = call
    job = Background(session.myevents)
    fs.expect("myevents")
    fs.reply("+OK Events Enabled")
    job.result()
    waiter = Background(session.wait_end, timeout=2)
    fs.disconnect()
    assert waiter.result() is None


@pytest.mark.parametrize("method, args, wire", [
    ("events", ("CHANNEL_ANSWER", "CUSTOM", "sofia::register"),
     b"event plain CHANNEL_ANSWER CUSTOM sofia::register\n\n"),
    ("nixevent", ("CHANNEL_ANSWER",), b"nixevent CHANNEL_ANSWER\n\n"),
    ("filter", ("Unique-ID", CALL_UUID), f"filter Unique-ID {CALL_UUID}\n\n".encode()),
    ("filter_delete", ("Unique-ID",), b"filter delete Unique-ID\n\n"),
    ("divert_events", (True,), b"divert_events on\n\n"),
    ("nolinger", (), b"nolinger\n\n"),
    ("resume", (), b"resume\n\n"),
    ("exit", (), b"exit\n\n"),
    ("log", (6,), b"log 6\n\n"),
    ("sendmsg", ([("call-command", "hangup")], OTHER_UUID),
     f"sendmsg {OTHER_UUID}\ncall-command: hangup\n\n".encode()),
])
def test_command_surface_sends_freeswitch_byte_forms(call, method, args, wire):
    """Each command method writes exactly the bytes FreeSWITCH parses (docs §6)."""
    session, fs = call
    job = Background(getattr(session, method), *args)
    assert fs.recv_raw() == wire
    fs.reply("+OK")
    job.result()
