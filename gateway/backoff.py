"""Crash-loop protection: when may a worker slot be respawned?

A worker that dies before it is ready, or crashes within a few seconds of becoming ready, is an
"early death". The first one is replaced at once (a one-off crash must not cost capacity); every
further early death in a row waits longer, einhorn-style: 1 s, 1.5 s, 2.25 s ... capped at 30 s.
So a broken deploy never becomes a fork bomb, while the master, the port and the other slots'
workers carry on. A death that is not early (a long-lived worker, a kill from outside) resets the
slot.
"""

from __future__ import annotations

BASE_DELAY = 1.0
FACTOR = 1.5
MAX_DELAY = 30.0
CRASH_WINDOW = 5.0   # a crash this soon after becoming ready still counts as a crash loop


class RespawnBackoff:
    """Respawn delays per worker slot; a slot is any hashable key, e.g. (generation, slot)."""

    def __init__(self, base: float = BASE_DELAY, factor: float = FACTOR,
                 cap: float = MAX_DELAY):
        self.base, self.factor, self.cap = base, factor, cap
        self.failures: dict = {}      # slot -> early deaths in a row
        self.not_before: dict = {}    # slot -> monotonic time of its next allowed spawn

    def record_exit(self, slot, early: bool, now: float) -> float:
        """Note a worker's death; return how long the slot must wait before its next spawn."""
        if not early:
            self.failures.pop(slot, None)
            self.not_before.pop(slot, None)
            return 0.0
        count = self.failures[slot] = self.failures.get(slot, 0) + 1
        delay = 0.0 if count == 1 else min(self.base * self.factor ** (count - 2), self.cap)
        self.not_before[slot] = now + delay
        return delay

    def may_spawn(self, slot, now: float) -> bool:
        return now >= self.not_before.get(slot, 0.0)

    def next_spawn_in(self, now: float) -> float | None:
        """Seconds until the earliest delayed slot may spawn, or None if none is waiting."""
        waits = [at - now for at in self.not_before.values() if at > now]
        return min(waits) if waits else None

    def retain(self, slots) -> None:
        """Forget every slot not in ``slots`` (gone generations, removed workers)."""
        for slot in [s for s in self.failures if s not in slots]:
            self.failures.pop(slot, None)
            self.not_before.pop(slot, None)
