"""Unit tests for gateway.protocol, the sans-IO ESL parser and serialiser.

Golden data: tests/fixtures/ holds byte-exact captures of a real FreeSWITCH 1.11.2 session (see
tests/fixtures/README.md). ``<name>.fs.bin`` is what FreeSWITCH sent, ``<name>.sent.bin`` is what
our server sent, and ``<name>.frames.json`` is both streams already split into frames.
"""

from __future__ import annotations

import base64
import json
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import protocol
from gateway.protocol import (CommandParser, Event, Frame, Headers, Parser, ProtocolError,
                              SessionParser, parse_event)

FIXTURE_DIR = Path(__file__).parent / "fixtures"
FIXTURES = sorted(p.name[:-len(".frames.json")] for p in FIXTURE_DIR.glob("*.frames.json"))

CHUNK_SETTINGS = settings(max_examples=50, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])

U = "ad174c24-ebdf-4b5f-aafa-0652eb95a487"  # Event-UUID of the answer sendmsg in async_full
INJECTION = "Mallory\nUnique-ID: forged"    # what an attacker puts in a caller-id name
BAD_BYTES = b"\xff\xfe\x80"


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def fixture_bytes(name: str, kind: str) -> bytes:
    """``kind`` is "fs" or "sent"."""
    return (FIXTURE_DIR / f"{name}.{kind}.bin").read_bytes()


@lru_cache(maxsize=None)
def fixture_frames(name: str) -> tuple:
    return tuple(json.loads((FIXTURE_DIR / f"{name}.frames.json").read_text("utf-8")))


def golden(name: str, direction: str) -> list[dict]:
    return [f for f in fixture_frames(name) if f["dir"] == direction]


def golden_body(frame: dict) -> bytes | None:
    return None if frame["body_b64"] is None else base64.b64decode(frame["body_b64"])


def golden_pairs(frame: dict) -> list[tuple[str, str]]:
    return [(name, value) for name, value in frame["headers"]]


def raw_pairs(headers: Headers) -> list[tuple[str, str]]:
    return [(name, headers.raw(name)) for name in list(headers)]


def snap_frame(frame: Frame) -> tuple:
    return frame.content_type, tuple(raw_pairs(frame.headers)), frame.body


def snap_command(cmd) -> tuple:
    return cmd.line, tuple(raw_pairs(cmd.headers)), cmd.body


def parse_all(data: bytes, **kw) -> list[Frame]:
    return Parser(**kw).feed(data)


def parse_one(data: bytes, **kw) -> Frame:
    frames = parse_all(data, **kw)
    assert len(frames) == 1, frames
    return frames[0]


def feed_chunks(parser, data: bytes, offsets) -> list:
    """Feed ``data`` cut at ``offsets`` (any order, duplicates and 0/len allowed)."""
    cuts = sorted({0, len(data), *(min(max(o, 0), len(data)) for o in offsets)})
    out = []
    for start, stop in zip(cuts, cuts[1:]):
        out.extend(parser.feed(data[start:stop]))
    return out


def fs_frames(name: str) -> list[Frame]:
    return parse_all(fixture_bytes(name, "fs"))


def frames_of_type(name: str, content_type: str) -> list[Frame]:
    return [f for f in fs_frames(name) if f.content_type == content_type]


def events_named(name: str, event_name: str) -> list[protocol.Event]:
    out = []
    for frame in fs_frames(name):
        if frame.content_type in protocol.EVENT_CONTENT_TYPES:
            ev = parse_event(frame)
            if ev.name == event_name:
                out.append(ev)
    return out


def sent_slices(name: str) -> list[bytes]:
    """The bytes of each command in ``<name>.sent.bin``, cut at the json offsets."""
    data = fixture_bytes(name, "sent")
    offsets = [f["offset"] for f in golden(name, "us")] + [len(data)]
    return [data[a:b] for a, b in zip(offsets, offsets[1:])]


def rebuild(name: str, direction: str, eol: bytes) -> bytes:
    """Rebuild a capture from its frames.json with ``eol`` as the line ending."""
    out = []
    for f in golden(name, direction):
        lines = ([f["command"]] if direction == "us" else []) + [
            n if v is None else f"{n}: {v}" for n, v in f["headers"]]
        body = golden_body(f)
        out.append(eol.join(line.encode("utf-8") for line in lines) + eol + eol + (body or b""))
    return b"".join(out)


def plain_event_frame(block: bytes) -> bytes:
    """A text/event-plain frame around a hand-written serialised event."""
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(block) + block


def event_of(content_type: str, body: bytes) -> protocol.Event:
    return parse_event(Frame(Headers([("Content-Type", content_type)]), body))


# --------------------------------------------------------------------------------------------
# 1. golden frames
# --------------------------------------------------------------------------------------------

def test_fixtures_present():
    """Guards against the parametrised golden tests silently running over zero fixtures."""
    assert len(FIXTURES) == 9
    assert "async_full" in FIXTURES and "misc_replies" in FIXTURES


@pytest.mark.parametrize("name", FIXTURES)
def test_fixture_json_rebuilds_bin(name):
    """Guards against a corrupted fixture: frames.json must rebuild both .bin files byte for byte."""
    assert rebuild(name, "fs", b"\n") == fixture_bytes(name, "fs")
    assert rebuild(name, "us", b"\n") == fixture_bytes(name, "sent")


@pytest.mark.parametrize("name", FIXTURES)
def test_golden_fs_frames(name):
    """Guards against mis-framing real FreeSWITCH output: every header (raw, in order) and body."""
    expected = golden(name, "fs")
    parser = Parser()
    frames = parser.feed(fixture_bytes(name, "fs"))
    assert len(frames) == len(expected)
    for i, (frame, exp) in enumerate(zip(frames, expected)):
        assert list(frame.headers) == [n for n, _ in exp["headers"]], i
        assert raw_pairs(frame.headers) == golden_pairs(exp), i
        assert frame.body == golden_body(exp), i
    assert not parser.mid_frame


@pytest.mark.parametrize("name", FIXTURES)
def test_session_parser_gives_what_parser_and_parse_event_give(name):
    """Guards the session's shortcut for plain events: each must come out as the Event that
    parse_event makes of its frame (name, every header, body), and every other frame as is."""
    data = fixture_bytes(name, "fs")
    for chunks in ([data], [data[i:i + 97] for i in range(0, len(data), 97)]):
        parser = SessionParser()
        items = [item for chunk in chunks for item in parser.feed(chunk)]
        frames = Parser().feed(data)
        assert len(items) == len(frames)
        for item, frame in zip(items, frames):
            if frame.content_type == "text/event-plain":
                expected = parse_event(frame)
                assert isinstance(item, Event)
                assert (item.name, item.body) == (expected.name, expected.body)
                assert list(item.headers.items()) == list(expected.headers.items())
            else:
                assert isinstance(item, Frame)
                assert (item.content_type, item.body) == (frame.content_type, frame.body)
                assert list(item.headers.items()) == list(frame.headers.items())
        assert not parser.mid_frame


@pytest.mark.parametrize("name", FIXTURES)
def test_golden_us_commands(name):
    """Guards against mis-framing our own commands: command line, raw headers and body."""
    expected = golden(name, "us")
    parser = CommandParser()
    cmds = parser.feed(fixture_bytes(name, "sent"))
    assert len(cmds) == len(expected)
    for i, (cmd, exp) in enumerate(zip(cmds, expected)):
        assert cmd.line == exp["command"], i
        assert raw_pairs(cmd.headers) == golden_pairs(exp), i
        assert cmd.body == golden_body(exp), i
    assert not parser.mid_frame


