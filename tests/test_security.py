"""The hardening pieces on their own: parser bounds, the frame deadline, the handshake timeout,
percent-decoding once, safe logging, the allowlist, the stats token, privilege-drop refusals."""

from __future__ import annotations

import argparse
import logging
import time

import gevent
import pytest

from gateway import config, protocol
from gateway.allowlist import Allowlist
from gateway.httpserver import _bearer_matches
from gateway.logsafe import RateLimitedLog, loggable
from gateway.privileges import PrivilegeError, drop
from gateway.protocol import ProtocolError, SessionParser
from gateway.session import (CONNECT_SETTLE_SECONDS, HandshakeTimeout, Session, SessionClosed,
                             SessionSettings)
from tests.fakefs import Background, FakeFS, socketpair
from tests.test_protocol import plain_event_frame as plain_event


CHANNEL_DATA = [("Event-Name", "CHANNEL_DATA"), ("Unique-ID", "u")]


# -- parser bounds ------------------------------------------------------------------------------

@pytest.mark.parametrize("data, limits, message", [
    (b"Content-Type: api/response\nContent-Length: 2147483648\n\n", {},
     "Content-Length 2147483648 exceeds the 8388608-byte limit"),
    (b"".join(b"X-H%d: v\n" % i for i in range(100_000)) + b"\n", {},
     "header block exceeds 1048576 bytes without ending"),
    (b"".join(b"X-H%d: v\n" % i for i in range(100_000)) + b"\n", {"max_header_block": 2 << 20},
     "header block of 100000 lines exceeds the 10000-line limit (--max-headers)"),
    (b"Content-Type: command/reply\nX: " + b"a" * 300_000 + b"\n\n", {},
     "header block has a line of 300003 bytes, over the 262144-byte limit (--max-line-length)"),
    (b"X: " + b"a" * 1_100_000, {}, "header block exceeds 1048576 bytes without ending"),
    (plain_event(b"Event-Name: X\n" * 20), {"max_headers": 10},
     "event header block of 21 lines exceeds the 10-line limit (--max-headers)"),
    (b"Content-Type: api/response\nContent-Length: -1\n\n", {}, "negative Content-Length -1"),
    (b"Content-Type: command/reply\nReply-Text: +OK\x00\n\n", {},
     "NUL byte in the header block at offset 43"),
    (plain_event(b"Event-Name: CUSTOM\nX: \xff\xfe\n\n"), {},
     "invalid UTF-8 in the event header block at offset 22"),
    (protocol.connect_reply_frame(CHANNEL_DATA).replace(b"u\n", b"\xc3\n", 1), {},
     "invalid UTF-8 in the channel data at offset 36"),
    (b"Content-Type: api/response\nContent-Length: 1e9\n\n", {}, "invalid Content-Length '1e9'"),
])
def test_each_bound_is_a_protocol_error_naming_it(data, limits, message):
    """Oversized, overlong and overcounted blocks, whole or fed in 64 KiB reads like a session's:
    one ProtocolError that says which limit, never any other exception."""
    parser = SessionParser(**limits)
    with pytest.raises(ProtocolError) as raised:
        for at in range(0, len(data), 65536):
            parser.feed(data[at:at + 65536])
    assert str(raised.value) == message


def feed_values(where: str, pairs: bytes):
    """``pairs`` (header lines) in an event's header block, or in the channel data."""
    if where == "event":
        item, = SessionParser().feed(plain_event(b"Event-Name: CUSTOM\n" + pairs + b"\n"))
        return item
    frame, = SessionParser().feed(b"Event-Name: CHANNEL_DATA\n" + pairs + b"\n")
    return frame.headers


@pytest.mark.parametrize("where,what", [("event", "event header block"),
                                        ("channel data", "channel data")])
@pytest.mark.parametrize("escape", [b"%zz", b"%4", b"%", b"%G0"])
def test_a_percent_that_starts_no_escape_is_a_protocol_error(where, what, escape):
    """FreeSWITCH writes a literal % as %25, so a bare one is not FreeSWITCH's."""
    pairs = b"X-Name: Bob" + escape + b"\nX-Other: v\n"
    with pytest.raises(ProtocolError) as raised:
        feed_values(where, pairs)
    assert f"invalid percent-escape {escape[:3]!r}" in str(raised.value)
    assert what in str(raised.value)


