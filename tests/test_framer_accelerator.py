"""The session's framer in C (gateway/_framer.c) against its reference, the pure-Python
PySessionParser: the same streams in, the same items out (every slot of every Frame and Event,
the headers a handler would read), the same ProtocolError with the same message, the same
buffered state after every read.

Streams: real FreeSWITCH 1.11.2 captures (tests/fixtures) cut at every frame and at random
points, real frames reshuffled and mutated byte by byte, and the hostile streams of
tests/test_fuzz.py; each under the default limits and under small ones that reach every bound.
"""

from __future__ import annotations

import json
import shutil
import sys
import sysconfig
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import protocol
from gateway.protocol import Event, Frame, ProtocolError
from tests.test_fuzz import LIMITS, chunks, streams

FIXTURES = Path(__file__).parent / "fixtures"
ACCELERATED = protocol.SessionParser is not protocol.PySessionParser
needs_accelerator = pytest.mark.skipif(not ACCELERATED, reason="gateway/_framer.c not compiled")


def real_frames() -> list[bytes]:
    """Every frame FreeSWITCH sent in the captures, byte for byte (cut at their offsets)."""
    frames = []
    for path in sorted(FIXTURES.glob("*.frames.json")):
        data = path.with_name(path.name.replace(".frames.json", ".fs.bin")).read_bytes()
        offsets = [f["offset"] for f in json.loads(path.read_text("utf-8")) if f["dir"] == "fs"]
        frames += [data[a:b] for a, b in zip(offsets, [*offsets[1:], len(data)])]
    return frames


REAL_FRAMES = real_frames()


def snapshot(item) -> tuple:
    """All an item is: its class, every slot, and what its accessors hand out."""
    slots = tuple(getattr(item, name) for name in ("_headers", "_block", "_encoded", "body"))
    if item.__class__ is Event:
        return ("Event", *slots, item.name, item.unique_id, item.get("Application-UUID"),
                list(item.headers.items()))
    assert item.__class__ is Frame
    return ("Frame", *slots, item.content_type, item._reply_text, item.reply_text,
            item.is_reply, list(item.headers.items()))


def run(parser_class, reads: list[bytes], limits: dict) -> list:
    """What a session reading ``reads`` sees: per read, its items and the parser's state after
    it, up to the first ProtocolError (the session closes there)."""
    limits = dict(limits)
    parser = parser_class(limits.pop("max_frame_size", protocol.DEFAULT_MAX_FRAME_SIZE), **limits)
    seen = []
    for data in reads:
        try:
            items = parser.feed(data)
        except ProtocolError as exc:
            return [*seen, ("ProtocolError", str(exc))]
        seen.append(([snapshot(item) for item in items], parser.mid_frame, parser.buffered()))
    return seen


def assert_same(reads: list[bytes], limits: dict | None = None) -> None:
    limits = limits or {}
    assert run(protocol.SessionParser, reads, limits) == run(protocol.PySessionParser, reads,
                                                              limits)