@pytest.mark.parametrize("name", FIXTURES)
def test_one_reply_per_command(name):
    """Guards against FIFO reply matching drift: is_reply frames must equal commands sent."""
    replies = [f for f in fs_frames(name) if f.is_reply]
    assert len(replies) == len(golden(name, "us"))
    assert all(f.content_type in ("command/reply", "api/response") for f in replies)


# --------------------------------------------------------------------------------------------
# 2. the connect reply
# --------------------------------------------------------------------------------------------

def test_connect_reply_decoded():
    """Guards against comparing the url-encoded Reply-Text (%2BOK%0A) or dispatching on line 1."""
    frame = fs_frames("async_full")[0]
    assert list(frame.headers)[0] == "Event-Name"          # Content-Type is not first
    assert frame.body is None and "Content-Length" not in frame.headers
    assert frame.content_type == "command/reply"
    assert frame.is_reply
    assert frame.headers.raw("Reply-Text") == "%2BOK%0A"
    assert frame.reply_text == "+OK\n"
    assert frame.headers["Socket-Mode"] == "async"
    assert frame.headers["Control"] == "full"
    assert frame.headers["Event-Date-Local"] == "2026-11-21 00:29:39"
    assert frame.headers["variable_current_application_data"] == "127.0.0.1:9090 async full"
    assert frame.headers["FreeSWITCH-IPv6"] == "fd00::2"


def test_connect_reply_is_channel_data_event():
    """Guards against refusing to treat the connect reply as the CHANNEL_DATA event it is."""
    frame = fs_frames("async_full")[0]
    ev = parse_event(frame)
    assert ev.name == "CHANNEL_DATA"
    assert ev.unique_id == frame.headers["Unique-ID"] == "75ea4081-f6e3-460a-9d5c-6fd197c523c8"
    assert ev["channel-call-state"] == "RINGING"


@pytest.mark.parametrize("name, mode, control", [
    ("async_full", "async", "full"),
    ("async_single", "async", "single-channel"),
    ("static_full", "static", "full"),
    ("static_full_paced", "static", "full"),
])
def test_connect_reply_modes(name, mode, control):
    """Guards against misreading Socket-Mode/Control, which decide whether linger is possible."""
    frame = fs_frames(name)[0]
    assert frame.reply_text == "+OK\n"
    assert frame.headers["Socket-Mode"] == mode
    assert frame.headers["Control"] == control
    assert list(frame.headers)[-4:] == ["Content-Type", "Reply-Text", "Socket-Mode", "Control"]


def test_second_connect_reply():
    """Guards against treating a later connect (fresh CHANNEL_DATA dump) as something else."""
    connects = [f for f in fs_frames("misc_replies") if "Event-Name" in f.headers]
    assert len(connects) == 2
    for frame in connects:
        assert frame.reply_text == "+OK\n"
        assert parse_event(frame).name == "CHANNEL_DATA"


# --------------------------------------------------------------------------------------------
# 3. every frame type
# --------------------------------------------------------------------------------------------

def test_command_replies_raw():
    """Guards against url-decoding (or otherwise mangling) plain command/reply values."""
    replies = [f.reply_text for f in frames_of_type("misc_replies", "command/reply")]
    for text in ("+OK Events Enabled", "+OK will linger 2 seconds", "+OK will not linger",
                 "-ERR no keywords supplied", "+OK events nixed", "-ERR missing value.",
                 "+OK filter added. [Unique-ID]=[99bfaf22-b58e-4f42-97d0-4735d347fafc]",
                 "-ERR invalid session id [00000000-0000-0000-0000-000000000000]",
                 "+OK log level 6 [6]", "-ERR not loging", "-ERR not listening for events",
                 "-ERR command not found", "+OK"):
        assert text in replies
    assert all(f.body is None for f in frames_of_type("misc_replies", "command/reply"))


def test_bgapi_reply_job_uuid():
    """Guards against losing the Job-UUID header that follows Reply-Text on a bgapi reply."""
    job = "c5470a29-82ab-4e25-9345-03b080d426ee"
    frame = [f for f in fs_frames("async_full") if "Job-UUID" in f.headers][0]
    assert frame.content_type == "command/reply"
    assert frame.reply_text == f"+OK Job-UUID: {job}"
    assert frame.headers["Job-UUID"] == job
    assert frame.headers["job-uuid"] == job
    assert list(frame.headers) == ["Content-Type", "Reply-Text", "Job-UUID"]


def test_api_responses_raw_bytes():
    """Guards against decoding or stripping api/response bodies (they are raw bytes)."""
    bodies = [f.body for f in frames_of_type("async_full", "api/response")]
    assert bodies == [b"75ea4081-f6e3-460a-9d5c-6fd197c523c8",
                      b"-ERR bogus_command Command not found!\n"]
    misc = [f.body for f in frames_of_type("misc_replies", "api/response")]
    assert misc == [b"-ERR no reply\n", b"hello%20world"]        # not url-decoded
    frame = frames_of_type("async_full", "api/response")[1]
    assert frame.is_reply
    assert frame.body_text() == "-ERR bogus_command Command not found!\n"


def test_getvar_reply_raw_value():
    """Guards against url-decoding getvar replies, which FreeSWITCH writes raw."""
    texts = [f.reply_text for f in frames_of_type("async_full", "command/reply")]
    assert "hello world" in texts
    frame = [f for f in fs_frames("async_full") if f.reply_text == "hello world"][0]
    assert frame.headers.raw("Reply-Text") == "hello world"
    assert "-ERR command not found" in texts                      # unset variable


def test_myevents_twice_reply():
    """Guards against mis-parsing the misspelt '-ERR aready enabled.' reply."""
    texts = [f.reply_text for f in frames_of_type("myevents_twice", "command/reply")]
    assert texts[1:3] == ["+OK Events Enabled", "-ERR aready enabled."]


def test_event_plain_decoding():
    """Guards against case-sensitive lookups and raw (still %-encoded) event values."""
    ev = events_named("misc_replies", "CHANNEL_EXECUTE")[0]
    assert ev.name == "CHANNEL_EXECUTE"
    assert ev["unique-id"] == ev["UNIQUE-ID"] == ev.unique_id == \
        "99bfaf22-b58e-4f42-97d0-4735d347fafc"
    assert "unique-id" in ev
    assert ev["Application"] == "log"
    assert ev["Application-Data"] == "INFO fixture log line"
    assert ev.headers.raw("Application-Data") == "INFO%20fixture%20log%20line"
    assert ev["Event-Date-Local"] == "2026-11-21 00:30:18"
    assert ev.headers.raw("Event-Date-Local") == "2026-11-21%2000%3A30%3A18"
    assert ev["FreeSWITCH-IPv6"] == "fd00::2"
    assert ev.body == b""
    assert ev.get("No-Such-Header", "dflt") == "dflt"


def test_event_plain_execute_complete_application_uuid():
    """Guards against losing the Event-UUID -> Application-UUID correlation in plain events."""
    done = events_named("async_full", "CHANNEL_EXECUTE_COMPLETE")
    assert done[0]["Application-UUID"] == U
    assert done[0]["Application"] == "answer"


def test_event_plain_background_job_body():
    """Guards against losing the inner Content-Length body of a plain BACKGROUND_JOB event."""
    ev = events_named("async_full", "BACKGROUND_JOB")[0]
    assert ev["Job-UUID"] == "c5470a29-82ab-4e25-9345-03b080d426ee"
    assert ev["Job-Owner-UUID"] == "75ea4081-f6e3-460a-9d5c-6fd197c523c8"
    assert ev["Job-Command"] == "status"
    assert "Job-Command-Arg" not in ev
    assert isinstance(ev.body, bytes)
    assert len(ev.body) == int(ev["Content-Length"]) == 347
    assert ev.body.startswith(b"UP 0 years") and ev.body.endswith(b"8192K\n")
    assert "FreeSWITCH (Version 1.11.2-release  64bit) is ready" in ev.body_text()


