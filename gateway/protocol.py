"""Sans-IO FreeSWITCH Event Socket (ESL) protocol: bytes in, frames out; commands in, bytes out.

Nothing here touches a socket or gevent, so the same code serves the worker's sessions, the
FreeSWITCH simulator and the tests, and it can be fed with any chunking or fuzzed.

Framing (both directions): a header block ends at the first blank line; if it carries
``Content-Length: N``, exactly N body bytes follow. Rules that naive parsers get wrong and that
this module exists to get right (see docs/esl-protocol.md §3, §4, §9 and §13):

* the connect reply is a serialised CHANNEL_DATA event: ``Content-Type`` is not the first header,
  there is no Content-Length, and every value is url-encoded (``Reply-Text: %2BOK%0A``);
* header blocks are split into lines first, then each line on its first ``": "``, and only then is
  each value url-decoded, so an encoded ``%0A`` in a caller-controlled value can never forge a header;
* bodies stay bytes and are cut by Content-Length before any decoding; text decoding never raises;
* a frame larger than the configured limit is a ``ProtocolError`` for that connection only, and so
  is a header block that is too large, has too many lines or too long a line: whatever a peer sends,
  the only exception that leaves this module is ``ProtocolError`` (tests/test_fuzz.py).
"""

from __future__ import annotations

import functools
import json
import re
from typing import Iterable, Iterator, Mapping
from urllib.parse import unquote
from xml.etree import ElementTree
from xml.sax.saxutils import escape as xml_escape

try:   # the session's framer and header search in C, where they were compiled
    from gateway import _framer
except ImportError:   # not compiled where this was installed (no C compiler): still correct
    _framer = None

DEFAULT_MAX_FRAME_SIZE = 8 * 1024 * 1024
DEFAULT_MAX_HEADER_BLOCK = 1024 * 1024
DEFAULT_MAX_HEADERS = 10000
DEFAULT_MAX_LINE_LENGTH = 256 * 1024
ARRAY_PREFIX = "ARRAY::"

CONTENT_COMMAND_REPLY = "command/reply"
CONTENT_API_RESPONSE = "api/response"
CONTENT_DISCONNECT_NOTICE = "text/disconnect-notice"
CONTENT_LOG = "log/data"
EVENT_CONTENT_TYPES = ("text/event-plain", "text/event-json", "text/event-xml")
# The frames that answer a command (each takes one slot of the FIFO of pending commands).
REPLY_CONTENT_TYPES = (CONTENT_COMMAND_REPLY, CONTENT_API_RESPONSE)
EVENT_FORMATS = ("plain", "json", "xml")
# The dialplan's `socket host:port [async] [full]` keywords, and what the connect reply then says
# (Socket-Mode, Control). Without `async` the socket is static; `sync` is not a keyword.
SOCKET_MODES = {"async full": ("async", "full"), "async": ("async", "single-channel"),
                "static": ("static", "full")}


class ProtocolError(Exception):
    """The peer sent bytes that cannot be ESL; the connection that carried them must be closed."""


# --------------------------------------------------------------------------------------------
# Header blocks
# --------------------------------------------------------------------------------------------

_MISSING = object()


class Headers(Mapping):
    """Ordered, case-insensitive header map whose values are url-decoded lazily, on lookup.

    FreeSWITCH looks headers up case-insensitively, so we do too. It also writes every name in
    one canonical case, so the map keeps names as sent and folds case only on a miss, lazily: an
    event carries ~100 headers and a worker reads a handful. Decoding also happens on lookup.
    ``ARRAY::a|:b`` values come back as lists, as the reference C client splits them.
    """

    __slots__ = ("_values", "_folded", "_encoded")

    def __init__(self, pairs: Iterable[tuple[str, object]] = (), encoded: bool = False):
        self._values: dict[str, object] = dict(pairs)   # the last duplicate wins
        self._folded: dict[str, str] | None = None       # lower-case name -> name as sent
        self._encoded = encoded

    def _name(self, name: str) -> str | None:
        """The name as sent for ``name`` in any case, or None."""
        if name in self._values:
            return name
        if self._folded is None:
            self._folded = {key.lower(): key for key in self._values}
        return self._folded.get(name.lower()) if isinstance(name, str) else None

    def _raw_value(self, name: str):
        """The value as on the wire for ``name`` in any case, or _MISSING."""
        value = self._values.get(name, _MISSING)
        if value is _MISSING:
            key = self._name(name)
            if key is not None:
                value = self._values[key]
        return value

    def __getitem__(self, name: str):
        value = self._raw_value(name)
        if value is _MISSING:
            raise KeyError(name)
        return self._decode(value)

    def get(self, name: str, default=None):
        value = self._raw_value(name)
        return default if value is _MISSING else self._decode(value)

    def __contains__(self, name) -> bool:
        return self._name(name) is not None

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def raw(self, name: str, default=None):
        """The value exactly as it was on the wire (still url-encoded where it was)."""
        value = self._raw_value(name)
        return default if value is _MISSING else value

    def _decode(self, value):
        return _decode_value(value, self._encoded)

    def __repr__(self) -> str:
        return f"Headers({dict(self.items())!r})"


def _decode_value(value, encoded: bool):
    """A header value as handed out: url-decoded where FreeSWITCH encoded it, arrays split."""
    if value.__class__ is str:
        if encoded and "%" in value:
            value = unquote(value, errors="replace")
        if value.startswith(ARRAY_PREFIX):
            return value[len(ARRAY_PREFIX):].split("|:")
    return value