@pytest.mark.parametrize("where", ["event", "channel data"])
def test_every_value_is_decoded_once_and_an_escaped_newline_forges_nothing(where):
    """An escaped invalid UTF-8 sequence (FreeSWITCH encodes whatever bytes a caller sent)
    becomes U+FFFD; nothing is decoded twice or can forge a header."""
    item = feed_values(where, b"X-Esc: %E2%82\nX-Twice: %2541\nX-Line: a%0AInjected: yes\n")
    assert item["X-Esc"] == "\ufffd"
    assert item["X-Twice"] == "%41"              # decoded once: %25 -> %, never again to A
    assert item["X-Line"] == "a\nInjected: yes"  # one value: an escaped newline forges nothing
    assert "Injected" not in item


def test_raw_invalid_utf8_in_a_reply_text_is_replaced_not_refused():
    """getvar replies carry values raw, so invalid UTF-8 there can be FreeSWITCH's own."""
    frame, = protocol.Parser().feed(b"Content-Type: command/reply\nReply-Text: \xff(\n\n")
    assert frame.reply_text == "\ufffd("


# -- the session: frame deadline, handshake timeout, unusable Unique-ID ---------------------------

def started(settings: SessionSettings, uuid: str | None = None):
    ours, theirs = socketpair()
    session, fs = Session(ours, settings), FakeFS(theirs)
    starter = Background(session.start)
    fs.answer_connect(uuid=uuid)
    return session, fs, starter


def test_a_trickled_frame_is_closed_at_the_frame_deadline():
    """One byte every 50 ms of a frame that would take 5 s: closed at the 0.3 s deadline."""
    session, fs, starter = started(SessionSettings(frame_timeout=0.3))
    starter.result()
    began = time.monotonic()
    for byte in b"Content-Type: api/response\nContent-Length: 100\n\n":
        if session.closed:
            break
        fs.send(bytes([byte]))
        gevent.sleep(0.05)
    assert session.wait_closed(2)
    assert 0.3 <= time.monotonic() - began < 1.0
    assert session.close_reason == ("protocol error: a frame was not complete within 0.3s "
                                    "(--frame-timeout)")
    assert session.counters.protocol_errors == 1
    fs.close()


def test_frames_arriving_in_pieces_for_longer_than_the_deadline_are_not_cut():
    """Every read ends mid-frame for 1 s, but each frame completes within 0.3 s."""
    session, fs, starter = started(SessionSettings(frame_timeout=0.3))
    starter.result()
    subscribed = Background(session.myevents)
    fs.expect("myevents")
    fs.reply()
    subscribed.result()
    frame = fs.event_bytes("CUSTOM", Event_Subclass="x")
    half = len(frame) // 2
    fs.send(frame[:half])
    for _ in range(10):
        gevent.sleep(0.1)
        fs.send(frame[half:] + frame[:half])   # one frame ends, the next begins
    fs.send(frame[half:])
    gevent.sleep(0.1)
    assert not session.closed, session.close_reason
    assert [session.next_event(1).name for _ in range(11)] == ["CUSTOM"] * 11
    fs.close()


def test_a_silent_peer_raises_handshake_timeout_and_is_closed_unlogged(caplog):
    ours, theirs = socketpair()
    session = Session(ours, SessionSettings(handshake_timeout=0.2, command_timeout=30))
    fs = FakeFS(theirs)
    with caplog.at_level(logging.DEBUG, "esl_gateway.session"):
        began = time.monotonic()
        error = Background(session.start).exception()
    assert isinstance(error, HandshakeTimeout)
    assert 0.2 <= time.monotonic() - began < 0.6
    assert session.closed and caplog.records == []   # the worker logs these, rate-limited
    fs.expect("connect")
    fs.expect_eof()
    fs.close()


@pytest.mark.parametrize("uuid", ["abc\ndef", "two words", "x" * 300])
def test_an_unusable_unique_id_ends_the_call_as_a_protocol_error(uuid, caplog):
    with caplog.at_level(logging.WARNING, "esl_gateway.session"):
        session, fs, starter = started(SessionSettings(), uuid=uuid)
        assert isinstance(starter.exception(), SessionClosed)
    assert session.counters.protocol_errors == 1
    line, = [r.getMessage() for r in caplog.records]
    assert "\n" not in line and "the connect reply's Unique-ID is unusable" in line
    # Not closed sooner than a real call could bear (docs/esl-protocol.md §14).
    assert fs.expect_eof() - fs.sent_connect_reply_at >= CONNECT_SETTLE_SECONDS
    fs.close()