def test_event_json_values_not_decoded():
    """Guards against url-decoding JSON values (they are raw) and losing real newlines."""
    execs = [e for e in events_named("async_full", "CHANNEL_EXECUTE") if e["Application"] == "log"]
    assert execs[0]["Application-Data"] == "INFO line1\nline2"
    ev = events_named("myevents_json", "CHANNEL_PARK")[0]
    assert ev["FreeSWITCH-IPv6"] == "fd00::2"
    assert ev["Event-Date-Local"] == ev.headers.raw("Event-Date-Local") == "2026-11-21 00:29:52"
    assert ev["unique-id"] == ev.unique_id
    hup = events_named("myevents_json", "CHANNEL_HANGUP_COMPLETE")[0]
    assert hup["Hangup-Cause"] == "NORMAL_CLEARING"


def test_event_json_pct_stays_literal():
    """Guards against applying url-decoding to JSON values that merely contain a '%'."""
    ev = event_of("text/event-json", b'{"Event-Name":"CUSTOM","X":"100%25 a%20b"}')
    assert ev["X"] == "100%25 a%20b"


def test_event_json_background_job():
    """Guards against leaving "_body" as a header instead of turning it into event.body bytes."""
    jobs = events_named("json_xml_bgapi", "BACKGROUND_JOB")
    status, bogus = jobs[0], jobs[1]
    assert status["Job-UUID"] == "f9ed9868-8b8e-44fe-8d3a-b565cfdffcf8"
    assert status["Job-Command"] == "status"
    assert isinstance(status.body, bytes)
    assert len(status.body) == int(status["Content-Length"]) == 348
    assert status.body.startswith(b"UP 0 years")
    assert "_body" not in status
    assert bogus["Job-UUID"] == "f3ef5a62-eeb9-4232-befe-5bb526283fed"
    assert bogus["Job-Command-Arg"] == "some arg"
    assert bogus.body == b"-ERR bogus_command Command not found!\n"


def test_event_xml_background_job():
    """Guards against leaving XML values %-encoded or dropping the <body>."""
    frame = frames_of_type("json_xml_bgapi", "text/event-xml")[0]
    assert frame.body.endswith(b"</event>\n")
    ev = parse_event(frame)
    assert ev.name == "BACKGROUND_JOB"
    assert ev["Job-UUID"] == "7f3fc15d-260b-418f-8a48-89d299ec9679"
    assert ev["Job-Command"] == "uuid_getvar"
    assert ev["Job-Command-Arg"] == "a380fa47-a839-42de-a7c0-0151e66cb0e2 call_uuid"
    assert " call_uuid" in ev["Job-Command-Arg"]
    assert ev.headers.raw("Job-Command-Arg").endswith("%20call_uuid")
    assert ev["FreeSWITCH-IPv6"] == "fd00::2"
    assert ev.body == b"a380fa47-a839-42de-a7c0-0151e66cb0e2"


def test_event_xml_channel_events():
    """Guards against mis-parsing the larger XML channel events (execute, answer, complete)."""
    names = [parse_event(f).name for f in frames_of_type("json_xml_bgapi", "text/event-xml")]
    assert names == ["BACKGROUND_JOB", "CHANNEL_EXECUTE", "CHANNEL_ANSWER",
                     "CHANNEL_EXECUTE_COMPLETE"]
    done = events_named("json_xml_bgapi", "CHANNEL_EXECUTE_COMPLETE")[0]
    assert done["Application"] == "answer"
    assert done["unique-id"] == "a380fa47-a839-42de-a7c0-0151e66cb0e2"


@pytest.mark.parametrize("name, linger_time, channel", [
    ("async_full", "5", "loopback/9090-b"), ("misc_replies", "2", "loopback/9090-b"),
    ("myevents_json", "1", "loopback/9090-b"), ("static_full", "-1", "loopback/9092-b"),
    ("static_full_paced", "-1", "loopback/9092-b"),
])
def test_linger_notice(name, linger_time, channel):
    """Guards against mistaking the linger notice (Content-Length: 0) for the final disconnect."""
    notices = frames_of_type(name, "text/disconnect-notice")
    linger = [f for f in notices if f.headers["Content-Disposition"] == "linger"]
    assert len(linger) == 1
    assert linger[0].headers["Linger-Time"] == linger_time
    assert linger[0].headers["Channel-Name"] == channel
    assert linger[0].body == b""
    assert not linger[0].is_reply


@pytest.mark.parametrize("name", FIXTURES)
def test_disconnect_notice_is_last(name):
    """Guards against losing the 67-byte goodbye body or the final frame before close."""
    last = fs_frames(name)[-1]
    assert last.content_type == "text/disconnect-notice"
    assert last.headers["Content-Disposition"] == "disconnect"
    assert last.body == protocol.DISCONNECT_BODY
    assert len(last.body) == 67
    assert last.body_text() == "Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"


def test_log_data_frames():
    """Guards against decoding log/data bodies before cutting, or losing their headers."""
    logs = frames_of_type("misc_replies", "log/data")
    assert len(logs) == 3
    assert logs[0].body.endswith(b"[ERR] switch_ivr.c:522 Invalid Command!\n")
    assert logs[0].headers["Log-Level"] == "3"
    assert logs[1].body == b"EXECUTE [depth=1] loopback/9090-b log(INFO fixture log line)\n"
    assert logs[2].headers["Log-File"] == "mod_dptools.c"
    assert logs[2].headers["User-Data"] == "99bfaf22-b58e-4f42-97d0-4735d347fafc"
    assert logs[2].body_text().endswith("[INFO] mod_dptools.c:1865 fixture log line\n")
    assert not any(f.is_reply for f in logs)


def test_parse_event_rejects_non_events():
    """Guards against parse_event silently accepting a reply or api frame as an event."""
    for frame in (frames_of_type("async_full", "api/response")[0],
                  frames_of_type("async_full", "command/reply")[1],
                  frames_of_type("async_full", "text/disconnect-notice")[0]):
        with pytest.raises(ProtocolError):
            parse_event(frame)


# --------------------------------------------------------------------------------------------
# 4. arbitrary chunking
# --------------------------------------------------------------------------------------------

STREAMS = {"fs": (Parser, snap_frame), "sent": (CommandParser, snap_command)}


@pytest.mark.parametrize("kind", STREAMS)
@pytest.mark.parametrize("name", FIXTURES)
@CHUNK_SETTINGS
@given(data=st.data())
def test_chunking(name, kind, data):
    """Guards against frames that depend on how TCP happened to segment either direction."""
    parser_cls, snap = STREAMS[kind]
    blob = fixture_bytes(name, kind)
    offsets = data.draw(st.lists(st.integers(0, len(blob)), max_size=60))
    whole = [snap(f) for f in parser_cls().feed(blob)]
    parser = parser_cls()
    assert [snap(f) for f in feed_chunks(parser, blob, offsets)] == whole
    assert not parser.mid_frame


@pytest.mark.parametrize("name", FIXTURES)
def test_byte_at_a_time(name):
    """Guards against boundary bugs at every single offset (FreeSWITCH itself reads 1 byte/recv)."""
    for kind, (parser_cls, snap) in STREAMS.items():
        blob = fixture_bytes(name, kind)
        whole = [snap(f) for f in parser_cls().feed(blob)]
        parser = parser_cls()
        got = []
        for i in range(len(blob)):
            got.extend(parser.feed(blob[i:i + 1]))
        assert [snap(f) for f in got] == whole, kind


