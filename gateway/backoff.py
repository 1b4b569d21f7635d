"""Crash-loop protection and crash rates, per worker slot: when may a slot be respawned?

The rule, judged by what a worker did, never by how long it lived:

* A worker has **served** once it has completed a call, or has held a call in its handler for a
  heartbeat interval or more (a minutes-long IVR call completes long after a sporadic crash may
  have ended its worker). The worker sets this itself, in its shared counters (gateway.scoreboard),
  so it is known exactly even when the worker dies without a word.
* A worker that served and then died is replaced **at once, every time, however often**. It proved
  that the app loads, accepts and runs calls; its death is a sporadic crash (one call in a few
  hundred hitting a bug), and the fastest replacement is what serves callers best: while it
  boots, new calls wait in the kernel's accept queue and the other workers take them. Waiting
  would only turn a crash that costs the calls in flight into an outage. At 1 % crashing calls
  and 250 calls/s a worker lives about 0.4 s; any rule that counts seconds since ready calls
  that a crash loop, which is how a first release turned a 1 % crash into a 10-second outage.
* A worker that died **before it served** (a boot failure, a crash on its first call, a hang
  before any call completed) tells nothing good about the next one. The first such death in a
  row is replaced at once (a one-off must not cost capacity); every further one in a row waits
  longer, einhorn-style: 1 s, 1.5 s, 2.25 s ... capped at 30 s. That is a **crash loop**: the slot
  neither forks hot nor fills the log, while the master, the port and the other slots carry on.
  One worker that serves ends the loop.
* A worker that took calls and died before it served, **while a sibling of its generation has
  served and is still up**, is replaced at once as well: the app demonstrably loads and completes calls right
  now, so this death is a sporadic crash that came early. At 500 calls/s and 1 % crashing calls
  a fresh worker takes several calls before its first completes, and about one in ten dies
  first; judged alone, two such deaths in a row would take the slot for a crash loop in most
  10-second runs. A crash on every call leaves no sibling that served; a worker that cannot
  boot (a broken deploy of a file it reads, while its sibling serves on what it loaded before)
  took no call.
* A worker stopped on purpose (drained, recycled, stopped) or killed from outside (an operator's
  SIGKILL, not the app's fault) says nothing about the app: it neither extends nor ends a loop.

Deaths (every exit that was not planned: crashes, the app's own exits, kills, hangs, boot
errors) are also counted per slot and in total, with the calls completed per death, so the crash
rate is visible in /stats, /metrics and ``esl-gateway stats`` long before it becomes an outage.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

BASE_DELAY = 1.0
FACTOR = 1.5
MAX_DELAY = 30.0
RATE_WINDOW = 60.0   # deaths "per minute" are the deaths of the last RATE_WINDOW seconds


@dataclass
class SlotHistory:
    """What one slot's workers did: deaths, calls completed, and its crash loop if any."""

    deaths: deque = field(default_factory=deque)   # monotonic times, the last RATE_WINDOW s
    deaths_total: int = 0
    completed_by_dead: int = 0       # calls completed by this slot's workers that are gone
    unserved_in_a_row: int = 0       # deaths before serving, since the last worker that served
    not_before: float = 0.0          # monotonic time of the next allowed spawn
    loop_reason: str | None = None   # how the last unserved worker ended, while in a loop


class RespawnBackoff:
    """Every slot's history; a slot is any hashable key, e.g. (generation, slot).

    A slot is *vacated* when its worker leaves service: it dies, or it starts draining (its
    replacement starts at once). That is when the rule above is applied. Deaths and completed
    calls are counted when the worker's process ends.
    """

    def __init__(self, base: float = BASE_DELAY, factor: float = FACTOR,
                 cap: float = MAX_DELAY):
        self.base, self.factor, self.cap = base, factor, cap
        self.slots: dict = {}
        self.deaths: deque = deque()   # all slots, the last RATE_WINDOW seconds
        self.deaths_total = 0

    def vacated(self, slot, *, app_fault: bool, served: bool, now: float,
                detail: str = "", sibling_serves: bool = False) -> float:
        """Apply the rule; return how long the slot must wait before its next spawn.

        ``app_fault``: the app ended the worker (it crashed, exited, hung or could not boot);
        a planned exit or a kill from outside leaves the slot's record as it was.
        ``sibling_serves``: the worker took calls, and a live one of its generation has served.
        """
        history = self.slots.setdefault(slot, SlotHistory())
        if not app_fault:
            return max(history.not_before - now, 0.0)
        if served or sibling_serves:
            history.unserved_in_a_row, history.not_before, history.loop_reason = 0, 0.0, None
            return 0.0
        history.unserved_in_a_row += 1
        count = history.unserved_in_a_row
        delay = 0.0 if count == 1 else min(self.base * self.factor ** (count - 2), self.cap)
        history.not_before = now + delay
        history.loop_reason = detail if count > 1 else None
        return delay

    def ended(self, slot, *, death: bool, completed: int, now: float) -> None:
        """A worker's process is gone: count its death (if it was not planned) and its calls."""
        history = self.slots.setdefault(slot, SlotHistory())
        history.completed_by_dead += completed
        if death:
            history.deaths_total += 1
            self.deaths_total += 1
            for deaths in (history.deaths, self.deaths):
                deaths.append(now)
                _trim(deaths, now)

    def in_loop(self, slot) -> int:
        """Deaths before serving in a row (2 or more is a crash loop)."""
        history = self.slots.get(slot)
        return history.unserved_in_a_row if history else 0

    def may_spawn(self, slot, now: float) -> bool:
        history = self.slots.get(slot)
        return history is None or now >= history.not_before

    def next_spawn_in(self, now: float) -> float | None:
        """Seconds until the earliest delayed slot may spawn, or None if none is waiting."""
        waits = [h.not_before - now for h in self.slots.values() if h.not_before > now]
        return min(waits) if waits else None

    def retain(self, slots) -> None:
        """Forget every slot not in ``slots`` (gone generations, removed workers)."""
        for slot in [s for s in self.slots if s not in slots]:
            del self.slots[slot]

    def deaths_per_minute(self, now: float, slot=None) -> int:
        """Deaths in the last RATE_WINDOW seconds, of one slot or of all."""
        deaths = self.deaths if slot is None else self.slots[slot].deaths
        _trim(deaths, now)
        return len(deaths)

    def export(self) -> dict:
        """Plain data for an upgrade's new image (monotonic times stay valid across exec)."""
        return {"deaths": list(self.deaths), "deaths_total": self.deaths_total,
                "slots": [[*key, {**vars(h), "deaths": list(h.deaths)}]
                          for key, h in self.slots.items()]}

    def restore(self, state: dict) -> None:
        self.deaths, self.deaths_total = deque(state["deaths"]), state["deaths_total"]
        for generation, slot, fields in state["slots"]:
            self.slots[(generation, slot)] = SlotHistory(
                **dict(fields, deaths=deque(fields["deaths"])))


def _trim(deaths: deque, now: float) -> None:
    while deaths and deaths[0] <= now - RATE_WINDOW:
        deaths.popleft()


def per_death(completed: int, deaths: int) -> float | None:
    """Calls completed per death (None before the first death)."""
    return round(completed / deaths, 1) if deaths else None