def as_text(value):
    """A header's value as one string, for the protocol's own fields (an event's name, a
    Job-UUID, a reply's text): an ``ARRAY::a|:b`` value (or a JSON event's array) comes back as
    FreeSWITCH would send it in a plain event, so hostile input cannot turn such a field into a
    list. None (no such header) stays None."""
    if value.__class__ is list:
        return ARRAY_PREFIX + "|:".join(value)
    return value


# One header per line, split at the first ": " (the common case, matched in C).
_HEADER_LINE = re.compile(r"^(.*?): (.*)$", re.MULTILINE)


def _split_header_block(block: bytes) -> list[tuple[str, str]]:
    """Split a header block into (name, value) pairs; values stay exactly as on the wire.

    A line without ``": "`` is a continuation of the previous value: FreeSWITCH inserts some
    values raw (``getvar`` replies), and a newline inside one must not be lost or become a header.
    """
    text = block.decode("utf-8", "replace")
    if "\r" in text:
        text = text.replace("\r", "")
    pairs = _HEADER_LINE.findall(text)
    if len(pairs) == text.count("\n") + 1:
        return pairs   # every line was a header line
    pairs = []
    for line in text.split("\n"):
        name, sep, value = line.partition(": ")
        if sep:
            pairs.append((name, value))
        elif line.endswith(":") and line.count(":") == 1:
            pairs.append((line[:-1], ""))
        elif pairs:
            last_name, last_value = pairs[-1]
            pairs[-1] = (last_name, last_value + "\n" + line)
    return pairs


# --------------------------------------------------------------------------------------------
# Frames from FreeSWITCH
# --------------------------------------------------------------------------------------------

class _BlockHeaders(Headers):
    """Headers still held as their header block: a lookup searches the bytes, and only what
    needs the whole map (iteration, ``len``, ``in``, a lookup the search cannot settle exactly)
    splits it, once.

    A call's channel data and events carry ~100 headers each, of which the session and most
    handlers read a handful; splitting them all for that was most of the parsing cost, and a
    split map costs several times the bytes of a held call's channel data.
    """

    __slots__ = ("_block",)

    def __init__(self, block: bytes, encoded: bool):
        self._block, self._folded, self._encoded = block, None, encoded

    def __getattr__(self, name: str):
        # Reached only while the _values slot is unset: the whole map is wanted now.
        if name != "_values":
            raise AttributeError(name)
        self._values = dict(_split_header_block(self._block))   # the last duplicate wins
        self._block = None
        return self._values

    def _raw_value(self, name: str):
        block = self._block
        if block is not None and name.__class__ is str:
            value = _search_value(block, name)
            if value is not _UNSURE:
                return value
        return Headers._raw_value(self, name)

    def get(self, name: str, default=None):
        block = self._block   # the session reads the channel data's few headers so
        if block is not None and name.__class__ is str:
            value = _lookup_block(block, name, self._encoded, default)
            if value is not _UNSURE:
                return value
        return Headers.get(self, name, default)


class _LazyHeaders:
    """Keeps a header block as bytes until a header is asked for (most frames and events of a
    call are only ever asked for their type or name)."""

    __slots__ = ("_headers", "_block", "_encoded")

    def _set_headers(self, headers: Headers | None, block: bytes | None, encoded: bool) -> None:
        self._headers, self._block, self._encoded = headers, block, encoded

    @property
    def headers(self) -> Headers:
        if self._headers is None:
            self._headers = _BlockHeaders(self._block, self._encoded)
            self._block = None
        return self._headers

    def _lookup(self, name: str, default=None):
        """``headers.get(name, default)``, searching the block itself while no map was asked for
        (the session looks up a few headers of some events)."""
        if self._headers is None and name.__class__ is str:
            value = _lookup_block(self._block, name, self._encoded, default)
            if value is not _UNSURE:
                return value
        return self.headers.get(name, default)


_UNSURE = object()
# A name a byte search finds exactly as the header split would: no separator, no line break.
_PLAIN_NAME = re.compile(r"[^:\r\n]+")
# name -> (b"name: ", b"lowered name:"), (b"", b"") when not a plain name: a call looks up the
# same few names again and again. Bounded, since a handler may look up names without end.
_search_keys: dict[str, tuple[bytes, bytes]] = {}
_SEARCH_KEYS_KEPT = 1024


def _search_value(block: bytes, name: str):
    """Header ``name``'s value as on the wire, found in an unsplit block by byte search.

    Returns the value, _MISSING when the block has no such header, or _UNSURE when only splitting
    the block settles it exactly as ``Headers`` would: a repeated name, a ``\r``, a value that
    may go on over the next line, or (in a block that is not ASCII) a name in another case.
    The search itself is the C framer's where it was built (``_search_block``).
    """
    return _search_block(block, *(_search_keys.get(name) or _search_keys_of(name)))


def _search_keys_of(name: str) -> tuple[bytes, bytes]:
    """(b"Name: ", b"name:") for the search, (b"", b"") where it cannot find ``name`` exactly;
    kept for the next lookup while the cache has room."""
    keys = ((name.encode() + b": ", name.lower().encode() + b":")
            if _PLAIN_NAME.fullmatch(name) else (b"", b""))
    if len(_search_keys) < _SEARCH_KEYS_KEPT:
        _search_keys[name] = keys
    return keys