@pytest.mark.parametrize("name", ["async_full", "misc_replies", "json_xml_bgapi"])
@CHUNK_SETTINGS
@given(data=st.data())
def test_chunking_crlf(name, data):
    """Guards against \\r\\n line endings (accepted by FreeSWITCH) breaking framing at any cut."""
    for direction, parser_cls, snap in (("fs", Parser, snap_frame),
                                        ("us", CommandParser, snap_command)):
        lf = [snap(f) for f in parser_cls().feed(rebuild(name, direction, b"\n"))]
        blob = rebuild(name, direction, b"\r\n")
        offsets = data.draw(st.lists(st.integers(0, len(blob)), max_size=60))
        assert [snap(f) for f in parser_cls().feed(blob)] == lf
        assert [snap(f) for f in feed_chunks(parser_cls(), blob, offsets)] == lf


# --------------------------------------------------------------------------------------------
# 5. header injection through url-encoded newlines
# --------------------------------------------------------------------------------------------

def test_injection_connect_reply_builder():
    """Guards against decoding before splitting lines: %0A in a value must not forge headers."""
    frame = parse_one(protocol.connect_reply_frame([
        ("Event-Name", "CHANNEL_DATA"),
        ("Unique-ID", "real-uuid"),
        ("Caller-Caller-ID-Name", "Eve\nEvil-Header: x"),
        ("Caller-Caller-ID-Number", INJECTION),
    ]))
    assert "%0AEvil-Header%3A%20x" in frame.headers.raw("Caller-Caller-ID-Name")
    assert frame.headers["Caller-Caller-ID-Name"] == "Eve\nEvil-Header: x"
    assert "Evil-Header" not in frame.headers
    assert frame.headers["Unique-ID"] == "real-uuid"
    assert frame.headers["Caller-Caller-ID-Number"] == INJECTION
    assert frame.reply_text == "+OK\n"
    assert parse_event(frame).unique_id == "real-uuid"


def test_injection_connect_reply_by_hand():
    """Guards against header forging in hand-written connect-reply bytes, incl. %0A%0A."""
    data = (b"Event-Name: CHANNEL_DATA\n"
            b"Unique-ID: real-uuid\n"
            b"Caller-Caller-ID-Name: Eve%0AUnique-ID%3A%20forged\n"
            b"Caller-Caller-ID-Number: 1%0A%0AContent-Length%3A%205%0AEvil-Header%3A%20x\n"
            b"Content-Type: command/reply\n"
            b"Reply-Text: %2BOK%0A\n"
            b"Socket-Mode: async\n"
            b"Control: full\n\n")
    parser = Parser()
    frame, = parser.feed(data)
    assert not parser.mid_frame
    assert frame.body is None
    assert frame.headers["Unique-ID"] == "real-uuid"
    assert frame.headers["Caller-Caller-ID-Name"] == "Eve\nUnique-ID: forged"
    assert "Evil-Header" not in frame.headers
    assert frame.headers["Caller-Caller-ID-Number"].startswith("1\n\nContent-Length: 5")
    assert frame.reply_text == "+OK\n"
    assert len(frame.headers) == 8


def test_injection_event_plain_builders():
    """Guards against forged headers in event-plain values built by serialize_event_plain."""
    headers = [("Event-Name", "CHANNEL_ANSWER"), ("Unique-ID", "real-uuid"),
               ("Caller-Caller-ID-Name", "Eve\nEvil-Header: x\nUnique-ID: forged")]
    block = protocol.serialize_event_plain(headers)
    assert b"%0AEvil-Header%3A%20x" in block
    for data in (protocol.event_frame(headers), plain_event_frame(block)):
        ev = parse_event(parse_one(data))
        assert ev.unique_id == "real-uuid"
        assert "Evil-Header" not in ev
        assert ev["Caller-Caller-ID-Name"] == "Eve\nEvil-Header: x\nUnique-ID: forged"
        assert len(ev.headers) == 3


def test_injection_event_plain_by_hand():
    """Guards against %0A%0A in a value cutting the inner block and forging the job body."""
    block = (b"Event-Name: BACKGROUND_JOB\n"
             b"Unique-ID: real-uuid\n"
             b"Caller-Caller-ID-Name: Eve%0AUnique-ID%3A%20forged%0A%0Afake-body\n"
             b"Content-Length: 4\n\nreal")
    ev = parse_event(parse_one(plain_event_frame(block)))
    assert ev.unique_id == "real-uuid"
    assert ev["Caller-Caller-ID-Name"] == "Eve\nUnique-ID: forged\n\nfake-body"
    assert ev.body == b"real"
    assert sorted(n.lower() for n in ev.headers) == sorted(
        ["event-name", "unique-id", "caller-caller-id-name", "content-length"])


def test_injection_event_xml_and_json():
    """Guards against XML (%-decoded) and JSON (raw newline) values forging headers."""
    xml = (b"<event>\n  <headers>\n    <Event-Name>CUSTOM</Event-Name>\n"
           b"    <Unique-ID>real-uuid</Unique-ID>\n"
           b"    <Caller-Caller-ID-Name>Eve%0AUnique-ID%3A%20forged</Caller-Caller-ID-Name>\n"
           b"  </headers>\n</event>\n")
    ev = event_of("text/event-xml", xml)
    assert ev.unique_id == "real-uuid"
    assert ev["Caller-Caller-ID-Name"] == "Eve\nUnique-ID: forged"
    js = json.dumps({"Event-Name": "CUSTOM", "Unique-ID": "real-uuid",
                     "Caller-Caller-ID-Name": INJECTION}).encode()
    ev = event_of("text/event-json", js)
    assert ev.unique_id == "real-uuid"
    assert ev["Caller-Caller-ID-Name"] == INJECTION
    assert len(ev.headers) == 3


# --------------------------------------------------------------------------------------------
# 6. non-UTF-8 bytes and byte-counted bodies
# --------------------------------------------------------------------------------------------

def test_non_utf8_outer_header_value():
    """Guards against strict UTF-8 decoding of a header block crashing the connection."""
    frame = parse_one(b"Content-Type: command/reply\nReply-Text: -ERR " + BAD_BYTES + b"\n\n")
    assert frame.content_type == "command/reply"
    assert frame.reply_text.startswith("-ERR ")
    assert "\ufffd" in frame.reply_text
    assert isinstance(frame.headers.raw("Reply-Text"), str)


def test_non_utf8_api_body():
    """Guards against decoding api bodies: they stay exact bytes; body_text() never raises."""
    body = b"ok " + BAD_BYTES + b"\n"
    frame = parse_one(protocol.api_response_frame(body))
    assert frame.body == body
    text = frame.body_text()
    assert isinstance(text, str) and text.startswith("ok ") and "\ufffd" in text


@pytest.mark.parametrize("value", [BAD_BYTES, b"%FF%FE%80", b"a%FFb%C3"])
def test_non_utf8_event_plain_value(value):
    """Guards against raw or %FF-encoded invalid UTF-8 in event values raising on lookup."""
    block = b"Event-Name: CUSTOM\nUnique-ID: u1\nX-Bad: " + value + b"\n\n"
    ev = parse_event(parse_one(plain_event_frame(block)))
    assert ev.name == "CUSTOM" and ev.unique_id == "u1"
    assert isinstance(ev["X-Bad"], str) and "\ufffd" in ev["X-Bad"]


def test_non_utf8_event_plain_inner_body():
    """Guards against decoding the inner body of a BACKGROUND_JOB (must stay exact bytes)."""
    body = b"result " + BAD_BYTES + b"\n\nmore"
    ev = parse_event(parse_one(protocol.event_frame([("Event-Name", "BACKGROUND_JOB")], body)))
    assert ev.body == body
    assert "\ufffd" in ev.body_text()


