"""Fuzzing what FreeSWITCH's side can send: whatever the bytes, the parser raises nothing but
ProtocolError, and a session ends only that call, with one protocol-error log line at most.

Inputs are built from ESL itself (frames of every kind from gateway.protocol's serialisers, with
hostile names and values) mixed with the pieces naive parsers choke on (Content-Length digits,
``\\r``, ``%`` escapes, NUL, invalid UTF-8, ``ARRAY::``, JSON and XML fragments), cut at random
points and fed in random chunks. Small limits in some examples reach every bound. For runs of
hours, tests/fuzz/fuzz_protocol.py is the same target for atheris (see the README's Security).
"""

from __future__ import annotations

import logging

import gevent
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from gateway import protocol
from gateway.protocol import Command, Event, Frame, ProtocolError
from gateway.session import ESLError, Session, SessionClosed, SessionSettings
from tests.fakefs import FakeFS, socketpair

NAMES = st.sampled_from(["Event-Name", "Content-Type", "Content-Length", "Unique-ID",
                         "Reply-Text", "Job-UUID", "Application-UUID", "Socket-Mode",
                         "Caller-Caller-ID-Name", "variable_sip_h_X", "content-length", "x"])
TEXT = st.text(max_size=40) | st.sampled_from(["%0A", "%zz", "%", "%E2%82", "ARRAY::a|:b",
                                               "-1", "99999999999", "2147483648", "\x00"])
PAIRS = st.lists(st.tuples(NAMES | st.text(max_size=12), TEXT), max_size=8)
TOKENS = st.sampled_from([b"\n", b"\n\n", b"\r\n", b"\r", b": ", b"Content-Length: ",
                          b"Content-Length: 2147483648\n\n", b"Content-Type: text/event-plain\n",
                          b"Content-Type: command/reply\nReply-Text: +OK\n\n", b"%", b"%0A",
                          b"%zz", b"\x00", b"\xff\xfe", b"\xc3(", b"ARRAY::", b"{", b"<event>",
                          b"Event-Name: CHANNEL_DATA\n", b"0", b"-5", b"1_0"])


@st.composite
def frames(draw) -> bytes:
    """One frame FreeSWITCH could send (or nearly: values and names are hostile)."""
    pairs = [(name.replace("\n", ""), value) for name, value in draw(PAIRS)]
    body = draw(st.binary(max_size=60))
    kind = draw(st.sampled_from(["event", "reply", "api", "connect", "notice", "log"]))
    if kind == "event":
        return protocol.event_frame(pairs, body, draw(st.sampled_from(protocol.EVENT_FORMATS)))
    if kind == "reply":
        return protocol.reply_frame(draw(TEXT).replace("\n", ""))
    if kind == "api":
        return protocol.api_response_frame(body)
    if kind == "connect":
        return protocol.connect_reply_frame(pairs)
    if kind == "notice":
        return protocol.disconnect_notice_frame(draw(TEXT).replace("\n", ""))
    return protocol._block([("Content-Type", "log/data"), ("Content-Length", len(body))]) + body


@st.composite
def streams(draw) -> tuple[bytes, list[int]]:
    """A byte stream of frames, tokens and noise, mutated, and where to cut it into reads."""
    pieces = draw(st.lists(frames() | TOKENS | st.binary(max_size=30), min_size=1, max_size=12))
    data = bytearray(b"".join(pieces))
    for _ in range(draw(st.integers(0, 3))):   # flip, drop or duplicate a byte somewhere
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "drop", "dup"]))
        if action == "flip":
            data[at] = draw(st.integers(0, 255))
        elif action == "drop":
            del data[at]
        else:
            data.insert(at, data[at])
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return bytes(data), cuts


LIMITS = st.sampled_from([{}, {"max_frame_size": 64}, {"max_header_block": 40},
                          {"max_headers": 3}, {"max_line_length": 16}])
# Small, but large enough for the fake FreeSWITCH's connect reply (488 bytes, 14 lines).
SESSION_LIMITS = st.sampled_from([{}, {"max_frame_size": 600}, {"max_header_block": 500},
                                  {"max_headers": 15}, {"max_line_length": 64}])


