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

The master sends ``serve`` (a spare takes a slot), ``resume`` (take over an orphaned call;
its socket travels with the message, SCM_RIGHTS) and ``listening`` (an undrain: the listeners a
drain shut down listen again, see gateway.drain).

Beside this channel each worker has its *call ledger*: a socket on which it passes the master a
copy of every call's socket as it accepts it (SCM_RIGHTS) and says when each call ends. Records
are 9 bytes (a kind and a call id), the cheapest thing a worker can write per call, and the
master reads the ledgers every LEDGER_POLL seconds while calls come and go, and only watches them
while none do (the first record after a quiet spell wakes it): descriptors in flight on a socket
reach the reader even after the sender is dead, so the master learns every call a worker held
however suddenly it dies, without waking up per call, nor ten times a second when idle.
"""

from __future__ import annotations

import struct

import msgpack

HEADER = struct.Struct(">I")
MAX_MESSAGE = 1024 * 1024
LEDGER_RECORD = struct.Struct(">cq")
OPENED, CLOSED = b"o", b"c"   # OPENED carries the call's socket; CLOSED says the call ended
LEDGER_POLL = 0.1
# Proxy mode: what a heartbeat reports of each backend (counters only ever grow).
BACKEND_COUNTERS = ("connects", "refused", "retries", "relayed", "bytes_to_backend",
                    "bytes_to_freeswitch", "died_mid_call", "reconnected", "waited_ms")


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


def ledger_record(kind: bytes, call_id: int) -> bytes:
    return LEDGER_RECORD.pack(kind, call_id)


class LedgerReader:
    """The master's reader of one worker's call ledger: feed bytes and the descriptors that
    came with them; get (kind, call id, descriptor or None) back, in order."""

    def __init__(self, pending: bytes = b"", fds=()):
        self.pending = bytearray(pending)
        self.fds = list(fds)   # received, not yet matched to their OPENED record

    def feed(self, data: bytes, fds) -> list[tuple[bytes, int, int | None]]:
        self.pending += data
        self.fds += fds
        size = LEDGER_RECORD.size
        count = len(self.pending) // size
        records = []
        for kind, call_id in LEDGER_RECORD.iter_unpack(self.pending[:count * size]):
            if kind == OPENED:
                if not self.fds:
                    raise IPCError(f"call {call_id} was opened without its socket")
                records.append((kind, call_id, self.fds.pop(0)))
            elif kind == CLOSED:
                records.append((kind, call_id, None))
            else:
                raise IPCError(f"unknown ledger record {kind!r}")
        del self.pending[:count * size]
        return records