def test_non_utf8_json_event():
    """Guards against invalid UTF-8 in a JSON event raising instead of being replaced."""
    js = b'{"Event-Name":"CUSTOM","X":"a' + BAD_BYTES + b'","_body":"b' + BAD_BYTES + b'"}'
    frame = parse_one(b"Content-Length: %d\nContent-Type: text/event-json\n\n" % len(js) + js)
    assert frame.body == js
    ev = parse_event(frame)
    assert ev.name == "CUSTOM"
    assert "\ufffd" in ev["X"]
    assert isinstance(ev.body, bytes) and ev.body.startswith(b"b")
    assert "\ufffd" in ev.body_text()


def test_non_utf8_log_data():
    """Guards against a log line with invalid UTF-8 crashing the parser or being altered."""
    body = b"2026 [INFO] caller " + BAD_BYTES + b"\n"
    data = (b"Content-Type: log/data\nContent-Length: %d\nLog-Level: 6\nText-Channel: 3\n"
            b"Log-File: x.c\nLog-Func: f\nLog-Line: 1\nUser-Data: u\n\n" % len(body) + body)
    frame = parse_one(data)
    assert frame.content_type == "log/data"
    assert frame.body == body
    assert frame.body_text().startswith("2026 [INFO] caller ")


def test_content_length_counts_bytes():
    """Guards against cutting a multi-byte UTF-8 body by characters instead of bytes."""
    body = "héllo ☎".encode("utf-8")
    assert len(body) == 10 and len("héllo ☎") == 7
    data = protocol.api_response_frame(body) + protocol.reply_frame("+OK next")
    frames = parse_all(data)
    assert [f.body for f in frames] == [body, None]
    assert frames[0].body_text() == "héllo ☎"
    assert frames[1].reply_text == "+OK next"
    # the same cut by hand, and with a cut in the middle of the multi-byte character
    data = b"Content-Type: api/response\nContent-Length: 10\n\n" + body + b"\n\n" + \
        b"Content-Type: api/response\nContent-Length: 2\n\n" + body[:2]
    assert [f.body for f in parse_all(data)] == [body, body[:2]]
    ev = parse_event(parse_one(protocol.event_frame([("Event-Name", "CUSTOM")], body + b"!")))
    assert ev.body == body + b"!"


# --------------------------------------------------------------------------------------------
# 7. limits and errors
# --------------------------------------------------------------------------------------------

def test_content_length_over_limit():
    """Guards against a huge declared Content-Length being buffered instead of rejected."""
    parser = Parser(max_frame_size=1000)
    with pytest.raises(ProtocolError, match="1000"):
        parser.feed(b"Content-Length: 5000\nContent-Type: text/event-plain\n\n")


def test_content_length_at_limit_is_fine():
    """Guards against an off-by-one that rejects a body of exactly the limit."""
    body = b"x" * 1000
    frame = parse_one(protocol.api_response_frame(body), max_frame_size=1000)
    assert frame.body == body


def test_header_block_without_end_over_limit():
    """Guards against unbounded buffering of a header block that never ends."""
    parser = Parser(max_frame_size=1000)
    with pytest.raises(ProtocolError, match="1000"):
        for _ in range(30):
            parser.feed(b"X-Pad: " + b"a" * 92 + b"\n")
    cmd_parser = CommandParser(max_frame_size=1000)
    with pytest.raises(ProtocolError):
        cmd_parser.feed(b"api " + b"a" * 1500)


def test_header_block_over_limit_delivered_at_once():
    """Guards against the frame-size limit depending on TCP segmentation (whole oversized block)."""
    data = b"Content-Type: command/reply\nX-Pad: " + b"a" * 5000 + b"\n\n"
    with pytest.raises(ProtocolError):
        Parser(max_frame_size=1000).feed(data)


@pytest.mark.parametrize("value", [b"abc", b"-1", b"", b"1.5", b"0x10"])
def test_bad_content_length(value):
    """Guards against int() failures or negative lengths escaping as ValueError or hanging."""
    with pytest.raises(ProtocolError):
        Parser().feed(b"Content-Type: api/response\nContent-Length: " + value + b"\n\n")
    with pytest.raises(ProtocolError):
        CommandParser().feed(b"sendmsg\nContent-Length: " + value + b"\n\nx")


@pytest.mark.parametrize("body", [b"", b"{", b"not json", b'{"a":', b"[1, 2]", b'"str"',
                                  b"\xff\xfe"])
def test_malformed_json_event(body):
    """Guards against ValueError/JSONDecodeError escaping parse_event instead of ProtocolError."""
    with pytest.raises(ProtocolError):
        event_of("text/event-json", body)


def test_deeply_nested_json_event():
    """Guards against RecursionError escaping parse_event on a hostile (malformed) JSON body."""
    with pytest.raises(ProtocolError):
        event_of("text/event-json", b"[" * 100_000)


@pytest.mark.parametrize("body", [b"", b"<event><headers>", b"not xml", b"<a></b>",
                                  b"<event>\xff</event>"])
def test_malformed_xml_event(body):
    """Guards against ElementTree.ParseError escaping parse_event instead of ProtocolError."""
    with pytest.raises(ProtocolError):
        event_of("text/event-xml", body)


def test_mid_frame():
    """Guards against EOF handling that cannot tell a cut frame from a clean boundary."""
    data = protocol.api_response_frame(b"0123456789") + protocol.reply_frame("+OK")
    parser = Parser()
    assert not parser.mid_frame
    assert parser.feed(data[:10]) == []
    assert parser.mid_frame                           # half a header block
    assert parser.feed(data[10:50]) == []
    assert parser.mid_frame                           # header done, body pending
    frames = parser.feed(data[50:])
    assert [f.content_type for f in frames] == ["api/response", "command/reply"]
    assert not parser.mid_frame
    parser.feed(b"\n\r\n")                            # stray blank lines are not a frame
    assert not parser.mid_frame
    cmd_parser = CommandParser()
    cmd_parser.feed(b"api sta")
    assert cmd_parser.mid_frame
    cmd_parser.feed(b"tus\n\n")
    assert not cmd_parser.mid_frame


def test_crlf_ends_block():
    """Guards against only accepting bare \\n\\n as the end of a block."""
    cmd, = CommandParser().feed(b"api status\r\n\r\n")
    assert cmd.line == "api status"
    assert cmd.name == "api" and cmd.args == "status"
    cmd, = CommandParser().feed(b"sendmsg\r\ncall-command: hangup\r\nhangup-cause: X\r\n\r\n")
    assert raw_pairs(cmd.headers) == [("call-command", "hangup"), ("hangup-cause", "X")]
    frame, = Parser().feed(b"Content-Type: command/reply\r\nReply-Text: +OK\r\n\r\n")
    assert frame.reply_text == "+OK"
    cmd, = CommandParser().feed(b"api status\n\r\n")               # \r between the two \n
    assert cmd.line == "api status"


def test_leading_blank_lines_skipped():
    """Guards against stray blank lines between frames becoming empty frames or commands."""
    cmds = CommandParser().feed(b"\n\n\r\nconnect\n\n\n\nmyevents\n\n")
    assert [c.line for c in cmds] == ["connect", "myevents"]
    frames = Parser().feed(b"\n\n" + protocol.reply_frame("+OK") + b"\r\n\n"
                           + protocol.reply_frame("+OK bye"))
    assert [f.reply_text for f in frames] == ["+OK", "+OK bye"]