def test_the_accelerator_is_built_where_a_compiler_is():
    """Guards against a build that silently fell back to pure Python where it need not."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) here: the pure-Python framer serves")
    assert ACCELERATED, "gateway/_framer.c was not compiled: reinstall (pip install -e .)"
    assert protocol.ACCELERATED


@needs_accelerator
@pytest.mark.parametrize("path", sorted(FIXTURES.glob("*.fs.bin")), ids=lambda p: p.stem)
def test_real_captures_whole_frame_by_frame_and_byte_by_byte(path):
    data = path.read_bytes()
    assert_same([data])
    assert_same(REAL_FRAMES)
    assert_same([data[i:i + 1] for i in range(0, min(len(data), 6000))])


@needs_accelerator
def test_every_real_frame_is_built_in_c_not_handed_back():
    """The fast path covers what FreeSWITCH really sends: no reference function is called for
    any frame of the captures (else the accelerator would accelerate little)."""
    called = []

    def spy(function):
        def wrapper(*args):
            called.append(function.__name__)
            return function(*args)
        return wrapper

    bindings = list(protocol.framer_bindings())
    bindings[3:7] = map(spy, bindings[3:7])   # the reference functions
    assert all(callable(function) for function in bindings[3:7])
    protocol._framer.bind(*bindings)
    try:
        items = protocol.SessionParser().feed(b"".join(REAL_FRAMES))
    finally:
        protocol._framer.bind(*protocol.framer_bindings())
    assert len(items) == len(REAL_FRAMES)
    assert called == []


def plain(event: bytes) -> bytes:
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(event) + event


@needs_accelerator
@pytest.mark.parametrize("data, message", [
    (b"Content-Length: 99999999999999999999\nContent-Type: text/event-plain\n\n",
     "Content-Length 99999999999999999999 exceeds the 8388608-byte limit"),
    (b"Content-Length: 0009\nContent-Type: api/response\n\n123456789", None),
    (b"Content-Type: text/disconnect-notice\nContent-Length: 4\nX\n\nbody", None),
    (b"Content-Type: text/disconnect-notice\ncontent-length: 4\n\nbody", None),
    (b"Content-Type: x\nContent-Length: 4\nContent-Length: 2\n\nbody", None),
    (b"Content-Type: x\r\nContent-Length: 2\r\n\r\nbody", None),
    (plain(b"Ev\n"), None),
    (plain(b"Event-Name: X\nContent-Length: 12\n\nab"), None),   # a body shorter than said
    (plain(b"Event-Name: X\nContent-Length: 2\n\nabcd"), None),
    (plain(b"Event-Name: X\nContent-Length: 0\n\nab"), None),
    (plain(b"Event-Name: X\nContent-Length: 002\r\n\nabc"), None),
    (plain(b"Event-Name: X\nContent-Length: 2 \n\nabc"), None),
    (plain(b"Event-Name: X\nContent-Length: -2\n\nabc"), None),
    (plain(b"Event-Name: X\nContent-Length: 99999999999999999999\n\nab"), None),
    (plain(b"Event-Name: X\nx: Content-Length: 9\n\nab"), None),
    (plain(b"Event-Name: X\nContent-Length: 9"), None),
    (plain(b"Event-Name: %zz\nA: b%4\n\n"), None),
    (plain(b"Event-Name: \xc3\xa9\n\n"), None),
    (plain(b"Event-Name: A\r\nB: c\n\n"), None),
    (plain(b"A: b\nEvent-Name: X\n\n"), None),
    (b"Event-Name: CHANNEL_DATA\nA: %\nContent-Type: command/reply\n\n", None),
    (b"Event-Name: CHANNEL_DATA\nReply-Text: +OK\n\n", None),
    (b"Content-Type: command/reply\nReply-Text: \x00\n\n", None),
])
def test_edges_of_the_fast_path(data, message):
    """Each shape the C code reads itself, and each it must hand to the reference."""
    assert_same([data])
    assert_same([data[:len(data) // 2], data[len(data) // 2:]])
    if message is not None:
        assert run(protocol.SessionParser, [data], {})[-1] == ("ProtocolError", message)


@st.composite
def mutated_real_streams(draw) -> tuple[bytes, list[int]]:
    """Real frames in any order, a few bytes flipped, dropped or repeated, cut anywhere."""
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(REAL_FRAMES), min_size=1,
                                            max_size=6))))
    for _ in range(draw(st.integers(0, 4))):
        at = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "drop", "dup", "crlf"]))
        if action == "flip":
            data[at] = draw(st.sampled_from([0, 0x0A, 0x0D, 0x25, 0x3A, 0x20, 0xC3, 0xFF,
                                             draw(st.integers(0, 255))]))
        elif action == "drop":
            del data[at]
        elif action == "dup":
            data.insert(at, data[at])
        else:
            data[at:at] = b"\r"
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=6)))
    return bytes(data), cuts


@needs_accelerator
@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_real_streams() | streams(), LIMITS)
def test_mutated_real_and_hostile_streams_give_the_same_items_and_errors(stream, limits):
    data, cuts = stream
    assert_same(list(chunks(data, cuts)), limits)


@needs_accelerator
def test_check_block_and_limits_are_the_reference_ones():
    parser = protocol.SessionParser(1000, max_header_block=50, max_headers=3, max_line_length=9)
    reference = protocol.PySessionParser(1000, max_header_block=50, max_headers=3,
                                         max_line_length=9)
    for name in ("max_frame_size", "max_header_block", "max_headers", "max_line_length",
                 "_check_above"):
        assert getattr(parser, name) == getattr(reference, name)
    for block, encoded in [(b"a: b", False), (b"a: b\nc: d\ne: f\ng: h", False),
                           (b"a: 0123456789", False), (b"a: b%zz", True), (b"a\x00", False),
                           (b"x" * 60, False), (b"a: \xff", True)]:
        outcomes = []
        for checker in (parser.check_block, reference.check_block):
            try:
                outcomes.append(checker(block, "event header block", encoded))
            except ProtocolError as exc:
                outcomes.append(str(exc))
        assert outcomes[0] == outcomes[1], block


HEADER_NAMES = st.sampled_from(["Event-Name", "Unique-ID", "Content-Length", "content-length",
                                "Application-UUID", "Hangup-Cause", "Caller-Caller-ID-Number",
                                "X", "x", "A", "\u212aey", "Key", "a b", "a:b", "", "é"])


@st.composite
def header_blocks(draw) -> bytes:
    """Header blocks with the shapes a lookup must get right: repeats, names in another case,
    continuation lines, "name:" alone, '\\r', bytes beyond ASCII."""
    lines = draw(st.lists(st.one_of(
        st.tuples(HEADER_NAMES, st.sampled_from([": ", ":", ": :", " : "]),
                  st.sampled_from(["v", "", "%41", "a: b", "\xe9", "1", "ARRAY::a|:b",
                                   "%zz", "%E2%82", "%2BOK%0A", "ARRAY%3A%3Aa%7C%3Ab",
                                   "%C3%A9%", "%%41%4", "%e2%82%ac"])).map("".join),
        st.sampled_from(["continued", "Key: k", "KEY: K", "key:", "x\r", ""])), max_size=7))
    return "\n".join(lines).encode()


@needs_accelerator
@settings(max_examples=2000, deadline=None)
@given(header_blocks(), HEADER_NAMES, st.booleans())
def test_header_search_gives_the_reference_answer(block, name, encoded):
    """The C search and lookup (gateway._framer.search_block, lookup_block) against
    _py_search_block and _py_lookup_block, and both against the header split they stand for
    wherever they claim to know."""
    keys = protocol._search_keys_of(name)
    found = protocol._framer.search_block(block, *keys)
    assert found is protocol._py_search_block(block, *keys) or \
        found == protocol._py_search_block(block, *keys)
    if found is not protocol._UNSURE:
        split = protocol.Headers(protocol._split_header_block(block)).raw(name, protocol._MISSING)
        assert found is split or found == split
    default = object()
    value = protocol._framer.lookup_block(block, name, encoded, default)
    assert value == protocol._py_lookup_block(block, name, encoded, default)
    if value is not protocol._UNSURE:
        headers = protocol.Headers(protocol._split_header_block(block), encoded=encoded)
        assert value == headers.get(name, default)


@needs_accelerator
def test_header_search_on_every_header_of_the_real_captures():
    for frame in REAL_FRAMES:
        block = frame.split(b"\n\n", 1)[0]
        for name, _ in protocol._split_header_block(block):
            keys = (name.encode() + b": ", name.lower().encode() + b":")
            assert protocol._framer.search_block(block, *keys) == \
                protocol._py_search_block(block, *keys)


@needs_accelerator
def test_a_framer_between_whole_frames_holds_no_buffer():
    """A held call's framer costs its object only: what a read framed whole is not kept (the
    benchmark holds 10 000 calls, at most 20 KiB each, all told)."""
    parser = protocol.SessionParser()
    empty = sys.getsizeof(parser)
    frames = b"".join(REAL_FRAMES[:5])
    parser.feed(frames)
    assert sys.getsizeof(parser) == empty
    parser.feed(frames[:-10])   # a frame cut short is kept, and only it
    assert empty < sys.getsizeof(parser) <= empty + len(REAL_FRAMES[4]) * 2
    assert parser.feed(frames[-10:])
    assert sys.getsizeof(parser) == empty and not parser.mid_frame and parser.buffered() == b""
