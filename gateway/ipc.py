"""Messages between workers and the master: msgpack maps on a stream socket, sans-IO.

Each message is a map with a ``t`` (type) key. Workers send:

* ``ready``: the app is imported and the worker accepts calls;
* ``hb``: heartbeat with the worker's counters (batched: one message a second, not one per event);
* ``exiting``: the worker is leaving on purpose, with its reason (drained, master gone, ...);
* ``boot_error`` / ``crash``: the traceback that is about to kill the worker.
"""

from __future__ import annotations

import msgpack

MAX_MESSAGE_BUFFER = 1024 * 1024


def pack(kind: str, **fields) -> bytes:
    fields["t"] = kind
    return msgpack.packb(fields, use_bin_type=True)


class MessageReader:
    """Feed bytes from a worker's socket, get complete messages (dicts) back."""

    def __init__(self):
        self._unpacker = msgpack.Unpacker(raw=False, max_buffer_size=MAX_MESSAGE_BUFFER)

    def feed(self, data: bytes) -> list[dict]:
        self._unpacker.feed(data)
        return [message for message in self._unpacker if isinstance(message, dict)]