def test_body_not_stripped_of_leading_newlines():
    """Guards against blank-line skipping eating the first bytes of a body."""
    data = protocol.api_response_frame(b"\n\nbody\n")
    for chunks in ([data], [data[:-7], data[-7:]], [bytes([b]) for b in data]):
        parser = Parser()
        frames = [f for c in chunks for f in parser.feed(c)]
        assert [f.body for f in frames] == [b"\n\nbody\n"]


def test_line_without_colon_is_continuation():
    """Guards against a raw newline in a getvar value forging a header or being dropped."""
    frame = parse_one(b"Content-Type: command/reply\nReply-Text: line one\nline two\n\n")
    assert frame.reply_text == "line one\nline two"
    assert list(frame.headers) == ["Content-Type", "Reply-Text"]


# Header blocks made of tricky lines: repeated names, other cases, missing separators, a "\r",
# continuation lines, url-encoding, arrays, bad UTF-8.
_LINES = st.tuples(st.sampled_from([b"Unique-ID", b"unique-id", b"Reply-Text", b"A", b"A: x",
                                    b"x", b"", b"\xe2\x84\xaa"]),   # the last: Kelvin sign
                   st.sampled_from([b": ", b":", b"\r: ", b"", b": \r"]),
                   st.sampled_from([b"v", b"", b"%41%0A", b"ARRAY::a|:b", b"\xc3\xff", b"w: z",
                                    b"w:"])).map(b"".join)
_BLOCKS = st.lists(_LINES, min_size=1, max_size=6).map(b"\n".join)


@settings(max_examples=1000, deadline=None)
@given(block=_BLOCKS, name=st.sampled_from(["Unique-ID", "unique-id", "Unique-Id", "Reply-Text",
                                            "A", "A: x", "x", "", "A\n", "k", "\u212a"]),
       encoded=st.booleans())
def test_lookup_on_an_unsplit_block_equals_the_split(block, name, encoded):
    """Guards the byte-search shortcut: it must give exactly what splitting the block gives, and
    the headers it hands out must then behave as the split map in every other way."""
    unsplit = Event.plain(block, b"") if encoded else Frame.from_block(
        block, b"", protocol._COMMON_OUTER.fullmatch(block))
    split = Headers(protocol._split_header_block(block), encoded=encoded)
    assert unsplit._lookup(name, "absent") == split.get(name, "absent")
    assert unsplit.headers.raw(name) == split.raw(name)
    assert (name in unsplit.headers) == (name in split)
    assert list(unsplit.headers.items()) == list(split.items())
    assert unsplit.headers.get(name, "absent") == split.get(name, "absent")


_OUTER_PIECES = st.sampled_from([b"Content-Length: ", b"Content-Type: ", b"Reply-Text: ",
                                 b"command/reply", b"text/event-plain", b"12", b"007", b"\n",
                                 b"\r", b": ", b"x", b"\xff", b""])


@settings(max_examples=1000, deadline=None)
@given(start=st.sampled_from([b"Content-Length: ", b"Content-Length: 12\nContent-Type: ",
                              b"Content-Type: command/reply\nReply-Text: "]),
       rest=st.lists(_OUTER_PIECES, max_size=8).map(b"".join))
def test_common_outer_blocks_read_as_the_split_reads_them(start, rest):
    """Guards the one-regex path for the outer blocks FreeSWITCH writes most: type, length and
    reply text must be what splitting the block gives."""
    block = start + rest
    headers = Headers(protocol._split_header_block(block))
    common = protocol._COMMON_OUTER.fullmatch(block)
    frame = Frame.from_block(block, None, common)
    if common is None:
        return   # the general path, tested elsewhere
    assert frame.content_type == headers.get("Content-Type")
    assert frame.reply_text == (headers.get("Reply-Text") or "")
    length = headers.get("Content-Length")
    assert _outcome(lambda: _framed_body_length(block, 10**6)) == _outcome(
        lambda: None if length is None else protocol._valid_length(length, 10**6))


def _framed_body_length(block: bytes, limit: int) -> int | None:
    """The body length the framer expects after ``block`` (None: a frame without a body)."""
    parser = Parser(limit)
    return None if parser.feed(block + b"\n\n") else parser._body_len


def _outcome(compute):
    try:
        return compute()
    except ProtocolError:
        return "ProtocolError"


# --------------------------------------------------------------------------------------------
# 8. ARRAY values
# --------------------------------------------------------------------------------------------

def test_array_value_plain():
    """Guards against returning ARRAY::a|:b|:c as a string instead of a list."""
    block = b"Event-Name: CUSTOM\nvariable_foo: ARRAY%3A%3Aa%7C%3Ab%7C%3Ac\n\n"
    ev = parse_event(parse_one(plain_event_frame(block)))
    assert ev["variable_foo"] == ["a", "b", "c"]
    assert ev.headers.raw("variable_foo") == "ARRAY%3A%3Aa%7C%3Ab%7C%3Ac"
    ev = parse_event(parse_one(protocol.event_frame(
        [("Event-Name", "CUSTOM"), ("variable_bar", "ARRAY::x y|:z%")])))
    assert ev["variable_bar"] == ["x y", "z%"]


def test_array_value_json():
    """Guards against mangling a JSON list value (it must stay a list)."""
    ev = event_of("text/event-json", b'{"Event-Name":"CUSTOM","variable_foo":["a","b","c"]}')
    assert ev["variable_foo"] == ["a", "b", "c"]


# --------------------------------------------------------------------------------------------
# 9. serialisers (us -> FreeSWITCH)
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("produced, expected", [
    (protocol.connect(), b"connect\n\n"),
    (protocol.myevents(), b"myevents\n\n"),
    (protocol.myevents("json"), b"myevents json\n\n"),
    (protocol.myevents("xml"), b"myevents xml\n\n"),
    (protocol.linger(5), b"linger 5\n\n"),
    (protocol.linger(), b"linger\n\n"),
    (protocol.nolinger(), b"nolinger\n\n"),
    (protocol.event("plain", ["BACKGROUND_JOB"]), b"event plain BACKGROUND_JOB\n\n"),
    (protocol.event("json", ["CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE"]),
     b"event json CHANNEL_EXECUTE CHANNEL_EXECUTE_COMPLETE\n\n"),
    (protocol.nixevent(["CHANNEL_ANSWER"]), b"nixevent CHANNEL_ANSWER\n\n"),
    (protocol.noevents(), b"noevents\n\n"),
    (protocol.filter_add("Unique-ID", "u1"), b"filter Unique-ID u1\n\n"),
    (protocol.filter_delete("Unique-ID", "u1"), b"filter delete Unique-ID u1\n\n"),
    (protocol.filter_delete("Unique-ID"), b"filter delete Unique-ID\n\n"),
    (protocol.getvar("call_uuid"), b"getvar call_uuid\n\n"),
    (protocol.divert_events(True), b"divert_events on\n\n"),
    (protocol.divert_events(False), b"divert_events off\n\n"),
    (protocol.log(6), b"log 6\n\n"),
    (protocol.nolog(), b"nolog\n\n"),
    (protocol.api("uuid_getvar x call_uuid"), b"api uuid_getvar x call_uuid\n\n"),
    (protocol.bgapi("status", "c5470a29-82ab-4e25-9345-03b080d426ee"),
     b"bgapi status\nJob-UUID: c5470a29-82ab-4e25-9345-03b080d426ee\n\n"),
    (protocol.exit_(), b"exit\n\n"),
    (protocol.resume(), b"resume\n\n"),
    (protocol.hangup("USER_BUSY"),
     b"sendmsg\ncall-command: hangup\nhangup-cause: USER_BUSY\n\n"),
    (protocol.hangup(), b"sendmsg\ncall-command: hangup\nhangup-cause: NORMAL_CLEARING\n\n"),
    (protocol.execute("answer", event_uuid=U),
     b"sendmsg\ncall-command: execute\nexecute-app-name: answer\nEvent-UUID: " + U.encode()
     + b"\n\n"),
])
def test_serializer_bytes(produced, expected):
    """Guards against any drift in the exact command bytes FreeSWITCH expects."""
    assert produced == expected