# -- logging what strangers control ----------------------------------------------------------

def test_loggable_escapes_controls_and_cuts_long_values():
    assert loggable("Bob\nINFO forged line\r\x1b[31m\u2028\\x0a") == \
        "Bob\\x0aINFO forged line\\x0d\\x1b[31m\\u2028\\\\x0a"
    assert loggable("a" * 300) == "a" * 200 + "...(cut)"
    assert loggable(None) == "None" and loggable("Ünïcode ok") == "Ünïcode ok"


def test_rate_limited_log_says_how_many_it_left_out(caplog):
    limited = RateLimitedLog(logging.getLogger("test.limited"), interval=0.2)
    with caplog.at_level(logging.INFO, "test.limited"):
        for _ in range(5):
            limited(logging.WARNING, "refused %s", "1.2.3.4")
        time.sleep(0.25)
        limited(logging.WARNING, "refused %s", "5.6.7.8")
    assert [r.getMessage() for r in caplog.records] == [
        "refused 1.2.3.4 (0 more since the last report)",
        "refused 5.6.7.8 (4 more since the last report)"]


# -- who may connect -----------------------------------------------------------------------------

@pytest.mark.parametrize("peer, allowed", [
    (("127.0.0.1", 5), True), (("10.1.2.3", 5), True), (("172.31.0.1", 5), True),
    (("172.32.0.1", 5), False), (("192.168.9.9", 5), True), (("8.8.8.8", 5), False),
    (("::1", 5, 0, 0), True), (("::ffff:192.168.1.1", 5, 0, 0), True),
    (("::ffff:8.8.8.8", 5, 0, 0), False), (("fd00::1", 5, 0, 0), True),
    (("fe80::1%eth0", 5, 0, 2), False), (("2001:db8::1", 5, 0, 0), False),
    ("/run/esl.sock", True),
])
def test_default_allowlist_is_loopback_and_private_ranges(peer, allowed):
    assert Allowlist(list(config.DEFAULT_ALLOW)).allows(peer) is allowed


def test_a_listed_public_address_is_allowed_and_verdicts_are_remembered():
    allowlist = Allowlist(["203.0.113.7", "127.0.0.1/32"])
    assert allowlist.allows(("203.0.113.7", 1)) and not allowlist.allows(("127.0.0.2", 1))
    assert allowlist._seen == {"203.0.113.7": True, "127.0.0.2": False}


# -- the stats token; refusing to drop privileges half-way ----------------------------------------

@pytest.mark.parametrize("header, ok", [
    ("Bearer s3cret", True), ("bearer s3cret", True), ("Bearer s3cre", False),
    ("Basic s3cret", False), ("", False), ("Bearer ", False), ("Bearer s3cret2", False)])
def test_bearer_token_comparison(header, ok):
    assert _bearer_matches(header, "s3cret") is ok


@pytest.mark.parametrize("user, group, message", [
    (None, "nogroup", "--group needs --user"),
    ("no-such-user-here", None, "no such user: 'no-such-user-here'"),
    ("nobody", "no-such-group-here", "no such group: 'no-such-group-here'"),
])
def test_privilege_drop_refuses_what_it_cannot_do(user, group, message):
    with pytest.raises(PrivilegeError, match=message):
        drop(user, group, [])


def test_allow_is_validated_when_the_config_is_read():
    """A typo in --allow stops the start with the setting's name, not the first call."""
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    with pytest.raises(config.ConfigError, match="allow from command line: '10.0.0.300/8'"):
        config.resolve(vars(parser.parse_args(["x:y", "--allow", "10.0.0.300/8"])), {})
    resolved = config.resolve(vars(parser.parse_args(["x:y"])),
                              {"ESL_GATEWAY_ALLOW": "203.0.113.7, 10.0.0.0/8"})
    assert resolved.allow == ["203.0.113.7", "10.0.0.0/8"]