def _py_lookup_block(block: bytes, name: str, encoded: bool, default):
    """Header ``name`` of an unsplit block as ``Headers(...).get(name, default)`` hands it out,
    or _UNSURE when only the split can tell; in C where it was built (``_lookup_block``)."""
    value = _search_value(block, name)
    if value is _MISSING:
        return default
    return value if value is _UNSURE else _decode_value(value, encoded)


def _py_search_block(block: bytes, prefix: bytes, lowered: bytes):
    """_search_value's search: ``prefix`` is ``b"Name: "``, ``lowered`` ``b"name:"`` (as
    ``name.lower()`` folds it), both empty for a name a byte search cannot find exactly."""
    if not prefix or b"\r" in block:
        return _UNSURE
    at = _line_start(block, prefix)
    if at < 0:
        # Absent in any case? Header lines start "name:" ("name:" alone is an empty value).
        if block.isascii() and _line_start(block.lower(), lowered) < 0:
            return _MISSING
        return _UNSURE
    if block.find(b"\n" + prefix[:-1], at) >= 0:   # repeated, perhaps as "Name:" (the last wins)
        return _UNSURE
    end = block.find(b"\n", at)
    if end >= 0 and not _is_header_line(block, end + 1):
        return _UNSURE
    return block[at + len(prefix):end if end >= 0 else len(block)].decode("utf-8", "replace")


_search_block = _framer.search_block if _framer is not None else _py_search_block
_lookup_block = _framer.lookup_block if _framer is not None else _py_lookup_block


def _is_header_line(block: bytes, start: int) -> bool:
    """Whether the line at ``start`` is a header of its own, not the previous value's
    continuation (see _split_header_block)."""
    end = block.find(b"\n", start)
    line = block[start:end if end >= 0 else len(block)]
    return b": " in line or (line.endswith(b":") and line.count(b":") == 1)


class Frame(_LazyHeaders):
    """One frame from FreeSWITCH: outer headers (split on first use) and an optional raw body."""

    __slots__ = ("body", "content_type", "_reply_text")

    def __init__(self, headers: Headers, body: bytes | None):
        self._set_headers(headers, None, False)
        self.body = body
        self.content_type: str | None = as_text(headers.get("Content-Type"))
        self._reply_text = None

    @classmethod
    def from_block(cls, block: bytes, body: bytes | None, common: re.Match | None) -> "Frame":
        """``common``: the block's _COMMON_OUTER match, or None (the framer matched it)."""
        frame = cls.__new__(cls)
        frame.body = body
        if common is not None:
            frame._set_headers(None, block, False)
            if common[3] is not None:   # a reply: its text is all that is read
                frame.content_type = CONTENT_COMMAND_REPLY
                frame._reply_text = common[4].decode("utf-8", "replace")
            else:                       # an event, api response or log line
                frame.content_type = common[2].decode("utf-8", "replace")
                frame._reply_text = None
            return frame
        frame._reply_text = None
        # The connect reply is a serialised CHANNEL_DATA event: its values are url-encoded, so
        # its bytes are plain ASCII and its escapes whole (checked now, once per call).
        encoded = body is None and _line_start(block, b"Event-Name: ") >= 0
        if encoded:
            _check_encoded(block, "channel data")
        frame._set_headers(None, block, encoded)
        frame.content_type = _line_value(block, b"Content-Type: ")
        if frame.content_type is None and b"ontent-" in block:   # another spelling
            frame.content_type = as_text(frame.headers.get("Content-Type"))
        return frame

    @property
    def is_reply(self) -> bool:
        """A frame that answers a command (and so takes one slot of the FIFO of pending commands)."""
        return self.content_type in REPLY_CONTENT_TYPES

    @property
    def reply_text(self) -> str:
        text = self._reply_text
        return (as_text(self._lookup("Reply-Text", "")) or "") if text is None else text

    def body_text(self) -> str:
        return (self.body or b"").decode("utf-8", "replace")

    def __repr__(self) -> str:
        size = None if self.body is None else len(self.body)
        return f"<Frame {self.content_type} body={size}>"


_BLOCK_END_CR = re.compile(rb"\n\r*\n")


def _line_start(block: bytes, prefix: bytes) -> int:
    """Where the first line starting with ``prefix`` (exact case) begins, or -1."""
    if block.startswith(prefix):
        return 0
    at = block.find(b"\n" + prefix)
    return at if at < 0 else at + 1


def _line_value(block: bytes, prefix: bytes) -> str | None:
    """The value of the header line starting with ``prefix`` (exact case), or None."""
    at = _line_start(block, prefix)
    if at < 0:
        return None
    end = block.find(b"\n", at)
    value = block[at + len(prefix):end if end >= 0 else len(block)]
    return value.rstrip(b"\r").decode("utf-8", "replace")