def test_async_full_sent_bin_reproduced():
    """Guards against serialisers differing from the bytes a real FreeSWITCH accepted."""
    uuid = "75ea4081-f6e3-460a-9d5c-6fd197c523c8"
    produced = [
        protocol.connect(),
        protocol.myevents(),
        protocol.linger(5),
        protocol.execute("answer", event_uuid=U),
        protocol.execute("playback", "tone_stream://%(100,0,800)",
                         event_uuid="99e465e7-d435-4753-9ca0-c848ed8ea2b1"),
        protocol.api(f"uuid_getvar {uuid} call_uuid"),
        protocol.api("bogus_command"),
        protocol.getvar("fixture_unset_variable"),
        protocol.event("plain", ["BACKGROUND_JOB"]),
        protocol.bgapi("status", "c5470a29-82ab-4e25-9345-03b080d426ee"),
        protocol.filter_add("Unique-ID", uuid),
        protocol.event("json", ["CHANNEL_EXECUTE", "CHANNEL_EXECUTE_COMPLETE"]),
        protocol.execute("set", "fixture_var=hello world",
                         event_uuid="bde53b6b-2228-41af-b51b-49b4ebfdd0a8"),
        protocol.execute("log", "INFO line1\nline2",
                         event_uuid="6a062fdf-ce34-4a21-adc2-d4618376a4f4"),
        protocol.getvar("fixture_var"),
        protocol.hangup("NORMAL_CLEARING"),
    ]
    slices = sent_slices("async_full")
    assert len(produced) == len(slices)
    for i, (ours, theirs) in enumerate(zip(produced, slices)):
        assert ours == theirs, i
    assert b"".join(produced) == fixture_bytes("async_full", "sent")


def test_misc_replies_sent_bin_reproduced():
    """Guards against serialiser drift for the less common commands (filter delete, log, ...)."""
    uuid = "99bfaf22-b58e-4f42-97d0-4735d347fafc"
    produced = [
        protocol.connect(), protocol.myevents(), protocol.linger(2), protocol.nolinger(),
        protocol.linger(2), protocol.getvar("call_uuid"), protocol.event("plain", []),
        protocol.event("plain", ["CHANNEL_ANSWER"]), protocol.nixevent(["CHANNEL_ANSWER"]),
        protocol.filter_add("Unique-ID", uuid), protocol.filter_delete("Unique-ID", uuid),
        protocol.command("filter"), protocol.command("divert_events"),
        protocol.divert_events(True), protocol.divert_events(False), protocol.resume(),
        protocol.execute("answer", uuid="00000000-0000-0000-0000-000000000000"),
        protocol.sendmsg([("call-command", "")]),
        protocol.api("echo"), protocol.api("echo hello%20world"), protocol.command("bgapi status"),
        protocol.command("xyzzy"), protocol.log(6),
        protocol.execute("log", "INFO fixture log line",
                         event_uuid="d9f092b2-4a1a-47f0-8736-a75e5c411882"),
        protocol.nolog(), protocol.nolog(), protocol.connect(), protocol.noevents(),
        protocol.noevents(), protocol.hangup("USER_BUSY"),
    ]
    slices = sent_slices("misc_replies")
    assert len(produced) == len(slices)
    for i, (ours, theirs) in enumerate(zip(produced, slices)):
        assert ours == theirs, i


def test_execute_answer_matches_fixture_slice():
    """Guards against header order/name drift in the most common sendmsg."""
    data = fixture_bytes("async_full", "sent")
    expected = (b"sendmsg\ncall-command: execute\nexecute-app-name: answer\nEvent-UUID: "
                + U.encode() + b"\n\n")
    start = data.index(b"sendmsg\ncall-command: execute\nexecute-app-name: answer")
    assert data[start:start + len(expected)] == expected
    assert protocol.execute("answer", event_uuid=U) == expected


def test_execute_multiline_arg_uses_body():
    """Guards against putting a newline in execute-app-arg (it would inject a second command)."""
    uuid = "6a062fdf-ce34-4a21-adc2-d4618376a4f4"
    out = protocol.execute("log", "INFO line1\nline2", event_uuid=uuid)
    expected = (b"sendmsg\ncall-command: execute\nexecute-app-name: log\nEvent-UUID: "
                + uuid.encode() + b"\nContent-Type: text/plain\nContent-Length: 16\n\n"
                + b"INFO line1\nline2")
    assert out == expected
    assert b"execute-app-arg" not in out
    data = fixture_bytes("async_full", "sent")
    start = data.index(b"sendmsg\ncall-command: execute\nexecute-app-name: log")
    assert data[start:start + len(expected)] == expected
    cmd, = CommandParser().feed(out)
    assert cmd.line == "sendmsg"
    assert cmd.headers["execute-app-name"] == "log"
    assert cmd.headers["Content-Type"] == "text/plain"
    assert cmd.headers["Content-Length"] == "16"
    assert "execute-app-arg" not in cmd.headers
    assert cmd.body == b"INFO line1\nline2"


def test_execute_multibyte_body_length():
    """Guards against Content-Length counting characters instead of UTF-8 bytes in a body arg."""
    arg = "INFO héllo ☎\nsecond"
    out = protocol.execute("log", arg)
    cmd, after = CommandParser().feed(out + protocol.exit_())
    assert cmd.body == arg.encode("utf-8")
    assert int(cmd.headers["Content-Length"]) == len(arg.encode("utf-8")) != len(arg)
    assert after.line == "exit"


def test_execute_options():
    """Guards against missing or misspelt loops / event-lock / async headers."""
    out = protocol.execute("playback", "x.wav", loops=3, event_lock=True, async_=True,
                           event_uuid="e1")
    assert out == (b"sendmsg\ncall-command: execute\nexecute-app-name: playback\n"
                   b"execute-app-arg: x.wav\nloops: 3\nevent-lock: true\nasync: true\n"
                   b"Event-UUID: e1\n\n")
    plain = protocol.execute("playback", "x.wav")
    assert b"loops" not in plain and b"event-lock" not in plain and b"async" not in plain


def test_execute_other_uuid():
    """Guards against dropping the target uuid from the sendmsg line."""
    out = protocol.execute("answer", uuid="other")
    assert out.startswith(b"sendmsg other\n")
    assert protocol.hangup("USER_BUSY", uuid="other").startswith(b"sendmsg other\n")
    cmd, = CommandParser().feed(out)
    assert cmd.name == "sendmsg" and cmd.args == "other"


@pytest.mark.parametrize("call", [
    lambda: protocol.command("api status\nexit"),
    lambda: protocol.command("api status\r"),
    lambda: protocol.command("sendmsg", [("execute-app-arg", "x\nexecute-app-name: evil")]),
    lambda: protocol.command("sendmsg", [("execute-app-arg", "x\r\n")]),
    lambda: protocol.command("sendmsg", [("bad\nname", "x")]),
    lambda: protocol.api("a\nb"),
    lambda: protocol.bgapi("status", "job\nevil: 1"),
    lambda: protocol.getvar("x\ny"),
    lambda: protocol.hangup("NORMAL_CLEARING\n\nexit"),
    lambda: protocol.execute("an\nswer"),
    lambda: protocol.execute("answer", uuid="u\n"),
    lambda: protocol.execute("answer", event_uuid="e\n"),
    lambda: protocol.filter_add("Unique-ID", "u\n"),
    lambda: protocol.myevents("yaml"),
    lambda: protocol.event("csv", ["ALL"]),
])
def test_command_rejects_newlines(call):
    """Guards against command injection through a newline in a line or header value."""
    with pytest.raises(ValueError):
        call()


