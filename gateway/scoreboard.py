"""Each worker's counters in a page of shared memory: the worker writes, the master reads.

Counters sent in heartbeats would lag by up to a heartbeat, and a worker that dies without a word
(``os._exit`` in the app, SIGKILL, the OOM killer) would take its last second of counts with it.
At 1 % crashing calls and 250 calls/s per worker a worker lives about 0.4 s, so most lives would
never report at all, and the master could not tell a worker that served hundreds of calls from
one that never served one. A shared page (Apache's "scoreboard") is exact at any moment,
including after the worker is gone, and costs the worker a memory write per update.

The page is a memfd, so an in-place upgrade hands it to the new master image with the worker's
other file descriptors. Values are unsigned 64-bit; an aligned 8-byte store is atomic on the
machines we run on, so the master never reads a torn value.
"""

from __future__ import annotations

import mmap
import os

# Every value a worker keeps; the index of each is its position here.
FIELDS = ("calls",              # calls accepted
          "completed",          # calls whose handler returned (or the caller hung up under it)
          "failed",             # calls that failed in setup or in the handler
          "handler_exceptions",
          "protocol_errors",
          "events", "commands",   # copied from the sessions' counters at each call's end
          "accept_errors",
          "active",             # calls in progress now
          "longest_block_ms",   # the longest event-loop stall the loop watchdog saw
          "served",             # 1 once the worker has completed a call or held one for a while
          "pid",                # written by the fork server's helper for a worker it forked
          "unprotected",        # calls whose socket could not be passed to the master
          # Calls taken over from a worker that died (or a generation that had to close): the
          # resume hook ran; --orphan-action ran; the call had ended meanwhile; it failed.
          "resumed", "resumed_fallback", "resumed_gone", "resumed_failed",
          "peers_refused",      # connections from outside --allow, closed unanswered
          "handshake_timeouts")  # connections closed for not answering connect in time
INDEX = {name: index for index, name in enumerate(FIELDS)}
SIZE = mmap.PAGESIZE
assert len(FIELDS) * 8 <= SIZE


class CounterBlock:
    """One worker's counters, created by the master just before the worker's fork()."""

    def __init__(self, fd: int | None = None):
        if fd is None:
            fd = os.memfd_create("esl-gateway-counters", os.MFD_CLOEXEC)
            os.ftruncate(fd, SIZE)
        self.fd = fd
        self._map = mmap.mmap(fd, SIZE)
        self.values = memoryview(self._map).cast("Q")   # values[INDEX["calls"]] += 1

    def read(self) -> dict[str, int]:
        values = self.values
        return {name: values[index] for index, name in enumerate(FIELDS)}

    def close(self) -> None:
        """Unmap and close (idempotent). The worker's own mapping, if any, is unaffected."""
        if self.fd < 0:
            return
        self.values.release()
        self._map.close()
        os.close(self.fd)
        self.fd = -1