class _Framer:
    """Cuts a byte stream into frames, enforcing a size limit; each subclass's ``_frame`` builds
    one from (header block, body, common). A method, not a function kept on the instance: a bound
    method kept there would make every parser a reference cycle, freed by the garbage collector
    instead of at once, one per call.

    Shared by both directions, since FreeSWITCH frames and our commands are framed alike. A block
    ends at two newlines in a row, ignoring any ``\r`` between them (FreeSWITCH's own rule).
    Only the Content-Length is read here; the header lines are split by whoever needs them.
    ``common`` is the block's _COMMON_OUTER match (or None), matched once for both uses.

    What a peer can make us hold is bounded: the frame (``max_frame_size``), a header block
    (``max_header_block`` bytes, ``max_headers`` lines, ``max_line_length`` per line), before
    any of it is split or decoded.
    """

    __slots__ = ("max_frame_size", "max_header_block", "max_headers", "max_line_length",
                 "_check_above", "_buf", "_scan_from", "_pending", "_body_len")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE,
                 max_header_block: int = DEFAULT_MAX_HEADER_BLOCK,
                 max_headers: int = DEFAULT_MAX_HEADERS,
                 max_line_length: int = DEFAULT_MAX_LINE_LENGTH):
        self.max_frame_size = max_frame_size
        self.max_header_block = min(max_header_block, max_frame_size)   # part of a frame
        self.max_headers = max_headers
        self.max_line_length = max_line_length
        # A block of n bytes has at most n lines, none longer than n: smaller ones need no count.
        self._check_above = min(self.max_header_block, max_headers, max_line_length)
        self._buf = bytearray()
        self._scan_from = 0          # the block end cannot start before this offset
        self._pending = None         # (header block, common) waiting for the block's body
        self._body_len = 0

    @property
    def mid_frame(self) -> bool:
        """True while part of a frame is buffered (EOF now would cut it). Asked after every
        read (the frame deadline): a body being buffered, or a block begun (after a feed the
        buffer never starts with a blank line), is told without copying the buffer."""
        buf = self._buf
        return self._pending is not None or (
            bool(buf) and (buf[0] not in b"\r\n" or bool(buf.strip(b"\r\n"))))

    def buffered(self) -> bytes:
        """The bytes fed but not yet returned as frames, for whoever reads the stream on
        without this framer (a header block waiting for its body comes back ended by a plain
        blank line)."""
        if self._pending is None:
            return bytes(self._buf)
        return self._pending[0] + b"\n\n" + bytes(self._buf)

    def feed(self, data: bytes) -> list:
        buf = self._buf
        buf += data
        out = []
        limit = self.max_frame_size
        while True:
            if self._pending is None:
                if buf[:1] in (b"\n", b"\r"):
                    # Blank lines between blocks are noise (FreeSWITCH discards them too).
                    del buf[:len(buf) - len(buf.lstrip(b"\r\n"))]
                    self._scan_from = 0
                start = buf.find(b"\n\n", self._scan_from)
                stop = start + 2
                # A "\n\r...\n" end can only come first if a "\r" does: look only up to there.
                if buf.find(b"\r", self._scan_from, start if start >= 0 else len(buf)) >= 0:
                    match = _BLOCK_END_CR.search(buf, self._scan_from)
                    start, stop = (match.start(), match.end()) if match else (-1, -1)
                if start < 0:
                    if len(buf) > self.max_header_block:
                        raise ProtocolError(f"header block exceeds {self.max_header_block} "
                                            "bytes without ending")
                    self._scan_from = max(buf.rfind(b"\n"), 0)
                    return out
                block = bytes(buf[:start])
                del buf[:stop]
                self._scan_from = 0
                self.check_block(block)
                common = _COMMON_OUTER.fullmatch(block)
                if common is None:
                    length = _block_content_length(block, limit)
                elif common[1] is None:   # a plain command reply
                    length = None
                else:                     # digits only, by the regex
                    length = int(common[1])
                    if length > limit:
                        raise ProtocolError(f"Content-Length {length} exceeds the {limit}-byte "
                                            "limit")
                if length is None:
                    out.append(self._frame(block, None, common))
                    continue
                self._pending, self._body_len = (block, common), length
            if len(buf) < self._body_len:
                return out
            body = bytes(buf[:self._body_len])
            del buf[:self._body_len]
            block, common = self._pending
            out.append(self._frame(block, body, common))
            self._pending = None

    def check_block(self, block: bytes, what: str = "header block", encoded: bool = False
                    ) -> None:
        """Refuse a header block over the size, line-count or line-length limit, or one that
        FreeSWITCH cannot have written: with a NUL byte (its values are C strings), or, where
        it url-encodes every value (``encoded``), invalid UTF-8 or a ``%`` that starts no
        escape. Cheap for a block within limits: a few C scans and a comparison."""
        if encoded:
            _check_encoded(block, what)
        elif b"\0" in block:
            _check_text(block, what)
        size = len(block)
        if size <= self._check_above:
            return
        if size > self.max_header_block:
            raise ProtocolError(f"{what} of {size} bytes exceeds the {self.max_header_block}-byte "
                                "limit")
        if size > self.max_headers:
            lines = block.count(b"\n") + 1
            if lines > self.max_headers:
                raise ProtocolError(f"{what} of {lines} lines exceeds the {self.max_headers}-line "
                                    "limit (--max-headers)")
        if size > self.max_line_length:
            longest = max(map(len, block.split(b"\n")))
            if longest > self.max_line_length:
                raise ProtocolError(f"{what} has a line of {longest} bytes, over the "
                                    f"{self.max_line_length}-byte limit (--max-line-length)")


# In a url-encoded block every "%" starts an escape: FreeSWITCH writes a literal "%" as "%25".
_BAD_ESCAPE = re.compile(rb"%(?![0-9A-Fa-f]{2})")