def test_command_body_bytes_verbatim():
    """Guards against a body being re-encoded or its length miscounted."""
    body = b"\x00\xff\n\nraw"
    out = protocol.command("sendevent CUSTOM", [("X", "1")], body)
    assert out == b"sendevent CUSTOM\nX: 1\nContent-Length: 7\n\n" + body
    cmd, = CommandParser().feed(out)
    assert cmd.body == body


# --------------------------------------------------------------------------------------------
# 10. simulator-side serialisers round-trip
# --------------------------------------------------------------------------------------------

CHANNEL_VALUES = [
    ("Event-Name", "CHANNEL_DATA"),
    ("Unique-ID", "3f1c-uuid"),
    ("Caller-Caller-ID-Name", "Jean Dupont: sales"),
    ("Caller-Caller-ID-Number", "+33 1 23 45"),
    ("variable_pct", "100% sure & done; a+b=c?"),
    ("variable_utf8", "héllo ☎ 日本"),
    ("variable_symbols", '#<>@[\\]^`{|}" ~/,()-\''),
    ("variable_multiline", "line1\nline2\r\n"),
]


def test_fs_url_encode():
    """Guards against encoding differing from switch_url_encode (space as %20, '/' and ',' kept)."""
    assert protocol.fs_url_encode("a b:c%d/e,f") == "a%20b%3Ac%25d/e,f"
    assert protocol.fs_url_encode("+OK\n") == "%2BOK%0A"
    assert protocol.fs_url_encode("é") == "%C3%A9"
    assert protocol.fs_url_encode("2026-11-21 00:29:39") == "2026-11-21%2000%3A29%3A39"


def test_connect_reply_frame_round_trip():
    """Guards against the simulator's connect reply decoding to anything but the originals."""
    frame = parse_one(protocol.connect_reply_frame(CHANNEL_VALUES, "static", "single-channel"))
    assert frame.content_type == "command/reply"
    assert frame.reply_text == "+OK\n"
    assert frame.headers["Socket-Mode"] == "static"
    assert frame.headers["Control"] == "single-channel"
    assert frame.body is None
    for name, value in CHANNEL_VALUES:
        assert frame.headers[name] == value, name
    assert parse_event(frame).unique_id == "3f1c-uuid"


def test_connect_reply_frame_matches_fixture():
    """Guards against the simulator's connect reply differing from real FreeSWITCH bytes."""
    for name in FIXTURES:
        frame = fs_frames(name)[0]
        pairs = [(n, frame.headers[n]) for n in frame.headers][:-4]
        built = protocol.connect_reply_frame(pairs, frame.headers["Socket-Mode"],
                                             frame.headers["Control"])
        assert fixture_bytes(name, "fs").startswith(built), name


@pytest.mark.parametrize("fmt", ["plain", "json"])
def test_event_frame_round_trip(fmt):
    """Guards against event_frame + Parser + parse_event losing names, values or body bytes."""
    headers = [("Event-Name", "BACKGROUND_JOB"), *CHANNEL_VALUES[1:]]
    body = "result: héllo ☎\n\nend\n".encode("utf-8")
    frame = parse_one(protocol.event_frame(headers, body, fmt))
    assert frame.content_type == f"text/event-{fmt}"
    assert list(frame.headers) == ["Content-Length", "Content-Type"]
    ev = parse_event(frame)
    assert ev.name == "BACKGROUND_JOB"
    for name, value in headers:
        assert ev[name] == value, name
    assert ev.body == body
    no_body = parse_event(parse_one(protocol.event_frame(headers, b"", fmt)))
    assert no_body.body == b""
    assert no_body["variable_utf8"] == "héllo ☎ 日本"


def test_serialize_event_plain_empty_value():
    """Guards against an empty value producing a 'Name: ' line FreeSWITCH never writes."""
    block = protocol.serialize_event_plain([("Event-Name", "CUSTOM"), ("X", "")])
    assert block == b"Event-Name: CUSTOM\nX: _undef_\n\n"


def test_serialize_event_plain_matches_fixtures():
    """Guards against the simulator's event-plain bytes differing from real FreeSWITCH output."""
    checked = 0
    for name in FIXTURES:
        for frame in frames_of_type(name, "text/event-plain"):
            head, _, rest = frame.body.partition(b"\n\n")
            pairs = [tuple(line.split(": ", 1)) for line in head.decode().split("\n")]
            body = b""
            if pairs[-1][0] == "Content-Length":
                body = rest[:int(pairs.pop()[1])]
            decoded = [(n, protocol.Headers([(n, v)], encoded=True)[n]) for n, v in pairs]
            assert protocol.serialize_event_plain(decoded, body) == frame.body
            checked += 1
    assert checked == 34


def test_reply_frame_round_trip():
    """Guards against the simulator's reply frames mismatching FreeSWITCH's layout."""
    frame = parse_one(protocol.reply_frame("+OK Job-UUID: j1", [("Job-UUID", "j1")]))
    assert frame.content_type == "command/reply"
    assert frame.reply_text == "+OK Job-UUID: j1"
    assert frame.headers["Job-UUID"] == "j1"
    assert frame.body is None
    assert protocol.reply_frame("+OK Events Enabled") in fixture_bytes("async_full", "fs")
    job = "c5470a29-82ab-4e25-9345-03b080d426ee"
    assert protocol.reply_frame(f"+OK Job-UUID: {job}", [("Job-UUID", job)]) in \
        fixture_bytes("async_full", "fs")


def test_api_response_frame_round_trip():
    """Guards against the simulator's api/response framing or body drifting."""
    body = b"-ERR bogus_command Command not found!\n"
    frame = parse_one(protocol.api_response_frame(body))
    assert frame.content_type == "api/response"
    assert frame.is_reply
    assert frame.body == body
    assert protocol.api_response_frame(body) in fixture_bytes("async_full", "fs")
    assert parse_one(protocol.api_response_frame(b"")).body == b""


def test_linger_notice_frame_round_trip():
    """Guards against the simulator's linger notice differing from FreeSWITCH's."""
    uuid = "75ea4081-f6e3-460a-9d5c-6fd197c523c8"
    data = protocol.linger_notice_frame(uuid, "loopback/9090-b", 5)
    assert data in fixture_bytes("async_full", "fs")
    frame = parse_one(data)
    assert frame.content_type == "text/disconnect-notice"
    assert frame.headers["Content-Disposition"] == "linger"
    assert frame.headers["Controlled-Session-UUID"] == uuid
    assert frame.headers["Linger-Time"] == "5"
    assert frame.body == b""
    assert protocol.linger_notice_frame(uuid, "loopback/9090-b", -1).count(b"Linger-Time: -1\n") == 1


def test_disconnect_notice_frame_round_trip():
    """Guards against the simulator's final notice differing from FreeSWITCH's (67-byte body)."""
    uuid = "75ea4081-f6e3-460a-9d5c-6fd197c523c8"
    data = protocol.disconnect_notice_frame(uuid)
    assert fixture_bytes("async_full", "fs").endswith(data)
    frame = parse_one(data)
    assert frame.content_type == "text/disconnect-notice"
    assert frame.headers["Content-Disposition"] == "disconnect"
    assert frame.headers["Controlled-Session-UUID"] == uuid
    assert frame.body == protocol.DISCONNECT_BODY and len(frame.body) == 67
