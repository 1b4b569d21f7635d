"""Messages between workers and the master: length-prefixed msgpack maps, sans-IO.

Each message is a 4-byte big-endian length and a msgpack map with a ``t`` (type) key. The framing
is ours, not msgpack's streaming unpacker, so the bytes of a half-received message can be handed
to the next master image across an in-place upgrade. Counters do not travel here: they are in
each worker's shared page (gateway.scoreboard). Workers send what they *say*:

* ``ready``: the app is imported and the worker accepts calls;
* ``hb``: heartbeat, the proof that the worker's event loop turns (about once a second);
* ``draining``: the worker stopped accepting and is finishing its calls, with its reason
  (drained, stopped, recycled, orphaned, app_exit), so the master can start its replacement
  at once;
* ``bye``: the last word of a planned exit, with its reason; a worker that ends without it
  crashed, whatever its exit code;
* ``boot_error`` / ``crash`` / ``app_exit``: the traceback that is about to end the worker, and
  for ``app_exit`` the code the app passed to sys.exit().
"""

from __future__ import annotations

import struct

import msgpack

HEADER = struct.Struct(">I")
MAX_MESSAGE = 1024 * 1024


class IPCError(Exception):
    """A worker sent bytes that are not our framing: its channel cannot be trusted any more."""


def pack(kind: str, **fields) -> bytes:
    fields["t"] = kind
    payload = msgpack.packb(fields, use_bin_type=True)
    return HEADER.pack(len(payload)) + payload


class MessageReader:
    """Feed bytes from a worker's socket, get complete messages (dicts) back."""

    def __init__(self, pending: bytes = b""):
        self.pending = bytearray(pending)   # bytes of a message not complete yet

    def feed(self, data: bytes) -> list[dict]:
        self.pending += data
        messages = []
        while len(self.pending) >= HEADER.size:
            (length,) = HEADER.unpack_from(self.pending)
            if length > MAX_MESSAGE:
                raise IPCError(f"message of {length} bytes exceeds {MAX_MESSAGE}")
            end = HEADER.size + length
            if len(self.pending) < end:
                break
            try:
                message = msgpack.unpackb(bytes(self.pending[HEADER.size:end]), raw=False)
            except ValueError as exc:
                raise IPCError(f"undecodable message: {exc}") from None
            del self.pending[:end]
            if isinstance(message, dict):
                messages.append(message)
        return messages