def _check_encoded(block: bytes, what: str) -> None:
    """A url-encoded block (the channel data, a plain event's headers) as FreeSWITCH writes it:
    plain ASCII without NUL, every ``%`` the start of an escape. (An escape of an invalid UTF-8
    sequence is FreeSWITCH's own: it encodes whatever bytes a caller sent; it decodes to
    U+FFFD.)"""
    if b"\0" in block or not block.isascii():
        _check_text(block, what)
    bad = _BAD_ESCAPE.search(block)
    if bad is not None:
        at = bad.start()
        escape = block[at:at + 3].split(b"\n")[0]
        raise ProtocolError(f"invalid percent-escape {escape!r} in the {what} at offset {at}")


def _check_text(block: bytes, what: str) -> None:
    at = block.find(b"\0")
    if at >= 0:
        raise ProtocolError(f"NUL byte in the {what} at offset {at}")
    try:
        block.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"invalid UTF-8 in the {what} at offset {exc.start}") from None


# The outer blocks of nearly every frame of a call, exactly as mod_event_socket writes them: an
# event, api response or log line (length and type), and a plain command reply. Matched whole by
# one regex they need no header search; any other block takes the general path, same result.
_COMMON_OUTER = re.compile(rb"Content-Length: ([0-9]+)\nContent-Type: ([^\r\n]*)"
                           rb"|Content-Type: (command/reply)\nReply-Text: ([^\r\n]*)")


def _block_content_length(block: bytes, limit: int) -> int | None:
    """The Content-Length of a block that is not one of the common ones, validated."""
    value = _search_value(block, "Content-Length")
    if value is _UNSURE:
        value = Headers(_split_header_block(block)).raw("Content-Length", _MISSING)
    return None if value is _MISSING else _valid_length(value, limit)


def _valid_length(value: str, limit: int | None, what: str = "Content-Length") -> int:
    try:
        length = int(value.strip())
    except ValueError:
        raise ProtocolError(f"invalid {what} {value[:40]!r}") from None
    if length < 0:
        raise ProtocolError(f"negative {what} {length}")
    if limit is not None and length > limit:
        raise ProtocolError(f"{what} {length} exceeds the {limit}-byte limit")
    return length


class Parser(_Framer):
    """FreeSWITCH → us: feed bytes, get complete ``Frame`` objects.

    The connect reply is recognised by its ``Event-Name`` header (it is a serialised CHANNEL_DATA
    event) and is the only outer block whose values are url-decoded; FreeSWITCH writes the other
    frames' outer values raw.
    """

    __slots__ = ()

    def _frame(self, block: bytes, body: bytes | None, common: re.Match | None) -> Frame:
        return Frame.from_block(block, body, common)


# --------------------------------------------------------------------------------------------
# Events (the body of text/event-* frames, and the connect reply)
# --------------------------------------------------------------------------------------------

class Event(_LazyHeaders):
    """A FreeSWITCH event, whatever format it came in: name, case-insensitive headers, raw body.

    A text/event-plain event keeps its header block as bytes until a header is asked for. Its
    name is read once, when it is made: the session and the handler each ask for it.
    """

    __slots__ = ("body", "name")

    def __init__(self, headers: Headers, body: bytes = b""):
        self._set_headers(headers, None, True)
        self.body = body
        self.name: str | None = as_text(headers.get("Event-Name"))

    @classmethod
    def plain(cls, block: bytes, body: bytes) -> "Event":
        """An event whose (url-encoded) header block is split on first use."""
        event = cls.__new__(cls)
        event._set_headers(None, block, True)
        event.body = body
        if block.startswith(b"Event-Name: "):
            # FreeSWITCH always serialises Event-Name first, and names need no decoding.
            event.name = _line_value(block, b"Event-Name: ")
        else:
            event.name = as_text(event.headers.get("Event-Name"))
        return event

    @property
    def subclass(self) -> str | None:
        return as_text(self._lookup("Event-Subclass"))

    @property
    def unique_id(self) -> str | None:
        return as_text(self._lookup("Unique-ID"))

    def __getitem__(self, name: str):
        value = self._lookup(name, _MISSING)
        if value is _MISSING:
            raise KeyError(name)
        return value

    get = _LazyHeaders._lookup   # one call less per lookup: the session makes several a call

    def __contains__(self, name) -> bool:
        return name in self.headers

    def body_text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def __repr__(self) -> str:
        return f"<Event {self.name} {self.unique_id}>"


def parse_event(frame: Frame, check_block=None) -> Event:
    """Turn a text/event-plain|json|xml frame (or the connect reply) into an ``Event``;
    ``check_block``: a framer's check_block, for a plain event's own header block."""
    content_type = frame.content_type
    body = frame.body or b""
    if content_type == "text/event-plain":
        return parse_plain_event(body, check_block)
    if content_type == "text/event-json":
        return _parse_json_event(body)
    if content_type == "text/event-xml":
        return _parse_xml_event(body)
    if frame.body is None and "Event-Name" in frame.headers:
        return Event(frame.headers)
    raise ProtocolError(f"frame of type {content_type!r} is not an event")


