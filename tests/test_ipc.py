"""Worker → master messages: framing survives any chunking and a hand-over mid-message."""

import pytest
from hypothesis import given, settings, strategies as st

from gateway import ipc

MESSAGES = [ipc.pack("ready", pid=1), ipc.pack("hb", active=3, calls=10**12, events=0),
            ipc.pack("boot_error", traceback="Traceback ...\nImportError: é\n" * 50)]


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, sum(map(len, MESSAGES))), max_size=20))
def test_any_chunking_gives_the_same_messages(cuts):
    """Messages come out whole and in order however the stream was cut."""
    stream = b"".join(MESSAGES)
    reader, got, last = ipc.MessageReader(), [], 0
    for cut in sorted(cuts) + [len(stream)]:
        got += reader.feed(stream[last:cut])
        last = cut
    assert [m["t"] for m in got] == ["ready", "hb", "boot_error"]
    assert got[1]["calls"] == 10**12 and not reader.pending


def test_half_a_message_carries_over_to_a_new_reader():
    """An upgrade hands the pending bytes to the new image, which completes the message."""
    stream = b"".join(MESSAGES)
    first = ipc.MessageReader()
    assert len(first.feed(stream[:len(MESSAGES[0]) + 5])) == 1
    second = ipc.MessageReader(bytes(first.pending))
    assert [m["t"] for m in second.feed(stream[len(MESSAGES[0]) + 5:])] == ["hb", "boot_error"]


def test_garbage_is_an_error_not_a_hang():
    """A corrupt length or payload is reported, never waited on for ever."""
    with pytest.raises(ipc.IPCError):
        ipc.MessageReader().feed(b"\xff\xff\xff\xff")
    with pytest.raises(ipc.IPCError):
        ipc.MessageReader().feed(ipc.HEADER.pack(1) + b"\xc1")