class Records(logging.Handler):
    """Keeps the session's log records of one example."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def chunks(data: bytes, cuts: list[int]):
    start = 0
    for cut in [*cuts, len(data)]:
        yield data[start:cut]
        start = cut


JSON_EVENT = b'{"Event-Name": ["A", "B"], "Unique-ID": "ARRAY::u|:v", "Job-UUID": 5}'


def exercise(item, check_block) -> None:
    """Use a parsed item as the session and a handler would: every accessor."""
    if isinstance(item, Command):
        item.name, item.args, dict(item.headers.items())
        return
    if isinstance(item, Frame):
        item.content_type, item.is_reply, item.reply_text, item.body_text(), repr(item)
        assert all(field is None or field.__class__ is str   # never an ARRAY:: value's list
                   for field in (item.content_type, item.reply_text))
        dict(item.headers.items()), item.headers.raw("Content-Type"), len(item.headers)
        if item.content_type in protocol.EVENT_CONTENT_TYPES or "Event-Name" in item.headers:
            item = protocol.parse_event(item, check_block)
        else:
            return
    assert isinstance(item, Event)
    item.name, item.subclass, item.unique_id, item.body_text(), repr(item)
    assert all(field is None or field.__class__ is str
               for field in (item.name, item.subclass, item.unique_id))
    item.get("Caller-Caller-ID-Name"), item.get("variable_sip_h_X"), "Job-UUID" in item
    dict(item.headers.items())


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), LIMITS, st.sampled_from([protocol.SessionParser, protocol.Parser,
                                           protocol.CommandParser]))
# Found in review, after the session test below found the same kind of input: header values
# "ARRAY::..." (split into lists on lookup) in fields the protocol reads itself, and JSON
# events whose values are not strings.
@example(stream=(b"Content-Length: 1\nContent-Length: ARRAY::5\nContent-Type: api/response\n\n"
                 b"x", []), limits={}, parser_class=protocol.SessionParser)
@example(stream=(b"content-type: ARRAY::command/reply\nReply-Text: ARRAY::+OK\n\n", []),
         limits={}, parser_class=protocol.SessionParser)
@example(stream=(b"Content-Length: %d\nContent-Type: text/event-json\n\n%s" % (
    len(JSON_EVENT), JSON_EVENT), []), limits={}, parser_class=protocol.SessionParser)
def test_parsers_raise_only_protocol_errors(stream, limits, parser_class):
    """Any bytes, any chunking, any limits: items come out usable, or ProtocolError is raised."""
    data, cuts = stream
    limits = dict(limits)
    parser = parser_class(limits.pop("max_frame_size", protocol.DEFAULT_MAX_FRAME_SIZE), **limits)
    try:
        for chunk in chunks(data, cuts):
            for item in parser.feed(chunk):
                exercise(item, parser.check_block)
        parser.mid_frame, parser.buffered()
    except ProtocolError:
        pass


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(streams(), SESSION_LIMITS, st.booleans())
# Found by this test: a reply nobody waits for, read during the connect settle time of a
# connect reply whose Unique-ID is unusable, logged a second protocol error for the call.
@example(stream=(b"Event-Name: _undef_\nUnique-ID: %20\nContent-Type: command/reply\n"
                 b"Reply-Text: %2BOK%0A\nSocket-Mode: async\nControl: full\n\n"
                 b"Content-Type: api/response\nContent-Length: 0\n\n", []),
         limits={}, instead_of_reply=True)
# Found by this test (CI of 2026-12-07): a reply whose text was "ARRAY::" became a list, and
# the session's reply_text.startswith() an internal error.
@example(stream=(b": \nContent-Type: command/reply\nReply-Text: ARRAY::\n\n", []), limits={},
         instead_of_reply=True)
def test_a_session_fed_anything_ends_only_in_a_clean_close(stream, limits, instead_of_reply):
    """A session reading fuzzed bytes from its FreeSWITCH, in place of the connect reply or
    after it: no internal error, ever; start() succeeds or raises an ESLError; a call it
    closes is closed with its reason, and a handler waiting on it is woken."""
    data, cuts = stream
    records = Records()
    ours, theirs = socketpair()
    fs = FakeFS(theirs)
    session = Session(ours, SessionSettings(command_timeout=1, frame_timeout=0.5, **limits))
    logger = logging.getLogger("esl_gateway.session")
    logger.addHandler(records)
    try:
        starter = gevent.spawn(session.start)
        if instead_of_reply:
            fs.expect("connect")
        else:
            fs.answer_connect()
            starter.join(2)
            assert starter.successful(), starter.exception
        waiter = gevent.spawn(session.next_event, 5)
        for chunk in chunks(data, cuts):
            if chunk and not session.closed:
                fs.send(chunk)
        gevent.sleep(0)
        fs.close()   # EOF: whatever was not closed before closes now
        starter.join(2)
        assert starter.ready() and isinstance(starter.exception, (ESLError, type(None))), \
            starter.exception
        assert session.wait_closed(2)
        waiter.join(2)
        assert waiter.ready()
        assert isinstance(waiter.exception, (SessionClosed, type(None)))
        lines = [record.getMessage() for record in records.records]
        assert not [line for line in lines if "internal error" in line], lines
        assert not [record for record in records.records if record.exc_info], lines
        protocol_lines = [line for line in lines if "protocol error" in line]
        assert len(protocol_lines) <= 1, lines
        assert session.counters.protocol_errors == len(protocol_lines)
    finally:
        logger.removeHandler(records)
        session._shutdown("test over")
        ours.close()
        theirs.close()