def parse_plain_event(data: bytes, check_block=None) -> Event:
    """Cut the event's own body by its inner Content-Length (validated now), headers later;
    ``check_block`` (a framer's) bounds the event's header block."""
    end = data.find(b"\n\n")
    block, rest = (data, b"") if end < 0 else (data[:end], data[end + 2:])
    if check_block is not None:
        check_block(block, "event header block", True)
    # Values are url-encoded in plain events, so this text can only be the header itself.
    value = _line_value(block, b"Content-Length: ") if b"Content-Length: " in block else None
    body = b"" if value is None else rest[:_valid_length(value, None, "inner Content-Length")]
    return Event.plain(block, body)


def _parse_json_event(data: bytes) -> Event:
    try:
        obj = json.loads(data.decode("utf-8", "replace"))
    except (ValueError, RecursionError) as exc:   # a hostile peer can nest arbitrarily deep
        raise ProtocolError(f"malformed JSON event: {exc}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("JSON event is not an object")
    body = obj.pop("_body", "")
    body = body.encode("utf-8") if isinstance(body, str) else b""
    for name, value in obj.items():   # FreeSWITCH writes strings, and arrays of them
        if not (value.__class__ is str or value.__class__ is list and
                all(item.__class__ is str for item in value)):
            raise ProtocolError(f"JSON event header {name[:40]!r} is neither a string nor an "
                                "array of strings")
    return Event(Headers(obj.items(), encoded=False), body)


def _parse_xml_event(data: bytes) -> Event:
    try:
        root = ElementTree.fromstring(data)
    except ElementTree.ParseError as exc:
        raise ProtocolError(f"malformed XML event: {exc}") from None
    headers = root.find("headers")
    pairs = [] if headers is None else [(el.tag, el.text or "") for el in headers]
    body_el = root.find("body")
    body = b"" if body_el is None or body_el.text is None else body_el.text.encode("utf-8")
    return Event(Headers(pairs, encoded=True), body)


# --------------------------------------------------------------------------------------------
# Commands (us → FreeSWITCH)
# --------------------------------------------------------------------------------------------

_FORBIDDEN_IN_LINE = re.compile(r"[\r\n]")


def _check_line(what: str, text: str) -> str:
    if _FORBIDDEN_IN_LINE.search(text):
        raise ValueError(f"{what} must not contain a newline: {text[:60]!r}")
    return text


def command(line: str, headers: Iterable[tuple[str, str]] = (), body: bytes | str | None = None
            ) -> bytes:
    """Serialise one command: the command line, ``Name: value`` headers, optional body.

    FreeSWITCH does not url-decode what we send, so a newline can only travel in a body; one in
    the command line or a header value would end the block early and inject a second command.
    The finished block is checked once: a line break in a piece shows as one line too many.
    """
    pairs = list(headers)
    if body is not None:
        data = body.encode("utf-8") if isinstance(body, str) else body
        pairs.append(("Content-Length", len(data)))
    block = _block(pairs, line)
    # The command line, one line per header and the blank line: any more is a line break inside.
    if b"\r" in block or block.count(b"\n") != len(pairs) + 2:
        pieces = [line, *(f"{name}: {value}" for name, value in pairs)]
        culprit = next(piece for piece in pieces if _FORBIDDEN_IN_LINE.search(piece))
        raise ValueError(f"a command line or header must not contain a line break: "
                         f"{culprit[:60]!r}")
    return block if body is None else block + data


def _block(pairs: Iterable[tuple[str, object]], first_line: str | None = None) -> bytes:
    """``Name: value`` lines (after an optional command line) and the blank line ending them."""
    lines = [] if first_line is None else [first_line]
    lines += [f"{name}: {value}" for name, value in pairs]
    return ("\n".join(lines) + "\n\n").encode("utf-8")


def connect() -> bytes:
    return b"connect\n\n"


def myevents(fmt: str = "plain") -> bytes:
    return b"myevents\n\n" if fmt == "plain" else command(f"myevents {_event_format(fmt)}")


def event(fmt: str, names: Iterable[str]) -> bytes:
    return command(" ".join(["event", _event_format(fmt), *names]))


def nixevent(names: Iterable[str]) -> bytes:
    return command(" ".join(["nixevent", *names]))


def noevents() -> bytes:
    return b"noevents\n\n"


def filter_add(header: str, value: str) -> bytes:
    return command(f"filter {header} {value}")


def filter_delete(header: str, value: str | None = None) -> bytes:
    return command(f"filter delete {header}" + ("" if value is None else f" {value}"))


def linger(seconds: int | None = None) -> bytes:
    """``linger`` alone lingers for ever inside FreeSWITCH; callers should pass a finite time."""
    return command("linger" if seconds is None else f"linger {int(seconds)}")


def nolinger() -> bytes:
    return b"nolinger\n\n"


def exit_() -> bytes:
    return b"exit\n\n"


def resume() -> bytes:
    return b"resume\n\n"


def getvar(name: str) -> bytes:
    return command(f"getvar {name}")


def divert_events(on: bool) -> bytes:
    return command("divert_events on" if on else "divert_events off")


def log(level: str | int) -> bytes:
    return command(f"log {level}")


def nolog() -> bytes:
    return b"nolog\n\n"


def api(cmd: str) -> bytes:
    return command(f"api {cmd}")


def bgapi(cmd: str, job_uuid: str) -> bytes:
    return command(f"bgapi {cmd}", [("Job-UUID", job_uuid)])


def sendmsg(headers: Iterable[tuple[str, str]], uuid: str | None = None,
            body: bytes | str | None = None) -> bytes:
    line = "sendmsg" if uuid is None else f"sendmsg {uuid}"
    if body is not None:
        headers = [*headers, ("Content-Type", "text/plain")]
    return command(line, headers, body)


def execute(app: str, arg: str | None = None, *, event_uuid: str | None = None,
            loops: int | None = None, event_lock: bool = False, async_: bool = False,
            uuid: str | None = None) -> bytes:
    """``sendmsg`` with ``call-command: execute``.

    An argument with a newline goes in a text/plain body, the only form FreeSWITCH passes intact
    (it never decodes header values).
    """
    headers = [("call-command", "execute"), ("execute-app-name", _check_line("app", app))]
    body = None
    if arg is not None and arg != "":
        if "\n" in arg or "\r" in arg:
            body = arg
        else:
            headers.append(("execute-app-arg", arg))
    if loops is not None:
        headers.append(("loops", str(int(loops))))
    if event_lock:
        headers.append(("event-lock", "true"))
    if async_:
        headers.append(("async", "true"))
    if event_uuid is not None:
        headers.append(("Event-UUID", event_uuid))
    return sendmsg(headers, uuid=uuid, body=body)


def hangup(cause: str = "NORMAL_CLEARING", uuid: str | None = None) -> bytes:
    return sendmsg([("call-command", "hangup"), ("hangup-cause", cause)], uuid=uuid)


def _event_format(fmt: str) -> str:
    if fmt not in EVENT_FORMATS:
        raise ValueError(f"event format must be one of {EVENT_FORMATS}, not {fmt!r}")
    return fmt


class Command:
    """One command as FreeSWITCH reads it: the command line, its headers and body."""

    __slots__ = ("line", "headers", "body")

    def __init__(self, line: str, headers: Headers, body: bytes | None):
        self.line = line
        self.headers = headers
        self.body = body

    @property
    def name(self) -> str:
        return self.line.split(" ", 1)[0].lower()

    @property
    def args(self) -> str:
        parts = self.line.split(" ", 1)
        return parts[1] if len(parts) > 1 else ""

    def __repr__(self) -> str:
        return f"<Command {self.line!r}>"


class PySessionParser(_Framer):
    """FreeSWITCH → a session: a ``Parser`` that hands out a plain event's frame as its
    ``Event`` (what the session wants of it), and every other frame as a ``Frame``.

    Most frames of a call are plain events: this skips a Frame per event and its dispatch.
    A plain event's own header block is held to the same limits as the frame's.

    The reference: sessions use ``SessionParser``, the same framer in C (gateway/_framer.c)
    where it was built, which defers to this module's functions whenever it is not sure.
    """

    __slots__ = ()

    def _frame(self, block: bytes, body: bytes | None, common: re.Match | None
               ) -> Event | Frame:
        if common is not None and common[2] == b"text/event-plain":   # body: set, by its length
            return parse_plain_event(body, self.check_block)
        return Frame.from_block(block, body, common)


def framer_bindings() -> tuple:
    """What the C framer builds with and defers to (``_framer.bind``): the classes, the
    reference functions for what it is not sure of, the defaults, the search's answers, its
    keys' cache and the decoding of a value that needs it."""
    return (ProtocolError, Event, Frame, Frame.from_block, parse_plain_event,
            _block_content_length, _Framer.check_block, CONTENT_COMMAND_REPLY,
            (DEFAULT_MAX_FRAME_SIZE, DEFAULT_MAX_HEADER_BLOCK, DEFAULT_MAX_HEADERS,
             DEFAULT_MAX_LINE_LENGTH), _MISSING, _UNSURE, _search_keys, _search_keys_of,
            _decode_value, ARRAY_PREFIX)


if _framer is not None:
    _framer.bind(*framer_bindings())
    SessionParser = _framer.SessionParser
else:
    SessionParser = PySessionParser
# Whether sessions frame and search in C (the master warns at start when they cannot).
ACCELERATED = _framer is not None


class CommandParser(_Framer):
    """us → FreeSWITCH: feed bytes, get ``Command`` objects (for the simulator and tests).

    Header values are kept raw: FreeSWITCH does not url-decode what clients send.
    """

    __slots__ = ()

    def _frame(self, block: bytes, body: bytes | None, _common) -> Command:
        return _command_from_block(block, body)


def _command_from_block(block: bytes, body: bytes | None) -> Command:
    line, _, rest = block.partition(b"\n")
    return Command(line.decode("utf-8", "replace").strip("\r"),
                   Headers(_split_header_block(rest)), body)


def whole_commands(data: bytes) -> list[Command] | None:
    """The commands in ``data`` if it holds nothing but whole commands without a body, exactly as
    a CommandParser holding nothing would give them; else None, and a CommandParser must be fed.

    A FreeSWITCH reads most commands whole, one per read: this skips the framer for them. It
    declines whatever the framer has rules for (``\\r``, blank lines between blocks, a
    Content-Length in any case, a partial block, a frame over the size limit).
    """
    if (not data.endswith(b"\n\n") or data[:1] == b"\n" or b"\n\n\n" in data
            or len(data) > DEFAULT_MAX_FRAME_SIZE or not data.isascii() or b"\r" in data
            or b"content-length" in data.lower()):
        return None
    return [_command_from_block(block, None) for block in data[:-2].split(b"\n\n")]


# --------------------------------------------------------------------------------------------
# FreeSWITCH's side of the wire (used by the simulator and the tests)
# --------------------------------------------------------------------------------------------

# What switch_url_encode escapes: controls, space, non-ASCII, the unsafe set, and a "%" that does
# not already start an upper-case %XX (FreeSWITCH never double-encodes those).
_FS_ESCAPED = re.compile(rb'%(?![0-9A-F]{2})|[^\x21-\x7e]|[#&+:;<=>?@\[\\\]^`{|}"]')


def _percent(match: re.Match) -> bytes:
    return b"%%%02X" % match.group()[0]


@functools.lru_cache(maxsize=8192)   # the simulator encodes the same channel values per event
def fs_url_encode(value: str) -> str:
    """Encode a value as switch_url_encode does (%XX, upper-case hex).

    Like FreeSWITCH, an existing ``%XX`` with upper-case hex digits is left alone, which makes
    decoding lossy for values that already contain such sequences.
    """
    data = value.encode("utf-8")
    if _FS_ESCAPED.search(data) is None:
        return value
    return _FS_ESCAPED.sub(_percent, data).decode("ascii")


def serialize_headers_plain(headers: Iterable[tuple[str, str]]) -> bytes:
    """Header lines as switch_event_serialize writes them: values url-encoded, empty ones
    ``_undef_``."""
    return "".join(f"{name}: {fs_url_encode(value) if value != '' else '_undef_'}\n"
                   for name, value in headers).encode("utf-8")


def _end_plain(lines: bytes, body: bytes) -> bytes:
    if body:
        return lines + b"Content-Length: %d\n\n" % len(body) + body
    return lines + b"\n"


def serialize_event_plain(headers: Iterable[tuple[str, str]], body: bytes = b"") -> bytes:
    """An event serialised as switch_event_serialize writes it (the body of a text/event-plain)."""
    return _end_plain(serialize_headers_plain(headers), body)


def serialize_event_json(headers: Iterable[tuple[str, str]], body: bytes = b"") -> bytes:
    obj = dict(headers)
    if body:
        obj["Content-Length"] = str(len(body))
        obj["_body"] = body.decode("utf-8", "replace")
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def serialize_event_xml(headers: Iterable[tuple[str, str]], body: bytes = b"") -> bytes:
    """An event as switch_event_xmlize writes it: url-encoded values inside XML elements."""
    lines = ["<event>", "  <headers>"]
    lines += [f"    <{name}>{fs_url_encode(value)}</{name}>" for name, value in headers]
    lines.append("  </headers>")
    if body:
        lines.append(f"  <Content-Length>{len(body)}</Content-Length>")
        lines.append(f"  <body>{xml_escape(body.decode('utf-8', 'replace'))}</body>")
    lines.append("</event>")
    return ("\n".join(lines) + "\n").encode("utf-8")


_SERIALIZERS = {"plain": serialize_event_plain, "json": serialize_event_json,
                "xml": serialize_event_xml}


def event_frame(headers: Iterable[tuple[str, str]], body: bytes = b"", fmt: str = "plain"
                ) -> bytes:
    """A whole text/event-* frame, Content-Length first, as mod_event_socket writes it."""
    payload = _SERIALIZERS[_event_format(fmt)](headers, body)
    return _block([("Content-Length", len(payload)), ("Content-Type", f"text/event-{fmt}")]
                  ) + payload


def event_frame_plain(lines: bytes, body: bytes = b"") -> bytes:
    """A text/event-plain frame from header lines already serialised (serialize_headers_plain),
    for a simulator that sends the same channel headers in every event."""
    payload = _end_plain(lines, body)
    return b"Content-Length: %d\nContent-Type: text/event-plain\n\n" % len(payload) + payload


def reply_frame(text: str, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    return _block([("Content-Type", CONTENT_COMMAND_REPLY), ("Reply-Text", text), *extra])


def api_response_frame(body: bytes) -> bytes:
    return _block([("Content-Type", CONTENT_API_RESPONSE), ("Content-Length", len(body))]) + body


def connect_reply_frame(channel_data: Iterable[tuple[str, str]], socket_mode: str = "async",
                        control: str = "full") -> bytes:
    """The connect reply: CHANNEL_DATA serialised as an event-plain body, reply headers last."""
    return serialize_event_plain([*channel_data, ("Content-Type", CONTENT_COMMAND_REPLY),
                                  ("Reply-Text", "+OK\n"), ("Socket-Mode", socket_mode),
                                  ("Control", control)])


DISCONNECT_BODY = b"Disconnected, goodbye.\nSee you at ClueCon! http://www.cluecon.com/\n"


def linger_notice_frame(uuid: str, channel_name: str, linger_time: int) -> bytes:
    return _block([("Content-Type", CONTENT_DISCONNECT_NOTICE),
                   ("Controlled-Session-UUID", uuid), ("Content-Disposition", "linger"),
                   ("Channel-Name", channel_name), ("Linger-Time", linger_time),
                   ("Content-Length", 0)])


def disconnect_notice_frame(uuid: str) -> bytes:
    return _block([("Content-Type", CONTENT_DISCONNECT_NOTICE),
                   ("Controlled-Session-UUID", uuid), ("Content-Disposition", "disconnect"),
                   ("Content-Length", len(DISCONNECT_BODY))]) + DISCONNECT_BODY
